//! The exposition from known counters: names, labels, values, and the histograms.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use hyper::{Method, StatusCode};

use super::{Metrics, answer, exposition};
use crate::{
    catalog::{BackendState, Catalog, Mode, Protocol, Service, ServiceAddr},
    forwarder::{ForwardingDefaults, SharedTable, Table},
    health::Board,
    live::Live,
    registry::{Registry, Source},
    test_helpers::{backend, service},
};

fn world() -> (Arc<Metrics>, Arc<Board>, Arc<AtomicBool>) {
    let (registry, _rx) = Registry::open(None);
    let web = Service {
        mode: Mode::Proxy,
        backends: vec![
            backend("10.0.0.1:8080", 2, BackendState::Ready),
            backend("10.0.0.2:8080", 1, BackendState::Drain),
        ],
        ..service("web", "10.96.0.20:80", &[])
    };
    registry.replace(Source::File, BTreeMap::from([("web".into(), web)]), &[]);
    let board = Arc::new(Board::default());
    let table = SharedTable::default();
    let catalog: Catalog = (*registry.catalog()).clone();
    table.store(Table::build(
        &catalog,
        &Table::default(),
        &board,
        ForwardingDefaults {
            connect_timeout: Duration::from_secs(1),
            retries: 2,
        },
    ));
    let ready = Arc::new(AtomicBool::new(false));
    let live = Live {
        registry,
        board: board.clone(),
        table,
        kernel: None,
        http: Default::default(),
    };
    (
        Arc::new(Metrics::new(live, None, ready.clone())),
        board,
        ready,
    )
}

#[test]
fn the_exposition_carries_the_counters() {
    let (metrics, board, _) = world();
    let svc = ServiceAddr {
        vip: "10.96.0.20:80".parse().unwrap(),
        protocol: Protocol::Tcp,
    };
    let h = board.get(svc, "10.0.0.1:8080".parse().unwrap());
    h.counters.opened.store(7, Ordering::Relaxed);
    h.counters.closed.store(5, Ordering::Relaxed);
    h.counters.active.store(2, Ordering::Relaxed);
    h.counters.bytes_out.store(1234, Ordering::Relaxed);
    h.counters.timings.connected(Duration::from_millis(3));
    h.counters.timings.closed(Instant::now());
    let text = exposition(&metrics).unwrap();
    let b1 = r#"{service="web",backend="10.0.0.1:8080"}"#;
    for want in [
        format!("switchyard_backend_connections_opened_total{b1} 7\n"),
        format!("switchyard_backend_connections_closed_total{b1} 5\n"),
        format!("switchyard_backend_connections_active{b1} 2\n"),
        format!("switchyard_backend_sent_bytes_total{b1} 1234\n"),
        format!("switchyard_backend_weight{b1} 2\n"),
        r#"switchyard_backend_weight{service="web",backend="10.0.0.2:8080"} 0"#.to_owned(),
        r#"switchyard_backend_draining{service="web",backend="10.0.0.2:8080"} 1"#.to_owned(),
        format!("switchyard_backend_connect_duration_seconds_count{b1} 1\n"),
        format!("switchyard_backend_connection_duration_seconds_count{b1} 1\n"),
        "switchyard_service_connections_opened_total{service=\"web\"} 7\n".to_owned(),
        "switchyard_service_backends_usable{service=\"web\"} 1\n".to_owned(),
        "switchyard_registry_entries{source=\"file\"} 1\n".to_owned(),
        "switchyard_services 1\n".to_owned(),
        "# TYPE switchyard_kernel_events counter\n".to_owned(),
        "switchyard_ready 0\n".to_owned(),
        "# TYPE switchyard_process_cpu_seconds counter\n".to_owned(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    assert!(text.ends_with("# EOF\n"));
    // Each family is described once.
    let mut seen = std::collections::HashSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(seen.insert(line), "{line} twice");
    }
}

#[test]
fn readiness_follows_the_flag() {
    let (metrics, _, ready) = world();
    assert_eq!(
        answer(&metrics, &Method::GET, "/healthz", false).status,
        StatusCode::OK
    );
    assert_eq!(
        answer(&metrics, &Method::GET, "/readyz", false).status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    ready.store(true, Ordering::Relaxed);
    assert_eq!(
        answer(&metrics, &Method::GET, "/readyz", false).status,
        StatusCode::OK
    );
    assert_eq!(
        answer(&metrics, &Method::GET, "/nope", false).status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        answer(&metrics, &Method::POST, "/metrics", false).status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[test]
fn the_text_format_names_counters_with_their_suffix() {
    let (metrics, _, _) = world();
    let text = super::text_format(&exposition(&metrics).unwrap());
    assert!(
        text.contains("# TYPE switchyard_service_retries_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# HELP switchyard_service_retries_total Connect attempts"),
        "{text}"
    );
    assert!(text.contains("# TYPE switchyard_backend_connect_duration_seconds histogram\n"));
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    let (status, ct) = {
        let r = answer(&metrics, &Method::GET, "/metrics", true);
        (r.status, r.content_type)
    };
    assert_eq!((status, ct), (StatusCode::OK, super::OPENMETRICS));
}

#[test]
fn http_requests_are_exported_by_class_route_and_backend() {
    use crate::http::stats::Tally;
    let (metrics, _, _) = world();
    let stats = metrics.live.http.clone();
    let b1: std::net::SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let gone: std::net::SocketAddr = "10.9.9.9:80".parse().unwrap();
    let none = hyper::HeaderMap::new();
    let mut t = Tally::start(&stats, "web", Some("api"), Instant::now(), None);
    t.retry(b1);
    t.answer(StatusCode::OK, &none, Some(b1)).end(true);
    let mut t = Tally::start(&stats, "web", None, Instant::now(), None);
    let mut grpc = hyper::HeaderMap::new();
    grpc.insert("grpc-status", "14".parse().unwrap());
    t.answer(StatusCode::OK, &grpc, None).end(true);
    // A backend and a service the catalog no longer lists: dropped at the scrape.
    let mut t = Tally::start(&stats, "web", Some("api"), Instant::now(), None);
    t.answer(StatusCode::OK, &none, Some(gone)).end(true);
    let mut t = Tally::start(&stats, "old", None, Instant::now(), None);
    t.answer(StatusCode::OK, &none, None).end(true);
    let _open = Tally::start(&stats, "web", Some("api"), Instant::now(), None);
    let text = exposition(&metrics).unwrap();
    let api = r#"service="web",route="api",backend="10.0.0.1:8080""#;
    for want in [
        format!("switchyard_http_requests_total{{{api},class=\"2xx\"}} 1\n"),
        format!("switchyard_http_retries_total{{{api}}} 1\n"),
        format!("switchyard_http_request_duration_seconds_count{{{api}}} 1\n"),
        "switchyard_http_requests_total{service=\"web\",route=\"\",backend=\"\",class=\"2xx\"} 1\n"
            .to_owned(),
        "switchyard_http_grpc_responses_total{service=\"web\",route=\"\",backend=\"\",code=\"UNAVAILABLE\"} 1\n"
            .to_owned(),
        "switchyard_http_requests_in_flight{service=\"web\",route=\"api\"} 1\n".to_owned(),
        "switchyard_http_unrecorded_requests_total 0\n".to_owned(),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    assert!(
        !text.contains("10.9.9.9") && !text.contains("service=\"old\""),
        "{text}"
    );
}
