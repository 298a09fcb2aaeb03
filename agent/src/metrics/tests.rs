//! The exposition from known counters: names, labels, values, and the histograms.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use hyper::{Method, StatusCode};

use super::{Metrics, answer, exposition};
use crate::{
    catalog::{
        Algorithm, Backend, BackendState, Catalog, Mode, Policy, Protocol, Service, ServiceAddr,
    },
    forwarder::{ForwardingDefaults, SharedTable, Table},
    health::Board,
    live::Live,
    registry::{Registry, Source},
};

fn world() -> (Arc<Metrics>, Arc<Board>, Arc<AtomicBool>) {
    let (registry, _rx) = Registry::open(None);
    let web = Service {
        name: "web".into(),
        addr: ServiceAddr {
            vip: "10.96.0.20:80".parse().unwrap(),
            protocol: Protocol::Tcp,
        },
        mode: Mode::Proxy,
        algorithm: Algorithm::RoundRobin,
        affinity: None,
        backends: vec![
            Backend {
                addr: "10.0.0.1:8080".parse().unwrap(),
                weight: 2,
                state: BackendState::Ready,
            },
            Backend {
                addr: "10.0.0.2:8080".parse().unwrap(),
                weight: 1,
                state: BackendState::Drain,
            },
        ],
        policy: Policy::default(),
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
