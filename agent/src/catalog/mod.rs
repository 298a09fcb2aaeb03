//! The catalog: services and their backends, as every source describes them and every
//! consumer (kernel maps, forwarder) reads them. Validated on the way in, so consumers can
//! trust it: every source builds its services through [`entry`].

pub mod duration;
pub mod entry;

use std::{fmt, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

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
    /// Power of two choices on active connections per weight (Envoy's least_request); in
    /// kernel mode on the programs' own per-backend counts.
    LeastConnections,
    /// Power of two choices on peak-EWMA latency × (active + 1) per weight (linkerd2-proxy);
    /// in kernel mode the latency is the connect time the programs measure.
    PeakEwma,
    /// Proxy mode: consistent hashing on a ring (Envoy's ring_hash). Kernel mode has no ring:
    /// it uses its Maglev table, which keeps clients the same way.
    RingHash,
}

impl Algorithm {
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

/// HTTP mode: a request's part a consistent-hash service hashes instead of the client's
/// address (`hash_key = "header:NAME"` or `"cookie:NAME"`). A request without it hashes the
/// client's address (`client_ip`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKey {
    /// A request header's first value; the name in lower case.
    Header(String),
    /// A cookie's value, by its name.
    Cookie(String),
}

impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestKey::Header(n) => write!(f, "header:{n}"),
            RequestKey::Cookie(n) => write!(f, "cookie:{n}"),
        }
    }
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
    /// HTTP mode, Maglev and ring hash: hash this part of each request (`hash_key`).
    #[serde(default)]
    pub hash_on: Option<RequestKey>,
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

/// The services of a catalog by address: a persistent map, so that a new catalog version
/// shares every untouched part of the previous one (a change copies the few tree nodes on its
/// path, not the map), and two versions are compared in proportion to what differs
/// ([`imbl::OrdMap::diff`] skips shared nodes).
pub type Services = imbl::OrdMap<ServiceAddr, Arc<Service>>;

/// All services, keyed by the address clients connect to. Each service is shared with the
/// registry's layers, and the map with the previous version: a new catalog version costs what
/// changed, not the catalog's size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    pub services: Services,
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
    #[error(
        "algorithm: {0:?} balances on connections, which UDP does not have; use random, \
         round_robin or maglev"
    )]
    UdpConnections(Algorithm),
    #[error("app_protocol: {0:?} needs mode = \"proxy\" (the kernel does not see requests)")]
    AppProtocolKernel(AppProtocol),
    #[error("try_timeout: must be positive and at most request_timeout")]
    TryTimeout,
    #[error(
        "hash_key: {0} is read from HTTP requests; it needs mode = \"proxy\" and app_protocol \
         http, grpc or auto"
    )]
    HashOnTcp(RequestKey),
    #[error("hash_key: {0} is hashed by maglev or ring_hash only; algorithm is {1:?}")]
    HashOnAlgorithm(RequestKey, Algorithm),
    #[error("health: interval, timeout, rise and fall must be positive, timeout at most interval")]
    Health,
    #[error(
        "health.path: must start with '/' and hold only visible ASCII (no spaces, CR or LF), \
         at most 1024 bytes"
    )]
    HealthPath,
    #[error("backends: {count} are more than the {max} one service may have")]
    TooManyBackends { count: usize, max: usize },
    #[error(
        "backends: {count} with a weight do not fit the kernel's Maglev table of {max} entries; \
         use mode = \"proxy\""
    )]
    KernelTable { count: usize, max: usize },
}

fn family(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Whether `path` can go on an HTTP request line as it is: anything else (a CR or LF above
/// all) would let a registry entry write the probe's headers.
fn request_target(path: &str) -> bool {
    path.starts_with('/') && path.len() <= 1024 && path.bytes().all(|b| b.is_ascii_graphic())
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
        if self.addr.protocol == Protocol::Udp
            && matches!(
                self.algorithm,
                Algorithm::LeastConnections | Algorithm::PeakEwma
            )
        {
            return Err(Invalid::UdpConnections(self.algorithm));
        }
        if self.mode == Mode::Kernel && !self.policy.app_protocol.is_tcp() {
            return Err(Invalid::AppProtocolKernel(self.policy.app_protocol));
        }
        let p = &self.policy;
        if let Some(k) = &p.hash_on {
            if self.mode != Mode::Proxy || p.app_protocol.is_tcp() {
                return Err(Invalid::HashOnTcp(k.clone()));
            }
            if !self.algorithm.hashes_client() {
                return Err(Invalid::HashOnAlgorithm(k.clone(), self.algorithm));
            }
        }
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
        if let Some(HealthCheck {
            probe: Probe::Http { path, .. },
            ..
        }) = &self.policy.health
            && !request_target(path)
        {
            return Err(Invalid::HealthPath);
        }
        if let Some(t) = self.affinity
            && (t < Duration::from_secs(1) || t > Duration::from_secs(86_400))
        {
            return Err(Invalid::AffinityTimeout);
        }
        let max = crate::defaults::MAX_BACKENDS_PER_SERVICE;
        if self.backends.len() > max {
            return Err(Invalid::TooManyBackends {
                count: self.backends.len(),
                max,
            });
        }
        let weighted = self.backends.iter().filter(|b| b.weight > 0).count();
        let table = switchyard_common::maps::MAGLEV_KERNEL_SIZE as usize;
        if self.mode == Mode::Kernel && self.algorithm.hashes_client() && weighted > table {
            // Beyond one entry each, the last backends would never be picked.
            return Err(Invalid::KernelTable {
                count: weighted,
                max: table,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(self.backends.len());
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
            // A set, not a scan of the ones before: a service of thousands of backends.
            if !seen.insert(b.addr) {
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
        crate::test_helpers::service("web", "10.96.0.10:80", &["10.0.0.1:8080"])
    }

    #[test]
    fn accepts_a_plain_service() {
        assert_eq!(service().validate(), Ok(()));
    }

    #[test]
    fn ring_hash_in_kernel_mode_is_accepted_as_maglev() {
        let mut s = service();
        s.algorithm = Algorithm::RingHash;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn a_service_of_too_many_backends_is_refused_by_count() {
        let backends = |n: u32| -> Vec<Backend> {
            (0..n)
                .map(|i| Backend {
                    addr: SocketAddr::new(
                        [10, 1, (i >> 8) as u8, i as u8].into(),
                        80 + (i >> 16) as u16,
                    ),
                    weight: 1,
                    state: BackendState::Ready,
                })
                .collect()
        };
        let mut s = service();
        s.backends = backends(crate::defaults::MAX_BACKENDS_PER_SERVICE as u32);
        assert_eq!(s.validate(), Ok(()));
        s.backends = backends(crate::defaults::MAX_BACKENDS_PER_SERVICE as u32 + 1);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "backends: 16385 are more than the 16384 one service may have"
        );
        // Kernel-mode Maglev: one entry each at least.
        let mut s = service();
        s.algorithm = Algorithm::Maglev;
        s.backends = backends(5000);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("Maglev table of 4093")
        );
        s.mode = Mode::Proxy;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn a_health_path_that_could_write_headers_is_refused() {
        let check = |path: &str| {
            let mut s = service();
            s.policy.health = Some(HealthCheck {
                probe: Probe::Http {
                    path: path.into(),
                    status: 200,
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
            });
            s.validate()
        };
        assert_eq!(check("/healthz?full=1"), Ok(()));
        for bad in ["/x\r\nHost: evil", "/a b", "healthz", "/\n", ""] {
            let e = check(bad).unwrap_err();
            assert!(e.to_string().starts_with("health.path"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn kernel_mode_takes_the_load_aware_algorithms() {
        for a in [Algorithm::LeastConnections, Algorithm::PeakEwma] {
            let mut s = service();
            s.algorithm = a;
            assert_eq!(s.validate(), Ok(()), "{a:?}");
        }
        let mut s = service();
        s.addr.protocol = Protocol::Udp;
        s.algorithm = Algorithm::LeastConnections;
        assert_eq!(
            s.validate(),
            Err(Invalid::UdpConnections(Algorithm::LeastConnections))
        );
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
