//! The manifests in `deploy/`, checked offline (no cluster is reachable here). What is checked:
//!
//! 1. **Schema**: every YAML document of `deploy/*.yaml` and `deploy/cleanup/*.yaml` parses,
//!    names a kind this check knows, and reads into that kind's Kubernetes 1.33 API type
//!    (k8s-openapi); written back out, it still holds every field and value of the original, so
//!    a misspelt or misplaced field (which the types would drop) or a value of the wrong type
//!    fails.
//! 2. **Agreement between them**: the DaemonSet runs as the ServiceAccount that the
//!    ClusterRoleBinding binds to the ClusterRole; it mounts the ConfigMap; the config it
//!    renders (the init container's `${NODE_IP}` substitution) passes `switchyard check-config`;
//!    its `pin_dir`, `state_dir`, API socket and metrics port are the paths and port the
//!    DaemonSet mounts, probes and announces to Prometheus; the cleanup DaemonSet cleans the
//!    same pin dir.
//! 3. **Policy**: the ClusterRole grants get/list/watch on services, endpointslices, httproutes
//!    and grpcroutes and nothing else; the agent container is not privileged, drops every
//!    capability and adds exactly BPF, NET_ADMIN, SYS_ADMIN and SYS_PTRACE; hostNetwork;
//!    tolerates every taint; RollingUpdate with maxUnavailable 1; the bpffs mount is HostToContainer; readiness on
//!    /readyz and liveness on /healthz; resources are set on every container.
//!
//! Not checked: admission by a real API server (Pod Security, webhooks), that the images exist,
//! or behaviour on a real cluster.

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every manifest, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("cleanup")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 5, "manifests missing: {files:?}");
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path
            .strip_prefix(deploy_dir())
            .unwrap()
            .display()
            .to_string();
        let parsed: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
        for doc in parsed.into_iter().filter(|d| !d.is_null()) {
            docs.push((name.clone(), doc));
        }
    }
    docs
}

/// Paths in `original` whose value `back` lacks or differs on.
fn lost(original: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        _ => out.push(format!("{path}: {original} became {back}")),
    }
}

/// Reads `doc` as `T` and checks that nothing was dropped or changed on the way.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {}: {e}", doc["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    let mut missing = Vec::new();
    lost(doc, &back, "", &mut missing);
    assert!(
        missing.is_empty(),
        "{file}: {} fields unknown to the API or of the wrong type: {missing:#?}",
        doc["kind"]
    );
    t
}

#[derive(Default)]
struct Manifests {
    daemonsets: BTreeMap<String, DaemonSet>,
    config_maps: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    namespaces: Vec<Namespace>,
}

fn manifests() -> Manifests {
    let mut m = Manifests::default();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "DaemonSet" => {
                let d: DaemonSet = typed(&file, &doc);
                m.daemonsets
                    .insert(d.metadata.name.clone().unwrap_or_default(), d);
            }
            "ConfigMap" => m.config_maps.push(typed(&file, &doc)),
            "ServiceAccount" => m.service_accounts.push(typed(&file, &doc)),
            "ClusterRole" => m.roles.push(typed(&file, &doc)),
            "ClusterRoleBinding" => m.bindings.push(typed(&file, &doc)),
            "Namespace" => m.namespaces.push(typed(&file, &doc)),
            other => panic!("{file}: kind {other:?} is not one this check knows"),
        }
    }
    m
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers.iter().find(|c| c.name == "agent").unwrap()
}

/// A TOML value of the config (the one line `key = "value"` under `[section]`).
fn config_value(toml: &str, section: &str, key: &str) -> String {
    let mut current = "";
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line;
            continue;
        }
        if current == format!("[{section}]")
            && let Some(v) = line.strip_prefix(&format!("{key} = "))
        {
            return v.trim_matches('"').to_owned();
        }
    }
    panic!("no {key} in [{section}]");
}

#[test]
fn every_manifest_reads_into_its_api_type_without_losing_a_field() {
    let m = manifests();
    assert_eq!(m.daemonsets.len(), 2, "the agent and the cleanup");
    assert_eq!(m.config_maps.len(), 1);
    assert_eq!(m.service_accounts.len(), 1);
    assert_eq!(m.roles.len(), 1);
    assert_eq!(m.bindings.len(), 1);
    assert_eq!(m.namespaces.len(), 1);
}

#[test]
fn the_cluster_role_reads_services_endpointslices_and_routes_and_nothing_else() {
    let m = manifests();
    let rules = m.roles[0].rules.clone().unwrap_or_default();
    let mut grants = Vec::new();
    for r in &rules {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                let mut verbs = r.verbs.clone();
                verbs.sort();
                grants.push((g.clone(), res.clone(), verbs));
            }
        }
    }
    grants.sort();
    let verbs = vec!["get".to_owned(), "list".into(), "watch".into()];
    assert_eq!(
        grants,
        [
            ("".to_owned(), "services".to_owned(), verbs.clone()),
            (
                "discovery.k8s.io".into(),
                "endpointslices".into(),
                verbs.clone()
            ),
            (
                "gateway.networking.k8s.io".into(),
                "grpcroutes".into(),
                verbs.clone()
            ),
            (
                "gateway.networking.k8s.io".into(),
                "httproutes".into(),
                verbs
            ),
        ]
    );

    // Bound to the ServiceAccount the DaemonSet runs as.
    let sa = &m.service_accounts[0].metadata;
    let binding = &m.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        m.roles[0].metadata.name.as_ref()
    );
    let subjects = binding.subjects.clone().unwrap_or_default();
    assert!(subjects.iter().any(|s| s.kind == "ServiceAccount"
        && Some(&s.name) == sa.name.as_ref()
        && s.namespace == sa.namespace));
    let ds = &m.daemonsets["switchyard"];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, sa.name);
    assert_eq!(ds.metadata.namespace, sa.namespace);
}

#[test]
fn the_agent_daemonset_is_least_privilege_on_every_node() {
    let m = manifests();
    let ds = &m.daemonsets["switchyard"];
    let spec = ds.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "must tolerate every taint"
    );

    let agent = agent_container(ds);
    let sc = agent.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "the agent is not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    let mut add = caps.add.clone().unwrap_or_default();
    add.sort();
    assert_eq!(add, ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert!(c.resources.is_some(), "{}: no resources", c.name);
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
        assert_ne!(privileged, Some(true), "{} is privileged", c.name);
    }

    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| (h.path.clone().unwrap_or_default(), h.port.clone()))
    };
    let metrics = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9479);
    assert_eq!(
        probe_path(&agent.readiness_probe),
        Some(("/readyz".into(), metrics.clone()))
    );
    assert_eq!(
        probe_path(&agent.liveness_probe),
        Some(("/healthz".into(), metrics))
    );
}

/// An upgrade starts the new pod before the old one stops, the new agent takes the listeners
/// over, and the old one has the time to drain (docs/zero-downtime.md).
#[test]
fn the_agent_daemonset_upgrades_without_downtime() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let m = manifests();
    let ds = &m.daemonsets["switchyard"];
    let spec = ds.spec.as_ref().unwrap();
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let pod = spec.template.spec.as_ref().unwrap();
    let agent = agent_container(ds);
    // With hostNetwork a declared port is a hostPort, and a surge pod asking for the old pod's
    // hostPorts is never scheduled on its node.
    assert!(
        agent.ports.as_ref().is_none_or(Vec::is_empty),
        "no ports on a surging hostNetwork pod"
    );
    let args = agent.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--wait-after-handover"),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a == "--no-handover"), "{args:?}");
    // The grace period covers the drain (the agent's default, or the config's) plus a margin.
    let cm = &m.config_maps[0];
    let template = cm.data.as_ref().unwrap()["agent.toml"].clone();
    let drain: i64 = config_value(&template, "forwarder", "drain_on_exit")
        .trim_end_matches('s')
        .parse()
        .expect("drain_on_exit in whole seconds");
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(grace >= drain + 5, "grace {grace}s, drain {drain}s");
    // Both pods mount the same run directory: the new agent finds the old one's handover
    // socket there, beside the API socket.
    let run = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "run")
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.clone());
    assert_eq!(run.as_deref(), Some("/run/switchyard"));
    assert_eq!(
        config_value(&template, "api", "socket"),
        "/run/switchyard/api.sock"
    );
}

#[test]
fn the_config_the_daemonset_renders_is_accepted_and_matches_its_mounts() {
    let m = manifests();
    let ds = &m.daemonsets["switchyard"];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let agent = agent_container(ds);
    let cm = &m.config_maps[0];
    let template = cm.data.as_ref().unwrap()["agent.toml"].clone();

    // The ConfigMap is what the init container reads, and it writes where the agent reads.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let template_volume = volumes
        .iter()
        .find(|v| {
            v.config_map
                .as_ref()
                .is_some_and(|c| Some(&c.name) == cm.metadata.name.as_ref())
        })
        .expect("the ConfigMap is mounted");
    let render = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "render-config")
        .unwrap();
    let script = render.command.clone().unwrap().join(" ");
    let mount_of = |c: &Container, volume: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .cloned()
            .unwrap_or_else(|| panic!("{} does not mount {volume}", c.name))
    };
    let template_dir = mount_of(render, &template_volume.name).mount_path;
    assert!(
        script.contains(&format!("{template_dir}/agent.toml")),
        "{script}"
    );
    let args = agent.args.clone().unwrap_or_default();
    let config_path = args[args.iter().position(|a| a == "--config").unwrap() + 1].clone();
    assert!(script.contains(&format!("> {config_path}")), "{script}");
    assert_eq!(
        mount_of(render, "config").mount_path,
        mount_of(agent, "config").mount_path
    );

    // Rendered as the init container does, the agent accepts it.
    let rendered = template.replace("${NODE_IP}", "192.0.2.7");
    let dir = switchyard_testkit::servers::TempDir::new("sy-deploy-").unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &rendered).unwrap();
    let out = Command::new(switchyard_testkit::binary("SWITCHYARD_BIN", "switchyard"))
        .arg("check-config")
        .arg(&file)
        .env("NODE_NAME", "node-1")
        .output()
        .expect("switchyard check-config runs");
    assert!(
        out.status.success(),
        "the rendered config is refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Its paths are the host paths the DaemonSet mounts.
    let host_path = |mount_path: &str| {
        let m = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|v| mount_path.starts_with(&v.mount_path))
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        (m.clone(), v.host_path.as_ref().map(|h| h.path.clone()))
    };
    let pin_dir = config_value(&template, "datapath", "pin_dir");
    let (bpf, host) = host_path(&pin_dir);
    assert_eq!(host.as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(bpf.mount_propagation.as_deref(), Some("HostToContainer"));
    let (_, host) = host_path(&config_value(&template, "registry", "state_dir"));
    assert_eq!(host.as_deref(), Some("/var/lib/switchyard"));
    let (_, host) = host_path(&config_value(&template, "api", "socket"));
    assert_eq!(host.as_deref(), Some("/run/switchyard"));
    let (_, host) = host_path("/sys/fs/cgroup");
    assert_eq!(host.as_deref(), Some("/sys/fs/cgroup"));

    // The metrics port is the one probed and announced (no `ports:`: see the upgrade test).
    let listen = config_value(&template, "metrics", "listen");
    let port: i32 = listen.rsplit(':').next().unwrap().parse().unwrap();
    for probe in [&agent.readiness_probe, &agent.liveness_probe] {
        let probed = probe.as_ref().and_then(|p| p.http_get.as_ref());
        assert_eq!(
            probed.map(|h| h.port.clone()),
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port))
        );
    }
    let annotations = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/scrape"], "true");

    // The cleanup DaemonSet cleans the same pin dir, on the same host bpffs.
    let cleanup = &m.daemonsets["switchyard-cleanup"];
    let cpod = cleanup
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let job = &cpod.init_containers.as_ref().unwrap()[0];
    let args = job.args.clone().unwrap().join(" ");
    assert_eq!(args, format!("cleanup --pin-dir {pin_dir}"));
    let bpffs = cpod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.as_ref())
        .map(|h| h.path.clone());
    assert_eq!(bpffs.as_deref(), Some("/sys/fs/bpf"));
}
