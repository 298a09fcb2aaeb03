//! Prometheus metrics, `/healthz` and `/readyz`, on one TCP address.
//!
//! Nothing is counted twice: the forwarder and the health checks already keep atomic counters
//! per (service, backend) on the [`Board`](crate::health::Board), the kernel keeps per-CPU
//! counters in a map, the registry knows its sources. A scrape reads them all at that moment
//! ([`Collector`]) and writes OpenMetrics text, one section per file: [`backends`],
//! [`services`], [`kernel`], [`sources`], [`process`]. Only the two histograms
//! ([`Timings`](crate::health::Timings)) are metrics objects of their own, kept beside the
//! counters they go with.
//!
//! Names start with `switchyard_`; counters end in `_total`; durations are `_seconds`; labels are
//! `service` and `backend` (plus `counter` for the kernel's counters and `source` for the
//! registry's: small fixed sets), so the series count follows the catalog.

mod backends;
mod family;
mod kernel;
mod process;
mod services;
mod sources;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use hyper::{Method, StatusCode};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use crate::{
    catalog::{Backend, Service},
    config::MetricsConfig,
    datapath::maps::KernelCounters,
    health::BackendHealth,
    listener::http::{self, Limits, Reply},
    live::{Live, Snapshot},
};

/// OpenMetrics, for scrapers that ask for it (Prometheus does).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, for everyone else (curl, `promtool check metrics`).
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// What one scrape looks at, taken once for the backend and service sections.
struct Scraped<'a> {
    snap: &'a Snapshot,
    services: Vec<&'a Service>,
    /// Backends the agent keeps counters for (proxy mode, or health-checked).
    backends: Vec<(&'a str, &'a Backend, Arc<BackendHealth>)>,
    /// Label values borrow from here.
    addrs: HashMap<SocketAddr, String>,
}

impl<'a> Scraped<'a> {
    fn new(snap: &'a Snapshot) -> Self {
        let services: Vec<&Service> = snap.catalog.services.values().map(|s| &**s).collect();
        let mut backends = Vec::new();
        for s in &services {
            for b in &s.backends {
                if let Some(h) = snap.health(s.addr, b.addr) {
                    backends.push((s.name.as_str(), b, h.clone()));
                }
            }
        }
        let addrs = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (b.addr, b.addr.to_string())))
            .collect();
        Scraped {
            snap,
            services,
            backends,
            addrs,
        }
    }

    /// The `service` and `backend` labels of one backend.
    fn labels<'s>(&'s self, service: &'s str, backend: SocketAddr) -> [(&'static str, &'s str); 2] {
        [
            ("service", service),
            (
                "backend",
                self.addrs.get(&backend).map_or("", String::as_str),
            ),
        ]
    }
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snap = self.live.snapshot();
        let seen = Scraped::new(&snap);
        backends::encode(&mut enc, &seen)?;
        services::encode(&mut enc, &seen)?;
        kernel::encode(&mut enc, self.kernel.as_ref())?;
        sources::encode(&mut enc, &self.live.registry)?;
        process::encode(&mut enc, self.ready.load(Ordering::Relaxed))
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
    let task = tokio::spawn(http::serve(listener, Limits::default(), move |req| {
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
