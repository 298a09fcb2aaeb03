//! HTTP mode's per-request series (`http/stats.rs` keeps them): requests by status class,
//! retries, gRPC statuses and durations per (service, route, backend), requests in flight per
//! (service, route). `route` is empty for requests served without a route; `backend` is empty
//! for answers the proxy made itself (no route, no backend, a timeout, a redirect); `service`
//! is empty for a gateway's requests that matched no route.

use std::{fmt, net::SocketAddr, sync::atomic::Ordering};

use prometheus_client::{
    encoding::DescriptorEncoder,
    metrics::{MetricType, counter::ConstCounter},
    registry::Unit,
};

use super::family::{counter, family, gauge, one};
use crate::{
    catalog::Catalog,
    http::stats::{CLASSES, GRPC_CODES, Series, Stats},
};

/// One series' labels, owned for the length of a scrape.
struct Row {
    service: String,
    route: String,
    backend: String,
    series: SeriesRef,
}

enum SeriesRef {
    Own(std::sync::Arc<crate::http::stats::Group>),
    Backend(std::sync::Arc<Series>),
}

impl Row {
    fn series(&self) -> &Series {
        match &self.series {
            SeriesRef::Own(g) => &g.own,
            SeriesRef::Backend(s) => s,
        }
    }

    fn labels(&self) -> [(&'static str, &str); 3] {
        [
            ("service", &self.service),
            ("route", &self.route),
            ("backend", &self.backend),
        ]
    }
}

pub fn encode(enc: &mut DescriptorEncoder, stats: &Stats, catalog: &Catalog) -> fmt::Result {
    // Series of services and backends that left the catalog go now.
    let listed = |name: &str| catalog.services.values().any(|s| s.name == name);
    let backend = |name: &str, b: SocketAddr| {
        catalog
            .services
            .values()
            .any(|s| s.name == name && s.backends.iter().any(|x| x.addr == b))
    };
    stats.retain(listed, backend);
    let groups = stats.groups();
    let mut rows = Vec::new();
    for (service, route, g) in &groups {
        rows.push(Row {
            service: service.to_string(),
            route: route.to_string(),
            backend: String::new(),
            series: SeriesRef::Own(g.clone()),
        });
        let mut backends = g.series();
        backends.sort_by_key(|(a, _)| *a);
        for (addr, s) in backends {
            rows.push(Row {
                service: service.to_string(),
                route: route.to_string(),
                backend: addr.map(|a| a.to_string()).unwrap_or_default(),
                series: SeriesRef::Backend(s),
            });
        }
    }
    counter(
        enc,
        "http_requests",
        "HTTP requests answered, by status class (backend empty: answered by the proxy itself).",
        None,
        rows.iter().flat_map(|r| {
            let [s, ro, b] = r.labels();
            CLASSES.iter().enumerate().filter_map(move |(i, c)| {
                let n = r.series().requests[i].load(Ordering::Relaxed);
                (n > 0).then_some(([s, ro, b, ("class", *c)], n))
            })
        }),
    )?;
    counter(
        enc,
        "http_retries",
        "HTTP requests tried again on another backend after this backend failed them.",
        None,
        rows.iter()
            .filter(|r| !r.backend.is_empty())
            .map(|r| (r.labels(), r.series().retries.load(Ordering::Relaxed))),
    )?;
    counter(
        enc,
        "http_grpc_responses",
        "gRPC calls answered, by grpc-status (trailers, or a trailers-only answer).",
        None,
        rows.iter().flat_map(|r| {
            let [s, ro, b] = r.labels();
            GRPC_CODES.iter().enumerate().filter_map(move |(i, c)| {
                let n = r.series().grpc[i].load(Ordering::Relaxed);
                (n > 0).then_some(([s, ro, b, ("code", *c)], n))
            })
        }),
    )?;
    family(
        enc,
        "http_request_duration",
        "From the request's headers to the response's end (its last byte or trailers).",
        Some(Unit::Seconds),
        MetricType::Histogram,
        rows.iter()
            .map(|r| (r.labels(), r.series().duration.clone())),
    )?;
    gauge(
        enc,
        "http_requests_in_flight",
        "HTTP requests received and not yet answered to their end.",
        None,
        groups.iter().map(|(s, r, g)| {
            (
                [("service", &**s), ("route", &**r)],
                g.in_flight.load(Ordering::Relaxed),
            )
        }),
    )?;
    one(
        enc,
        "http_unrecorded_requests",
        "HTTP requests not counted in the series above: the bound on series was reached.",
        None,
        ConstCounter::new(stats.unrecorded.load(Ordering::Relaxed)),
    )
}
