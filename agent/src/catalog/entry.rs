//! A service entry as written, whichever source writes it: a `[[service]]` table of the file,
//! an etcd or API JSON value, the JSON the Kubernetes and Consul sources assemble. One schema,
//! one deserialization and one check ([`check_service`]) for all, so every source accepts the
//! same entries and names the same field when refusing one.

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{
    Deserialize,
    de::{self, Deserializer, MapAccess, Visitor, value::MapAccessDeserializer},
};

use super::{
    Algorithm, AppProtocol, Backend, BackendState, BytePath, HashKey, HealthCheck, Mode, Policy,
    Probe, Protocol, RequestKey, Service, ServiceAddr, duration::HumanDuration,
};
use crate::defaults;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    name: String,
    vip: SocketAddr,
    #[serde(default = "tcp")]
    protocol: Protocol,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    algorithm: Algorithm,
    /// Session affinity by client; `affinity_timeout` alone turns it on too.
    #[serde(default)]
    affinity: bool,
    affinity_timeout: Option<HumanDuration>,
    #[serde(default)]
    backends: Vec<RawBackend>,
    // Forwarding policy (proxy mode).
    connect_timeout: Option<HumanDuration>,
    retries: Option<u32>,
    max_connections: Option<u32>,
    drain_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    #[serde(default)]
    hash_key: RawHashKey,
    #[serde(default)]
    byte_path: BytePath,
    health: Option<RawHealth>,
    outlier_failures: Option<u32>,
    outlier_ejection: Option<HumanDuration>,
    #[serde(default)]
    app_protocol: AppProtocol,
    request_timeout: Option<HumanDuration>,
    try_timeout: Option<HumanDuration>,
    #[serde(default)]
    access_log: bool,
}

/// `hash_key`: `client_ip` (the default), `client_ip_port`, or in HTTP mode `header:NAME` or
/// `cookie:NAME` (the client's address where a request lacks it).
#[derive(Default)]
struct RawHashKey(HashKey, Option<RequestKey>);

/// Header and cookie names: an HTTP token (RFC 9110 §5.6.2), at most this long.
const KEY_NAME_MAX: usize = 128;

fn token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= KEY_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One `hash_key` value, as written.
pub fn hash_key(v: &str) -> Result<(HashKey, Option<RequestKey>), String> {
    let expected = "client_ip, client_ip_port, header:NAME or cookie:NAME";
    Ok(match v.split_once(':') {
        None if v == "client_ip" => (HashKey::ClientIp, None),
        None if v == "client_ip_port" => (HashKey::ClientIpPort, None),
        Some(("header", n)) if token(n) => (
            HashKey::ClientIp,
            Some(RequestKey::Header(n.to_ascii_lowercase())),
        ),
        Some(("cookie", n)) if token(n) => (HashKey::ClientIp, Some(RequestKey::Cookie(n.into()))),
        Some(("header" | "cookie", n)) => {
            return Err(format!(
                "`{n}` is not a header or cookie name (1 to {KEY_NAME_MAX} letters, digits or \
                 !#$%&'*+-.^_`|~)"
            ));
        }
        _ => return Err(format!("`{v}` is not one of {expected}")),
    })
}

impl<'de> Deserialize<'de> for RawHashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        let (client, request) = hash_key(&v).map_err(de::Error::custom)?;
        Ok(RawHashKey(client, request))
    }
}

/// `health = { kind = "http", path = "/healthz", status = 200, interval = "2s", … }`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "tcp_probe")]
    kind: String,
    path: Option<String>,
    status: Option<u16>,
    interval: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    rise: Option<u32>,
    fall: Option<u32>,
}

fn tcp_probe() -> String {
    "tcp".into()
}

impl RawHealth {
    fn into_check(self) -> Result<HealthCheck, String> {
        let probe = match self.kind.as_str() {
            "tcp" => Probe::Tcp,
            "http" => Probe::Http {
                path: self.path.unwrap_or_else(|| "/".into()),
                status: self.status.unwrap_or(200),
            },
            other => return Err(format!("health.kind: `{other}` is not tcp or http")),
        };
        Ok(HealthCheck {
            probe,
            interval: self.interval.map_or(defaults::HEALTH_INTERVAL, |d| d.0),
            timeout: self.timeout.map_or(defaults::HEALTH_TIMEOUT, |d| d.0),
            rise: self.rise.unwrap_or(defaults::HEALTH_RISE),
            fall: self.fall.unwrap_or(defaults::HEALTH_FALL),
        })
    }
}

pub(crate) fn tcp() -> Protocol {
    Protocol::Tcp
}

/// `affinity_timeout` alone turns affinity on; `affinity = true` alone takes the default.
pub(crate) fn affinity(on: bool, timeout: Option<HumanDuration>) -> Option<Duration> {
    match (on, timeout) {
        (_, Some(t)) => Some(t.0),
        (true, None) => Some(defaults::AFFINITY_TIMEOUT),
        (false, None) => None,
    }
}

/// What every entry must satisfy, whichever source it comes from: the service's own rules
/// ([`Service::validate`]) and, for proxy mode, a forwarder address of the vip's family.
pub fn check_service(service: &Service, listen: &[SocketAddr]) -> Result<(), String> {
    service.validate().map_err(|e| e.to_string())?;
    if service.mode == Mode::Proxy
        && !listen
            .iter()
            .any(|l| l.is_ipv4() == service.addr.vip.is_ipv4())
    {
        return Err("mode: proxy needs a forwarder.listen address of the vip's family".into());
    }
    Ok(())
}

impl RawService {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The one way from an entry as written (a TOML `[[service]]` table, an etcd JSON value)
    /// to a checked service, so every source accepts the same entries and names the same field.
    pub fn into_service(self, listen: &[SocketAddr]) -> Result<Service, String> {
        let raw = self;
        let health = match raw.health {
            Some(h) => Some(h.into_check()?),
            None => None,
        };
        let policy = Policy {
            connect_timeout: raw.connect_timeout.map(|d| d.0),
            retries: raw.retries,
            max_connections: raw.max_connections,
            drain_timeout: raw.drain_timeout.map(|d| d.0),
            idle_timeout: raw.idle_timeout.map(|d| d.0),
            hash_key: raw.hash_key.0,
            byte_path: raw.byte_path,
            health,
            outlier_failures: raw.outlier_failures,
            outlier_ejection: raw.outlier_ejection.map(|d| d.0),
            app_protocol: raw.app_protocol,
            request_timeout: raw.request_timeout.map(|d| d.0),
            try_timeout: raw.try_timeout.map(|d| d.0),
            access_log: raw.access_log,
            hash_on: raw.hash_key.1,
        };
        let service = Service {
            policy,
            name: raw.name,
            addr: ServiceAddr {
                vip: raw.vip,
                protocol: raw.protocol,
            },
            mode: raw.mode,
            algorithm: raw.algorithm,
            affinity: affinity(raw.affinity, raw.affinity_timeout),
            backends: raw.backends.into_iter().map(|b| b.0).collect(),
        };
        check_service(&service, listen)?;
        Ok(service)
    }
}

/// One service entry as JSON (an etcd value): the fields of a `[[service]]` table, through the
/// same deserialization and checks as the file, so an error names the field the same way
/// (`backends[0].address: …`, `backends[1]: port 0 is not a backend port`). `name` may be left
/// out: `default_name` (the key's last part) is taken.
pub fn service_from_json(
    json: &[u8],
    default_name: &str,
    listen: &[SocketAddr],
) -> Result<Service, String> {
    let mut value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let Some(fields) = value.as_object_mut() else {
        return Err("not an object with the fields of a [[service]] table".into());
    };
    fields.entry("name").or_insert_with(|| default_name.into());
    let raw: RawService = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." => e.into_inner().to_string(),
            _ => format!("{path}: {}", e.into_inner()),
        }
    })?;
    raw.into_service(listen)
}

/// One backend as JSON, as a `backends` list holds it (`"ip:port"` or
/// `{"address": "ip:port", "weight": 2, "state": "drain"}`), through the same deserialization as
/// the file; the error names the field (`weight: invalid type: …`). The backend is not checked
/// against its service here: the caller checks the service it joins.
pub fn backend_from_json(json: &[u8]) -> Result<Backend, String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw: RawBackend = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." => e.into_inner().to_string(),
            _ => format!("{path}: {}", e.into_inner()),
        }
    })?;
    de.end()
        .map_err(|e| format!("trailing characters after the backend: {e}"))?;
    Ok(raw.0)
}

/// A backend is `"ip:port"` or `{ address = "ip:port", weight = 2, state = "drain" }`.
struct RawBackend(Backend);

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            address: SocketAddr,
            #[serde(default = "default_weight")]
            weight: u32,
            #[serde(default)]
            state: BackendState,
        }
        fn default_weight() -> u32 {
            defaults::WEIGHT
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"ip:port\" or { address = \"ip:port\", weight = N, state = \"ready\" }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let addr = v
                    .parse()
                    .map_err(|_| E::custom(format!("`{v}` is not an ip:port address")))?;
                Ok(RawBackend(Backend {
                    addr,
                    weight: defaults::WEIGHT,
                    state: BackendState::Ready,
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let f = Full::deserialize(MapAccessDeserializer::new(map))?;
                Ok(RawBackend(Backend {
                    addr: f.address,
                    weight: f.weight,
                    state: f.state,
                }))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_helpers::config_with_forwarder as parse;

    fn json(text: &str) -> Result<Service, String> {
        service_from_json(
            text.as_bytes(),
            "web",
            &["10.77.0.1:15001".parse().unwrap()],
        )
    }

    #[test]
    fn a_json_entry_reads_like_a_toml_table() {
        let toml = parse(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nmode = \"proxy\"\n\
             affinity_timeout = \"30s\"\n\
             backends = [\"10.0.0.1:8080\", { address = \"10.0.0.2:8080\", weight = 3 }]\n",
        )
        .unwrap();
        let from_json = json(
            r#"{"vip": "10.96.0.10:80", "mode": "proxy", "affinity_timeout": 30,
                "backends": ["10.0.0.1:8080", {"address": "10.0.0.2:8080", "weight": 3}]}"#,
        )
        .unwrap();
        assert_eq!(
            toml.catalog.services.values().next().map(|s| &**s),
            Some(&from_json)
        );
        assert_eq!(from_json.name, "web", "the name comes from the key");
    }

    #[test]
    fn http_mode_fields_read_from_toml_and_json_alike() {
        let toml = parse(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nmode = \"proxy\"\n\
             app_protocol = \"grpc\"\nrequest_timeout = \"2s\"\ntry_timeout = \"500ms\"\n\
             access_log = true\n",
        )
        .unwrap();
        let from_json = json(
            r#"{"vip": "10.96.0.10:80", "mode": "proxy", "app_protocol": "grpc",
                "request_timeout": "2s", "try_timeout": "500ms", "access_log": true}"#,
        )
        .unwrap();
        let s = toml.catalog.services.values().next().unwrap();
        assert_eq!(s.as_ref(), &from_json);
        assert_eq!(s.policy.app_protocol, AppProtocol::Grpc);
        assert_eq!(s.policy.try_timeout, Some(Duration::from_millis(500)));
        assert!(s.policy.access_log);
    }

    #[test]
    fn hash_keys_read_and_refuse_with_the_field_named() {
        let s = json(
            r#"{"vip": "10.96.0.10:80", "mode": "proxy", "app_protocol": "http",
                "algorithm": "maglev", "hash_key": "header:X-User"}"#,
        )
        .unwrap();
        assert_eq!(s.policy.hash_on, Some(RequestKey::Header("x-user".into())));
        assert_eq!(s.policy.hash_key, HashKey::ClientIp, "the fallback");
        let s = json(
            r#"{"vip": "10.96.0.10:80", "mode": "proxy", "app_protocol": "grpc",
                "algorithm": "ring_hash", "hash_key": "cookie:session"}"#,
        )
        .unwrap();
        assert_eq!(s.policy.hash_on, Some(RequestKey::Cookie("session".into())));
        let s = json(r#"{"vip": "10.96.0.10:80", "hash_key": "client_ip_port"}"#).unwrap();
        assert_eq!(
            (s.policy.hash_key, s.policy.hash_on),
            (HashKey::ClientIpPort, None)
        );
        let cases = [
            (
                r#""hash_key": "header:""#,
                "hash_key: `` is not a header or cookie name",
            ),
            (
                r#""hash_key": "header:a b""#,
                "hash_key: `a b` is not a header",
            ),
            (
                r#""hash_key": "body:x""#,
                "hash_key: `body:x` is not one of",
            ),
            (r#""hash_key": 7"#, "hash_key: invalid type"),
        ];
        for (field, want) in cases {
            let text = format!(
                r#"{{"vip": "10.96.0.1:80", "mode": "proxy", "app_protocol": "http",
                    "algorithm": "maglev", {field}}}"#
            );
            let e = json(&text).unwrap_err();
            assert!(e.contains(want), "{text}: {e:?} lacks {want:?}");
        }
        let e = json(r#"{"vip": "10.96.0.1:80", "mode": "proxy", "algorithm": "maglev", "hash_key": "header:x"}"#)
            .unwrap_err();
        assert!(
            e.starts_with("hash_key: header:x is read from HTTP requests"),
            "{e}"
        );
        let e = json(
            r#"{"vip": "10.96.0.1:80", "mode": "proxy", "app_protocol": "http", "hash_key": "cookie:s"}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("hash_key: cookie:s is hashed by maglev or ring_hash only"),
            "{e}"
        );
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (
                r#"{"vip": "10.96.0.1:80", "backends": ["10.0.0.1:0"]}"#,
                "backends[0]: port 0",
            ),
            (r#"{"vip": "10.96.0.1"}"#, "vip: "),
            (
                r#"{"vip": "10.96.0.1:80", "mode": "teleport"}"#,
                "mode: unknown variant",
            ),
            (
                r#"{"vip": "10.96.0.1:80", "backends": [{"address": "10.0.0.1:1", "weight": -1}]}"#,
                "backends[0]",
            ),
            (
                r#"{"vip": "10.96.0.1:80", "colour": "red"}"#,
                "unknown field `colour`",
            ),
            (r#"{"vip": "#, "not JSON"),
            (r#"["10.96.0.1:80"]"#, "not an object"),
            (r#"{"name": "no spaces", "vip": "10.96.0.1:80"}"#, "name: "),
            (
                r#"{"vip": "10.96.0.1:80", "app_protocol": "http"}"#,
                "app_protocol: Http needs mode = \"proxy\"",
            ),
            (
                r#"{"vip": "10.96.0.1:80", "mode": "proxy", "app_protocol": "gopher"}"#,
                "app_protocol: unknown variant `gopher`",
            ),
            (
                r#"{"vip": "10.96.0.1:80", "mode": "proxy", "app_protocol": "http",
                    "try_timeout": "2s", "request_timeout": "1s"}"#,
                "try_timeout: must be positive and at most request_timeout",
            ),
        ];
        for (text, want) in cases {
            let e = json(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e:?} lacks {want:?}");
        }
    }
}
