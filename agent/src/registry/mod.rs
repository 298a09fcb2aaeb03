//! The registry: every source's view of the services, merged into one catalog.
//!
//! Each source (the config file, etcd, the local API, …) owns a *layer*: its entries, keyed by
//! the source's own name for them (an etcd key, a service name). A source replaces or edits its
//! layer; the registry merges the layers by precedence ([`Source`] order: the first source to
//! name a service address owns it), publishes the merged catalog on a watch channel for the
//! reconciler (the agent's loop in `run.rs` waits on it and calls
//! [`Reconciler::apply`](crate::reconcile::Reconciler::apply)), and saves every layer as last
//! known good ([`last_known_good`]) so that a restarted agent serves the last state at once,
//! before any source answers.
//!
//! An entry that fails validation is rejected alone, with its reason logged and counted; the
//! entry it would have replaced keeps its last good state.

pub mod consul;
pub mod dns;
pub mod etcd;
pub mod file;
pub mod kubernetes;
mod kubernetes_routes;
pub mod last_known_good;
mod merge;
mod retry;
pub mod routes;
mod settings;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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
    /// Entries by the source's own key. Shared with the catalog: an entry is never copied on
    /// its way through the registry. A persistent map, so that the last-known-good saver's
    /// snapshot of every layer shares them instead of copying them under the registry's lock.
    pub entries: imbl::OrdMap<String, Arc<Service>>,
    /// HTTP routes by name ([`routes`]); left out of the saved file when there are none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Arc<crate::http::route::RawRoute>>,
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

/// Who serves a service: the source whose entry won, and the first other source that also
/// names it (by address or name), which an API entry overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub source: Source,
    pub overrides: Option<Source>,
}

struct State {
    layers: BTreeMap<Source, Layer>,
    merge: merge::Merge,
    published: Arc<Catalog>,
    /// The merged routes, published apart from the catalog.
    routes: Arc<routes::RouteTable>,
    last_known_good: Option<last_known_good::Saver>,
    /// Catalog versions published since start.
    version: u64,
}

impl State {
    /// Sets (or with `None` removes) one entry and re-merges what it affects.
    fn set(&mut self, source: Source, key: &str, entry: Option<Arc<Service>>) {
        let layer = self.layers.entry(source).or_default();
        let old = match &entry {
            Some(e) => layer.entries.insert(key.to_owned(), e.clone()),
            None => layer.entries.remove(key),
        };
        if let (Some(o), Some(n)) = (&old, &entry)
            && (Arc::ptr_eq(o, n) || **o == **n)
        {
            // The same entry again: keep the one the catalog shares.
            layer.entries.insert(key.to_owned(), o.clone());
            return;
        }
        let layers = &self.layers;
        let lookup = |(s, k): &merge::Node| layers.get(s).and_then(|l| l.entries.get(k)).cloned();
        let rejected = self.merge.change(
            (source, key.to_owned()),
            old.as_deref(),
            entry.as_deref(),
            &lookup,
        );
        for r in rejected {
            warn!(key = %r.key, "not applied: {}", r.reason);
        }
    }
}

/// The handle sources and readers share.
#[derive(Clone)]
pub struct Registry {
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<Arc<Catalog>>>,
    routes_tx: Arc<watch::Sender<Arc<routes::RouteTable>>>,
}

impl Registry {
    /// A registry that saves to `state_dir` (none: memory only), starting from the
    /// last-known-good found there. Returns the receiver of merged catalogs.
    pub fn open(state_dir: Option<PathBuf>) -> (Registry, watch::Receiver<Arc<Catalog>>) {
        let mut saved = BTreeMap::new();
        let last_known_good = state_dir.map(last_known_good::Store::new);
        if let Some(store) = &last_known_good {
            match store.load() {
                Ok(Some(layers)) => {
                    info!(
                        path = %store.path().display(),
                        sources = layers.len(),
                        "serving the last-known-good catalog until sources answer"
                    );
                    saved = layers;
                }
                Ok(None) => {}
                Err(e) => warn!("{e}"),
            }
        }
        let mut state = State {
            layers: BTreeMap::new(),
            merge: merge::Merge::default(),
            published: Arc::new(Catalog::default()),
            routes: Arc::default(),
            last_known_good: last_known_good
                .as_ref()
                .map(|_| last_known_good::Saver::new()),
            version: 0,
        };
        for (source, mut layer) in saved {
            routes::restore(source, &mut layer);
            let entries = layer.entries.clone();
            state.layers.insert(
                source,
                Layer {
                    entries: Default::default(),
                    ..layer
                },
            );
            for (key, entry) in entries {
                // The file is ours, but it may have been edited by hand: what is served from it
                // passes the same checks as what any source sends.
                if let Err(e) = entry.validate() {
                    warn!(source = source.name(), key = %key, "last-known-good entry not served: {e}");
                    continue;
                }
                state.set(source, &key, Some(entry));
            }
        }
        state.merge.take_changed();
        state.published = Arc::new(catalog_of(&state.merge));
        state.merge_routes();
        let (tx, rx) = watch::channel(state.published.clone());
        let (routes_tx, _) = watch::channel(state.routes.clone());
        let saver = state.last_known_good.clone();
        let registry = Registry {
            state: Arc::new(Mutex::new(state)),
            tx: Arc::new(tx),
            routes_tx: Arc::new(routes_tx),
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
    /// their previous good state (if they had one). Only the entries that differ from the
    /// layer's are merged again.
    pub fn replace(
        &self,
        source: Source,
        entries: BTreeMap<String, Service>,
        rejected: &[Rejected],
    ) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        let mut kept: BTreeSet<String> = BTreeSet::new();
        for r in rejected {
            warn!(source = source.name(), key = %r.key, "entry rejected: {}", r.reason);
            layer.rejected_total += 1;
            if layer.entries.contains_key(&r.key) && !entries.contains_key(&r.key) {
                kept.insert(r.key.clone());
            }
        }
        layer.last_sync = Some(SystemTime::now());
        layer.live = true;
        layer.last_error = None;
        let gone: Vec<String> = layer
            .entries
            .keys()
            .filter(|k| !entries.contains_key(*k) && !kept.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            state.set(source, &key, None);
        }
        for (key, entry) in entries {
            state.set(source, &key, Some(Arc::new(entry)));
        }
        self.publish(&mut state);
    }

    /// Sets or removes one entry of a source (`None` removes it).
    pub fn put(&self, source: Source, key: &str, entry: Option<Service>) {
        self.apply(source, vec![(key.to_owned(), entry)], &[]);
    }

    /// Sets or removes several entries of a source at once (one catalog version), and counts
    /// and logs the rejected ones, which keep what they had.
    pub fn apply(
        &self,
        source: Source,
        changes: Vec<(String, Option<Service>)>,
        rejected: &[Rejected],
    ) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        for r in rejected {
            warn!(source = source.name(), key = %r.key, "entry rejected: {}", r.reason);
            layer.rejected_total += 1;
        }
        layer.last_sync = Some(SystemTime::now());
        for (key, entry) in changes {
            state.set(source, &key, entry.map(Arc::new));
        }
        self.publish(&mut state);
    }

    /// Drops a source's whole layer: for a source no longer configured, whose last-known-good
    /// entries would otherwise be served forever.
    pub fn forget(&self, source: Source) {
        let mut state = self.lock();
        let Some(layer) = state.layers.get(&source) else {
            return;
        };
        info!(
            source = source.name(),
            "source no longer configured: its saved entries are dropped"
        );
        let keys: Vec<String> = layer.entries.keys().cloned().collect();
        for key in keys {
            state.set(source, &key, None);
        }
        state.layers.remove(&source);
        self.publish(&mut state);
        self.publish_routes(&mut state);
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

    /// One source's entries, copied (for sources that edit their own small layer, like the
    /// API; others ask for [`Registry::keys`], [`Registry::get`] or [`Registry::clash`]).
    pub fn entries(&self, source: Source) -> BTreeMap<String, Service> {
        self.lock()
            .layers
            .get(&source)
            .map(|l| {
                l.entries
                    .iter()
                    .map(|(k, s)| (k.clone(), (**s).clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One source's keys starting with `prefix`.
    pub fn keys(&self, source: Source, prefix: &str) -> Vec<String> {
        let state = self.lock();
        let Some(layer) = state.layers.get(&source) else {
            return Vec::new();
        };
        layer
            .entries
            .range(prefix.to_owned()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// One entry of a source.
    pub fn get(&self, source: Source, key: &str) -> Option<Arc<Service>> {
        self.lock().layers.get(&source)?.entries.get(key).cloned()
    }

    /// Why `entry` cannot join `source`'s entries under `key`: another key of the source
    /// already has its address or its name (keys in `except` not counted). Sources check this
    /// entry by entry and reject the newcomer, so the entry already there keeps serving (and
    /// the rejection names the key and the field).
    pub fn clash(
        &self,
        source: Source,
        key: &str,
        entry: &Service,
        except: &BTreeSet<String>,
    ) -> Option<String> {
        self.lock().merge.clash(source, key, entry, except)
    }

    /// Who serves each service of the catalog, by address.
    pub fn owners(&self) -> HashMap<ServiceAddr, Ownership> {
        let state = self.lock();
        state
            .merge
            .services()
            .filter_map(|(addr, s)| Some((*addr, ownership(&state.merge, addr, &s.name)?)))
            .collect()
    }

    /// Who serves one service: look-ups in the merge's indexes (what answering for one service
    /// costs, whatever the catalog's size).
    pub fn owner(&self, service: &Service) -> Option<Ownership> {
        ownership(&self.lock().merge, &service.addr, &service.name)
    }

    /// The served service named `name`, if any: a look-up in the merge's name index.
    pub fn served_named(&self, name: &str) -> Option<Arc<Service>> {
        let state = self.lock();
        let (source, key) = state.merge.applied_named(name)?;
        state.layers.get(source)?.entries.get(key).cloned()
    }

    /// The first source other than the API that names this address or name.
    pub fn below_api(&self, addr: &ServiceAddr, name: &str) -> Option<Source> {
        self.lock().merge.first_other(Source::Api, addr, name)
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.lock().published.clone()
    }

    /// Whether `source` is connected and current now.
    pub fn is_live(&self, source: Source) -> bool {
        self.lock().layers.get(&source).is_some_and(|l| l.live)
    }

    /// Every catalog published from now on (sources that resolve names against the catalog).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.tx.subscribe()
    }

    /// Catalog versions published since start, and entries merged since start (each
    /// entry judged once counts once): what a change costs, for tests and benchmarks.
    pub fn work(&self) -> (u64, u64) {
        let state = self.lock();
        (state.version, state.merge.judged)
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
        if state.merge.take_changed() {
            state.version += 1;
            state.published = Arc::new(catalog_of(&state.merge));
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

/// The published catalog: the merge's persistent map, shared whole (a change made the new
/// version by copying the few nodes on its path; nothing here grows with the catalog).
fn catalog_of(merge: &merge::Merge) -> Catalog {
    Catalog {
        services: merge.published().clone(),
    }
}

fn ownership(merge: &merge::Merge, addr: &ServiceAddr, name: &str) -> Option<Ownership> {
    let source = merge.owner(addr)?;
    let overrides = (source == Source::Api)
        .then(|| merge.first_other(Source::Api, addr, name))
        .flatten();
    Some(Ownership { source, overrides })
}

/// Addresses and names already taken within one batch of a source's entries (a full list being
/// built), so that each newcomer is checked at the cost of two look-ups.
#[derive(Default)]
pub struct Claims {
    addrs: HashMap<ServiceAddr, String>,
    names: HashMap<String, String>,
}

impl Claims {
    /// Why `entry` cannot join under `key` (another key has its address or name).
    pub fn check(&self, key: &str, entry: &Service) -> Option<String> {
        if let Some(k) = self.addrs.get(&entry.addr).filter(|k| *k != key) {
            return Some(format!("vip: {} is already {k:?}'s address", entry.addr));
        }
        self.names
            .get(&entry.name)
            .filter(|k| *k != key)
            .map(|k| format!("name: {:?} is already used by {k:?}", entry.name))
    }

    pub fn claim(&mut self, key: &str, entry: &Service) {
        self.addrs.insert(entry.addr, key.to_owned());
        self.names.insert(entry.name.clone(), key.to_owned());
    }
}

/// Why `entry` cannot join `entries` under `key` (another key has its address or name): for a
/// small layer at hand (the API's); sources use [`Registry::clash`] or [`Claims`].
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

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, vip: &str) -> Service {
        crate::test_helpers::service(name, vip, &[])
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
mod saved {
    use super::*;

    /// A hand-edited last-known-good file holding an entry no source could send (a weight
    /// that would expand to millions of slots) serves the good entries and not that one.
    #[test]
    fn a_saved_entry_that_fails_the_checks_is_not_served() {
        let dir = std::env::temp_dir().join(format!("sy-lkg-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let good = r#"{"name":"good","addr":{"vip":"10.96.0.1:80","protocol":"tcp"},"mode":"kernel","algorithm":"round_robin","affinity":null,"backends":[{"addr":"10.0.0.1:80","weight":1,"state":"ready"}]}"#;
        let bad = good
            .replace("\"good\"", "\"bad\"")
            .replace("10.96.0.1", "10.96.0.2")
            .replace("\"weight\":1", "\"weight\":4000000000");
        let body = format!(r#"{{"etcd":{{"entries":{{"a":{good},"b":{bad}}},"last_sync":null}}}}"#);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("catalog.json"),
            last_known_good::framed(body.as_bytes()),
        )
        .unwrap();
        let (_r, rx) = Registry::open(Some(dir.clone()));
        let names: Vec<String> = rx
            .borrow()
            .services
            .values()
            .map(|s| s.name.clone())
            .collect();
        assert_eq!(names, ["good"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod scale {
    use super::*;
    use crate::catalog::{Algorithm, Backend, BackendState, Mode, Policy, Protocol};

    fn service(i: usize, b: u8) -> Service {
        Service {
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
        }
    }

    fn ten_thousand() -> BTreeMap<String, Service> {
        (0..10_000)
            .map(|i| (format!("s{i}"), service(i, 1)))
            .collect()
    }

    /// One change in a catalog of 10,000 services merges that one entry and shares the other
    /// 9,999 with the previous catalog (no service copied, none compared); a full relist that
    /// changes one entry costs the same merge. (Timings: `cargo xtask bench-registry`.)
    #[test]
    fn one_change_in_ten_thousand_services_touches_one_entry() {
        let (r, rx) = Registry::open(None);
        r.replace(Source::Etcd, ten_thousand(), &[]);
        let before = rx.borrow().clone();
        assert_eq!(before.services.len(), 10_000);
        let (version, judged) = r.work();
        assert_eq!(judged, 10_000);

        r.put(Source::Etcd, "s5", Some(service(5, 2)));
        let after = rx.borrow().clone();
        assert_eq!(r.work(), (version + 1, judged + 1));
        let shared = before
            .services
            .iter()
            .filter(|(a, s)| Arc::ptr_eq(s, &after.services[*a]))
            .count();
        assert_eq!(shared, 9_999, "every other service is the same allocation");

        // The same entry again: nothing merged, no new version.
        r.put(Source::Etcd, "s5", Some(service(5, 2)));
        assert_eq!(r.work(), (version + 1, judged + 1));

        // A relist of all 10,000 with one entry changed merges that one.
        let mut relist = ten_thousand();
        relist.insert("s5".into(), service(5, 2));
        relist.insert("s7".into(), service(7, 3));
        r.replace(Source::Etcd, relist, &[]);
        assert_eq!(r.work(), (version + 2, judged + 2));
        // No service exists twice: each allocation is held by its layer, the merge and the
        // published catalog, and by nothing else once the old catalogs are gone.
        drop((before, after));
        let now = rx.borrow().clone();
        assert!(now.services.values().all(|s| Arc::strong_count(s) == 3));
    }

    /// Catalog versions share their map: with 50 versions alive, each one put apart, every
    /// service but the few in the changed service's tree leaf is held by one node that all 50
    /// share (a map copied per version, as before, held each service 50 more times). The
    /// registry answers for one service by look-ups, without walking the catalog.
    #[test]
    fn catalog_versions_share_all_but_the_changed_path() {
        let (r, rx) = Registry::open(None);
        r.replace(Source::Etcd, ten_thousand(), &[]);
        let versions: Vec<Arc<Catalog>> = (0..50)
            .map(|k| {
                r.put(Source::Etcd, "s5", Some(service(5, 2 + (k % 2) as u8)));
                rx.borrow().clone()
            })
            .collect();
        let (_, judged) = r.work();
        assert_eq!(judged, 10_000 + 50);
        let now = versions.last().unwrap();
        assert_eq!(now.services.len(), 10_000);
        // Held by its layer, the merge's index and one shared tree node.
        let once = now
            .services
            .values()
            .filter(|s| Arc::strong_count(s) == 3)
            .count();
        // imbl's B-tree leaves hold at most 16 entries: only s5's leaf is copied per version.
        assert!(once >= 10_000 - 16, "{once} of 10,000 held once");
        for pair in versions.windows(2) {
            let changed: Vec<_> = pair[0].services.diff(&pair[1].services).collect();
            assert_eq!(changed.len(), 1);
        }
        let s77 = r.served_named("s77").unwrap();
        assert!(Arc::ptr_eq(&s77, &now.services[&s77.addr]));
        assert_eq!(r.served_named("nobody"), None);
        assert_eq!(
            r.owner(&s77),
            Some(Ownership {
                source: Source::Etcd,
                overrides: None
            })
        );
    }

    /// The sources' own clash checks look up, they do not copy or walk the layer.
    #[test]
    fn a_clash_check_in_a_large_layer_names_the_holder() {
        let (r, _rx) = Registry::open(None);
        r.replace(Source::Kubernetes, ten_thousand(), &[]);
        let mut taken = service(123, 1);
        taken.name = "new".into();
        assert_eq!(
            r.clash(Source::Kubernetes, "k", &taken, &BTreeSet::new()),
            Some(format!("vip: {} is already \"s123\"'s address", taken.addr))
        );
        let except: BTreeSet<String> = ["s123".to_owned()].into();
        assert_eq!(r.clash(Source::Kubernetes, "k", &taken, &except), None);
        assert_eq!(r.keys(Source::Kubernetes, "s999").len(), 11);
    }
}

#[cfg(test)]
mod incremental {
    //! The per-entry merge against the merge done from scratch (what the registry did before):
    //! same catalog after any sequence of changes.
    use super::*;
    use crate::catalog::{Algorithm, Mode, Policy, Protocol};
    use proptest::prelude::*;

    fn svc(name: u8, vip: u8) -> Service {
        Service {
            name: format!("n{name}"),
            addr: ServiceAddr {
                vip: format!("10.96.0.{}:80", vip + 1).parse().unwrap(),
                protocol: Protocol::Tcp,
            },
            mode: Mode::Kernel,
            algorithm: Algorithm::RoundRobin,
            affinity: None,
            policy: Policy::default(),
            backends: vec![],
        }
    }

    /// The rule from scratch: in precedence order, an entry is applied unless an applied entry
    /// before it has its address or name.
    fn from_scratch(layers: &BTreeMap<Source, BTreeMap<String, Service>>) -> Catalog {
        let mut catalog = Catalog::default();
        let mut names = std::collections::HashSet::new();
        for entries in layers.values() {
            for s in entries.values() {
                if catalog.services.contains_key(&s.addr) || names.contains(&s.name) {
                    continue;
                }
                names.insert(s.name.clone());
                catalog.services.insert(s.addr, Arc::new(s.clone()));
            }
        }
        catalog
    }

    const SOURCES: [Source; 3] = [Source::Api, Source::Etcd, Source::Dns];

    proptest! {
        #[test]
        fn any_changes_give_the_catalog_a_merge_from_scratch_gives(
            ops in proptest::collection::vec((0..3usize, 0..6u8, proptest::option::of((0..4u8, 0..4u8))), 1..60)
        ) {
            let (r, rx) = Registry::open(None);
            let mut model: BTreeMap<Source, BTreeMap<String, Service>> = BTreeMap::new();
            for (source, key, entry) in ops {
                let source = SOURCES[source];
                let key = format!("k{key}");
                let entry = entry.map(|(n, v)| svc(n, v));
                match &entry {
                    Some(e) => model.entry(source).or_default().insert(key.clone(), e.clone()),
                    None => model.entry(source).or_default().remove(&key),
                };
                r.put(source, &key, entry);
                prop_assert_eq!(&*rx.borrow().clone(), &from_scratch(&model));
            }
        }
    }
}
