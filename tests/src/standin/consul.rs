//! A **stand-in** for Consul's HTTP API, built from its documented wire format (the catalog
//! and health endpoints, blocking queries, ACL tokens): it is not Consul and runs none of its
//! code. It serves what the agent's Consul source asks for:
//!
//! - `GET /v1/catalog/services`: `{"name": [tags…]}` (the union of the instances' tags).
//! - `GET /v1/health/service/NAME[?passing]`: each instance with its node, service and checks
//!   (`serfHealth` and the service's own check); with `passing`, only instances whose checks
//!   all pass.
//! - blocking queries: with `index=N`, the answer waits until the result's index passes N or
//!   `wait` (`10s`, `500ms`, `5m`; default 5 min) runs out; every answer carries
//!   `X-Consul-Index`.
//! - with a token set ([`ConsulApi::require_token`]), a request without that `X-Consul-Token`
//!   is refused with 403, as Consul's ACLs do.
//! - [`ConsulApi::start_tls`] serves the same over TLS (`https://`), as Consul's HTTPS port.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::http::{Handler, Request, Response, Server};
use crate::{
    Netns,
    servers::{TempDir, make_certificates},
};

/// One registered instance of a service.
#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    pub address: IpAddr,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub passing: bool,
    pub weight: u32,
}

impl Instance {
    /// A passing instance with `tags`.
    pub fn new(id: &str, address: SocketAddr, tags: &[&str]) -> Self {
        Instance {
            id: id.to_owned(),
            address: address.ip(),
            port: address.port(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::new(),
            passing: true,
            weight: 1,
        }
    }

    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.meta.insert(key.to_owned(), value.to_owned());
        self
    }
}

#[derive(Default)]
struct Entry {
    index: u64,
    instances: BTreeMap<String, Instance>,
}

#[derive(Default)]
struct Store {
    /// Raft-index-like counter: every change takes the next value.
    index: u64,
    /// The last change to the catalog's names or tags.
    catalog_index: u64,
    services: BTreeMap<String, Entry>,
    token: Option<String>,
    /// Requests refused for a missing or wrong token.
    refused: usize,
    /// Paths asked, in order.
    asked: Vec<String>,
}

type Shared = super::shared::Shared<Store>;

/// The stand-in Consul agent, listening inside a namespace.
pub struct ConsulApi<'a> {
    server: Server<'a>,
    shared: Arc<Shared>,
    /// With TLS: the CA and the server's certificate (for 127.0.0.1), removed on drop.
    certs: Option<TempDir>,
}

impl<'a> ConsulApi<'a> {
    pub fn start(netns: &'a Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        shared.lock().index = 1;
        let s = shared.clone();
        let handler: Handler = Arc::new(move |req, resp| handle(&s, req, resp));
        Ok(ConsulApi {
            server: Server::start_in(netns, addr, handler)?,
            shared,
            certs: None,
        })
    }

    /// The same over TLS (`https://`), with a certificate for 127.0.0.1 signed by a CA of its
    /// own: [`ConsulApi::ca`].
    pub fn start_tls(netns: &'a Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let certs = TempDir::new("sy-consul-tls-")?;
        make_certificates(certs.path())?;
        let chain = CertificateDer::pem_file_iter(certs.path().join("server.pem"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(certs.path().join("server.key"))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let shared = Arc::new(Shared::default());
        shared.lock().index = 1;
        let s = shared.clone();
        let handler: Handler = Arc::new(move |req, resp| handle(&s, req, resp));
        Ok(ConsulApi {
            server: Server::start_tls_in(netns, addr, handler, Some(Arc::new(config)))?,
            shared,
            certs: Some(certs),
        })
    }

    /// The CA file that signed a TLS stand-in's certificate.
    pub fn ca(&self) -> Option<std::path::PathBuf> {
        self.certs.as_ref().map(|d| d.path().join("ca.pem"))
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Refuse requests that lack this ACL token.
    pub fn require_token(&self, token: &str) {
        self.shared.lock().token = Some(token.to_owned());
    }

    /// Requests refused for their token so far.
    pub fn refused(&self) -> usize {
        self.shared.lock().refused
    }

    /// Paths asked so far (with their queries).
    pub fn asked(&self) -> Vec<String> {
        self.shared.lock().asked.clone()
    }

    fn change(&self, service: &str, f: impl FnOnce(&mut Entry) -> bool) {
        let mut store = self.shared.lock();
        store.index += 1;
        let index = store.index;
        let entry = store.services.entry(service.to_owned()).or_default();
        let tags_before = tags_of(entry);
        let existed = !entry.instances.is_empty();
        let catalog_changed = f(entry);
        entry.index = index;
        let gone = entry.instances.is_empty();
        let tags_changed = tags_before != tags_of(entry);
        if gone {
            store.services.remove(service);
        }
        if catalog_changed || tags_changed || gone || !existed {
            store.catalog_index = index;
        }
        drop(store);
        self.shared.notify();
    }

    /// Registers (or replaces) an instance of `service`.
    pub fn register(&self, service: &str, instance: Instance) {
        self.change(service, |e| {
            e.instances.insert(instance.id.clone(), instance).is_none()
        });
    }

    pub fn deregister(&self, service: &str, id: &str) {
        self.change(service, |e| e.instances.remove(id).is_some());
    }

    /// Sets an instance's service check to passing or critical.
    pub fn set_passing(&self, service: &str, id: &str, passing: bool) {
        self.change(service, |e| {
            if let Some(i) = e.instances.get_mut(id) {
                i.passing = passing;
            }
            false
        });
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.server.stop();
        self.server.start()
    }
}

fn tags_of(e: &Entry) -> BTreeSet<String> {
    e.instances
        .values()
        .flat_map(|i| i.tags.iter().cloned())
        .collect()
}

/// Consul's wait syntax: a number with `ms`, `s`, `m` or `h`.
fn wait_of(text: &str) -> Option<Duration> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    match &text[digits.len()..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" | "" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

fn handle(shared: &Shared, req: &Request, resp: &mut Response) -> io::Result<()> {
    {
        let mut store = shared.lock();
        let mut asked = req.path.clone();
        if !req.query.is_empty() {
            let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            asked.push('?');
            asked.push_str(&q.join("&"));
        }
        store.asked.push(asked);
        if let Some(token) = &store.token
            && req.headers.get("x-consul-token") != Some(token)
        {
            store.refused += 1;
            drop(store);
            return resp.send(403, &[], "ACL not found");
        }
    }
    let wanted: u64 = req
        .query
        .get("index")
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    let wait = req
        .query
        .get("wait")
        .and_then(|w| wait_of(w))
        .unwrap_or(Duration::from_secs(300))
        .min(Duration::from_secs(600));
    let deadline = Instant::now() + wait;
    let passing = req.query.contains_key("passing");
    let service = req
        .path
        .strip_prefix("/v1/health/service/")
        .map(str::to_owned);
    if service.is_none() && req.path != "/v1/catalog/services" {
        return resp.send(
            404,
            &[],
            &format!("stand-in: no such endpoint {}", req.path),
        );
    }

    let mut store = shared.lock();
    loop {
        let index = match &service {
            Some(name) => store
                .services
                .get(name)
                .map_or(store.catalog_index, |e| e.index),
            None => store.catalog_index,
        }
        .max(1);
        let now = Instant::now();
        if index > wanted || now >= deadline {
            let body = match &service {
                Some(name) => health(&store, name, passing),
                None => catalog(&store),
            };
            drop(store);
            return resp.send(
                200,
                &[
                    ("X-Consul-Index", index.to_string()),
                    ("X-Consul-KnownLeader", "true".into()),
                    ("X-Consul-LastContact", "0".into()),
                ],
                &body.to_string(),
            );
        }
        store = shared.wait(store, (deadline - now).min(Duration::from_millis(200)));
        if resp.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
    }
}

fn catalog(store: &Store) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("consul".into(), json!([]));
    for (name, e) in &store.services {
        out.insert(name.clone(), json!(tags_of(e)));
    }
    Value::Object(out)
}

fn health(store: &Store, name: &str, passing: bool) -> Value {
    let Some(e) = store.services.get(name) else {
        return json!([]);
    };
    let list: Vec<Value> = e
        .instances
        .values()
        .filter(|i| i.passing || !passing)
        .map(|i| {
            let status = if i.passing { "passing" } else { "critical" };
            json!({
                "Node": {"ID": "0b5e-node", "Node": "node-1", "Address": "10.77.0.1",
                         "Datacenter": "dc1"},
                "Service": {"ID": i.id, "Service": name, "Tags": i.tags, "Address": i.address.to_string(),
                            "Meta": i.meta, "Port": i.port,
                            "Weights": {"Passing": i.weight, "Warning": 1}},
                "Checks": [
                    {"Node": "node-1", "CheckID": "serfHealth", "Name": "Serf Health Status",
                     "Status": "passing", "ServiceID": "", "ServiceName": ""},
                    {"Node": "node-1", "CheckID": format!("service:{}", i.id),
                     "Name": format!("Service '{name}' check"), "Status": status,
                     "ServiceID": i.id, "ServiceName": name},
                ],
            })
        })
        .collect();
    json!(list)
}

#[cfg(test)]
mod tests {
    use super::wait_of;
    use std::time::Duration;

    #[test]
    fn reads_consul_waits() {
        assert_eq!(wait_of("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(wait_of("10s"), Some(Duration::from_secs(10)));
        assert_eq!(wait_of("5m"), Some(Duration::from_secs(300)));
        assert_eq!(wait_of("5x"), None);
    }
}
