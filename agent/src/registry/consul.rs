//! The Consul source: services registered in Consul with a service address of Switchyard's,
//! their backends the instances whose health checks all pass.
//!
//! `/v1/catalog/services` is followed with blocking queries (`index`, `wait`: the answer comes
//! when the catalog changes or the wait runs out); each service in it is followed the same way
//! through `/v1/health/service/NAME?passing`, so a failing check removes an instance from the
//! backends (it takes no new connections) and a passing one brings it back. Consul's rules for
//! the index are kept: an index that goes backwards (a restored or restarted server) starts
//! again from 0, and a failed request is retried with backoff, the entries serving as they were.
//!
//! Where a service's address comes from, and its settings:
//! - the tag `switchyard-vip=10.96.0.10:80` (several tags: several addresses), or else the
//!   service meta key `switchyard_vip` (`10.96.0.10:80`; several, comma-separated). A service
//!   with neither is not Switchyard's and is left alone.
//! - tags `switchyard-<setting>=<value>` or meta `switchyard_<setting>`: the settings of
//!   [`super::settings`] plus `protocol` (`tcp`, the default, or `udp`) and `affinity-timeout`.
//!   Unset: the agent's defaults (kernel mode, round robin).
//! - each passing instance is a backend at its service address (the node's address when the
//!   service has none) and port, weighted by `Weights.Passing` (capped at our maximum).
//!
//! An ACL token is sent as `X-Consul-Token`; `https://` addresses are checked against the CA
//! file given. A service whose tags or meta make no valid entry is rejected alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, header::HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{Registry, Rejected, Source, retry::Backoff, settings};
use crate::{
    catalog::{Service, entry::service_from_json},
    config::ConsulConfig,
    defaults,
};

/// The tag (`switchyard-vip=ip:port`) and meta key that give a service's address.
pub const VIP_TAG: &str = "switchyard-vip=";
pub const VIP_META: &str = "switchyard_vip";
const TAG_PREFIX: &str = "switchyard-";
const META_PREFIX: &str = "switchyard_";

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{url}: {source}")]
    Request {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url}: reading the answer: {reason}")]
    Body { url: String, reason: String },
    #[error("{url}: no answer within {0:?}", .after)]
    Timeout { url: String, after: Duration },
    #[error("{url}: {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error("{url}: no X-Consul-Index in the answer")]
    NoIndex { url: String },
    #[error("{url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("bad request: {0}")]
    Http(#[from] hyper::http::Error),
}

/// Consul's HTTP API, as this source asks it.
pub struct Consul {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    config: ConsulConfig,
}

impl Consul {
    pub fn new(config: ConsulConfig) -> Result<Self, ConsulError> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &config.ca {
            let path = ca.display().to_string();
            let pem = std::fs::read(ca).map_err(|source| ConsulError::File {
                path: path.clone(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ConsulError::Ca {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(ConsulError::Ca {
                    path,
                    reason: "no certificate in it".into(),
                });
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Consul { client, config })
    }

    fn token(&self) -> Result<Option<String>, ConsulError> {
        if let Some(path) = &self.config.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConsulError::File {
                path: path.display().to_string(),
                source,
            })?;
            return Ok(Some(text.trim().to_owned()));
        }
        Ok(self.config.token.clone())
    }

    /// A blocking GET of `path` (with its query, if any) from `index`: the new index and the
    /// body. Index 0 answers at once.
    pub async fn get(&self, path: &str, index: u64) -> Result<(u64, Bytes), ConsulError> {
        let mut query = Vec::new();
        if index > 0 {
            query.push(format!("index={index}"));
            query.push(format!("wait={}ms", self.config.wait.as_millis()));
        }
        if let Some(dc) = &self.config.datacenter {
            query.push(format!("dc={}", encode(dc)));
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = if query.is_empty() {
            format!("{}{path}", self.config.address)
        } else {
            format!("{}{path}{sep}{}", self.config.address, query.join("&"))
        };
        let mut request = Request::get(&url).header("accept", "application/json");
        if let Some(token) = self.token()? {
            let value = HeaderValue::from_str(&token).map_err(|_| ConsulError::Decode {
                url: url.clone(),
                reason: "the ACL token is not a valid header value".into(),
            })?;
            request = request.header("x-consul-token", value);
        }
        let request = request.body(Empty::new())?;
        let after = self.config.wait + self.config.wait / 16 + defaults::CONSUL_REQUEST_SLACK;
        let answer = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|source| ConsulError::Request {
                        url: url.clone(),
                        source,
                    })?;
            let status = response.status();
            let index = response
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body = Limited::new(response.into_body(), defaults::CONSUL_MAX_BODY)
                .collect()
                .await
                .map_err(|e| ConsulError::Body {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(ConsulError::Status {
                    url: url.clone(),
                    status,
                    message: String::from_utf8_lossy(&body)
                        .trim()
                        .chars()
                        .take(200)
                        .collect(),
                });
            }
            let index = index.ok_or_else(|| ConsulError::NoIndex { url: url.clone() })?;
            Ok((index, body))
        };
        match tokio::time::timeout(after, answer).await {
            Ok(r) => r,
            Err(_) => Err(ConsulError::Timeout { url, after }),
        }
    }
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Consul's rule for the next index: never backwards, never 0 after an answer.
fn next_index(old: u64, new: u64) -> u64 {
    if new < old { 0 } else { new.max(1) }
}

/// Follows the catalog until the task is dropped. `listen` is the forwarder's addresses.
pub async fn run(registry: Registry, config: ConsulConfig, listen: Vec<SocketAddr>) {
    let mut retry = Backoff::default();
    let consul = loop {
        match Consul::new(config.clone()) {
            Ok(c) => break Arc::new(c),
            Err(e) => {
                let wait = retry.next();
                warn!("consul: {e}; retrying in {wait:?}");
                registry.set_live(Source::Consul, false, Some(e.to_string()));
                tokio::time::sleep(wait).await;
            }
        }
    };
    let mut followers: BTreeMap<String, Follower> = BTreeMap::new();
    let mut index = 0;
    let mut first = true;
    loop {
        let listed = consul
            .get("/v1/catalog/services", index)
            .await
            .and_then(|(i, body)| {
                let services: BTreeMap<String, Vec<String>> = serde_json::from_slice(&body)
                    .map_err(|e| ConsulError::Decode {
                        url: "/v1/catalog/services".into(),
                        reason: e.to_string(),
                    })?;
                Ok((i, services))
            });
        let (new_index, services) = match listed {
            Ok(answer) => answer,
            Err(e) => {
                let wait = retry.next();
                warn!(
                    address = %config.address,
                    "consul: {e}; retrying in {wait:?}, serving the entries as they were"
                );
                registry.set_live(Source::Consul, false, Some(e.to_string()));
                index = 0;
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        retry.reset();
        if index == 0 || first {
            info!(
                services = services.len(),
                index = new_index,
                "consul: read the catalog"
            );
        }
        index = next_index(index, new_index);
        registry.set_live(Source::Consul, true, None);

        // Services gone from the catalog (or, at the first answer, saved from an earlier run
        // and no longer there): their entries go.
        let gone: Vec<String> = followers
            .keys()
            .filter(|n| !services.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(f) = followers.remove(&name) {
                f.task.abort();
            }
            remove_service(&registry, &name);
        }
        if first {
            for key in registry.keys(Source::Consul, "") {
                let service = key.split('/').next().unwrap_or_default();
                if !services.contains_key(service) {
                    registry.put(Source::Consul, &key, None);
                }
            }
            first = false;
        }
        for (name, tags) in services {
            match followers.get(&name) {
                Some(f) => {
                    f.tags.send_if_modified(|t| {
                        let changed = *t != tags;
                        *t = tags.clone();
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(tags);
                    let task = tokio::spawn(follow(
                        consul.clone(),
                        registry.clone(),
                        name.clone(),
                        rx,
                        listen.clone(),
                    ));
                    followers.insert(name, Follower { task, tags: tx });
                }
            }
        }
    }
}

struct Follower {
    task: JoinHandle<()>,
    tags: watch::Sender<Vec<String>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn remove_service(registry: &Registry, name: &str) {
    let prefix = format!("{name}/");
    for key in registry.keys(Source::Consul, &prefix) {
        info!(key = %key, "consul: service gone from the catalog");
        registry.put(Source::Consul, &key, None);
    }
}

/// One instance as `/v1/health/service` gives it (the fields used).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    pub node: Node,
    pub service: InstanceService,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(default)]
    pub address: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceService {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub weights: Option<Weights>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
}

/// Follows one service's passing instances; its catalog tags come through `tags`.
async fn follow(
    consul: Arc<Consul>,
    registry: Registry,
    name: String,
    mut tags: watch::Receiver<Vec<String>>,
    listen: Vec<SocketAddr>,
) {
    let path = format!("/v1/health/service/{}?passing", encode(&name));
    let mut index = 0;
    let mut retry = Backoff::default();
    let mut instances: Option<Vec<Instance>> = None;
    let mut state = Made::default();
    loop {
        tokio::select! {
            answer = consul.get(&path, index) => {
                let parsed = answer.and_then(|(i, body)| {
                    serde_json::from_slice::<Vec<Instance>>(&body)
                        .map(|list| (i, list))
                        .map_err(|e| ConsulError::Decode { url: path.clone(), reason: e.to_string() })
                });
                match parsed {
                    Ok((i, list)) => {
                        retry.reset();
                        index = next_index(index, i);
                        if instances.as_ref() != Some(&list) {
                            instances = Some(list);
                        } else {
                            continue;
                        }
                    }
                    Err(e) => {
                        let wait = retry.next();
                        warn!(service = %name, "consul: {e}; retrying in {wait:?}");
                        registry.set_live(Source::Consul, false, Some(format!("{name}: {e}")));
                        index = 0;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            changed = tags.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let Some(list) = &instances else { continue };
        let tags_now = tags.borrow_and_update().clone();
        state.apply(&registry, &name, &tags_now, list, &listen);
    }
}

/// What a follower made last, so it can tell what to remove.
#[derive(Default)]
struct Made {
    keys: BTreeSet<String>,
    /// The addresses last known from meta, kept while no instance passes.
    meta_vips: Vec<SocketAddr>,
}

impl Made {
    fn apply(
        &mut self,
        registry: &Registry,
        name: &str,
        tags: &[String],
        instances: &[Instance],
        listen: &[SocketAddr],
    ) {
        let made = match entries(name, tags, instances, &self.meta_vips, listen) {
            Ok((made, meta_vips)) => {
                self.meta_vips = meta_vips;
                made
            }
            Err(reason) => {
                // The whole service is at fault: each entry it had keeps its last good state.
                let keys = if self.keys.is_empty() {
                    vec![format!("{name}/")]
                } else {
                    self.keys.iter().cloned().collect()
                };
                for key in keys {
                    registry.reject(
                        Source::Consul,
                        &Rejected {
                            key,
                            reason: reason.clone(),
                        },
                    );
                }
                return;
            }
        };
        let now: BTreeSet<String> = made.keys().cloned().collect();
        for gone in self.keys.difference(&now) {
            registry.put(Source::Consul, gone, None);
        }
        for (key, entry) in made {
            let checked = entry.and_then(|s| {
                match registry.clash(Source::Consul, &key, &s, &BTreeSet::new()) {
                    Some(reason) => Err(reason),
                    None => Ok(s),
                }
            });
            match checked {
                Ok(s) => {
                    let addrs: Vec<String> =
                        s.backends.iter().map(|b| b.addr.to_string()).collect();
                    info!(key = %key, "consul: backends {}", addrs.join(" "));
                    registry.put(Source::Consul, &key, Some(s));
                }
                Err(reason) => registry.reject(Source::Consul, &Rejected { key, reason }),
            }
        }
        self.keys = now;
    }
}

type Entries = BTreeMap<String, Result<Service, String>>;

/// The entries of one Consul service (keys `NAME/VIP`), and the addresses its instances' meta
/// gave. `Err`: the service's tags or meta are at fault as a whole.
pub fn entries(
    name: &str,
    tags: &[String],
    instances: &[Instance],
    last_meta_vips: &[SocketAddr],
    listen: &[SocketAddr],
) -> Result<(Entries, Vec<SocketAddr>), String> {
    let mut fields = Map::new();
    let mut vips: Vec<SocketAddr> = Vec::new();
    for tag in tags {
        if let Some(v) = tag.strip_prefix(VIP_TAG) {
            vips.push(
                v.parse()
                    .map_err(|_| format!("tag {tag}: `{v}` is not an ip:port address"))?,
            );
        } else if let Some(setting) = tag.strip_prefix(TAG_PREFIX) {
            let Some((setting, value)) = setting.split_once('=') else {
                return Err(format!("tag {tag}: expected {TAG_PREFIX}<setting>=<value>"));
            };
            settings::set(&mut fields, setting, value, settings::PROTOCOL_AND_AFFINITY)
                .map_err(|e| format!("tag {TAG_PREFIX}{e}"))?;
        }
    }
    // Meta: every instance must say the same (one service, one set of settings).
    let mut meta: Option<(&str, BTreeMap<&str, &str>)> = None;
    for i in instances {
        let mine: BTreeMap<&str, &str> = i
            .service
            .meta
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(META_PREFIX))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        match &meta {
            None => meta = Some((&i.service.id, mine)),
            Some((first, theirs)) if *theirs != mine => {
                return Err(format!(
                    "meta: instances {first:?} and {:?} disagree on the switchyard_ keys",
                    i.service.id
                ));
            }
            Some(_) => {}
        }
    }
    let mut meta_vips = Vec::new();
    if let Some((_, meta)) = &meta {
        for (key, value) in meta {
            if *key == VIP_META {
                for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    meta_vips.push(v.parse().map_err(|_| {
                        format!("meta {VIP_META}: `{v}` is not an ip:port address")
                    })?);
                }
            } else if let Some(setting) = key.strip_prefix(META_PREFIX) {
                settings::set(&mut fields, setting, value, settings::PROTOCOL_AND_AFFINITY)
                    .map_err(|e| format!("meta {META_PREFIX}{e}"))?;
            }
        }
    } else {
        // No passing instance: the addresses the meta gave last still name the service.
        meta_vips = last_meta_vips.to_vec();
    }
    if vips.is_empty() {
        vips = meta_vips.clone();
    }
    vips.sort();
    vips.dedup();

    let mut out = BTreeMap::new();
    for vip in &vips {
        let key = format!("{name}/{vip}");
        let entry_name = if vips.len() == 1 {
            name.to_owned()
        } else {
            let v6 = if vip.is_ipv6() { "-v6" } else { "" };
            format!("{name}-{}{v6}", vip.port())
        };
        let mut backends = Vec::new();
        for i in instances {
            let address = if i.service.address.is_empty() {
                &i.node.address
            } else {
                &i.service.address
            };
            let Ok(ip) = address.parse::<IpAddr>() else {
                debug!(service = name, instance = %i.service.id, address, "not an IP address; skipped");
                continue;
            };
            if ip.is_ipv4() != vip.is_ipv4() {
                continue;
            }
            let weight = i
                .service
                .weights
                .as_ref()
                .map_or(defaults::WEIGHT, |w| w.passing)
                .clamp(1, defaults::MAX_WEIGHT);
            let addr = SocketAddr::new(ip, i.service.port);
            backends.push(json!({"address": addr.to_string(), "weight": weight}));
        }
        backends.sort_by_key(|b| b["address"].as_str().map(str::to_owned));
        backends.dedup_by_key(|b| b["address"].as_str().map(str::to_owned));
        let mut f = fields.clone();
        f.insert("name".into(), json!(entry_name));
        f.insert("vip".into(), json!(vip.to_string()));
        f.insert("backends".into(), Value::Array(backends));
        let made = service_from_json(Value::Object(f).to_string().as_bytes(), name, listen);
        out.insert(key, made);
    }
    Ok((out, meta_vips))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Mode;

    fn instance(id: &str, address: &str, port: u16, meta: &[(&str, &str)]) -> Instance {
        serde_json::from_value(json!({
            "Node": {"Node": "n1", "Address": "10.0.9.9"},
            "Service": {
                "ID": id, "Service": "web", "Address": address, "Port": port,
                "Meta": meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "Weights": {"Passing": 2, "Warning": 1},
            },
            "Checks": [],
        }))
        .unwrap()
    }

    fn listen() -> Vec<SocketAddr> {
        vec!["10.77.0.1:15001".parse().unwrap()]
    }

    #[test]
    fn tags_give_the_address_and_settings() {
        let tags = vec![
            "switchyard-vip=10.96.0.10:80".to_owned(),
            "switchyard-mode=proxy".to_owned(),
            "v2".to_owned(),
        ];
        let instances = [
            instance("a", "10.0.0.1", 8080, &[]),
            instance("b", "", 8080, &[]),
        ];
        let (made, _) = entries("web", &tags, &instances, &[], &listen()).unwrap();
        let s = made["web/10.96.0.10:80"].as_ref().unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.mode, Mode::Proxy);
        let addrs: Vec<String> = s.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.9.9:8080"]);
        assert_eq!(s.backends[0].weight, 2);
    }

    #[test]
    fn meta_gives_the_address_and_is_kept_while_nothing_passes() {
        let meta = [
            ("switchyard_vip", "10.96.0.11:53"),
            ("switchyard_protocol", "udp"),
        ];
        let (made, vips) = entries(
            "dns",
            &[],
            &[instance("a", "10.0.0.1", 53, &meta)],
            &[],
            &listen(),
        )
        .unwrap();
        assert_eq!(made.len(), 1);
        let (none_pass, _) = entries("dns", &[], &[], &vips, &listen()).unwrap();
        assert!(
            none_pass["dns/10.96.0.11:53"]
                .as_ref()
                .unwrap()
                .backends
                .is_empty()
        );
    }

    #[test]
    fn bad_tags_and_meta_are_named() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case; 4] = [
            (
                &["switchyard-vip=10.96.0.10"],
                &[],
                "tag switchyard-vip=10.96.0.10",
            ),
            (
                &["switchyard-mdoe=proxy"],
                &[],
                "tag switchyard-mdoe: not a setting",
            ),
            (
                &["switchyard-proxy"],
                &[],
                "expected switchyard-<setting>=<value>",
            ),
            (
                &[],
                &[("switchyard_retries", "x")],
                "meta switchyard_retries: `x`",
            ),
        ];
        for (tags, meta, want) in cases {
            let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
            let e = entries(
                "web",
                &tags,
                &[instance("a", "10.0.0.1", 80, meta)],
                &[],
                &listen(),
            )
            .unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let tags = vec![
            "switchyard-vip=10.96.0.10:80".to_owned(),
            "switchyard-mode=teleport".into(),
        ];
        let (made, _) = entries("web", &tags, &[], &[], &listen()).unwrap();
        let e = made["web/10.96.0.10:80"].as_ref().unwrap_err();
        assert!(e.contains("mode: unknown variant"), "{e}");
    }

    #[test]
    fn the_index_never_goes_backwards() {
        assert_eq!(next_index(0, 5), 5);
        assert_eq!(next_index(5, 7), 7);
        assert_eq!(next_index(7, 3), 0);
        assert_eq!(next_index(0, 0), 1);
    }

    /// A self-signed test CA (openssl, P-256); only its parsing is exercised.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBkTCCATegAwIBAgIUaWAlCH39ZI/MhzGDY7UYe9YErFswCgYIKoZIzj0EAwIw\nHTEbMBkGA1UEAwwSc3dpdGNoeWFyZC10ZXN0LWNhMCAXDTI2MTEyNjAxMzYyOFoY\nDzIxMjYxMTAyMDEzNjI4WjAdMRswGQYDVQQDDBJzd2l0Y2h5YXJkLXRlc3QtY2Ew\nWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAR9iCbYuzlUa1SjLXmkzF96y2XNDk5j\n8FgJRLDVRK/47w4Rv3QzeCuTbIr1PKN6usAImHb+OpLTEzrZcr9l5gLgo1MwUTAd\nBgNVHQ4EFgQUYxr/zR++A3Mtb1y7knEhlJkImVQwHwYDVR0jBBgwFoAUYxr/zR++\nA3Mtb1y7knEhlJkImVQwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF\nAiAKzevFEnQgbbZCbRurK55sPOyxuzYHJgJ4rMKCOphf0QIhAP369xhrC/FdXJUE\nQPkEye8qI7vNiqCzTWG80/EbEKUs\n-----END CERTIFICATE-----\n";

    #[test]
    fn an_https_address_takes_its_ca_from_the_file() {
        let dir = std::env::temp_dir().join(format!("sy-consul-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("ca.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&good, TEST_CA).unwrap();
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let config = |ca: &std::path::Path| ConsulConfig {
            address: "https://consul.example:8501".into(),
            token: None,
            token_file: None,
            ca: Some(ca.to_owned()),
            datacenter: None,
            wait: Duration::from_secs(10),
        };
        assert!(Consul::new(config(&good)).is_ok());
        let e = Consul::new(config(&empty)).err().unwrap().to_string();
        assert!(e.contains("no certificate"), "{e}");
        let e = Consul::new(config(&dir.join("missing.pem")))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
