//! `[registry.kubernetes]` and `[registry.consul]`: the control planes the agent can follow.
//! Checked with the rest of the file, so a mistake here names its line and field and the agent
//! does not start.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::HumanDuration;
use crate::defaults;

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

/// Where the Consul source reads services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulConfig {
    /// The agent's (or a server's) HTTP API: `http://host:8500` or `https://host:8501`.
    pub address: String,
    /// ACL token sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Read the token from this file instead (at each connect: a rotated token is taken).
    pub token_file: Option<PathBuf>,
    /// The CA that signed the server's certificate (needed for `https://`).
    pub ca: Option<PathBuf>,
    /// Datacenter to ask about (`None`: the agent's own).
    pub datacenter: Option<String>,
    /// How long one blocking query may wait for a change (Consul caps it at 10 minutes).
    pub wait: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsul {
    #[serde(default = "default_consul_address")]
    address: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    datacenter: Option<String>,
    wait: Option<HumanDuration>,
}

fn default_consul_address() -> String {
    defaults::CONSUL_ADDRESS.into()
}

impl RawConsul {
    pub(super) fn check(self) -> Result<ConsulConfig, String> {
        let address = self.address.trim_end_matches('/').to_owned();
        let https = address.starts_with("https://");
        if !https && !address.starts_with("http://") {
            return Err(format!(
                "address: {:?} must start with http:// or https://",
                self.address
            ));
        }
        let rest = address.split_once("://").map_or("", |(_, r)| r);
        if rest.is_empty() || rest.contains('/') {
            return Err(format!(
                "address: {:?} must be scheme://host:port, without a path",
                self.address
            ));
        }
        match (https, &self.ca) {
            (true, None) => return Err("ca: an https:// address needs the server's CA".into()),
            (false, Some(_)) => return Err("ca: the address is plain http://".into()),
            _ => {}
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err("token, token_file: give one or neither".into());
        }
        let wait = self.wait.map_or(defaults::CONSUL_WAIT, |d| d.0);
        if wait < Duration::from_secs(1) || wait > Duration::from_secs(600) {
            return Err("wait: must be between 1s and 10m (Consul's own cap)".into());
        }
        Ok(ConsulConfig {
            address,
            token: self.token,
            token_file: self.token_file,
            ca: self.ca,
            datacenter: self.datacenter.filter(|d| !d.is_empty()),
            wait,
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

    #[test]
    fn reads_a_consul_section() {
        let c = parse("[registry.consul]\ntoken = \"t\"\nwait = \"30s\"\n").unwrap();
        let consul = c.registry.consul.unwrap();
        assert_eq!(consul.address, defaults::CONSUL_ADDRESS);
        assert_eq!(consul.wait, Duration::from_secs(30));
        assert_eq!(consul.token.as_deref(), Some("t"));
        for (text, want) in [
            ("address = \"https://c:8501\"", "ca: an https"),
            ("address = \"c:8500\"", "address: "),
            ("address = \"http://c:8500/v1\"", "without a path"),
            ("ca = \"/ca.pem\"", "plain http"),
            ("wait = \"11m\"", "wait: "),
            ("token = \"a\"\ntoken_file = \"/t\"", "token, token_file"),
        ] {
            let e = parse(&format!("[registry.consul]\n{text}\n")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
