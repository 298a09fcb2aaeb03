//! The catalog: services and their backends, as every source describes them and every
//! consumer (kernel maps, forwarder) reads them. Validated on the way in, so consumers can
//! trust it: every source builds its services through [`entry`].

pub mod duration;
pub mod entry;

use std::{collections::BTreeMap, fmt, net::SocketAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// The identity of a service in the datapath: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub vip: SocketAddr,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Who picks the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The kernel, at `connect()`: no proxy hop.
    #[default]
    Kernel,
    /// The agent's forwarder: retries, load-aware balancing, draining, per-connection metrics.
    Proxy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Uniform over usable backends, weights ignored.
    Random,
    /// Random in proportion to weight.
    WeightedRandom,
    /// In turn, each backend as often as its weight (smooth weighted round robin).
    #[default]
    RoundRobin,
    /// Consistent hashing on the client: a client keeps its backend while the set changes.
    Maglev,
    /// Proxy mode: power of two choices on active connections (Envoy's least_request).
    LeastConnections,
    /// Proxy mode: power of two choices on peak-EWMA connect latency (linkerd2-proxy).
    PeakEwma,
    /// Proxy mode: consistent hashing on a ring (Envoy's ring_hash).
    RingHash,
}

impl Algorithm {
    /// Algorithms only the forwarder can run: they need load or latency the kernel does not see.
    pub fn proxy_only(self) -> bool {
        matches!(
            self,
            Algorithm::LeastConnections | Algorithm::PeakEwma | Algorithm::RingHash
        )
    }

    pub fn hashes_client(self) -> bool {
        matches!(self, Algorithm::Maglev | Algorithm::RingHash)
    }
}

/// What a consistent-hash service hashes (proxy mode; the kernel hashes the client's network
/// namespace and bound address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    #[default]
    ClientIp,
    ClientIpPort,
}

/// How the forwarder moves bytes for a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BytePath {
    /// Userspace copy with bounded buffers.
    Copy,
    /// The copy, moving on to `splice(2)` through a pipe (no copy into userspace) once a
    /// direction carries bulk. The default: as fast as the copy on short messages, faster
    /// and at a third less CPU on bulk (`cargo xtask bench`, docs/benchmarks.md).
    #[default]
    Splice,
}

/// What a proxy-mode service speaks over TCP: the forwarder relays bytes (`tcp`) or serves
/// requests (docs/http.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Bytes both ways, one backend per connection.
    #[default]
    Tcp,
    /// HTTP/1.1, or HTTP/2 with prior knowledge (told apart by the client's preface): one
    /// backend per request.
    Http,
    /// gRPC: HTTP/2 only.
    Grpc,
    /// The first bytes decide: an HTTP/1 request line or the HTTP/2 preface is served as
    /// `http`, anything else is relayed as `tcp`, those bytes included.
    Auto,
}

impl AppProtocol {
    pub fn is_tcp(self) -> bool {
        self == AppProtocol::Tcp
    }
}

/// Per-service forwarding policy (proxy mode). `None` fields take the agent's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub connect_timeout: Option<Duration>,
    pub retries: Option<u32>,
    /// Open connections allowed; more are refused at once and counted.
    pub max_connections: Option<u32>,
    /// How long a drained or removed backend's connections may run on.
    pub drain_timeout: Option<Duration>,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Option<Duration>,
    pub hash_key: HashKey,
    pub byte_path: BytePath,
    pub health: Option<HealthCheck>,
    /// Consecutive failures that eject a backend.
    pub outlier_failures: Option<u32>,
    /// First ejection time; each further one lasts that much longer, capped.
    pub outlier_ejection: Option<Duration>,
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// HTTP: the whole request, retries included (`None`: unbounded, or the client's
    /// `grpc-timeout`).
    #[serde(default)]
    pub request_timeout: Option<Duration>,
    /// HTTP: one attempt on one backend, to the response's headers.
    #[serde(default)]
    pub try_timeout: Option<Duration>,
    /// HTTP: one line per request on the agent's log.
    #[serde(default)]
    pub access_log: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Probe {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers with `status`.
    Http { path: String, status: u16 },
}

/// Active health checking (HAProxy's semantics: every `interval`, `rise` successes mark a
/// backend up, `fall` failures mark it down).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// A backend's administrative state (HAProxy's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new connections.
    #[default]
    Ready,
    /// Takes no new connections; existing ones run on until the drain deadline.
    Drain,
    /// Out of service: no new connections.
    Maint,
}

impl FromStr for BackendState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(Self::Ready),
            "drain" => Ok(Self::Drain),
            "maint" => Ok(Self::Maint),
            other => Err(format!(
                "unknown state `{other}`, expected ready, drain or maint"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub addr: ServiceAddr,
    pub mode: Mode,
    pub algorithm: Algorithm,
    /// Session affinity by client, with its timeout.
    pub affinity: Option<Duration>,
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub policy: Policy,
}

impl Service {
    /// Backends that may take new connections.
    pub fn usable(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .filter(|b| b.state == BackendState::Ready && b.weight > 0)
    }
}

/// All services, keyed by the address clients connect to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub services: BTreeMap<ServiceAddr, Service>,
}

/// Why an entry is not acceptable. Each message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    #[error("name: must be 1 to 64 characters of letters, digits, '-', '_' or '.'")]
    Name,
    #[error("vip: port 0 is not a service port")]
    VipPort,
    #[error("vip: {0} is unspecified; a service needs a concrete address")]
    VipUnspecified(SocketAddr),
    #[error("backends[{index}]: port 0 is not a backend port")]
    BackendPort { index: usize },
    #[error("backends[{index}]: {addr} is {backend} but the vip is {vip}; families must match")]
    Family {
        index: usize,
        addr: SocketAddr,
        backend: &'static str,
        vip: &'static str,
    },
    #[error("backends[{index}]: {addr} is listed twice")]
    DuplicateBackend { index: usize, addr: SocketAddr },
    #[error("backends[{index}].weight: {weight} is out of range 0..={max}")]
    Weight { index: usize, weight: u32, max: u32 },
    #[error("affinity_timeout: must be between 1 s and 24 h")]
    AffinityTimeout,
    #[error("mode: proxy mode is for TCP; UDP services use kernel mode")]
    UdpProxy,
    #[error("algorithm: {0:?} needs mode = \"proxy\" (the kernel does not see load or latency)")]
    ProxyOnly(Algorithm),
    #[error("app_protocol: {0:?} needs mode = \"proxy\" (the kernel does not see requests)")]
    AppProtocolKernel(AppProtocol),
    #[error("try_timeout: must be positive and at most request_timeout")]
    TryTimeout,
    #[error("health: interval, timeout, rise and fall must be positive, timeout at most interval")]
    Health,
}

fn family(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

impl Service {
    /// Checks one entry on its own; the catalog checks what spans entries (duplicates).
    pub fn validate(&self) -> Result<(), Invalid> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(Invalid::Name);
        }
        let vip = self.addr.vip;
        if vip.port() == 0 {
            return Err(Invalid::VipPort);
        }
        if vip.ip().is_unspecified() {
            return Err(Invalid::VipUnspecified(vip));
        }
        if self.mode == Mode::Proxy && self.addr.protocol == Protocol::Udp {
            return Err(Invalid::UdpProxy);
        }
        if self.mode == Mode::Kernel && self.algorithm.proxy_only() {
            return Err(Invalid::ProxyOnly(self.algorithm));
        }
        if self.mode == Mode::Kernel && !self.policy.app_protocol.is_tcp() {
            return Err(Invalid::AppProtocolKernel(self.policy.app_protocol));
        }
        let p = &self.policy;
        if p.try_timeout.is_some_and(|t| t.is_zero())
            || p.request_timeout.is_some_and(|t| t.is_zero())
            || matches!((p.try_timeout, p.request_timeout), (Some(t), Some(r)) if t > r)
        {
            return Err(Invalid::TryTimeout);
        }
        if let Some(h) = &self.policy.health
            && (h.interval.is_zero()
                || h.timeout.is_zero()
                || h.timeout > h.interval
                || h.rise == 0
                || h.fall == 0)
        {
            return Err(Invalid::Health);
        }
        if let Some(t) = self.affinity
            && (t < Duration::from_secs(1) || t > Duration::from_secs(86_400))
        {
            return Err(Invalid::AffinityTimeout);
        }
        for (index, b) in self.backends.iter().enumerate() {
            if b.addr.port() == 0 {
                return Err(Invalid::BackendPort { index });
            }
            if b.addr.is_ipv4() != vip.is_ipv4() {
                return Err(Invalid::Family {
                    index,
                    addr: b.addr,
                    backend: family(&b.addr),
                    vip: family(&vip),
                });
            }
            if b.weight > crate::defaults::MAX_WEIGHT {
                return Err(Invalid::Weight {
                    index,
                    weight: b.weight,
                    max: crate::defaults::MAX_WEIGHT,
                });
            }
            if self.backends[..index].iter().any(|o| o.addr == b.addr) {
                return Err(Invalid::DuplicateBackend {
                    index,
                    addr: b.addr,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            name: "web".into(),
            addr: ServiceAddr {
                vip: "10.96.0.10:80".parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            mode: Mode::Kernel,
            algorithm: Algorithm::RoundRobin,
            affinity: None,
            policy: Policy::default(),
            backends: vec![Backend {
                addr: "10.0.0.1:8080".parse().unwrap(),
                weight: 1,
                state: BackendState::Ready,
            }],
        }
    }

    #[test]
    fn accepts_a_plain_service() {
        assert_eq!(service().validate(), Ok(()));
    }

    #[test]
    fn names_the_field_at_fault() {
        let mut s = service();
        s.backends.push(s.backends[0].clone());
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "backends[1]: 10.0.0.1:8080 is listed twice"
        );
        let mut s = service();
        s.backends[0].addr = "[fd00::1]:80".parse().unwrap();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("families must match")
        );
        let mut s = service();
        s.backends[0].weight = 1000;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .starts_with("backends[0].weight")
        );
    }
}
