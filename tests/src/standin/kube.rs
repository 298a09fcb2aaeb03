//! A **stand-in** for the Kubernetes API server, built from its documented wire format (the
//! API concepts page: list, watch, resource versions, `410 Gone`, bookmarks): it is not the real
//! kube-apiserver and runs none of its code. It serves what the agent's Kubernetes source asks
//! for, cluster-wide, as JSON: Services (`/api/v1/services`), EndpointSlices
//! (`/apis/discovery.k8s.io/v1/endpointslices`), and Gateway API's HTTPRoutes and GRPCRoutes
//! (`/apis/gateway.networking.k8s.io/v1/httproutes`, `…/grpcroutes`).
//!
//! - Every change takes the next resource version (one counter for all kinds, as etcd's
//!   revision is), and is kept in a history.
//! - A list (`limit`/`continue` pages) answers the current objects and the current version.
//! - A watch (`?watch=true&resourceVersion=N`) streams, chunked, one JSON event per line:
//!   `ADDED`, `MODIFIED`, `DELETED` for every change after N of its kind, then new ones as they
//!   come, until `timeoutSeconds` runs out or the server stops. With `allowWatchBookmarks=true`,
//!   [`KubeApi::bookmark`] sends each open watch a `BOOKMARK` carrying the current version.
//! - History before [`KubeApi::compact`] is gone: a watch from an older version is answered
//!   with an `ERROR` event holding a `Status` of code 410 (`Expired`), or, after
//!   [`KubeApi::gone_as_http`], with an HTTP 410 answer to the watch request itself.
//! - [`KubeApi::restart`] drops the listener and every open watch, keeping the objects and
//!   history, as an API server restarting over the same etcd does.
//!
//! No authentication: the agent reaches it through a kubeconfig with a plain `http://` server.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::http::{Handler, Request, Response, Server};
use crate::Netns;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
}

const ALL_KINDS: [Kind; 4] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::HttpRoute,
    Kind::GrpcRoute,
];

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::HttpRoute => "/apis/gateway.networking.k8s.io/v1/httproutes",
            Kind::GrpcRoute => "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::HttpRoute | Kind::GrpcRoute => "gateway.networking.k8s.io/v1",
        }
    }

    fn of_path(path: &str) -> Option<Kind> {
        ALL_KINDS.into_iter().find(|k| k.path() == path)
    }
}

struct Change {
    rv: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this are answered 410.
    compacted: u64,
    gone_as_http: bool,
    /// Bumped by [`KubeApi::bookmark`]: each open watch then sends one bookmark.
    bookmarks: u64,
    lists: BTreeMap<Kind, usize>,
    watches: BTreeMap<Kind, usize>,
    gone: BTreeMap<Kind, usize>,
    bookmarks_sent: BTreeMap<Kind, usize>,
}

type Shared = super::shared::Shared<Store>;

/// The stand-in API server, listening inside a namespace.
pub struct KubeApi<'a> {
    server: Server<'a>,
    shared: Arc<Shared>,
}

impl<'a> KubeApi<'a> {
    /// Listens on `addr` inside `netns`.
    pub fn start(netns: &'a Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let handler: Handler = Arc::new(move |req, resp| handle(&s, req, resp));
        Ok(KubeApi {
            server: Server::start_in(netns, addr, handler)?,
            shared,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// A kubeconfig that points at this server, written into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    \
             server: http://{}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    \
             user: standin\ncurrent-context: standin\nusers:\n- name: standin\n  user: {{}}\n",
            self.addr()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Creates or replaces an object (its kind, namespace and name from `kind` and its metadata).
    pub fn apply(&self, kind: Kind, mut object: Value) -> u64 {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let mut store = self.shared.lock();
        store.rv += 1;
        let rv = store.rv;
        object["kind"] = json!(kind.name());
        object["apiVersion"] = json!(kind.api_version());
        object["metadata"]["namespace"] = json!(ns);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("{}-{ns}-{name}", kind.name()));
        let before = store.objects.insert((kind, ns, name), object.clone());
        let event = if before.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.history.push(Change {
            rv,
            kind,
            event,
            object,
        });
        drop(store);
        self.shared.notify();
        rv
    }

    /// Deletes an object, if it is there.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        let mut store = self.shared.lock();
        let Some(mut object) = store
            .objects
            .remove(&(kind, ns.to_owned(), name.to_owned()))
        else {
            return;
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.history.push(Change {
            rv,
            kind,
            event: "DELETED",
            object,
        });
        drop(store);
        self.shared.notify();
    }

    /// Forgets the history up to now: a watch from any older version gets 410.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// From now on an expired watch is refused with an HTTP 410 answer instead of a 200 and an
    /// `ERROR` event (both are what API servers do, depending on the path a request takes).
    pub fn gone_as_http(&self, yes: bool) {
        self.shared.lock().gone_as_http = yes;
    }

    /// Every open watch that asked for bookmarks gets one, at the current version.
    pub fn bookmark(&self) {
        self.shared.lock().bookmarks += 1;
        self.shared.notify();
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// List requests served for `kind` so far.
    pub fn lists(&self, kind: Kind) -> usize {
        self.shared.lock().lists.get(&kind).copied().unwrap_or(0)
    }

    /// Watch requests served for `kind` so far.
    pub fn watches(&self, kind: Kind) -> usize {
        self.shared.lock().watches.get(&kind).copied().unwrap_or(0)
    }

    /// Watches of `kind` answered 410 so far.
    pub fn gone(&self, kind: Kind) -> usize {
        self.shared.lock().gone.get(&kind).copied().unwrap_or(0)
    }

    /// Bookmarks written to watches of `kind` so far.
    pub fn bookmarks_sent(&self, kind: Kind) -> usize {
        self.shared
            .lock()
            .bookmarks_sent
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    /// Stops listening and cuts every open watch.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Stops (closing every watch mid-stream) and listens again, objects and history kept.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.server.stop();
        self.server.start()
    }

    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.server.start()
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(shared: &Shared, req: &Request, resp: &mut Response) -> io::Result<()> {
    let Some(kind) = Kind::of_path(&req.path).filter(|_| req.method == "GET") else {
        let body = status(
            404,
            "NotFound",
            &format!("the stand-in does not serve {}", req.path),
        );
        return resp.send(404, &[], &body.to_string());
    };
    if req
        .query
        .get("watch")
        .is_some_and(|w| w == "true" || w == "1")
    {
        watch(shared, kind, req, resp)
    } else {
        list(shared, kind, req, resp)
    }
}

fn list(shared: &Shared, kind: Kind, req: &Request, resp: &mut Response) -> io::Result<()> {
    let mut store = shared.lock();
    *store.lists.entry(kind).or_default() += 1;
    let all: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((k, _, _), _)| *k == kind)
        .map(|(_, v)| v)
        .collect();
    let offset: usize = req
        .query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&Value> = all.iter().skip(offset).take(limit).copied().collect();
    let next = offset + page.len();
    let mut metadata = json!({"resourceVersion": store.rv.to_string()});
    if next < all.len() {
        metadata["continue"] = json!(next.to_string());
    }
    let body = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": page,
    });
    drop(store);
    resp.send(200, &[], &body.to_string())
}

fn watch(shared: &Shared, kind: Kind, req: &Request, resp: &mut Response) -> io::Result<()> {
    let from: Option<u64> = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let deadline = Instant::now() + timeout;

    let mut store = shared.lock();
    *store.watches.entry(kind).or_default() += 1;
    // No version (or "0"): the current objects first, as synthetic ADDED events.
    let mut pending: Vec<String> = Vec::new();
    let mut sent = match from {
        Some(v) => v,
        None => {
            for ((k, _, _), o) in &store.objects {
                if *k == kind {
                    pending.push(json!({"type": "ADDED", "object": o}).to_string());
                }
            }
            store.rv
        }
    };
    if sent < store.compacted {
        *store.gone.entry(kind).or_default() += 1;
        let message = format!("too old resource version: {sent} ({})", store.compacted);
        let gone = status(410, "Expired", &message);
        let as_http = store.gone_as_http;
        drop(store);
        if as_http {
            return resp.send(410, &[], &gone.to_string());
        }
        resp.start_chunked(200)?;
        resp.chunk(&format!("{}\n", json!({"type": "ERROR", "object": gone})))?;
        return resp.finish();
    }
    let mut bookmark_seen = store.bookmarks;
    drop(store);
    resp.start_chunked(200)?;
    for line in pending.drain(..) {
        resp.chunk(&format!("{line}\n"))?;
    }
    loop {
        if resp.stopping.load(Ordering::SeqCst) {
            // The server is going away: the connection is cut, no clean end.
            return Ok(());
        }
        if Instant::now() >= deadline {
            return resp.finish();
        }
        let store = shared.lock();
        let mut lines = Vec::new();
        let from = sent;
        for c in store
            .history
            .iter()
            .filter(|c| c.rv > from && c.kind == kind)
        {
            lines.push(json!({"type": c.event, "object": c.object}).to_string());
            sent = c.rv;
        }
        if bookmarks && store.bookmarks != bookmark_seen {
            bookmark_seen = store.bookmarks;
            sent = sent.max(store.rv);
            let mark = json!({"type": "BOOKMARK", "object": {
                "kind": kind.name(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": store.rv.to_string()}}});
            lines.push(mark.to_string());
        }
        let marked = lines.iter().any(|l| l.contains("\"BOOKMARK\""));
        if lines.is_empty() {
            drop(shared.wait(store, Duration::from_millis(200)));
            continue;
        }
        drop(store);
        for line in lines {
            resp.chunk(&format!("{line}\n"))?;
        }
        if marked {
            *shared.lock().bookmarks_sent.entry(kind).or_default() += 1;
        }
    }
}

/// A port of a stand-in Service: `(name, port, protocol)`; the name may be empty for a
/// single-port Service.
pub type Port<'a> = (&'a str, u16, &'a str);

/// A ClusterIP Service object, with `annotations`.
pub fn service(
    ns: &str,
    name: &str,
    cluster_ip: IpAddr,
    ports: &[Port],
    annotations: &[(&str, &str)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| {
            let mut v = json!({"port": p, "protocol": proto, "targetPort": p});
            if !n.is_empty() {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    json!({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip.to_string(),
                 "clusterIPs": [cluster_ip.to_string()], "ports": ports,
                 "sessionAffinity": "None"},
    })
}

/// One endpoint of a stand-in EndpointSlice.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

impl Endpoint {
    pub fn ready(ip: IpAddr) -> Self {
        Endpoint {
            ip,
            ready: true,
            serving: true,
            terminating: false,
            node: None,
        }
    }

    /// As a pod being deleted is shown: not ready, still serving, terminating.
    pub fn terminating(ip: IpAddr) -> Self {
        Endpoint {
            ip,
            ready: false,
            serving: true,
            terminating: true,
            node: None,
        }
    }
}

/// An EndpointSlice of `service` with one port (`port_name`, `port`, TCP).
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    endpoints: &[Endpoint],
    port_name: &str,
    port: u16,
) -> Value {
    let family = match endpoints.first() {
        Some(e) if e.ip.is_ipv6() => "IPv6",
        _ => "IPv4",
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
            });
            if let Some(n) = &e.node {
                v["nodeName"] = json!(n);
            }
            v
        })
        .collect();
    let mut p = json!({"port": port, "protocol": "TCP"});
    if !port_name.is_empty() {
        p["name"] = json!(port_name);
    }
    json!({
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "endpoints": endpoints,
        "ports": [p],
    })
}

/// An HTTPRoute (or, with `kind` [`Kind::GrpcRoute`], a GRPCRoute) with `spec` as given
/// (`parentRefs`, `hostnames`, `rules`).
pub fn route(kind: Kind, ns: &str, name: &str, spec: Value) -> (Kind, Value) {
    (
        kind,
        json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
}
