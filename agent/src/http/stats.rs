//! HTTP mode's request counters, kept where a request is answered: per (service, route) a
//! group with its requests in flight, and per backend that answered (or the proxy itself) a
//! series of requests by status class, retries, gRPC statuses and a duration histogram. The
//! access log line is written here too, when the response ends. `metrics/http.rs` encodes
//! them; `ctl state` sums them per service and per route.
//!
//! Labels stay bounded: services and routes come from the catalog and the route table, backends
//! from the catalog; statuses are counted by class and gRPC codes by their 17 names. A scrape
//! drops the series of services and backends that left the catalog ([`Stats::retain`]), and
//! beyond [`defaults::HTTP_STATS_MAX_SERIES`] series nothing new is made (those requests are
//! counted as unrecorded).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use hyper::{HeaderMap, Method, StatusCode};
use prometheus_client::metrics::histogram::Histogram;
use tracing::info;

use crate::defaults;

/// Status classes, as label values.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// gRPC status codes by number, as gRPC names them.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Request duration, from the request's headers to the response's end: a cached answer on the
/// node's bridge to a long gRPC stream.
const DURATION_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

fn class(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

/// A code outside gRPC's 17 counts as `UNKNOWN`, as gRPC's own clients read it.
fn grpc_code(code: u32) -> usize {
    if (code as usize) < GRPC_CODES.len() {
        code as usize
    } else {
        2
    }
}

/// One label set's counts: requests answered by one backend (or by the proxy) for one
/// (service, route).
#[derive(Debug)]
pub struct Series {
    pub requests: [AtomicU64; 5],
    /// Retries on another backend after this one failed.
    pub retries: AtomicU64,
    pub grpc: [AtomicU64; 17],
    pub duration: Histogram,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            requests: Default::default(),
            retries: AtomicU64::new(0),
            grpc: Default::default(),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }
}

/// The requests of one (service, route).
#[derive(Debug, Default)]
pub struct Group {
    pub in_flight: AtomicU64,
    /// Answers the proxy made itself (no route, no backend, timeouts, redirects).
    pub own: Series,
    backends: RwLock<HashMap<SocketAddr, Arc<Series>>>,
}

impl Group {
    /// Each backend's series and the proxy's own (`None`).
    pub fn series(&self) -> Vec<(Option<SocketAddr>, Arc<Series>)> {
        let b = self.backends.read().unwrap_or_else(|e| e.into_inner());
        b.iter().map(|(a, s)| (Some(*a), s.clone())).collect()
    }
}

/// Request counts summed over series, for `ctl state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// By class: 1xx to 5xx.
    pub requests: [u64; 5],
    /// Of those, answered by the proxy itself.
    pub by_proxy: u64,
    pub retries: u64,
    pub in_flight: u64,
}

impl Totals {
    fn add(&mut self, s: &Series, own: bool) {
        for (t, n) in self.requests.iter_mut().zip(&s.requests) {
            let n = n.load(Ordering::Relaxed);
            *t += n;
            if own {
                self.by_proxy += n;
            }
        }
        self.retries += s.retries.load(Ordering::Relaxed);
    }
}

/// A service's groups by route (`""`: served without a route).
type Routes = HashMap<Arc<str>, Arc<Group>>;

/// Every group, by service, then route.
#[derive(Debug, Default)]
pub struct Stats {
    groups: RwLock<HashMap<Arc<str>, Routes>>,
    series: AtomicUsize,
    /// Requests not counted because the series bound was reached.
    pub unrecorded: AtomicU64,
}

impl Stats {
    /// The group of `service` and `route`, made on first use (`None`: the bound is reached).
    pub fn group(&self, service: &str, route: &str) -> Option<Arc<Group>> {
        {
            let g = self.groups.read().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = g.get(service).and_then(|r| r.get(route)) {
                return Some(found.clone());
            }
        }
        if !self.reserve() {
            return None;
        }
        let mut g = self.groups.write().unwrap_or_else(|e| e.into_inner());
        let routes = g.entry(service.into()).or_default();
        if let Some(found) = routes.get(route) {
            self.series.fetch_sub(1, Ordering::Relaxed);
            return Some(found.clone());
        }
        let made = Arc::new(Group::default());
        routes.insert(route.into(), made.clone());
        Some(made)
    }

    /// The series of `backend` in `group`, made on first use.
    fn backend(&self, group: &Group, backend: SocketAddr) -> Option<Arc<Series>> {
        if let Some(s) = group
            .backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&backend)
        {
            return Some(s.clone());
        }
        if !self.reserve() {
            return None;
        }
        let mut b = group.backends.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = b.get(&backend) {
            self.series.fetch_sub(1, Ordering::Relaxed);
            return Some(s.clone());
        }
        let made = Arc::new(Series::default());
        b.insert(backend, made.clone());
        Some(made)
    }

    fn reserve(&self) -> bool {
        let n = self.series.fetch_add(1, Ordering::Relaxed);
        if n >= defaults::HTTP_STATS_MAX_SERIES {
            self.series.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Every group: (service, route, group).
    pub fn groups(&self) -> Vec<(Arc<str>, Arc<str>, Arc<Group>)> {
        let g = self.groups.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = g
            .iter()
            .flat_map(|(s, routes)| {
                routes
                    .iter()
                    .map(|(r, g)| (s.clone(), r.clone(), g.clone()))
            })
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    /// Drops what is no longer served: services `service` says no to, and backends
    /// `backend(service, addr)` says no to.
    pub fn retain(
        &self,
        service: impl Fn(&str) -> bool,
        backend: impl Fn(&str, SocketAddr) -> bool,
    ) {
        let mut g = self.groups.write().unwrap_or_else(|e| e.into_inner());
        let mut dropped = 0;
        g.retain(|name, routes| {
            if service(name) || name.is_empty() {
                for group in routes.values() {
                    let mut b = group.backends.write().unwrap_or_else(|e| e.into_inner());
                    let before = b.len();
                    b.retain(|a, _| backend(name, *a));
                    dropped += before - b.len();
                }
                true
            } else {
                dropped += routes
                    .values()
                    .map(|g| 1 + g.backends.read().map_or(0, |b| b.len()))
                    .sum::<usize>();
                false
            }
        });
        self.series.fetch_sub(dropped, Ordering::Relaxed);
    }

    fn totals(&self, pick: impl Fn(&str, &str) -> bool) -> Totals {
        let mut t = Totals::default();
        for (s, r, g) in self.groups() {
            if !pick(&s, &r) {
                continue;
            }
            t.in_flight += g.in_flight.load(Ordering::Relaxed);
            t.add(&g.own, true);
            for (_, series) in g.series() {
                t.add(&series, false);
            }
        }
        t
    }

    /// A service's requests, over its routes and backends (`ctl state`).
    pub fn service_totals(&self, service: &str) -> Totals {
        self.totals(|s, _| s == service)
    }

    /// A route's requests, over the services it sends to (`ctl state`).
    pub fn route_totals(&self, route: &str) -> Totals {
        self.totals(|_, r| r == route)
    }

    /// A service's requests per route that sent them (`ctl state`), by route name.
    pub fn service_routes(&self, service: &str) -> Vec<(String, Totals)> {
        let mut names: Vec<String> = self
            .groups()
            .into_iter()
            .filter(|(s, r, _)| &**s == service && !r.is_empty())
            .map(|(_, r, _)| r.to_string())
            .collect();
        names.dedup();
        names
            .into_iter()
            .map(|r| {
                let t = self.totals(|s, x| s == service && x == r);
                (r, t)
            })
            .collect()
    }

    /// Routes that have served requests.
    pub fn routes(&self) -> Vec<String> {
        let mut r: Vec<String> = self
            .groups()
            .into_iter()
            .filter(|(_, r, _)| !r.is_empty())
            .map(|(_, r, _)| r.to_string())
            .collect();
        r.sort();
        r.dedup();
        r
    }
}

/// What the access log says of a request, taken from its head.
pub struct Line {
    /// Filled in by [`Tally::start`].
    pub service: String,
    pub route: Option<String>,
    pub method: Method,
    pub host: String,
    pub path: String,
    pub peer: SocketAddr,
}

/// One request from its head on: counted in flight on its group until its response ends.
pub struct Tally {
    stats: Arc<Stats>,
    /// Taken by the answer, which leaves flight when the response ends.
    group: Option<Arc<Group>>,
    started: Instant,
    retries: AtomicU32,
    line: Option<Box<Line>>,
}

impl Tally {
    pub fn start(
        stats: &Arc<Stats>,
        service: &str,
        route: Option<&str>,
        started: Instant,
        line: Option<Line>,
    ) -> Tally {
        let group = stats.group(service, route.unwrap_or(""));
        if let Some(g) = &group {
            g.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        let line = line.map(|mut l| {
            l.service = service.to_owned();
            l.route = route.map(str::to_owned);
            Box::new(l)
        });
        Tally {
            stats: stats.clone(),
            group,
            started,
            retries: AtomicU32::new(0),
            line,
        }
    }

    /// A retry on another backend after `failed` did not answer usefully.
    pub fn retry(&self, failed: SocketAddr) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self
            .group
            .as_ref()
            .and_then(|g| self.stats.backend(g, failed))
        {
            s.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The response's head goes to the client, from `backend` (`None`: the proxy's own
    /// answer): its status counts now, its duration and gRPC status once [`Done`] ends.
    pub fn answer(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        backend: Option<SocketAddr>,
    ) -> Done {
        let series = match (&self.group, backend) {
            (Some(g), Some(b)) => self.stats.backend(g, b).map(Counted::Backend),
            (Some(g), None) => Some(Counted::Own(g.clone())),
            (None, _) => None,
        };
        match series.as_ref().map(Counted::get) {
            Some(s) => s.requests[class(status)].fetch_add(1, Ordering::Relaxed),
            None => self.stats.unrecorded.fetch_add(1, Ordering::Relaxed),
        };
        Done {
            group: self.group.take(),
            series,
            started: self.started,
            status,
            grpc: super::retry::grpc_status(headers),
            backend,
            retries: self.retries.load(Ordering::Relaxed),
            line: self.line.take(),
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        // Never answered (the client left first): no longer in flight.
        if let Some(g) = &self.group {
            g.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Where an answer is counted: a backend's series, or the group's own.
enum Counted {
    Backend(Arc<Series>),
    Own(Arc<Group>),
}

impl Counted {
    fn get(&self) -> &Series {
        match self {
            Counted::Backend(s) => s,
            Counted::Own(g) => &g.own,
        }
    }
}

/// A request whose response is under way: recorded when the response ends.
pub struct Done {
    group: Option<Arc<Group>>,
    series: Option<Counted>,
    started: Instant,
    status: StatusCode,
    grpc: Option<u32>,
    backend: Option<SocketAddr>,
    retries: u32,
    line: Option<Box<Line>>,
}

impl Done {
    /// The trailers went by: a gRPC status there is the call's.
    pub fn trailers(&mut self, t: &HeaderMap) {
        if let Some(code) = super::retry::grpc_status(t) {
            self.grpc = Some(code);
        }
    }

    /// The response ended (`whole`: to its last byte).
    pub fn end(self, whole: bool) {
        let took = self.started.elapsed();
        if let Some(s) = self.series.as_ref().map(Counted::get) {
            s.duration.observe(took.as_secs_f64());
            if let Some(code) = self.grpc {
                s.grpc[grpc_code(code)].fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(g) = &self.group {
            g.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(l) = &self.line {
            info!(
                target: "switchyard::access",
                service = %l.service,
                route = %l.route.as_deref().unwrap_or("-"),
                peer = %l.peer,
                method = %l.method,
                host = %l.host,
                path = %l.path,
                status = self.status.as_u16(),
                grpc_status = %self.grpc.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                backend = %self.backend.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                retries = self.retries,
                seconds = took.as_secs_f64(),
                complete = whole,
                "request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_count_by_class_and_backend_and_leave_flight_when_they_end() {
        let stats = Arc::new(Stats::default());
        let b: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut t = Tally::start(&stats, "web", Some("r"), Instant::now(), None);
        assert_eq!(stats.route_totals("r").in_flight, 1);
        t.retry(b);
        let done = t.answer(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), Some(b));
        drop(t);
        assert_eq!(stats.route_totals("r").in_flight, 1, "until the body ends");
        done.end(true);
        let w = stats.service_totals("web");
        assert_eq!(w.requests, [0, 0, 0, 0, 1]);
        assert_eq!((w.retries, w.in_flight, w.by_proxy), (1, 0, 0));
        // A proxy's own answer; a request whose client left.
        let mut t = Tally::start(&stats, "web", None, Instant::now(), None);
        t.answer(StatusCode::NOT_FOUND, &HeaderMap::new(), None)
            .end(true);
        drop(Tally::start(&stats, "web", None, Instant::now(), None));
        let w = stats.service_totals("web");
        assert_eq!((w.requests[3], w.by_proxy, w.in_flight), (1, 1, 0));
        assert_eq!(stats.routes(), ["r"]);
        // Gone from the catalog: its series go.
        stats.retain(|s| s == "web", |_, a| a != b);
        assert_eq!(stats.service_totals("web").requests[4], 0);
        stats.retain(|_| false, |_, _| false);
        assert!(stats.groups().is_empty());
        assert_eq!(stats.series.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn grpc_codes_are_bounded() {
        assert_eq!(GRPC_CODES[grpc_code(14)], "UNAVAILABLE");
        assert_eq!(GRPC_CODES[grpc_code(99)], "UNKNOWN");
        assert_eq!(class(StatusCode::from_u16(599).unwrap()), 4);
        assert_eq!(CLASSES[class(StatusCode::CONTINUE)], "1xx");
    }
}
