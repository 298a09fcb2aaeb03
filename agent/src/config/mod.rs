//! The agent's configuration file (TOML): where to attach, where the forwarder listens, and the
//! services of the file source.
//!
//! A file is taken whole or not at all: any error names the line and the field, and nothing of
//! the file is applied.

mod consul;
mod control;
mod dns;
mod etcd;
mod kubernetes;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

pub use consul::ConsulConfig;
pub use control::{ApiConfig, MetricsConfig};
pub use dns::{DnsConfig, DnsRecord};
pub use etcd::{EtcdConfig, EtcdTls};
pub use kubernetes::KubernetesConfig;

pub use crate::catalog::duration::HumanDuration;
use crate::{
    catalog::{Catalog, entry::RawService},
    defaults,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}, line {line}: {entry}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        entry: String,
        reason: String,
    },
}

/// Kernel-side log level (aya-log): what the programs send to the agent's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLog {
    Off,
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl KernelLog {
    /// The value of aya-log-ebpf's `AYA_LOG_LEVEL` global.
    pub fn level(self) -> u8 {
        match self {
            KernelLog::Off => 0,
            KernelLog::Error => 1,
            KernelLog::Warn => 2,
            KernelLog::Info => 3,
            KernelLog::Debug => 4,
            KernelLog::Trace => 5,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DatapathConfig {
    /// The cgroup v2 whose processes are steered: absolute, or relative to the cgroup v2 mount.
    pub cgroup: PathBuf,
    pub kernel_log: KernelLog,
    /// Where maps and links are pinned (a bpffs directory; mounted by the agent if need be).
    /// `None`: `/sys/fs/bpf/switchyard`, or `/run/switchyard/bpffs` where `/sys/fs/bpf` is not
    /// a bpffs.
    pub pin_dir: Option<PathBuf>,
    /// Cgroups (with everything below them) whose connections are never steered: a sidecar
    /// mesh's, say. Relative to the cgroup v2 mount, or absolute.
    pub exclude_cgroups: Vec<PathBuf>,
    /// Destination ports never steered.
    pub exclude_ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ForwarderConfig {
    /// Node addresses the forwarder listens on: one per family it serves. Pods live in their
    /// own network namespaces, so this cannot be loopback for them.
    pub listen: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub retries: u32,
    /// Forwarder threads; 0: one per CPU the agent may run on.
    pub threads: usize,
    /// How long a stopping (or handed-over) agent keeps copying its open connections.
    pub drain_on_exit: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RegistryConfig {
    /// Where the last-known-good catalog is kept; `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// `[registry.etcd]`: services under a key prefix, watched.
    pub etcd: Option<EtcdConfig>,
    /// `[[registry.dns]]`: services whose backends a DNS name gives, re-resolved by TTL.
    pub dns: Vec<DnsConfig>,
    /// `[registry.kubernetes]`: Services and EndpointSlices, watched.
    pub kubernetes: Option<KubernetesConfig>,
    /// `[registry.consul]`: services with a VIP tag or meta key, by blocking queries.
    pub consul: Option<ConsulConfig>,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub datapath: DatapathConfig,
    pub forwarder: ForwarderConfig,
    pub registry: RegistryConfig,
    /// `[api]`: the local API's Unix socket.
    pub api: ApiConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The services the file names.
    pub catalog: Catalog,
    /// `[[route]]`: HTTP routes, checked against the file's services and gateways.
    pub routes: Vec<crate::http::route::RawRoute>,
    /// `[[gateway]]`: HTTP listeners for clients the hooks do not steer.
    pub gateways: Vec<crate::http::gateway::GatewayConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    datapath: RawDatapath,
    #[serde(default)]
    forwarder: RawForwarder,
    #[serde(default)]
    registry: RawRegistry,
    #[serde(default)]
    api: control::RawApi,
    #[serde(default)]
    metrics: control::RawMetrics,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
    #[serde(default, rename = "route")]
    routes: Vec<crate::http::route::RawRoute>,
    #[serde(default, rename = "gateway")]
    gateways: Vec<crate::http::gateway::GatewayConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    cgroup: String,
    #[serde(default)]
    kernel_log: KernelLog,
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    exclude_cgroups: Vec<PathBuf>,
    #[serde(default)]
    exclude_ports: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// `""` turns saving off.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    etcd: Option<Spanned<etcd::RawEtcd>>,
    #[serde(default)]
    dns: Vec<Spanned<dns::RawDns>>,
    kubernetes: Option<Spanned<kubernetes::RawKubernetes>>,
    consul: Option<Spanned<consul::RawConsul>>,
}

impl Default for RawRegistry {
    fn default() -> Self {
        RawRegistry {
            state_dir: default_state_dir(),
            etcd: None,
            dns: Vec::new(),
            kubernetes: None,
            consul: None,
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(defaults::STATE_DIR)
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarder {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    connect_timeout: Option<HumanDuration>,
    retries: Option<u32>,
    #[serde(default)]
    threads: usize,
    drain_on_exit: Option<HumanDuration>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_text(path).map(|(config, _)| config)
    }

    /// The config and the exact text it came from (the file watcher starts from that text, so
    /// an edit made just after the load is still seen as an edit).
    pub fn load_with_text(path: &Path) -> Result<(Self, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text).map(|config| (config, text))
    }

    /// Parses and validates a whole file; `path` only labels the errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid =
            |span: std::ops::Range<usize>, entry: String, reason: String| ConfigError::Invalid {
                path: path.to_owned(),
                line: line_of(text, span.start),
                entry,
                reason,
            };

        let forwarder = ForwarderConfig {
            listen: raw.forwarder.listen,
            connect_timeout: raw
                .forwarder
                .connect_timeout
                .map_or(defaults::CONNECT_TIMEOUT, |d| d.0),
            retries: raw.forwarder.retries.unwrap_or(defaults::CONNECT_RETRIES),
            threads: raw.forwarder.threads,
            drain_on_exit: raw
                .forwarder
                .drain_on_exit
                .map_or(defaults::DRAIN_ON_EXIT, |d| d.0),
        };
        if raw
            .datapath
            .pin_dir
            .as_ref()
            .is_some_and(|p| !p.is_absolute())
        {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "datapath.pin_dir: must be an absolute path".into(),
            });
        }
        if raw.datapath.cgroup.trim().is_empty() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "datapath.cgroup: must name a cgroup v2 directory".into(),
            });
        }

        let parse_error = |message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let api = raw.api.check().map_err(parse_error)?;
        let metrics = raw.metrics.check().map_err(parse_error)?;

        let mut catalog = Catalog::default();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (index, spanned) in raw.services.into_iter().enumerate() {
            let span = spanned.span();
            let raw = spanned.into_inner();
            let entry = format!("service[{index}] \"{}\"", raw.name());
            let service = raw
                .into_service(&forwarder.listen)
                .map_err(|e| invalid(span.clone(), entry.clone(), e))?;
            if let Some(first) = names.insert(service.name.clone(), index) {
                return Err(invalid(
                    span,
                    entry,
                    format!("name: already used by service[{first}]"),
                ));
            }
            if catalog.services.contains_key(&service.addr) {
                return Err(invalid(
                    span,
                    entry,
                    format!("vip: {} is already another service's address", service.addr),
                ));
            }
            catalog.services.insert(service.addr, Arc::new(service));
        }

        let etcd = match raw.registry.etcd {
            Some(spanned) => {
                let span = spanned.span();
                let etcd = spanned
                    .into_inner()
                    .check()
                    .map_err(|e| invalid(span, "registry.etcd".into(), e))?;
                Some(etcd)
            }
            None => None,
        };
        let mut dns = Vec::new();
        let mut dns_names: HashMap<String, usize> = HashMap::new();
        for (index, spanned) in raw.registry.dns.into_iter().enumerate() {
            let span = spanned.span();
            let raw = spanned.into_inner();
            let entry = format!("registry.dns[{index}] \"{}\"", raw.name);
            let d = raw
                .check(&forwarder.listen)
                .map_err(|e| invalid(span.clone(), entry.clone(), e))?;
            let addr = d.service.addr;
            let clash = if let Some(first) = dns_names.insert(d.service.name.clone(), index) {
                Some(format!("name: already used by registry.dns[{first}]"))
            } else if names.contains_key(&d.service.name) {
                Some("name: already used by a [[service]]".into())
            } else if catalog.services.contains_key(&addr)
                || dns.iter().any(|o: &DnsConfig| o.service.addr == addr)
            {
                Some(format!("vip: {addr} is already another service's address"))
            } else {
                None
            };
            if let Some(reason) = clash {
                return Err(invalid(span, entry, reason));
            }
            dns.push(d);
        }

        let kubernetes = match raw.registry.kubernetes {
            Some(spanned) => {
                let span = spanned.span();
                let env_node = std::env::var("NODE_NAME").ok();
                let k = spanned
                    .into_inner()
                    .check(env_node)
                    .map_err(|e| invalid(span, "registry.kubernetes".into(), e))?;
                Some(k)
            }
            None => None,
        };
        let consul = match raw.registry.consul {
            Some(spanned) => {
                let span = spanned.span();
                let c = spanned
                    .into_inner()
                    .check()
                    .map_err(|e| invalid(span, "registry.consul".into(), e))?;
                Some(c)
            }
            None => None,
        };

        let mut gateway_names: Vec<String> = Vec::new();
        for (i, g) in raw.gateways.iter().enumerate() {
            if gateway_names.contains(&g.name) {
                return Err(parse_error(format!(
                    "gateway[{i}] \"{}\": name: already used by another gateway",
                    g.name
                )));
            }
            if g.max_connections == 0 {
                return Err(parse_error(format!(
                    "gateway[{i}] \"{}\": max_connections: must be positive",
                    g.name
                )));
            }
            gateway_names.push(g.name.clone());
        }
        let proxy_service = |name: &str| {
            catalog
                .services
                .values()
                .any(|s| s.name == name && s.mode == crate::catalog::Mode::Proxy)
        };
        crate::http::route::Routes::build(raw.routes.clone(), &proxy_service, &gateway_names)
            .map_err(parse_error)?;

        Ok(AgentConfig {
            datapath: DatapathConfig {
                cgroup: PathBuf::from(raw.datapath.cgroup),
                kernel_log: raw.datapath.kernel_log,
                pin_dir: raw.datapath.pin_dir,
                exclude_cgroups: raw.datapath.exclude_cgroups,
                exclude_ports: raw.datapath.exclude_ports,
            },
            forwarder,
            registry: RegistryConfig {
                state_dir: (!raw.registry.state_dir.as_os_str().is_empty())
                    .then_some(raw.registry.state_dir),
                etcd,
                dns,
                kubernetes,
                consul,
            },
            api,
            metrics,
            catalog,
            routes: raw.routes,
            gateways: raw.gateways,
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    // Bytes, not `str`: an offset inside a character must not panic.
    let before = &text.as_bytes()[..offset.min(text.len())];
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{BackendState, Mode};

    #[test]
    fn a_line_number_from_an_offset_inside_a_character_does_not_panic() {
        assert_eq!(line_of("é\nx", 1), 1);
        assert_eq!(line_of("a\néé", 4), 2);
        assert_eq!(line_of("a\n", 99), 2);
    }

    const GOOD: &str = r#"
[datapath]
cgroup = "demo/pods"

[forwarder]
listen = ["10.77.0.1:15001"]

[[service]]
name = "web"
vip = "10.96.0.10:80"
mode = "proxy"
backends = ["10.77.0.11:8080", { address = "10.77.0.12:8080", weight = 3, state = "drain" }]
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn reads_a_whole_file() {
        let c = parse(GOOD).unwrap();
        let s = c.catalog.services.values().next().unwrap();
        assert_eq!(s.mode, Mode::Proxy);
        assert_eq!(s.backends[1].weight, 3);
        assert_eq!(s.backends[1].state, BackendState::Drain);
        assert_eq!(c.forwarder.connect_timeout, defaults::CONNECT_TIMEOUT);
        assert_eq!(c.forwarder.drain_on_exit, defaults::DRAIN_ON_EXIT);
        let c =
            parse(&GOOD.replace("[forwarder]\n", "[forwarder]\ndrain_on_exit = \"2s\"\n")).unwrap();
        assert_eq!(c.forwarder.drain_on_exit, Duration::from_secs(2));
    }

    #[test]
    fn a_bad_value_names_its_line_and_field() {
        let e = parse(&GOOD.replace("mode = \"proxy\"", "mode = \"teleport\"")).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("line 11"), "{m}");
        assert!(m.contains("teleport"), "{m}");
    }

    #[test]
    fn a_semantic_error_names_the_entry() {
        let text = GOOD.replace("10.77.0.11:8080", "10.77.0.11:0");
        let m = parse(&text).unwrap_err().to_string();
        assert!(m.contains("line 8"), "{m}");
        assert!(m.contains("service[0] \"web\": backends[0]: port 0"), "{m}");
    }

    #[test]
    fn duplicate_vips_are_refused() {
        let text = format!("{GOOD}\n[[service]]\nname = \"web2\"\nvip = \"10.96.0.10:80\"\n");
        let m = parse(&text).unwrap_err().to_string();
        assert!(m.contains("already another service's address"), "{m}");
    }

    #[test]
    fn proxy_mode_needs_a_forwarder() {
        let text = GOOD.replace("listen = [\"10.77.0.1:15001\"]", "");
        let m = parse(&text).unwrap_err().to_string();
        assert!(m.contains("forwarder.listen"), "{m}");
    }
}
