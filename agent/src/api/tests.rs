//! The endpoints without a socket: every answer, every refusal, and fuzzing that no bytes make
//! the API panic or change anything they should not.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{Api, view};
use crate::{
    catalog::{
        Algorithm, Backend, BackendState, BytePath, Catalog, HashKey, HealthCheck, Mode, Policy,
        Probe, Protocol, Service, ServiceAddr, entry::service_from_json,
    },
    forwarder::SharedTable,
    health::Board,
    live::Live,
    registry::{Registry, Source},
};

fn listen() -> Vec<SocketAddr> {
    vec!["10.77.0.1:15001".parse().unwrap()]
}

fn file_service(name: &str, vip: &str, backends: &[&str]) -> Service {
    Service {
        mode: Mode::Proxy,
        ..crate::test_helpers::service(name, vip, backends)
    }
}

/// An API over a registry whose file source serves `web` (proxy mode, two backends).
fn api() -> (Api, Registry) {
    let (registry, _rx) = Registry::open(None);
    let web = file_service("web", "10.96.0.10:80", &["10.0.0.1:8080", "10.0.0.2:8080"]);
    registry.replace(Source::File, BTreeMap::from([("web".into(), web)]), &[]);
    let live = Live {
        registry: registry.clone(),
        board: Arc::new(Board::default()),
        table: SharedTable::default(),
        kernel: None,
        http: Default::default(),
    };
    (Api::new(live, listen()), registry)
}

fn call(api: &Api, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    let reply = api.handle(&method, path, body.as_bytes());
    let value = serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: answer is not JSON ({e}): {:?}",
            reply.body
        )
    });
    (reply.status, value)
}

fn catalog(r: &Registry) -> Arc<Catalog> {
    r.catalog()
}

#[test]
fn lists_and_shows_services_with_their_source() {
    let (api, _) = api();
    let (status, v) = call(&api, Method::GET, "/v1/services", "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["services"][0]["name"], "web");
    assert_eq!(v["services"][0]["source"], "file");
    assert_eq!(
        v["services"][0]["service"]["backends"][1]["address"],
        "10.0.0.2:8080"
    );
    let (status, v) = call(&api, Method::GET, "/v1/services/web", "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["service"]["mode"], "proxy");
    let (status, v) = call(&api, Method::GET, "/v1/services/nope", "");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["field"], "name");
}

#[test]
fn creates_replaces_and_deletes_its_own_services() {
    let (api, registry) = api();
    let body = r#"{"name": "db", "vip": "10.96.0.20:5432", "backends": ["10.0.0.5:5432"]}"#;
    let (status, v) = call(&api, Method::POST, "/v1/services", body);
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["source"], "api");
    assert_eq!(catalog(&registry).services.len(), 2);

    // Creating it again is a conflict on the name.
    let (status, v) = call(&api, Method::POST, "/v1/services", body);
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::CONFLICT, Some("name"))
    );

    // GET, then PUT what GET said: nothing changes.
    let (_, got) = call(&api, Method::GET, "/v1/services/db", "");
    let before = catalog(&registry);
    let (status, _) = call(
        &api,
        Method::PUT,
        "/v1/services/db",
        &got["service"].to_string(),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(catalog(&registry), before);

    let (status, v) = call(&api, Method::DELETE, "/v1/services/db", "");
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(catalog(&registry).services.len(), 1);
    let (status, _) = call(&api, Method::DELETE, "/v1/services/db", "");
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[test]
fn a_backend_change_on_another_sources_service_is_an_override_until_released() {
    let (api, registry) = api();
    let (status, v) = call(
        &api,
        Method::PATCH,
        "/v1/services/web/backends/10.0.0.1:8080",
        r#"{"state": "drain", "weight": 3}"#,
    );
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["source"].as_str(), v["overrides"].as_str()),
        (Some("api"), Some("file"))
    );
    assert!(v["note"].as_str().unwrap().contains("/override"), "{v}");
    let web = catalog(&registry).services.values().next().unwrap().clone();
    assert_eq!(web.backends[0].state, BackendState::Drain);
    assert_eq!(web.backends[0].weight, 3);
    assert!(registry.entries(Source::Api).contains_key("web"));

    // The file's service cannot be deleted through the API, overridden or not.
    let (status, v) = call(&api, Method::DELETE, "/v1/services/web", "");
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(v["error"].as_str().unwrap().contains("/override"), "{v}");

    let (status, v) = call(&api, Method::DELETE, "/v1/services/web/override", "");
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["source"], "file");
    let web = catalog(&registry).services.values().next().unwrap().clone();
    assert_eq!(web.backends[0].state, BackendState::Ready);
    let (status, _) = call(&api, Method::DELETE, "/v1/services/web/override", "");
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[test]
fn backends_are_added_and_removed() {
    let (api, registry) = api();
    let (status, v) = call(
        &api,
        Method::POST,
        "/v1/services/web/backends",
        r#"{"address": "10.0.0.3:8080", "weight": 2}"#,
    );
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        catalog(&registry)
            .services
            .values()
            .next()
            .unwrap()
            .backends
            .len(),
        3
    );
    let (status, v) = call(
        &api,
        Method::POST,
        "/v1/services/web/backends",
        r#""10.0.0.3:8080""#,
    );
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::CONFLICT, Some("address"))
    );
    let (status, _) = call(
        &api,
        Method::DELETE,
        "/v1/services/web/backends/10.0.0.3%3A8080",
        "",
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        catalog(&registry)
            .services
            .values()
            .next()
            .unwrap()
            .backends
            .len(),
        2
    );
    let (status, v) = call(
        &api,
        Method::DELETE,
        "/v1/services/web/backends/10.0.0.3:8080",
        "",
    );
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("address"))
    );
}

#[test]
fn every_bad_request_names_its_field_and_changes_nothing() {
    let (api, registry) = api();
    let before = catalog(&registry);
    let api_layer = registry.entries(Source::Api);
    let cases: &[(Method, &str, &str, StatusCode, Option<&str>)] = &[
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": "10.96.0.1"}"#,
            StatusCode::BAD_REQUEST,
            Some("vip"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": 80}"#,
            StatusCode::BAD_REQUEST,
            Some("vip"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"vip": "10.96.0.1:80"}"#,
            StatusCode::BAD_REQUEST,
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": "10.96.0.1:80", "colour": 1}"#,
            StatusCode::BAD_REQUEST,
            Some("colour"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": "10.96.0.1:80", "backends": ["10.0.0.1:0"]}"#,
            StatusCode::BAD_REQUEST,
            Some("backends[0]"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": "10.96.0.1:80", "backends": [{"address": "10.0.0.1:1", "weight": "heavy"}]}"#,
            StatusCode::BAD_REQUEST,
            Some("backends[0].weight"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": "10.96.0.10:80"}"#,
            StatusCode::CONFLICT,
            Some("vip"),
        ),
        (
            Method::POST,
            "/v1/services",
            r#"{"name": "x", "vip": "[fd00::1]:80", "mode": "proxy"}"#,
            StatusCode::BAD_REQUEST,
            Some("mode"),
        ),
        (
            Method::POST,
            "/v1/services",
            "{\"name\": ",
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::POST,
            "/v1/services",
            "[1, 2]",
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::PUT,
            "/v1/services/web",
            r#"{"name": "other", "vip": "10.96.0.10:80"}"#,
            StatusCode::BAD_REQUEST,
            Some("name"),
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.1:8080",
            r#"{"weight": 1000}"#,
            StatusCode::BAD_REQUEST,
            Some("weight"),
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.1:8080",
            r#"{"weight": "heavy"}"#,
            StatusCode::BAD_REQUEST,
            Some("weight"),
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.1:8080",
            r#"{"state": "asleep"}"#,
            StatusCode::BAD_REQUEST,
            Some("state"),
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.1:8080",
            r#"{"colour": 1}"#,
            StatusCode::BAD_REQUEST,
            Some("colour"),
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.1:8080",
            "{}",
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.1",
            r#"{"weight": 2}"#,
            StatusCode::BAD_REQUEST,
            Some("address"),
        ),
        (
            Method::PATCH,
            "/v1/services/web/backends/10.0.0.9:8080",
            r#"{"weight": 2}"#,
            StatusCode::NOT_FOUND,
            Some("address"),
        ),
        (
            Method::PATCH,
            "/v1/services/nope/backends/10.0.0.1:8080",
            r#"{"weight": 2}"#,
            StatusCode::NOT_FOUND,
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/services/web/backends",
            r#""[fd00::1]:80""#,
            StatusCode::BAD_REQUEST,
            Some("address"),
        ),
        (
            Method::POST,
            "/v1/services/web/backends",
            r#""nowhere""#,
            StatusCode::BAD_REQUEST,
            Some("address"),
        ),
        (
            Method::POST,
            "/v1/services/web/backends",
            r#"{"address": "10.0.0.7:1", "weight": -1}"#,
            StatusCode::BAD_REQUEST,
            Some("weight"),
        ),
        (
            Method::GET,
            "/v1/services/web/backends",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
            None,
        ),
        (Method::GET, "/v2/services", "", StatusCode::NOT_FOUND, None),
        (
            Method::GET,
            "/v1/services/%zz",
            "",
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (method, path, body, status, field) in cases {
        let (got, v) = call(&api, method.clone(), path, body);
        assert_eq!(got, *status, "{method} {path} {body}: {v}");
        assert_eq!(v["field"].as_str(), *field, "{method} {path} {body}: {v}");
        assert!(!v["error"].as_str().unwrap_or("").is_empty(), "{v}");
    }
    assert_eq!(catalog(&registry), before);
    assert_eq!(registry.entries(Source::Api), api_layer);
}

#[test]
fn a_refused_method_says_which_are_taken() {
    let (api, _) = api();
    let reply = api.handle(&Method::DELETE, "/v1/services", b"");
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.allow, Some("GET, POST"));
}

#[test]
fn state_registry_and_version_answer() {
    let (api, _) = api();
    let (status, v) = call(&api, Method::GET, "/v1/services/web/state", "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["backends"][0]["health"], "unknown");
    let (status, v) = call(&api, Method::GET, "/v1/state", "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["services"].as_array().map(Vec::len), Some(1));
    let (status, v) = call(&api, Method::GET, "/v1/registry", "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["sources"][0]["source"], "file");
    assert_eq!(v["sources"][0]["entries"], 1);
    assert!(
        v["sources"][0]["last_sync"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let (status, v) = call(&api, Method::GET, "/v1/version", "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

// ---- fuzzing -------------------------------------------------------------------------------

fn methods() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE),
        Just(Method::HEAD),
        Just(Method::OPTIONS),
    ]
}

fn paths() -> impl Strategy<Value = String> {
    let known = prop_oneof![
        Just("/v1/services".to_owned()),
        Just("/v1/services/web".to_owned()),
        Just("/v1/services/web/override".to_owned()),
        Just("/v1/services/web/state".to_owned()),
        Just("/v1/services/web/backends".to_owned()),
        Just("/v1/services/web/backends/10.0.0.1:8080".to_owned()),
        Just("/v1/services/new".to_owned()),
        Just("/v1/state".to_owned()),
        Just("/v1/registry".to_owned()),
        Just("/v1/version".to_owned()),
    ];
    prop_oneof![
        3 => known,
        1 => "/v1/[a-z%0-9:/\\[\\]]{0,40}",
        1 => ".{0,60}",
    ]
}

/// JSON values of any shape, with the field names the API knows appearing often.
fn json_values() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("10.96.0.30:80".to_owned()),
            Just("10.0.0.9:8080".to_owned()),
            Just("[fd00::1]:80".to_owned()),
            Just("proxy".to_owned()),
            Just("drain".to_owned()),
            Just("30s".to_owned()),
            ".{0,12}",
        ]
        .prop_map(Value::from),
    ];
    let keys = prop_oneof![
        Just("name".to_owned()),
        Just("vip".to_owned()),
        Just("mode".to_owned()),
        Just("backends".to_owned()),
        Just("address".to_owned()),
        Just("weight".to_owned()),
        Just("state".to_owned()),
        Just("health".to_owned()),
        Just("affinity_timeout".to_owned()),
        "[a-z_]{1,10}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn assert_sane(api: &Api, method: &Method, path: &str, body: &[u8]) {
    let reply = api.handle(method, path, body);
    assert!(
        !reply.status.is_server_error(),
        "{method} {path}: {}",
        reply.status
    );
    let v: Value = serde_json::from_slice(&reply.body).expect("every answer is JSON");
    if reply.status.is_client_error() {
        let e: view::ErrorBody = serde_json::from_value(v).expect("a refusal is an ErrorBody");
        assert!(!e.error.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(method in methods(), path in paths(), body in prop::collection::vec(any::<u8>(), 0..256)) {
        let (api, _) = api();
        assert_sane(&api, &method, &path, &body);
    }

    #[test]
    fn arbitrary_json_never_panics_and_refusals_change_nothing(method in methods(), path in paths(), body in json_values()) {
        let (api, registry) = api();
        let before = catalog(&registry);
        let api_layer = registry.entries(Source::Api);
        let text = body.to_string();
        let reply = api.handle(&method, &path, text.as_bytes());
        prop_assert!(!reply.status.is_server_error());
        if !reply.status.is_success() {
            prop_assert_eq!(catalog(&registry), before);
            prop_assert_eq!(registry.entries(Source::Api), api_layer);
        }
    }

    #[test]
    fn an_entry_reads_back_as_the_same_service(s in services()) {
        prop_assume!(s.validate().is_ok());
        let text = view::entry(&s).to_string();
        let back = service_from_json(text.as_bytes(), "", &listen()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(back, s);
    }
}

fn durations() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..5000).prop_map(Duration::from_millis),
        (1u64..100_000).prop_map(Duration::from_secs),
    ]
}

fn services() -> impl Strategy<Value = Service> {
    let backends = prop::collection::btree_map(
        (1u8..250, 1u16..u16::MAX),
        (
            0u32..=256,
            prop_oneof![
                Just(BackendState::Ready),
                Just(BackendState::Drain),
                Just(BackendState::Maint)
            ],
        ),
        0..5,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|((host, port), (weight, state))| Backend {
                addr: SocketAddr::from(([10, 0, 0, host], port)),
                weight,
                state,
            })
            .collect::<Vec<_>>()
    });
    let health = prop::option::of(
        (any::<bool>(), "/[a-z]{0,8}", 100u16..600, 1u32..5, 1u32..5).prop_map(
            |(http, path, status, rise, fall)| HealthCheck {
                probe: if http {
                    Probe::Http { path, status }
                } else {
                    Probe::Tcp
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise,
                fall,
            },
        ),
    );
    let policy = (
        prop::option::of(durations()),
        prop::option::of(0u32..10),
        prop::option::of(1u32..1000),
        prop::option::of(durations()),
        prop::option::of(durations()),
        any::<bool>(),
        any::<bool>(),
        health,
        prop::option::of(1u32..10),
        prop::option::of(durations()),
    )
        .prop_map(
            |(ct, retries, max, drain, idle, hk, bp, health, of, oe)| Policy {
                connect_timeout: ct,
                retries,
                max_connections: max,
                drain_timeout: drain,
                idle_timeout: idle,
                hash_key: if hk {
                    HashKey::ClientIpPort
                } else {
                    HashKey::ClientIp
                },
                byte_path: if bp { BytePath::Splice } else { BytePath::Copy },
                health,
                outlier_failures: of,
                outlier_ejection: oe,
                ..Policy::default()
            },
        );
    let algorithms = prop_oneof![
        Just(Algorithm::Random),
        Just(Algorithm::WeightedRandom),
        Just(Algorithm::RoundRobin),
        Just(Algorithm::Maglev),
        Just(Algorithm::LeastConnections),
        Just(Algorithm::PeakEwma),
        Just(Algorithm::RingHash),
    ];
    (
        "[a-z][a-z0-9._-]{0,20}",
        (1u8..250, 1u16..u16::MAX),
        any::<bool>(),
        any::<bool>(),
        algorithms,
        prop::option::of((1u64..86_400).prop_map(Duration::from_secs)),
        backends,
        policy,
    )
        .prop_map(
            |(name, (host, port), udp, proxy, algorithm, affinity, backends, policy)| Service {
                name,
                addr: ServiceAddr {
                    vip: SocketAddr::from(([10, 96, 0, host], port)),
                    protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                },
                mode: if proxy { Mode::Proxy } else { Mode::Kernel },
                algorithm,
                affinity,
                backends,
                policy,
            },
        )
}

#[test]
fn a_large_entry_still_fits_the_body_limit() {
    // A thousand backends is far below the 1 MiB limit: the limit is for abuse, not for use.
    let backends: Vec<Value> = (0..1000)
        .map(|i| json!({"address": format!("10.1.{}.{}:8080", i / 250, i % 250 + 1), "weight": 1}))
        .collect();
    let body = json!({"name": "big", "vip": "10.96.9.9:80", "backends": backends}).to_string();
    assert!(body.len() < crate::defaults::API_MAX_BODY);
    let (api, _) = api();
    let (status, v) = call(&api, Method::POST, "/v1/services", &body);
    assert_eq!(status, StatusCode::CREATED, "{v}");
}
