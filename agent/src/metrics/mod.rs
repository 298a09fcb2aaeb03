//! Prometheus metrics, `/healthz` and `/readyz`, on one TCP address.
//!
//! Nothing is counted twice: the forwarder and the health checks already keep atomic counters
//! per (service, backend) on the [`Board`](crate::health::Board), the kernel keeps per-CPU
//! counters in a map, the registry knows its sources. A scrape reads them all at that moment
//! ([`Collector`]) and writes OpenMetrics text. Only the two histograms ([`Timings`]) are
//! metrics objects of their own, kept beside the counters they go with.
//!
//! Names start with `switchyard_`; counters end in `_total`; durations are `_seconds`; labels are
//! `service` and `backend` (plus `counter` for the kernel's counters and `source` for the
//! registry's: small fixed sets), so the series count follows the catalog.

mod process;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{Method, StatusCode};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    api::{Limits, Live, Reply, server},
    catalog::BackendState,
    config::MetricsConfig,
    datapath::maps::KernelCounters,
    health::{Counters, Verdict},
};

/// OpenMetrics, for scrapers that ask for it (Prometheus does).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, for everyone else (curl, `promtool check metrics`).
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connect latency: from well under a millisecond (a backend on the node's bridge) to the
/// longest connect timeout anyone sets.
const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Connection duration: a request-response exchange to a connection held for hours.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// A backend's connect latency and connection duration histograms (proxy mode).
#[derive(Debug)]
pub struct Timings {
    connect: Histogram,
    duration: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            connect: Histogram::new(CONNECT_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

impl Timings {
    /// A connect to the backend succeeded after `latency`.
    pub fn connected(&self, latency: Duration) {
        self.connect.observe(latency.as_secs_f64());
    }

    /// A connection opened at `since` ended.
    pub fn closed(&self, since: Instant) {
        self.duration.observe(since.elapsed().as_secs_f64());
    }
}

/// Everything a scrape reads.
pub struct Metrics {
    live: Live,
    kernel: Option<KernelCounters>,
    /// Set once the programs are attached and the first catalog is applied.
    ready: Arc<AtomicBool>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(live: Live, kernel: Option<KernelCounters>, ready: Arc<AtomicBool>) -> Metrics {
        Metrics {
            live,
            kernel,
            ready,
        }
    }
}

/// Writes one family: its descriptor, then one sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let unit = unit.as_ref();
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a family of one unlabelled sample.
fn one<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> fmt::Result {
    let unit = unit.as_ref();
    metric.encode(enc.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn counter<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, unit, MetricType::Counter, samples)
}

fn gauge<L: EncodeLabelSet, N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (L, N)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, unit, MetricType::Gauge, samples)
}

type BackendLabels<'a> = [(&'static str, &'a str); 2];

fn labels<'a>(
    addrs: &'a HashMap<SocketAddr, String>,
    service: &'a str,
    backend: SocketAddr,
) -> BackendLabels<'a> {
    [
        ("service", service),
        ("backend", addrs.get(&backend).map_or("", String::as_str)),
    ]
}
type OneLabel<'a> = [(&'static str, &'a str); 1];

fn service_label(service: &str) -> OneLabel<'_> {
    [("service", service)]
}

/// A per-backend counter: its name (without `switchyard_` and `_total`), help, unit, and where
/// the board keeps it.
type BackendCounter = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&Counters) -> &AtomicU64,
);

/// Per-backend counters exported as `switchyard_<name>_total`.
const BACKEND_COUNTERS: [BackendCounter; 11] = [
    (
        "backend_connections_opened",
        "Connections the forwarder opened to the backend.",
        None,
        |c| &c.opened,
    ),
    (
        "backend_connections_closed",
        "Forwarded connections to the backend that ended.",
        None,
        |c| &c.closed,
    ),
    (
        "backend_sent",
        "Bytes sent to the backend (from clients).",
        Some(Unit::Bytes),
        |c| &c.bytes_out,
    ),
    (
        "backend_received",
        "Bytes received from the backend (for clients).",
        Some(Unit::Bytes),
        |c| &c.bytes_in,
    ),
    (
        "backend_connect_failures",
        "Connects to the backend that failed (refused, unreachable, timed out).",
        None,
        |c| &c.connect_failures,
    ),
    (
        "backend_connect_timeouts",
        "Connects to the backend that timed out.",
        None,
        |c| &c.connect_timeouts,
    ),
    (
        "backend_resets",
        "Connections the backend reset, or closed before its first byte.",
        None,
        |c| &c.resets,
    ),
    (
        "backend_ejections",
        "Times passive outlier detection ejected the backend.",
        None,
        |c| &c.ejections,
    ),
    (
        "backend_drain_closed",
        "Connections closed because the backend's drain deadline passed.",
        None,
        |c| &c.drained_closed,
    ),
    (
        "backend_health_checks_passed",
        "Active health checks that passed.",
        None,
        |c| &c.checks_passed,
    ),
    (
        "backend_health_checks_failed",
        "Active health checks that failed.",
        None,
        |c| &c.checks_failed,
    ),
];

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = self.live.snapshot();
        let services: Vec<_> = snap.catalog.services.values().collect();
        // Backends the agent keeps counters for (proxy mode, or health-checked).
        let mut backends = Vec::new();
        for s in &services {
            for b in &s.backends {
                if let Some(h) = snap.health(s.addr, b.addr) {
                    backends.push((s.name.as_str(), b, h.clone()));
                }
            }
        }
        // Label values borrow from here.
        let addrs: HashMap<SocketAddr, String> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (b.addr, b.addr.to_string())))
            .collect();

        for (name, help, unit, get) in BACKEND_COUNTERS {
            counter(
                &mut enc,
                name,
                help,
                unit,
                backends.iter().map(|(s, b, h)| {
                    (
                        labels(&addrs, s, b.addr),
                        get(&h.counters).load(Ordering::Relaxed),
                    )
                }),
            )?;
        }
        gauge(
            &mut enc,
            "backend_connections_active",
            "Forwarded connections to the backend open now.",
            None,
            backends.iter().map(|(s, b, h)| {
                (
                    labels(&addrs, s, b.addr),
                    h.counters.active.load(Ordering::Relaxed),
                )
            }),
        )?;
        gauge(
            &mut enc,
            "backend_ejected",
            "1 while passive outlier detection holds the backend out.",
            None,
            backends
                .iter()
                .map(|(s, b, h)| (labels(&addrs, s, b.addr), u64::from(snap.ejected(h)))),
        )?;
        gauge(
            &mut enc,
            "backend_health_down",
            "1 while active health checks hold the backend down.",
            None,
            backends.iter().map(|(s, b, h)| {
                (
                    labels(&addrs, s, b.addr),
                    u64::from(h.verdict() == Verdict::Down),
                )
            }),
        )?;
        gauge(
            &mut enc,
            "backend_draining",
            "1 while the backend drains (state drain or maint, or removed): open connections run on until the deadline.",
            None,
            backends
                .iter()
                .map(|(s, b, h)| (labels(&addrs, s, b.addr), u64::from(h.draining()))),
        )?;
        gauge(
            &mut enc,
            "backend_weight",
            "The backend's configured weight (0 while not ready).",
            None,
            services.iter().flat_map(|s| {
                s.backends.iter().map(|b| {
                    let w = if b.state == BackendState::Ready {
                        b.weight
                    } else {
                        0
                    };
                    (labels(&addrs, &s.name, b.addr), u64::from(w))
                })
            }),
        )?;
        family(
            &mut enc,
            "backend_connect_duration",
            "Time to connect to the backend (successful connects).",
            Some(Unit::Seconds),
            MetricType::Histogram,
            backends.iter().map(|(s, b, h)| {
                (
                    labels(&addrs, s, b.addr),
                    h.counters.timings.connect.clone(),
                )
            }),
        )?;
        family(
            &mut enc,
            "backend_connection_duration",
            "How long forwarded connections to the backend lasted.",
            Some(Unit::Seconds),
            MetricType::Histogram,
            backends.iter().map(|(s, b, h)| {
                (
                    labels(&addrs, s, b.addr),
                    h.counters.timings.duration.clone(),
                )
            }),
        )?;

        // Per service.

        let shared: Vec<_> = services
            .iter()
            .filter_map(|s| Some((s.name.as_str(), snap.forwarder(s)?)))
            .collect();
        gauge(
            &mut enc,
            "service_connections_active",
            "Forwarded connections of the service open now (proxy mode).",
            None,
            shared
                .iter()
                .map(|(n, f)| (service_label(n), f.active.load(Ordering::Relaxed))),
        )?;
        let sum = |name: &str, get: fn(&Counters) -> &AtomicU64| -> u64 {
            backends
                .iter()
                .filter(|(s, _, _)| *s == name)
                .map(|(_, _, h)| get(&h.counters).load(Ordering::Relaxed))
                .sum()
        };
        counter(
            &mut enc,
            "service_connections_opened",
            "Connections the forwarder opened for the service (sum over its current backends).",
            None,
            shared
                .iter()
                .map(|(n, _)| (service_label(n), sum(n, |c| &c.opened))),
        )?;
        counter(
            &mut enc,
            "service_connections_closed",
            "Forwarded connections of the service that ended (sum over its current backends).",
            None,
            shared
                .iter()
                .map(|(n, _)| (service_label(n), sum(n, |c| &c.closed))),
        )?;
        counter(
            &mut enc,
            "service_retries",
            "Connect attempts on another backend after a failure.",
            None,
            shared
                .iter()
                .map(|(n, f)| (service_label(n), f.retries.load(Ordering::Relaxed))),
        )?;
        counter(
            &mut enc,
            "service_refused_limit",
            "Connections refused because max_connections were open.",
            None,
            shared
                .iter()
                .map(|(n, f)| (service_label(n), f.refused_limit.load(Ordering::Relaxed))),
        )?;
        counter(
            &mut enc,
            "service_refused_no_backend",
            "Connections the forwarder refused because no backend could be reached (fail fast).",
            None,
            shared.iter().map(|(n, f)| {
                (
                    service_label(n),
                    f.refused_no_backend.load(Ordering::Relaxed),
                )
            }),
        )?;
        gauge(
            &mut enc,
            "service_backends",
            "Backends the service lists.",
            None,
            services
                .iter()
                .map(|s| (service_label(&s.name), s.backends.len() as u64)),
        )?;
        gauge(
            &mut enc,
            "service_backends_usable",
            "Backends that may take new connections: ready, weight above 0, not held down or ejected.",
            None,
            services.iter().map(|s| {
                let usable = s
                    .usable()
                    .filter(|b| {
                        snap.health(s.addr, b.addr)
                            .is_none_or(|h| h.verdict() != Verdict::Down && !snap.ejected(h))
                    })
                    .count();
                (service_label(&s.name), usable as u64)
            }),
        )?;
        one(
            &mut enc,
            "services",
            "Services in the catalog the datapath serves.",
            None,
            ConstGauge::new(services.len() as u64),
        )?;

        // The kernel's counters.
        let kernel = match &self.kernel {
            Some(k) => k.read().unwrap_or_else(|e| {
                warn!("kernel counters not read: {e}");
                Vec::new()
            }),
            None => Vec::new(),
        };
        counter(
            &mut enc,
            "kernel_events",
            "Events the eBPF programs counted (summed over CPUs), by counter.",
            None,
            kernel.iter().map(|(c, n)| ([("counter", c.name())], *n)),
        )?;

        // The registry's sources.
        let status = self.live.registry.status();
        let src = |s: &crate::registry::SourceStatus| [("source", s.source.name())];
        gauge(
            &mut enc,
            "registry_entries",
            "Entries in the source's layer.",
            None,
            status.iter().map(|s| (src(s), s.entries as u64)),
        )?;
        gauge(
            &mut enc,
            "registry_live",
            "1 while the source is connected and current.",
            None,
            status.iter().map(|s| (src(s), u64::from(s.live))),
        )?;
        gauge(
            &mut enc,
            "registry_staleness",
            "Seconds since the source last delivered a current view (absent: never).",
            Some(Unit::Seconds),
            status
                .iter()
                .filter_map(|s| Some((src(s), s.staleness_seconds?))),
        )?;
        counter(
            &mut enc,
            "registry_rejected",
            "Entries of the source rejected since the agent started.",
            None,
            status.iter().map(|s| (src(s), s.rejected_total)),
        )?;

        // The agent itself.
        one(
            &mut enc,
            "ready",
            "1 once the programs are attached and the first catalog is applied.",
            None,
            ConstGauge::new(u64::from(self.ready.load(Ordering::Relaxed))),
        )?;
        gauge(
            &mut enc,
            "build_info",
            "The agent's version (always 1).",
            None,
            [([("version", env!("CARGO_PKG_VERSION"))], 1u64)],
        )?;
        if let Some(p) = process::read() {
            one(
                &mut enc,
                "process_resident_memory",
                "Resident memory of the agent.",
                Some(Unit::Bytes),
                ConstGauge::new(p.resident_bytes),
            )?;
            one(
                &mut enc,
                "process_virtual_memory",
                "Virtual memory of the agent.",
                Some(Unit::Bytes),
                ConstGauge::new(p.virtual_bytes),
            )?;
            one(
                &mut enc,
                "process_cpu",
                "CPU time the agent used, user and system.",
                Some(Unit::Seconds),
                ConstCounter::new(p.cpu_seconds),
            )?;
            one(
                &mut enc,
                "process_open_fds",
                "Open file descriptors of the agent.",
                None,
                ConstGauge::new(p.open_fds),
            )?;
            if let Some(max) = p.max_fds {
                one(
                    &mut enc,
                    "process_max_fds",
                    "The agent's limit on open file descriptors.",
                    None,
                    ConstGauge::new(max),
                )?;
            }
            one(
                &mut enc,
                "process_threads",
                "Threads of the agent.",
                None,
                ConstGauge::new(p.threads),
            )?;
            one(
                &mut enc,
                "process_start_time",
                "When the agent started, in seconds since the Unix epoch.",
                Some(Unit::Seconds),
                ConstGauge::new(p.start_time_seconds),
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The running endpoint; dropping it stops serving.
pub struct MetricsServer(JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The exposition, as a scrape gets it.
pub fn exposition(metrics: &Arc<Metrics>) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix("switchyard");
    registry.register_collector(Box::new(metrics.clone()));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Serves `/metrics`, `/healthz` and `/readyz` where configured (`None`: turned off).
pub async fn start(
    config: &MetricsConfig,
    metrics: Metrics,
) -> Result<Option<MetricsServer>, MetricsError> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    info!(%addr, "metrics listening (/metrics, /healthz, /readyz)");
    let metrics = Arc::new(metrics);
    let task = tokio::spawn(server::serve(listener, Limits::default(), move |req| {
        let openmetrics = req
            .headers
            .get_all(hyper::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        std::future::ready(answer(&metrics, &req.method, &req.path, openmetrics))
    }));
    Ok(Some(MetricsServer(task)))
}

fn answer(metrics: &Arc<Metrics>, method: &Method, path: &str, openmetrics: bool) -> Reply {
    const TEXT: &str = "text/plain; charset=utf-8";
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Reply::text(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: this endpoint serves /metrics, /healthz and /readyz\n",
        );
    }
    if *method != Method::GET && *method != Method::HEAD {
        let mut r = Reply::text(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n");
        r.allow = Some("GET, HEAD");
        return r;
    }
    match path {
        "/metrics" => match exposition(metrics) {
            Ok(text) if openmetrics => Reply::text(StatusCode::OK, OPENMETRICS, text),
            Ok(text) => Reply::text(StatusCode::OK, TEXT_FORMAT, text_format(&text)),
            Err(_) => Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                "metrics could not be encoded\n",
            ),
        },
        "/healthz" => Reply::text(StatusCode::OK, TEXT, "ok\n"),
        _ if metrics.ready.load(Ordering::Relaxed) => Reply::text(StatusCode::OK, TEXT, "ready\n"),
        _ => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: programs not attached or no catalog applied yet\n",
        ),
    }
}

/// OpenMetrics text as the Prometheus text format (0.0.4): a counter family is named with its
/// `_total` suffix there, and there is no `# UNIT` or `# EOF`. Samples are written the same.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{p}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
