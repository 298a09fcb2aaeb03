//! The Kubernetes source: every Service's cluster IPs and ports become service addresses, and
//! the endpoints of its EndpointSlices their backends.
//!
//! Both kinds are listed, then watched from the list's resource version (kube's watcher, with
//! bookmarks asked for, so a resumed watch starts from the newest version the server vouched
//! for rather than from the last object seen). A watch that ends (the server's timeout, a
//! restarted API server) is resumed from that version; one the server answers with `410 Gone`,
//! as an `ERROR` event or as the answer to the watch request itself, is listed whole again. The
//! layer is replaced whole after each complete list, and edited service by service in between.
//!
//! What each object becomes:
//! - a Service of type ClusterIP (or NodePort/LoadBalancer: their cluster IP) gives one entry
//!   per cluster IP × port: `spec.clusterIPs`, `ports[].port`, `ports[].protocol` (TCP or UDP),
//!   `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.timeoutSeconds`
//!   (default 10800 s, kube-proxy's). Headless and ExternalName Services are not entries.
//! - the endpoints of its EndpointSlices (label `kubernetes.io/service-name`, same namespace,
//!   address type of the cluster IP's family), each at the slice port whose name (and protocol)
//!   is the Service port's, as the EndpointSlice controller writes them (the Service's
//!   `targetPort` resolved per pod): `ready` → `ready`; `terminating` (serving or not) → `drain`
//!   (no new connections, open ones run to the drain deadline); neither → `maint`.
//!   `ready` left out counts as ready, as the API documents.
//! - annotations `switchyard.io/<setting>` ([`super::settings`]): `mode` (default kernel),
//!   `algorithm` (default round_robin), `connect-timeout`, `retries`, `max-connections`,
//!   `drain-timeout`, `idle-timeout`, `hash-key`, `byte-path`, `outlier-failures`,
//!   `outlier-ejection`, `health` (JSON). Unset: the agent's defaults.
//! - with `node_name` known: `internalTrafficPolicy: Local` keeps only this node's endpoints;
//!   `prefer_local` keeps only this node's while one of them is ready.
//!
//! HTTPRoutes and GRPCRoutes are followed beside them ([`super::kubernetes_routes`]).
//!
//! An object that does not make a valid entry (an unknown setting, an SCTP port, a bad value)
//! is rejected alone with its reason; its entries keep their last good state.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Service as KubeService, ServicePort},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{utils::StreamBackoff, watcher},
};
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use super::{Claims, Registry, Rejected, Source, retry::Backoff, settings};
use crate::{
    catalog::{Service, entry::service_from_json},
    config::KubernetesConfig,
    defaults,
};

/// Annotations under this prefix are Switchyard settings.
pub const ANNOTATION_PREFIX: &str = "switchyard.io/";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster config: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("client: {0}")]
    Client(#[from] kube::Error),
}

/// Follows Services and EndpointSlices until the task is dropped. `listen` is the forwarder's
/// addresses (a proxy-mode entry needs one of its family).
pub async fn run(registry: Registry, config: KubernetesConfig, listen: Vec<SocketAddr>) {
    let mut retry = Backoff::default();
    let client = loop {
        match client(&config).await {
            Ok(c) => break c,
            Err(e) => {
                let wait = retry.next();
                warn!("kubernetes: {e}; retrying in {wait:?}, serving the entries as they were");
                registry.set_live(Source::Kubernetes, false, Some(e.to_string()));
                tokio::time::sleep(wait).await;
            }
        }
    };
    // HTTPRoutes and GRPCRoutes beside, in the same task (aborted with it).
    let routes = super::kubernetes_routes::follow(registry.clone(), client.clone());
    let mut follower = Follower {
        registry,
        config,
        listen,
        services: BTreeMap::new(),
        slices: BTreeMap::new(),
        by_owner: HashMap::new(),
        listing_services: None,
        listing_slices: None,
        synced: (false, false),
        emitted: BTreeMap::new(),
        last_error: None,
        slices_read: 0,
    };
    tokio::join!(follower.follow(client), routes);
}

async fn client(config: &KubernetesConfig) -> Result<Client, KubeError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            let options = KubeConfigOptions {
                context: config.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(kubeconfig_error)?
        }
        None => kube::Config::incluster()?,
    };
    info!(server = %kube_config.cluster_url, "kubernetes: following Services and EndpointSlices");
    Ok(Client::try_from(kube_config)?)
}

/// Our reconnect backoff, in the shape kube's stream backoff takes.
pub(super) struct Retry(Backoff);

pub(super) fn retry_backoff() -> Retry {
    Retry(Backoff::default())
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next())
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        self.0.reset();
    }
}

type Events<K> = Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// A fresh watcher on every namespace's objects of kind `K`: it lists first.
fn watch<K>(client: &Client) -> Events<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    // Bookmarks on (the default), list then watch, pages of 500, consistent reads.
    let events = watcher(api, watcher::Config::default());
    Box::pin(StreamBackoff::new(events, Retry(Backoff::default())))
}

/// Namespace and name.
type ObjectKey = (String, String);

fn key_of<K: ResourceExt>(object: &K) -> ObjectKey {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// Which kind an event is about.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Services,
    Slices,
}

struct Follower {
    registry: Registry,
    config: KubernetesConfig,
    listen: Vec<SocketAddr>,
    services: BTreeMap<ObjectKey, KubeService>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// The slices of each Service (by the slices' label), so that making a Service's entries
    /// costs its own slices, not a walk over all of them.
    by_owner: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Objects of a list in progress (between `Init` and `InitDone`), of each kind.
    listing_services: Option<BTreeMap<ObjectKey, KubeService>>,
    listing_slices: Option<BTreeMap<ObjectKey, EndpointSlice>>,
    /// Whether each kind has been listed once: the layer is replaced only when both have.
    synced: (bool, bool),
    /// The layer keys each Service produced last, to remove the ones it no longer makes.
    emitted: BTreeMap<ObjectKey, BTreeSet<String>>,
    /// When a watch last failed (cleared once the source is live again).
    last_error: Option<Instant>,
    /// Slices read to make entries, since start (for the tests' bounds).
    slices_read: u64,
}

impl Follower {
    async fn follow(&mut self, client: Client) {
        let mut services: Events<KubeService> = watch(&client);
        let mut slices: Events<EndpointSlice> = watch(&client);
        // kube's watcher says nothing when a watch resumes after an error: the source counts as
        // live again once both kinds are listed and a while has passed without an error.
        let mut check = tokio::time::interval(defaults::KUBE_LIVE_AFTER / 2);
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if self.last_error.is_some_and(|t| t.elapsed() >= defaults::KUBE_LIVE_AFTER)
                        && self.synced.0
                        && self.synced.1
                    {
                        self.last_error = None;
                        self.registry.set_live(Source::Kubernetes, true, None);
                    }
                }
                Some(event) = services.next() => match event {
                    Ok(e) => self.on_service(e),
                    Err(e) => {
                        if self.failed(Kind::Services, &e) {
                            services = watch(&client);
                        }
                    }
                },
                Some(event) = slices.next() => match event {
                    Ok(e) => self.on_slice(e),
                    Err(e) => {
                        if self.failed(Kind::Slices, &e) {
                            slices = watch(&client);
                        }
                    }
                },
                else => {
                    // The watchers never end; should they, start over.
                    services = watch(&client);
                    slices = watch(&client);
                }
            }
        }
    }

    /// Logs a watch error; `true` when the watch must start over with a list. kube's watcher
    /// re-lists by itself after a `410 Gone` event, but not when the watch *request* is
    /// answered with 410 (it would ask again from the same expired version forever).
    fn failed(&mut self, kind: Kind, e: &watcher::Error) -> bool {
        let gone = match e {
            watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 410,
            watcher::Error::WatchError(s) => s.code == 410,
            _ => false,
        };
        if gone {
            info!("kubernetes: {kind:?}: the resource version is gone (410); listing whole again");
        } else {
            warn!("kubernetes: {kind:?}: {e}; retrying, serving the entries as they were");
            self.last_error = Some(Instant::now());
            self.registry
                .set_live(Source::Kubernetes, false, Some(format!("{kind:?}: {e}")));
        }
        matches!(e, watcher::Error::WatchStartFailed(_)) && gone
    }

    fn on_service(&mut self, event: watcher::Event<KubeService>) {
        match event {
            watcher::Event::Init => self.listing_services = Some(BTreeMap::new()),
            watcher::Event::InitApply(s) => {
                if let Some(l) = &mut self.listing_services {
                    l.insert(key_of(&s), s);
                }
            }
            watcher::Event::InitDone => {
                self.services = self.listing_services.take().unwrap_or_default();
                self.synced.0 = true;
                info!(
                    services = self.services.len(),
                    "kubernetes: listed Services; watching"
                );
                self.replace_all();
            }
            watcher::Event::Apply(s) => {
                let key = key_of(&s);
                self.services.insert(key.clone(), s);
                self.refresh(&key);
            }
            watcher::Event::Delete(s) => {
                let key = key_of(&s);
                self.services.remove(&key);
                self.refresh(&key);
            }
        }
    }

    fn on_slice(&mut self, event: watcher::Event<EndpointSlice>) {
        match event {
            watcher::Event::Init => self.listing_slices = Some(BTreeMap::new()),
            watcher::Event::InitApply(s) => {
                if let Some(l) = &mut self.listing_slices {
                    l.insert(key_of(&s), s);
                }
            }
            watcher::Event::InitDone => {
                self.slices = self.listing_slices.take().unwrap_or_default();
                self.by_owner.clear();
                for (key, slice) in &self.slices {
                    if let Some(o) = owner(slice) {
                        self.by_owner.entry(o).or_default().insert(key.clone());
                    }
                }
                self.synced.1 = true;
                info!(
                    slices = self.slices.len(),
                    "kubernetes: listed EndpointSlices; watching"
                );
                self.replace_all();
            }
            watcher::Event::Apply(s) => {
                let key = key_of(&s);
                let before = self.slices.insert(key.clone(), s.clone());
                self.index_slice(&key, before.as_ref(), Some(&s));
                self.slice_changed(before.as_ref(), Some(&s));
            }
            watcher::Event::Delete(s) => {
                let key = key_of(&s);
                let before = self.slices.remove(&key);
                self.index_slice(&key, before.as_ref().or(Some(&s)), None);
                self.slice_changed(before.as_ref().or(Some(&s)), None);
            }
        }
    }

    fn index_slice(
        &mut self,
        key: &ObjectKey,
        before: Option<&EndpointSlice>,
        after: Option<&EndpointSlice>,
    ) {
        if let Some(o) = before.and_then(owner)
            && let Some(set) = self.by_owner.get_mut(&o)
        {
            set.remove(key);
            if set.is_empty() {
                self.by_owner.remove(&o);
            }
        }
        if let Some(o) = after.and_then(owner) {
            self.by_owner.entry(o).or_default().insert(key.clone());
        }
    }

    /// A slice changed: the Services it belonged to before and after are recomputed.
    fn slice_changed(&mut self, before: Option<&EndpointSlice>, after: Option<&EndpointSlice>) {
        let owners: BTreeSet<ObjectKey> = [before, after]
            .into_iter()
            .flatten()
            .filter_map(owner)
            .collect();
        for service in owners {
            self.refresh(&service);
        }
    }

    /// Both kinds listed: the layer becomes exactly what the objects make.
    fn replace_all(&mut self) {
        if !(self.synced.0 && self.synced.1) {
            return;
        }
        let mut entries = BTreeMap::new();
        let mut claims = Claims::default();
        let mut rejected = Vec::new();
        self.emitted.clear();
        let keys: Vec<ObjectKey> = self.services.keys().cloned().collect();
        for key in keys {
            let made = self.entries_of(&key);
            let mut emitted = BTreeSet::new();
            for (k, made) in made {
                let checked = made.and_then(|s| claims.check(&k, &s).map_or(Ok(s), Err));
                match checked {
                    Ok(s) => {
                        claims.claim(&k, &s);
                        entries.insert(k.clone(), s);
                    }
                    Err(reason) => rejected.push(Rejected {
                        key: k.clone(),
                        reason,
                    }),
                }
                emitted.insert(k);
            }
            self.emitted.insert(key, emitted);
        }
        info!(
            entries = entries.len(),
            rejected = rejected.len(),
            "kubernetes: catalog replaced from a full list"
        );
        self.registry
            .replace(Source::Kubernetes, entries, &rejected);
    }

    /// One Service (or its slices) changed: its entries are made again and put, the ones it no
    /// longer makes removed.
    fn refresh(&mut self, service: &ObjectKey) {
        if !(self.synced.0 && self.synced.1) {
            return;
        }
        let made = self.entries_of(service);
        let before = self.emitted.remove(service).unwrap_or_default();
        let now: BTreeSet<String> = made.keys().cloned().collect();
        for gone in before.difference(&now) {
            info!(key = %gone, "kubernetes: entry removed");
            self.registry.put(Source::Kubernetes, gone, None);
        }
        for (key, made) in made {
            let checked = made.and_then(|s| {
                let clash = self
                    .registry
                    .clash(Source::Kubernetes, &key, &s, &BTreeSet::new());
                clash.map_or(Ok(s), Err)
            });
            match checked {
                Ok(s) => {
                    debug!(key = %key, backends = s.backends.len(), "kubernetes: entry applied");
                    self.registry.put(Source::Kubernetes, &key, Some(s));
                }
                Err(reason) => self
                    .registry
                    .reject(Source::Kubernetes, &Rejected { key, reason }),
            }
        }
        if !now.is_empty() {
            self.emitted.insert(service.clone(), now);
        }
        self.registry.set_live(Source::Kubernetes, true, None);
    }

    /// The entries one Service makes, by layer key: each a checked service or why not.
    fn entries_of(&mut self, key: &ObjectKey) -> BTreeMap<String, Result<Service, String>> {
        let Some(service) = self.services.get(key) else {
            return BTreeMap::new();
        };
        let slices: Vec<&EndpointSlice> = self
            .by_owner
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .collect();
        self.slices_read += slices.len() as u64;
        let view = View {
            node: self.config.node_name.as_deref(),
            prefer_local: self.config.prefer_local,
        };
        match entries(service, &slices, view, &self.listen) {
            Ok(made) => made,
            // The whole object is at fault (a bad annotation): every entry it had is rejected
            // and keeps its last good state.
            Err(reason) => {
                let mut rejected: BTreeMap<String, Result<Service, String>> = self
                    .emitted
                    .get(key)
                    .into_iter()
                    .flatten()
                    .map(|k| (k.clone(), Err(reason.clone())))
                    .collect();
                if rejected.is_empty() {
                    rejected.insert(format!("{}/{}", key.0, key.1), Err(reason));
                }
                rejected
            }
        }
    }
}

/// The Service a slice belongs to.
fn owner(slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some((slice.namespace().unwrap_or_default(), name.clone()))
}

/// What the agent knows of its own place, for topology.
#[derive(Clone, Copy, Default)]
pub struct View<'a> {
    pub node: Option<&'a str>,
    pub prefer_local: bool,
}

/// The entries of one Service with its slices, by layer key (`namespace/name:port/protocol`,
/// with `/ipv6` for the second family of a dual-stack Service). `Err`: the whole object is
/// unusable (its settings); a per-port problem is an `Err` entry.
pub fn entries(
    service: &KubeService,
    slices: &[&EndpointSlice],
    view: View,
    listen: &[SocketAddr],
) -> Result<BTreeMap<String, Result<Service, String>>, String> {
    let (ns, name) = key_of(service);
    let mut out = BTreeMap::new();
    let Some(spec) = &service.spec else {
        return Ok(out);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(out);
    }
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        ips.push(ip.clone());
    }
    let ips: Vec<IpAddr> = ips
        .iter()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| {
            ip.parse()
                .map_err(|_| format!("spec.clusterIPs: `{ip}` is not an IP address"))
        })
        .collect::<Result<_, _>>()?;
    if ips.is_empty() {
        // Headless (or not yet allocated): nothing to steer.
        return Ok(out);
    }

    // Settings common to every entry of the Service.
    let mut common = Map::new();
    for (annotation, value) in service.annotations() {
        if let Some(setting) = annotation.strip_prefix(ANNOTATION_PREFIX) {
            settings::set(&mut common, setting, value, &[])
                .map_err(|e| format!("annotation {ANNOTATION_PREFIX}{e}"))?;
        }
    }
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(defaults::AFFINITY_TIMEOUT.as_secs(), |t| {
                u64::try_from(t).unwrap_or(0)
            });
        common.insert("affinity_timeout".into(), json!(timeout));
    }
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");

    let ports = spec.ports.as_deref().unwrap_or_default();
    let dual = ips.len() > 1;
    for ip in &ips {
        for port in ports {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            let mut key = format!("{ns}/{name}:{}/{}", port.port, protocol.to_lowercase());
            if ip.is_ipv6() && dual {
                key.push_str("/ipv6");
            }
            let entry_name = entry_name(&ns, &name, port, ports.len(), ip.is_ipv6() && dual);
            let made = entry(
                &common,
                &entry_name,
                *ip,
                port,
                protocol,
                slices,
                view,
                local_only,
                listen,
            );
            out.insert(key, made);
        }
    }
    Ok(out)
}

/// The catalog name: `name.namespace`, with the port's name (or number) when the Service has
/// several, and `.v6` for the IPv6 side of a dual-stack Service. Names longer than the catalog
/// allows keep their start and a hash of the whole, so they stay unique.
fn entry_name(ns: &str, name: &str, port: &ServicePort, ports: usize, v6: bool) -> String {
    let mut full = format!("{name}.{ns}");
    if ports > 1 {
        match port.name.as_deref().filter(|n| !n.is_empty()) {
            Some(n) => full.push_str(&format!(".{n}")),
            None => full.push_str(&format!(".{}", port.port)),
        }
    }
    if v6 {
        full.push_str(".v6");
    }
    if full.len() <= 64 {
        return full;
    }
    // FNV-1a: stable across runs and versions (the name is part of the saved catalog).
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    // Cut at a character boundary: the names come from the API server, not all of them ASCII.
    let head = &full[..full.floor_char_boundary(51)];
    format!("{head}-{:012x}", hash & 0xffff_ffff_ffff)
}

#[allow(clippy::too_many_arguments)]
fn entry(
    common: &Map<String, Value>,
    name: &str,
    ip: IpAddr,
    port: &ServicePort,
    protocol: &str,
    slices: &[&EndpointSlice],
    view: View,
    local_only: bool,
    listen: &[SocketAddr],
) -> Result<Service, String> {
    let proto = match protocol {
        "TCP" => "tcp",
        "UDP" => "udp",
        other => {
            return Err(format!(
                "ports[{}]: protocol {other} is not TCP or UDP",
                port.port
            ));
        }
    };
    let vip_port =
        u16::try_from(port.port).map_err(|_| format!("ports: {} is not a port", port.port))?;
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };

    struct Found {
        addr: SocketAddr,
        state: &'static str,
        local: bool,
    }
    let mut found: BTreeMap<SocketAddr, Found> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(target) = slice_port(slice, port, protocol) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let c = endpoint.conditions.clone().unwrap_or_default();
            let state = if c.terminating == Some(true) {
                "drain"
            } else if c.ready.unwrap_or(true) {
                "ready"
            } else {
                "maint"
            };
            let local = view
                .node
                .is_some_and(|n| endpoint.node_name.as_deref() == Some(n));
            for address in &endpoint.addresses {
                let Ok(a) = address.parse::<IpAddr>() else {
                    debug!(slice = %slice.name_any(), address, "not an IP address; skipped");
                    continue;
                };
                if a.is_ipv4() != ip.is_ipv4() {
                    continue;
                }
                let addr = SocketAddr::new(a, target);
                // The same endpoint in two slices (a slice being split or merged): the more
                // usable state wins.
                let better = found.get(&addr).is_none_or(|f| rank(state) < rank(f.state));
                if better {
                    found.insert(addr, Found { addr, state, local });
                }
            }
        }
    }
    let mut backends: Vec<&Found> = found.values().collect();
    if view.node.is_some() {
        let any_local_ready = backends.iter().any(|f| f.local && f.state == "ready");
        if local_only || (view.prefer_local && any_local_ready) {
            backends.retain(|f| f.local);
        }
    }
    let mut fields = common.clone();
    fields.insert("name".into(), json!(name));
    fields.insert(
        "vip".into(),
        json!(SocketAddr::new(ip, vip_port).to_string()),
    );
    fields.insert("protocol".into(), json!(proto));
    if let Some(app) = app_protocol(port, &fields) {
        fields.insert("app_protocol".into(), json!(app));
    }
    fields.insert(
        "backends".into(),
        Value::Array(
            backends
                .iter()
                .map(|f| json!({"address": f.addr.to_string(), "state": f.state}))
                .collect(),
        ),
    );
    service_from_json(Value::Object(fields).to_string().as_bytes(), name, listen)
}

/// The port's `appProtocol` as an `app_protocol`, for a proxy-mode entry whose annotations did
/// not choose one: `http` and `kubernetes.io/h2c` serve HTTP (HTTP/1.1 or HTTP/2 by the client's
/// preface), `grpc` serves gRPC. Kernel-mode entries never see requests, so the value is left
/// out for them; other values (`kubernetes.io/ws`, …) keep the L4 path.
fn app_protocol(port: &ServicePort, fields: &Map<String, Value>) -> Option<&'static str> {
    if fields.get("mode").and_then(Value::as_str) != Some("proxy")
        || fields.contains_key("app_protocol")
    {
        return None;
    }
    match port.app_protocol.as_deref()? {
        "http" | "kubernetes.io/h2c" => Some("http"),
        "grpc" => Some("grpc"),
        _ => None,
    }
}

fn rank(state: &str) -> u8 {
    match state {
        "ready" => 0,
        "drain" => 1,
        _ => 2,
    }
}

/// The backend port of Service port `port` in `slice`: the slice port of the same name (both
/// unnamed for a single-port Service) and protocol. A slice port without a number (all ports)
/// takes the Service's numeric `targetPort`, else its `port`.
fn slice_port(slice: &EndpointSlice, port: &ServicePort, protocol: &str) -> Option<u16> {
    let want = port.name.as_deref().unwrap_or("");
    let p = slice.ports.as_ref()?.iter().find(|p| {
        p.name.as_deref().unwrap_or("") == want
            && p.protocol.as_deref().unwrap_or("TCP") == protocol
    })?;
    let number = match p.port {
        Some(n) => n,
        None => match &port.target_port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n,
            _ => port.port,
        },
    };
    u16::try_from(number).ok().filter(|n| *n != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{BackendState, Mode};

    fn service(annotations: Value, spec: Value) -> KubeService {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(endpoints: Value, ports: Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }))
        .unwrap()
    }

    fn listen() -> Vec<SocketAddr> {
        vec!["10.77.0.1:15001".parse().unwrap()]
    }

    #[test]
    fn a_service_with_its_slice_makes_an_entry() {
        let s = service(
            json!({"switchyard.io/mode": "proxy", "switchyard.io/connect-timeout": "300ms"}),
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                   "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}],
                   "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        );
        let sl = slice(
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"]},
            ]),
            json!([{"port": 8080, "protocol": "TCP"}]),
        );
        let made = entries(&s, &[&sl], View::default(), &listen()).unwrap();
        let svc = made["shop/web:80/tcp"].as_ref().unwrap();
        assert_eq!(svc.name, "web.shop");
        assert_eq!(svc.mode, Mode::Proxy);
        assert_eq!(svc.affinity, Some(Duration::from_secs(60)));
        assert_eq!(svc.policy.connect_timeout, Some(Duration::from_millis(300)));
        let states: Vec<(String, BackendState)> = svc
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.state))
            .collect();
        assert_eq!(
            states,
            [
                ("10.0.0.1:8080".into(), BackendState::Ready),
                ("10.0.0.2:8080".into(), BackendState::Drain),
                ("10.0.0.3:8080".into(), BackendState::Maint),
                ("10.0.0.4:8080".into(), BackendState::Ready),
            ]
        );
    }

    #[test]
    fn a_port_app_protocol_chooses_http_mode_for_proxy_services_only() {
        use crate::catalog::AppProtocol;
        let spec = json!({"clusterIP": "10.96.0.10",
            "ports": [{"name": "web", "port": 80, "appProtocol": "http"},
                      {"name": "h2c", "port": 81, "appProtocol": "kubernetes.io/h2c"},
                      {"name": "rpc", "port": 82, "appProtocol": "grpc"},
                      {"name": "ws", "port": 83, "appProtocol": "kubernetes.io/ws"}]});
        let sl = slice(
            json!([{"addresses": ["10.0.0.1"]}]),
            json!([{"name": "web", "port": 8080}, {"name": "h2c", "port": 8081},
                   {"name": "rpc", "port": 8082}, {"name": "ws", "port": 8083}]),
        );
        let app = |annotations: Value, port: u16| {
            let made = entries(
                &service(annotations, spec.clone()),
                &[&sl],
                View::default(),
                &listen(),
            )
            .unwrap();
            made[&format!("shop/web:{port}/tcp")]
                .as_ref()
                .unwrap()
                .policy
                .app_protocol
        };
        let proxy = json!({"switchyard.io/mode": "proxy"});
        assert_eq!(app(proxy.clone(), 80), AppProtocol::Http);
        assert_eq!(app(proxy.clone(), 81), AppProtocol::Http);
        assert_eq!(app(proxy.clone(), 82), AppProtocol::Grpc);
        assert_eq!(app(proxy, 83), AppProtocol::Tcp);
        // Kernel mode never sees requests: the port's appProtocol is left aside.
        assert_eq!(app(json!({}), 80), AppProtocol::Tcp);
        // The annotation wins over the port.
        let auto = json!({"switchyard.io/mode": "proxy", "switchyard.io/app-protocol": "auto"});
        assert_eq!(app(auto, 82), AppProtocol::Auto);
    }

    #[test]
    fn ports_match_by_name_and_bad_objects_are_named() {
        let s = service(
            json!({}),
            json!({"clusterIP": "10.96.0.10",
                   "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"},
                             {"name": "sig", "port": 9, "protocol": "SCTP"}]}),
        );
        let sl = slice(
            json!([{"addresses": ["10.0.0.1"]}]),
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        );
        let made = entries(&s, &[&sl], View::default(), &listen()).unwrap();
        let http = made["shop/web:80/tcp"].as_ref().unwrap();
        assert_eq!(http.name, "web.shop.http");
        assert_eq!(http.backends[0].addr.port(), 8080);
        let dns = made["shop/web:53/udp"].as_ref().unwrap();
        assert_eq!(dns.backends[0].addr.port(), 5353);
        let sctp = made["shop/web:9/sctp"].as_ref().unwrap_err();
        assert!(sctp.contains("SCTP"), "{sctp}");

        let bad = service(
            json!({"switchyard.io/mode": "teleport"}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
        );
        let e = entries(&bad, &[], View::default(), &listen()).unwrap();
        let e = e["shop/web:80/tcp"].as_ref().unwrap_err();
        assert!(e.contains("mode: unknown variant"), "{e}");
        let typo = service(
            json!({"switchyard.io/mdoe": "proxy"}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
        );
        let e = entries(&typo, &[], View::default(), &listen()).unwrap_err();
        assert!(e.contains("switchyard.io/mdoe: not a setting"), "{e}");
    }

    #[test]
    fn local_endpoints_are_preferred_when_asked() {
        let s = service(
            json!({}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
        );
        let sl = slice(
            json!([{"addresses": ["10.0.0.1"], "nodeName": "n1"},
                   {"addresses": ["10.0.0.2"], "nodeName": "n2"}]),
            json!([{"port": 8080}]),
        );
        let view = View {
            node: Some("n1"),
            prefer_local: true,
        };
        let made = entries(&s, &[&sl], view, &listen()).unwrap();
        let svc = made["shop/web:80/tcp"].as_ref().unwrap();
        assert_eq!(svc.backends.len(), 1);
        assert_eq!(svc.backends[0].addr.to_string(), "10.0.0.1:8080");
        let elsewhere = View {
            node: Some("n3"),
            prefer_local: true,
        };
        let made = entries(&s, &[&sl], elsewhere, &listen()).unwrap();
        assert_eq!(made["shop/web:80/tcp"].as_ref().unwrap().backends.len(), 2);
    }

    #[test]
    fn long_names_stay_valid_and_distinct() {
        let p = ServicePort {
            port: 80,
            ..Default::default()
        };
        let a = entry_name(&"n".repeat(63), &"s".repeat(63), &p, 1, false);
        let b = entry_name(&"n".repeat(63), &"s".repeat(62), &p, 1, false);
        assert!(a.len() <= 64 && b.len() <= 64);
        assert_ne!(a, b);
        assert_eq!(entry_name("ns", "web", &p, 1, true), "web.ns.v6");
    }

    #[test]
    fn a_long_name_of_any_characters_is_cut_without_panicking() {
        let named = |n: &str| ServicePort {
            port: 80,
            name: Some(n.into()),
            ..Default::default()
        };
        // "ü" is two bytes: byte 51 falls inside one.
        for pad in 0..4 {
            let ns = "n".repeat(pad);
            let made = entry_name(&ns, "web", &named(&"ü".repeat(40)), 2, false);
            assert!(made.len() <= 64, "{made}");
        }
        // Through the whole builder: the entry is rejected, naming the field, and nothing panics.
        let s = service(
            json!({}),
            json!({"clusterIP": "10.96.0.10",
                   "ports": [{"name": "ü".repeat(40), "port": 80}, {"name": "b", "port": 81}]}),
        );
        let made = entries(&s, &[], View::default(), &listen()).unwrap();
        let e = made["shop/web:80/tcp"].as_ref().unwrap_err();
        assert!(e.starts_with("name:"), "{e}");
    }

    /// A full list of 10,000 Services with a slice each reads each slice once and checks each
    /// entry against the others by look-up (both were a scan per Service: quadratic).
    #[test]
    fn a_relist_of_ten_thousand_services_reads_each_slice_once() {
        let (registry, rx) = Registry::open(None);
        let mut f = Follower {
            registry,
            config: KubernetesConfig {
                kubeconfig: None,
                context: None,
                node_name: None,
                prefer_local: false,
            },
            listen: listen(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            by_owner: HashMap::new(),
            listing_services: None,
            listing_slices: None,
            synced: (false, false),
            emitted: BTreeMap::new(),
            last_error: None,
            slices_read: 0,
        };
        f.on_service(watcher::Event::Init);
        f.on_slice(watcher::Event::Init);
        for i in 0..10_000u32 {
            let name = format!("s{i}");
            let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
            let s: KubeService = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
            }))
            .unwrap();
            f.on_service(watcher::Event::InitApply(s));
            let sl: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-x"), "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [format!("10.0.{}.{}", i / 250, i % 250 + 1)]}],
                "ports": [{"port": 8080}],
            }))
            .unwrap();
            f.on_slice(watcher::Event::InitApply(sl));
        }
        // Two Services claiming one address: the second is rejected by name of the first.
        let dup: KubeService = serde_json::from_value(json!({
            "metadata": {"name": "zz", "namespace": "ns"},
            "spec": {"clusterIP": "10.100.0.1", "ports": [{"port": 80}]},
        }))
        .unwrap();
        f.on_service(watcher::Event::InitApply(dup));
        f.on_service(watcher::Event::InitDone);
        f.on_slice(watcher::Event::InitDone);
        assert_eq!(f.slices_read, 10_000);
        let catalog = rx.borrow().clone();
        assert_eq!(catalog.services.len(), 10_000);
        assert!(catalog.services.values().all(|s| s.backends.len() == 1));
        assert_eq!(f.registry.status()[0].rejected_total, 1);

        // One slice changes: its Service alone is made again, and merged alone.
        let (version, judged) = f.registry.work();
        let sl: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s7-x", "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": "s7"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.8", "10.0.0.9"]}],
            "ports": [{"port": 8080}],
        }))
        .unwrap();
        f.on_slice(watcher::Event::Apply(sl));
        assert_eq!(f.slices_read, 10_001);
        assert_eq!(f.registry.work(), (version + 1, judged + 1));
    }

    #[test]
    fn headless_and_external_services_make_nothing() {
        for spec in [
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            json!({"type": "ExternalName", "externalName": "x.example"}),
        ] {
            let made = entries(&service(json!({}), spec), &[], View::default(), &listen());
            assert!(made.unwrap().is_empty());
        }
    }
}
