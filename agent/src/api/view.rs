//! What the API says, as JSON: the server builds these, `switchyard ctl` reads them back.
//!
//! A service *entry* is written with the fields of a `[[service]]` table (durations as `"30s"`,
//! backends as `{"address", "weight", "state"}` objects), so what `GET` returns can be sent back
//! with `PUT` unchanged.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{
    catalog::{BackendState, Mode, Probe, Protocol, Service},
    registry::Source,
};

/// Every refusal, as the bounded server writes it.
pub use crate::listener::http::ErrorBody;

/// One service as the API lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    /// The source whose entry is served.
    pub source: Option<Source>,
    /// The source the API's entry overrides (set when the API copied another source's service
    /// to change it): `DELETE /v1/services/NAME/override` hands the service back to it.
    pub overrides: Option<Source>,
    /// The entry, with the fields of a `[[service]]` table.
    pub service: Value,
    /// A remark about the request (for example that an override was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceList {
    pub services: Vec<ServiceView>,
}

/// A service's live state: what the forwarder and the health board see now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub mode: Mode,
    pub source: Option<Source>,
    /// Proxy mode only: the forwarder's service-wide counters.
    pub forwarder: Option<ForwarderState>,
    pub backends: Vec<BackendLive>,
    /// HTTP mode only (`app_protocol` other than `tcp`): its requests, and per route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpState>,
}

/// A service's HTTP requests, over its routes and backends, and the routes that sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpState {
    pub requests: RequestCounts,
    pub routes: Vec<RouteRequests>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRequests {
    pub route: String,
    pub requests: RequestCounts,
}

/// Requests by status class (`1xx` … `5xx`), how many of them the proxy answered itself,
/// retries on another backend, and requests in flight now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub by_class: std::collections::BTreeMap<String, u64>,
    pub by_proxy: u64,
    pub retries: u64,
    pub in_flight: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForwarderState {
    pub active: u64,
    /// Connections refused because `max_connections` were open.
    pub refused_limit: u64,
    /// Connections refused because no backend could be reached.
    pub refused_no_backend: u64,
    pub retries: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No active check, or not decided yet.
    Unknown,
    Up,
    Down,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendLive {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
    pub health: Health,
    /// Seconds until a passive-outlier ejection ends (`None`: not ejected).
    pub ejected_for_seconds: Option<f64>,
    pub draining: bool,
    /// While draining: how far it got.
    pub drain: Option<DrainProgress>,
    /// `None` where nobody keeps a count. Kernel-mode TCP backends: the programs' counts
    /// (`active` from the connect on, `closed` includes failed connects, as the forwarder's).
    pub counters: Option<CountersView>,
    /// Kernel-mode TCP backends: what the programs learned (see `docs/kernel-learning.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBackendView>,
}

/// A backend as the eBPF programs count it, node-wide (every client of the node feeds it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelBackendView {
    /// SYN sent, not yet established or failed.
    pub connecting: u64,
    /// Established and not yet closed.
    pub established_open: u64,
    pub opened: u64,
    pub established: u64,
    /// Established connections that closed.
    pub closed: u64,
    /// Connects that ended before being established.
    pub failed: u64,
    pub syn_retransmits: u64,
    pub consecutive_failures: u64,
    pub ejections: u64,
    /// Peak-EWMA of the connect time (SYN to established), decayed to now.
    pub connect_ewma_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrainProgress {
    /// Connections still open on the backend.
    pub open: u64,
    /// Connections closed because the drain deadline passed.
    pub closed_at_deadline: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CountersView {
    pub active: u64,
    pub opened: u64,
    pub closed: u64,
    /// Bytes from the backend to clients.
    pub bytes_in: u64,
    /// Bytes from clients to the backend.
    pub bytes_out: u64,
    pub connect_failures: u64,
    pub connect_timeouts: u64,
    pub resets: u64,
    pub ejections: u64,
    pub drained_closed: u64,
    pub checks_passed: u64,
    pub checks_failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateList {
    pub services: Vec<ServiceState>,
    /// Kernel-mode TCP sockets the programs follow now (each entry goes when its socket
    /// closes); `None` without the kernel side.
    #[serde(default)]
    pub kernel_sockets: Option<usize>,
    /// HTTP routes, by name.
    #[serde(default)]
    pub routes: Vec<RouteState>,
}

/// One route as the API lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteView {
    pub name: String,
    /// The source whose route is served.
    pub source: Source,
    /// The route, with the fields of a `[[route]]` table (what `PUT` takes back).
    pub route: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteList {
    pub routes: Vec<RouteView>,
}

/// A route as `ctl state` shows it: its parent, its rules and where each sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteState {
    pub name: String,
    pub source: Source,
    /// `service NAME` (mesh) or `gateway NAME` (ingress).
    pub parent: String,
    /// None: any host.
    pub hostnames: Vec<String>,
    pub rules: Vec<RuleState>,
    /// The route's request counters (by status class, retries, …) once HTTP mode counts per
    /// route; `None` until then. The metrics fill this; `ctl state` prints it as it comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleState {
    /// Each match as one line (`prefix /api GET x-canary=1`); empty: every request.
    pub matches: Vec<String>,
    pub backends: Vec<RouteBackend>,
    /// `301 -> https://host/path` for a redirecting rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteBackend {
    pub service: String,
    pub weight: u32,
    /// Whether the service is a proxy-mode service now. Requests for one that is not are
    /// answered 500 (Gateway API's answer for a backendRef that does not resolve).
    pub resolved: bool,
}

/// The registry: each source's layer and how current it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistryView {
    /// Services in the merged catalog the datapath serves.
    pub services: usize,
    pub sources: Vec<SourceView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceView {
    pub source: Source,
    pub entries: usize,
    pub live: bool,
    /// RFC 3339, UTC.
    pub last_sync: Option<String>,
    pub staleness_seconds: Option<f64>,
    pub rejected_total: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionView {
    pub version: String,
    pub build: BuildView,
    pub pid: u32,
    pub uptime_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildView {
    /// `debug` or `release`.
    pub profile: String,
    pub target: String,
    pub rust_version: String,
}

/// The build this agent is.
pub fn build() -> BuildView {
    BuildView {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        rust_version: env!("CARGO_PKG_RUST_VERSION").into(),
    }
}

/// A duration as the config file writes it: the largest unit that says it exactly.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        0 => "0s".into(),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The entry for `s`, with the fields of a `[[service]]` table (defaults left out).
pub fn entry(s: &Service) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(s.name));
    m.insert("vip".into(), json!(s.addr.vip.to_string()));
    m.insert("protocol".into(), json!(s.addr.protocol));
    m.insert("mode".into(), json!(s.mode));
    m.insert("algorithm".into(), json!(s.algorithm));
    if let Some(t) = s.affinity {
        m.insert("affinity_timeout".into(), json!(human(t)));
    }
    let p = &s.policy;
    let durations = [
        ("connect_timeout", p.connect_timeout),
        ("drain_timeout", p.drain_timeout),
        ("idle_timeout", p.idle_timeout),
        ("outlier_ejection", p.outlier_ejection),
        ("request_timeout", p.request_timeout),
        ("try_timeout", p.try_timeout),
    ];
    for (k, v) in durations {
        if let Some(d) = v {
            m.insert(k.into(), json!(human(d)));
        }
    }
    let numbers = [
        ("retries", p.retries),
        ("max_connections", p.max_connections),
        ("outlier_failures", p.outlier_failures),
    ];
    for (k, v) in numbers {
        if let Some(n) = v {
            m.insert(k.into(), json!(n));
        }
    }
    if let Some(k) = &p.hash_on {
        m.insert("hash_key".into(), json!(k.to_string()));
    } else if p.hash_key != Default::default() {
        m.insert("hash_key".into(), json!(p.hash_key));
    }
    if p.byte_path != Default::default() {
        m.insert("byte_path".into(), json!(p.byte_path));
    }
    if p.app_protocol != Default::default() {
        m.insert("app_protocol".into(), json!(p.app_protocol));
    }
    if p.access_log {
        m.insert("access_log".into(), json!(true));
    }
    if let Some(h) = &p.health {
        let mut hm = Map::new();
        match &h.probe {
            Probe::Tcp => {
                hm.insert("kind".into(), json!("tcp"));
            }
            Probe::Http { path, status } => {
                hm.insert("kind".into(), json!("http"));
                hm.insert("path".into(), json!(path));
                hm.insert("status".into(), json!(status));
            }
        }
        hm.insert("interval".into(), json!(human(h.interval)));
        hm.insert("timeout".into(), json!(human(h.timeout)));
        hm.insert("rise".into(), json!(h.rise));
        hm.insert("fall".into(), json!(h.fall));
        m.insert("health".into(), Value::Object(hm));
    }
    let backends: Vec<Value> = s
        .backends
        .iter()
        .map(|b| json!({"address": b.addr.to_string(), "weight": b.weight, "state": b.state}))
        .collect();
    m.insert("backends".into(), Value::Array(backends));
    Value::Object(m)
}

/// `t` as RFC 3339 in UTC, to the second (`2026-05-01T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_written() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(10_800)), "3h");
        assert_eq!(human(Duration::ZERO), "0s");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }
}
