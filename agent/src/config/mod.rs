//! The agent's configuration file (TOML): where to attach, where the forwarder listens, and the
//! services of the file source.
//!
//! A file is taken whole or not at all: any error names the line and the field, and nothing of
//! the file is applied.

mod duration;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{
    Deserialize,
    de::{self, Deserializer, MapAccess, Visitor, value::MapAccessDeserializer},
};
use toml::Spanned;

pub use duration::{HumanDuration, parse as parse_duration};

use crate::{
    catalog::{Algorithm, Backend, BackendState, Catalog, Mode, Protocol, Service, ServiceAddr},
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

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// The cgroup v2 whose processes are steered: absolute, or relative to the cgroup v2 mount.
    pub cgroup: PathBuf,
    pub kernel_log: KernelLog,
    /// Where maps and links are pinned (a bpffs directory; mounted by the agent if need be).
    /// `None`: `/sys/fs/bpf/switchyard`, or `/run/switchyard/bpffs` where `/sys/fs/bpf` is not
    /// a bpffs.
    pub pin_dir: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    /// Node addresses the forwarder listens on: one per family it serves. Pods live in their
    /// own network namespaces, so this cannot be loopback for them.
    pub listen: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub retries: u32,
}

#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Where the last-known-good catalog is kept; `None`: memory only.
    pub state_dir: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub datapath: DatapathConfig,
    pub forwarder: ForwarderConfig,
    pub registry: RegistryConfig,
    /// The services the file names.
    pub catalog: Catalog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    datapath: RawDatapath,
    #[serde(default)]
    forwarder: RawForwarder,
    #[serde(default)]
    registry: RawRegistry,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    cgroup: String,
    #[serde(default)]
    kernel_log: KernelLog,
    pin_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// `""` turns saving off.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
}

impl Default for RawRegistry {
    fn default() -> Self {
        RawRegistry {
            state_dir: default_state_dir(),
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: SocketAddr,
    #[serde(default = "tcp")]
    protocol: Protocol,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    algorithm: Algorithm,
    /// Session affinity by client; `affinity_timeout` alone turns it on too.
    #[serde(default)]
    affinity: bool,
    affinity_timeout: Option<HumanDuration>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// A backend is `"ip:port"` or `{ address = "ip:port", weight = 2, state = "drain" }`.
struct RawBackend(Backend);

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            address: SocketAddr,
            #[serde(default = "default_weight")]
            weight: u32,
            #[serde(default)]
            state: BackendState,
        }
        fn default_weight() -> u32 {
            defaults::WEIGHT
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"ip:port\" or { address = \"ip:port\", weight = N, state = \"ready\" }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let addr = v
                    .parse()
                    .map_err(|_| E::custom(format!("`{v}` is not an ip:port address")))?;
                Ok(RawBackend(Backend {
                    addr,
                    weight: defaults::WEIGHT,
                    state: BackendState::Ready,
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let f = Full::deserialize(MapAccessDeserializer::new(map))?;
                Ok(RawBackend(Backend {
                    addr: f.address,
                    weight: f.weight,
                    state: f.state,
                }))
            }
        }
        d.deserialize_any(V)
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
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

        let mut catalog = Catalog::default();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (index, spanned) in raw.services.into_iter().enumerate() {
            let span = spanned.span();
            let raw = spanned.into_inner();
            let entry = format!("service[{index}] \"{}\"", raw.name);
            let affinity = match (raw.affinity, raw.affinity_timeout) {
                (_, Some(t)) => Some(t.0),
                (true, None) => Some(defaults::AFFINITY_TIMEOUT),
                (false, None) => None,
            };
            let service = Service {
                name: raw.name.clone(),
                addr: ServiceAddr {
                    vip: raw.vip,
                    protocol: raw.protocol,
                },
                mode: raw.mode,
                algorithm: raw.algorithm,
                affinity,
                backends: raw.backends.into_iter().map(|b| b.0).collect(),
            };
            service
                .validate()
                .map_err(|e| invalid(span.clone(), entry.clone(), e.to_string()))?;
            if service.mode == Mode::Proxy
                && !forwarder
                    .listen
                    .iter()
                    .any(|l| l.is_ipv4() == service.addr.vip.is_ipv4())
            {
                return Err(invalid(
                    span,
                    entry,
                    "mode: proxy needs a forwarder.listen address of the vip's family".into(),
                ));
            }
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
            catalog.services.insert(service.addr, service);
        }
        Ok(AgentConfig {
            datapath: DatapathConfig {
                cgroup: PathBuf::from(raw.datapath.cgroup),
                kernel_log: raw.datapath.kernel_log,
                pin_dir: raw.datapath.pin_dir,
            },
            forwarder,
            registry: RegistryConfig {
                state_dir: (!raw.registry.state_dir.as_os_str().is_empty())
                    .then_some(raw.registry.state_dir),
            },
            catalog,
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

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
