//! The registry: every source's view of the services, merged into one catalog.
//!
//! Each source (the config file, etcd, the local API, …) owns a *layer*: its entries, keyed by
//! the source's own name for them (an etcd key, a service name). A source replaces or edits its
//! layer; the registry merges the layers by precedence ([`Source`] order: the first source to
//! name a service address owns it), publishes the merged catalog on a watch channel for the
//! reconciler, and saves every layer as last known good ([`last_known_good`]) so that a
//! restarted agent serves the last state at once, before any source answers.
//!
//! An entry that fails validation is rejected alone, with its reason logged and counted; the
//! entry it would have replaced keeps its last good state.

pub mod consul;
pub mod dns;
pub mod etcd;
pub mod file;
pub mod kubernetes;
pub mod last_known_good;
mod retry;
mod settings;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::catalog::{Catalog, Service, ServiceAddr};

/// Where entries come from. The order is the precedence: when two sources name the same
/// service address, the earlier one wins. The local API is the operator's hand on the node;
/// the node's own file comes next; then the control planes; DNS, last, only fills in backends
/// for addresses nobody else names (keep new variants before it unless they rank lower).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Api,
    File,
    Etcd,
    Kubernetes,
    Consul,
    Dns,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
            Source::Etcd => "etcd",
            Source::Kubernetes => "kubernetes",
            Source::Consul => "consul",
            Source::Dns => "dns",
        }
    }
}

/// One source's entries and health.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Layer {
    /// Entries by the source's own key.
    pub entries: BTreeMap<String, Service>,
    /// When the source last delivered a full, current view.
    pub last_sync: Option<SystemTime>,
    /// Entries rejected since start.
    #[serde(skip)]
    pub rejected_total: u64,
    /// Whether the source is currently connected and current.
    #[serde(skip)]
    pub live: bool,
    /// The last problem the source reported.
    #[serde(skip)]
    pub last_error: Option<String>,
}

/// An entry a source could not use, and why.
#[derive(Clone, Debug)]
pub struct Rejected {
    pub key: String,
    pub reason: String,
}

/// Status of one source, for metrics and the API.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub source: Source,
    pub entries: usize,
    pub live: bool,
    pub last_sync: Option<SystemTime>,
    /// Seconds since the last sync (`None`: never synced).
    pub staleness_seconds: Option<f64>,
    pub rejected_total: u64,
    pub last_error: Option<String>,
}

struct State {
    layers: BTreeMap<Source, Layer>,
    published: Arc<Catalog>,
    last_known_good: Option<last_known_good::Saver>,
    /// Catalog versions published since start.
    version: u64,
}

/// The handle sources and readers share.
#[derive(Clone)]
pub struct Registry {
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<Arc<Catalog>>>,
}

impl Registry {
    /// A registry that saves to `state_dir` (none: memory only), starting from the
    /// last-known-good found there. Returns the receiver of merged catalogs.
    pub fn open(state_dir: Option<PathBuf>) -> (Registry, watch::Receiver<Arc<Catalog>>) {
        let mut layers = BTreeMap::new();
        let last_known_good = state_dir.map(last_known_good::Store::new);
        if let Some(store) = &last_known_good {
            match store.load() {
                Ok(Some(saved)) => {
                    info!(
                        path = %store.path().display(),
                        sources = saved.len(),
                        "serving the last-known-good catalog until sources answer"
                    );
                    layers = saved;
                }
                Ok(None) => {}
                Err(e) => warn!("{e}"),
            }
        }
        let mut state = State {
            layers,
            published: Arc::new(Catalog::default()),
            last_known_good: last_known_good
                .as_ref()
                .map(|_| last_known_good::Saver::new()),
            version: 0,
        };
        let (catalog, rejected) = merge(&state.layers);
        for r in rejected {
            warn!(key = %r.key, "rejected: {}", r.reason);
        }
        state.published = Arc::new(catalog);
        let (tx, rx) = watch::channel(state.published.clone());
        let saver = state.last_known_good.clone();
        let registry = Registry {
            state: Arc::new(Mutex::new(state)),
            tx: Arc::new(tx),
        };
        if let (Some(store), Some(saver)) = (last_known_good, saver) {
            let state = registry.state.clone();
            saver.run(
                store,
                Box::new(move || {
                    state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .layers
                        .clone()
                }),
            );
        }
        (registry, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces a source's whole layer with a fresh, complete view. Rejected entries keep
    /// their previous good state (if they had one).
    pub fn replace(
        &self,
        source: Source,
        entries: BTreeMap<String, Service>,
        rejected: &[Rejected],
    ) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        let mut next = entries;
        for r in rejected {
            warn!(source = source.name(), key = %r.key, "entry rejected: {}", r.reason);
            layer.rejected_total += 1;
            if let Some(previous) = layer.entries.get(&r.key) {
                next.insert(r.key.clone(), previous.clone());
            }
        }
        layer.entries = next;
        layer.last_sync = Some(SystemTime::now());
        layer.live = true;
        layer.last_error = None;
        self.publish(&mut state);
    }

    /// Sets or removes one entry of a source (`None` removes it).
    pub fn put(&self, source: Source, key: &str, entry: Option<Service>) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        match entry {
            Some(s) => {
                layer.entries.insert(key.to_owned(), s);
            }
            None => {
                layer.entries.remove(key);
            }
        }
        layer.last_sync = Some(SystemTime::now());
        self.publish(&mut state);
    }

    /// Drops a source's whole layer: for a source no longer configured, whose last-known-good
    /// entries would otherwise be served forever.
    pub fn forget(&self, source: Source) {
        let mut state = self.lock();
        if state.layers.remove(&source).is_some() {
            info!(
                source = source.name(),
                "source no longer configured: its saved entries are dropped"
            );
            self.publish(&mut state);
        }
    }

    /// Counts and logs one rejected entry without changing anything.
    pub fn reject(&self, source: Source, rejected: &Rejected) {
        warn!(source = source.name(), key = %rejected.key, "entry rejected: {}", rejected.reason);
        self.lock().layers.entry(source).or_default().rejected_total += 1;
    }

    /// A source lost (or regained) its connection; its entries stay as they were.
    pub fn set_live(&self, source: Source, live: bool, error: Option<String>) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        layer.live = live;
        if live {
            layer.last_sync = Some(SystemTime::now());
        }
        if error.is_some() {
            layer.last_error = error;
        }
    }

    /// One source's entries (for sources that edit their own layer, like the API).
    pub fn entries(&self, source: Source) -> BTreeMap<String, Service> {
        self.lock()
            .layers
            .get(&source)
            .map(|l| l.entries.clone())
            .unwrap_or_default()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.lock().published.clone()
    }

    pub fn status(&self) -> Vec<SourceStatus> {
        let now = SystemTime::now();
        self.lock()
            .layers
            .iter()
            .map(|(&source, l)| SourceStatus {
                source,
                entries: l.entries.len(),
                live: l.live,
                last_sync: l.last_sync,
                staleness_seconds: l
                    .last_sync
                    .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
                rejected_total: l.rejected_total,
                last_error: l.last_error.clone(),
            })
            .collect()
    }

    fn publish(&self, state: &mut State) {
        let (catalog, rejected) = merge(&state.layers);
        for r in rejected {
            warn!(key = %r.key, "not applied: {}", r.reason);
        }
        if *state.published != catalog {
            state.version += 1;
            state.published = Arc::new(catalog);
            self.tx.send_replace(state.published.clone());
        }
        // After the reconciler has it: the disk must not delay a change.
        if let Some(saver) = &state.last_known_good {
            saver.touch();
        }
    }

    /// Waits until the last-known-good on disk is current (at shutdown).
    pub fn flush(&self) {
        let saver = self.lock().last_known_good.clone();
        if let Some(s) = saver {
            s.flush();
        }
    }
}

/// Why `entry` cannot join a source's `entries` under `key`: another key already has its
/// address or its name. Sources check this entry by entry and reject the newcomer, so the
/// entry already there keeps serving (and the rejection names the key and the field).
pub fn clash(entries: &BTreeMap<String, Service>, key: &str, entry: &Service) -> Option<String> {
    entries
        .iter()
        .filter(|(k, _)| k.as_str() != key)
        .find_map(|(k, other)| {
            if other.addr == entry.addr {
                Some(format!("vip: {} is already {k:?}'s address", entry.addr))
            } else if other.name == entry.name {
                Some(format!("name: {:?} is already used by {k:?}", entry.name))
            } else {
                None
            }
        })
}

/// The network sources' tasks; dropping this ends them.
pub struct SourceTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for SourceTasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Starts the network sources `config` names (etcd, Kubernetes, Consul, DNS), each keeping its layer current in
/// the background; the agent serves what it has (last-known-good included) meanwhile. The
/// saved layer of a source no longer configured is dropped.
pub fn start_sources(registry: &Registry, config: &crate::config::AgentConfig) -> SourceTasks {
    let mut tasks = Vec::new();
    let listen = config.forwarder.listen.clone();
    match &config.registry.etcd {
        Some(etcd) => tasks.push(tokio::spawn(etcd::run(
            registry.clone(),
            etcd.clone(),
            listen.clone(),
        ))),
        None => registry.forget(Source::Etcd),
    }
    match &config.registry.kubernetes {
        Some(k) => tasks.push(tokio::spawn(kubernetes::run(
            registry.clone(),
            k.clone(),
            listen.clone(),
        ))),
        None => registry.forget(Source::Kubernetes),
    }
    match &config.registry.consul {
        Some(c) => tasks.push(tokio::spawn(consul::run(
            registry.clone(),
            c.clone(),
            listen.clone(),
        ))),
        None => registry.forget(Source::Consul),
    }
    if config.registry.dns.is_empty() {
        registry.forget(Source::Dns);
    } else {
        let dns = config.registry.dns.clone();
        tasks.push(tokio::spawn(dns::run(registry.clone(), dns)));
    }
    SourceTasks(tasks)
}

/// Merges layers by precedence: the first source to name a service address owns it; a second
/// entry for the same address (or name) is not applied, and said so.
fn merge(layers: &BTreeMap<Source, Layer>) -> (Catalog, Vec<Rejected>) {
    // Owners are borrowed, not formatted: this runs on every change of a catalog that may hold
    // tens of thousands of entries; only a rejection pays for a message.
    let mut catalog = Catalog::default();
    let mut owners: HashMap<ServiceAddr, (Source, &str)> = HashMap::new();
    let mut names: HashMap<&str, (Source, &str)> = HashMap::new();
    let mut rejected = Vec::new();
    let label = |source: Source, key: &str| format!("{}:{key}", source.name());
    for (&source, layer) in layers {
        for (key, service) in &layer.entries {
            if let Some(&(owner, owner_key)) = owners.get(&service.addr) {
                if owner == source {
                    rejected.push(Rejected {
                        key: label(source, key),
                        reason: format!(
                            "vip: {} is already {}'s address",
                            service.addr,
                            label(owner, owner_key)
                        ),
                    });
                }
                // A lower-precedence source naming the same address is simply overridden.
                continue;
            }
            if let Some(&(owner, owner_key)) = names.get(service.name.as_str()) {
                rejected.push(Rejected {
                    key: label(source, key),
                    reason: format!(
                        "name: {:?} is already used by {}",
                        service.name,
                        label(owner, owner_key)
                    ),
                });
                continue;
            }
            owners.insert(service.addr, (source, key));
            names.insert(&service.name, (source, key));
            catalog.services.insert(service.addr, service.clone());
        }
    }
    (catalog, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Algorithm, Mode, Protocol};

    fn svc(name: &str, vip: &str) -> Service {
        Service {
            name: name.into(),
            addr: ServiceAddr {
                vip: vip.parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            mode: Mode::Kernel,
            algorithm: Algorithm::RoundRobin,
            affinity: None,
            policy: Default::default(),
            backends: vec![],
        }
    }

    #[test]
    fn higher_precedence_wins_the_address() {
        let (r, rx) = Registry::open(None);
        r.replace(
            Source::Etcd,
            [("a".into(), svc("from-etcd", "10.96.0.1:80"))].into(),
            &[],
        );
        r.replace(
            Source::File,
            [("a".into(), svc("from-file", "10.96.0.1:80"))].into(),
            &[],
        );
        let c = rx.borrow().clone();
        assert_eq!(c.services.values().next().unwrap().name, "from-file");
        assert_eq!(c.services.len(), 1);
    }

    #[test]
    fn a_rejected_entry_keeps_its_last_good_state() {
        let (r, rx) = Registry::open(None);
        r.replace(
            Source::Etcd,
            [("k1".into(), svc("one", "10.96.0.1:80"))].into(),
            &[],
        );
        let bad = Rejected {
            key: "k1".into(),
            reason: "vip: bad".into(),
        };
        r.replace(Source::Etcd, BTreeMap::new(), &[bad]);
        assert_eq!(rx.borrow().services.len(), 1);
        assert_eq!(r.status()[0].rejected_total, 1);
    }

    #[test]
    fn a_duplicate_address_within_a_source_is_not_applied() {
        let (r, rx) = Registry::open(None);
        r.replace(
            Source::Etcd,
            [
                ("a".into(), svc("one", "10.96.0.1:80")),
                ("b".into(), svc("two", "10.96.0.1:80")),
            ]
            .into(),
            &[],
        );
        assert_eq!(rx.borrow().services.values().next().unwrap().name, "one");
    }
}

#[cfg(test)]
mod scale {
    use super::*;
    use crate::catalog::{Algorithm, Backend, BackendState, Mode, Policy, Protocol};

    /// Not a benchmark (see `cargo xtask bench-registry`): a guard that one change in a large
    /// catalog stays a cheap operation, printed for whoever looks.
    #[test]
    fn one_change_in_ten_thousand_services() {
        let service = |i: usize, b: u8| Service {
            name: format!("s{i}"),
            addr: ServiceAddr {
                vip: format!("10.100.{}.{}:80", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
                protocol: Protocol::Tcp,
            },
            mode: Mode::Kernel,
            algorithm: Algorithm::RoundRobin,
            affinity: None,
            policy: Policy::default(),
            backends: (0..10)
                .map(|k| Backend {
                    addr: format!("10.78.{b}.{}:8080", k + 1).parse().unwrap(),
                    weight: 1,
                    state: BackendState::Ready,
                })
                .collect(),
        };
        let (r, _rx) = Registry::open(None);
        r.replace(
            Source::Etcd,
            (0..10_000)
                .map(|i| (format!("s{i}"), service(i, 1)))
                .collect(),
            &[],
        );
        let t = std::time::Instant::now();
        for k in 0..20 {
            r.put(Source::Etcd, "s5", Some(service(5, k)));
        }
        eprintln!(
            "registry put with 10k services: {:?} each",
            t.elapsed() / 20
        );
    }
}
