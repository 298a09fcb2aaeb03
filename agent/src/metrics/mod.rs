//! Prometheus metrics, `/healthz` and `/readyz`, on one TCP address.
//!
//! Nothing is counted twice: the forwarder and the health checks already keep atomic counters
//! per (service, backend) on the [`Board`](crate::health::Board), HTTP mode keeps its request
//! counters where requests are answered ([`Stats`](crate::http::stats::Stats)), the kernel
//! keeps per-CPU counters in a map, the registry knows its sources. A scrape reads them all at
//! that moment ([`Collector`]) and writes OpenMetrics text, one section per file:
//! `backends.rs`, `services.rs`, `http.rs`, `kernel.rs`, `sources.rs`, `process.rs`. Only the
//! histograms ([`Timings`](crate::health::Timings), HTTP request durations) are metrics objects
//! of their own, kept beside the counters they go with.
//!
//! Names start with `switchyard_`; counters end in `_total`; durations are `_seconds`; labels are
//! `service` and `backend` (plus `counter` for the kernel's counters, `source` for the
//! registry's, and for HTTP `route`, `class` and gRPC's `code`: small fixed sets or names from
//! the config), so the series count follows the catalog.

mod backends;
mod family;
mod http;
mod kernel;
mod learned;
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
    listener::http::{self as listener_http, Limits, Reply},
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
    /// Backends of kernel-mode TCP services, as the programs count them.
    kernel: Vec<(&'a str, SocketAddr, switchyard_common::maps::BackendStats)>,
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
        let kernel = services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter_map(|b| Some((s.name.as_str(), b.addr, *snap.kernel(s, b.addr)?)))
            })
            .collect();
        Scraped {
            snap,
            services,
            backends,
            addrs,
            kernel,
        }
    }

    /// Samples of a per-backend family: the board's, with the kernel's value where the
    /// programs count the same thing ([`learned::shared`]), and the kernel-mode backends the
    /// board does not know.
    fn merged<'s>(
        &'s self,
        family: &'s str,
        board: impl Fn(&BackendHealth) -> u64 + 's,
    ) -> impl Iterator<Item = ([(&'static str, &'s str); 2], u64)> + 's {
        let now = self.snap.kernel_now_ns;
        let kernel = move |s: &str, b: SocketAddr| {
            self.kernel
                .iter()
                .find(|(ks, kb, _)| *ks == s && *kb == b)
                .and_then(|(_, _, k)| learned::shared(family, k, now))
        };
        let on_board = self.backends.iter().map(move |(s, b, h)| {
            let v = kernel(s, b.addr).unwrap_or_else(|| board(h));
            (self.labels(s, b.addr), v)
        });
        let kernel_only = self
            .kernel
            .iter()
            .filter(|(s, b, _)| {
                !self
                    .backends
                    .iter()
                    .any(|(bs, bb, _)| bs == s && bb.addr == *b)
            })
            .filter_map(move |(s, b, k)| {
                Some((self.labels(s, *b), learned::shared(family, k, now)?))
            });
        on_board.chain(kernel_only)
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
        learned::encode(&mut enc, &seen)?;
        services::encode(&mut enc, &seen)?;
        http::encode(&mut enc, &self.live.http, &snap.catalog)?;
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
pub struct MetricsServer {
    task: JoinHandle<()>,
    /// Another descriptor of the listening socket, for a successor to take over.
    listener: Option<std::net::TcpListener>,
}

impl MetricsServer {
    /// The listening socket, for a successor agent (see `handover`).
    pub fn listener(&self) -> Option<&std::net::TcpListener> {
        self.listener.as_ref()
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
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
    start_on(config, metrics, None).await
}

/// As [`start`], serving on `inherited` (a previous agent's listening socket, handed over)
/// when it listens on the configured address: `/healthz` never stops answering.
pub async fn start_on(
    config: &MetricsConfig,
    metrics: Metrics,
    inherited: Option<std::net::TcpListener>,
) -> Result<Option<MetricsServer>, MetricsError> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let err = |source| MetricsError::Bind { addr, source };
    let listener = match inherited.filter(|l| l.local_addr().is_ok_and(|a| a == addr)) {
        Some(l) => {
            l.set_nonblocking(true).map_err(err)?;
            TcpListener::from_std(l).map_err(err)?
        }
        None => TcpListener::bind(addr).await.map_err(err)?,
    };
    let kept = {
        use std::os::fd::AsFd as _;
        listener
            .as_fd()
            .try_clone_to_owned()
            .map(std::net::TcpListener::from)
            .map_err(err)?
    };
    info!(%addr, "metrics listening (/metrics, /healthz, /readyz)");
    let metrics = Arc::new(metrics);
    // Probes are answered whatever scrapers hold (see `defaults::PROBE_RESERVE`).
    let limits = Limits {
        reserve: crate::defaults::PROBE_RESERVE,
        reserved_paths: &["/healthz", "/readyz"],
        ..Limits::default()
    };
    let task = tokio::spawn(listener_http::serve(listener, limits, move |req| {
        let openmetrics = req
            .headers
            .get_all(hyper::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
        std::future::ready(answer(&metrics, &req.method, &req.path, openmetrics))
    }));
    Ok(Some(MetricsServer {
        task,
        listener: Some(kept),
    }))
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
