//! `[registry.kubernetes]`: where the Kubernetes source reads Services and EndpointSlices.
//! Checked with the rest of the file, so a mistake here names its line and field and the agent
//! does not start.

use std::path::PathBuf;

use serde::Deserialize;

/// Where the Kubernetes source reads Services and EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// A kubeconfig file; `None`: the in-cluster service account (the pod's token, CA and
    /// `KUBERNETES_SERVICE_HOST`).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (`None`: its current context).
    pub context: Option<String>,
    /// This node's name, for topology: from the config, else `$NODE_NAME` (the DaemonSet sets
    /// it from `spec.nodeName`). `None`: endpoints are not told apart by node.
    pub node_name: Option<String>,
    /// Send new connections only to ready endpoints on this node while there are any (the others
    /// take over when none is left). Needs `node_name`.
    pub prefer_local: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    node_name: Option<String>,
    #[serde(default)]
    prefer_local: bool,
}

impl RawKubernetes {
    /// The checked section; the error names the field. `env_node` is `$NODE_NAME`.
    pub(super) fn check(self, env_node: Option<String>) -> Result<KubernetesConfig, String> {
        if self
            .kubeconfig
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("kubeconfig: leave it out for the in-cluster account".into());
        }
        if self.context.is_some() && self.kubeconfig.is_none() {
            return Err("context: only with a kubeconfig".into());
        }
        let node_name = self
            .node_name
            .or(env_node)
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        if self.prefer_local && node_name.is_none() {
            return Err(
                "prefer_local: needs this node's name (node_name, or NODE_NAME in the environment)"
                    .into(),
            );
        }
        Ok(KubernetesConfig {
            kubeconfig: self.kubeconfig,
            context: self.context,
            node_name,
            prefer_local: self.prefer_local,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::AgentConfig;

    const HEAD: &str = "[datapath]\ncgroup = \"pods\"\n";

    fn parse(rest: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("t.toml"), &format!("{HEAD}{rest}")).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_a_kubernetes_section() {
        let c = parse(
            "[registry.kubernetes]\nkubeconfig = \"/etc/k.conf\"\nnode_name = \"n1\"\n\
             prefer_local = true\n",
        )
        .unwrap();
        let k = c.registry.kubernetes.unwrap();
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/etc/k.conf")));
        assert_eq!(k.node_name.as_deref(), Some("n1"));
        assert!(k.prefer_local);
        let in_cluster = RawKubernetes {
            kubeconfig: None,
            context: None,
            node_name: None,
            prefer_local: false,
        };
        let k = in_cluster.check(Some("from-env".into())).unwrap();
        assert_eq!(k.node_name.as_deref(), Some("from-env"));
        let e = parse("[registry.kubernetes]\ncontext = \"x\"\n").unwrap_err();
        assert!(e.contains("line 3: registry.kubernetes: context"), "{e}");
        let e = parse("[registry.kubernetes]\nfoo = 1\n").unwrap_err();
        assert!(e.contains("unknown field `foo`"), "{e}");
    }
}
