//! The merge of the layers into one catalog, kept up to date entry by entry.
//!
//! The rule: entries are taken in precedence order (source, then key); an entry is applied
//! unless an entry before it that is applied has its address or its name. Done from scratch,
//! that walks every entry of every layer on each change. Here each entry's verdict is kept, and
//! a change re-judges only the entries it can affect: the changed one, then, whenever an
//! entry's verdict flips, the later entries that share its address or name (found through
//! indexes), in order. A change to one service with no clashes judges one entry and touches one
//! place in the catalog, whatever the catalog's size.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use super::{Rejected, Source};
use crate::catalog::{Service, ServiceAddr, Services};

/// One entry: its source and the source's key for it. The order is precedence.
pub type Node = (Source, String);

/// The merged view and what it takes to keep it current.
#[derive(Default)]
pub struct Merge {
    by_addr: HashMap<ServiceAddr, BTreeSet<Node>>,
    by_name: HashMap<String, BTreeSet<Node>>,
    applied: HashSet<Node>,
    /// Applied entries by address: who owns each place in the catalog.
    catalog: BTreeMap<ServiceAddr, (Node, Arc<Service>)>,
    /// The same services as a persistent map, kept in step with `catalog`: what the registry
    /// publishes, sharing everything a change leaves alone with the version before.
    published: Services,
    /// Whether the catalog changed since [`Merge::take_changed`].
    changed: bool,
    /// Entries judged since start (for the tests' bounds).
    pub judged: u64,
}

impl Merge {
    /// The applied entries, by address.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceAddr, &Arc<Service>)> {
        self.catalog.iter().map(|(a, (_, s))| (a, s))
    }

    /// The applied entries as the catalog's map: a clone shares it whole.
    pub fn published(&self) -> &Services {
        &self.published
    }

    /// The applied entry named `name` (at most one is): a look-up in the name index.
    pub fn applied_named(&self, name: &str) -> Option<&Node> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .find(|n| self.applied.contains(*n))
    }

    pub fn owner(&self, addr: &ServiceAddr) -> Option<Source> {
        self.catalog.get(addr).map(|((source, _), _)| *source)
    }

    /// The first entry of a source other than `except`, by precedence, that has this address or
    /// this name.
    pub fn first_other(&self, except: Source, addr: &ServiceAddr, name: &str) -> Option<Source> {
        let by_addr = self.by_addr.get(addr).into_iter().flatten();
        let by_name = self.by_name.get(name).into_iter().flatten();
        by_addr
            .chain(by_name)
            .map(|(s, _)| *s)
            .filter(|s| *s != except)
            .min()
    }

    /// Why `entry` under `key` would clash within its own source: another key of `source` has
    /// its address or name (keys in `except` not counted).
    pub fn clash(
        &self,
        source: Source,
        key: &str,
        entry: &Service,
        except: &BTreeSet<String>,
    ) -> Option<String> {
        let other = |set: Option<&BTreeSet<Node>>| {
            set.into_iter()
                .flatten()
                .find(|(s, k)| *s == source && k != key && !except.contains(k))
                .map(|(_, k)| k.clone())
        };
        if let Some(k) = other(self.by_addr.get(&entry.addr)) {
            return Some(format!("vip: {} is already {k:?}'s address", entry.addr));
        }
        other(self.by_name.get(&entry.name))
            .map(|k| format!("name: {:?} is already used by {k:?}", entry.name))
    }

    /// True once after any change to the catalog.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// `node`'s entry went from `old` to `new` (either may be absent). `entry` looks entries
    /// up in the layers, which already hold the new state. Returns the entries now not applied
    /// with a reason (a clash the source should hear of).
    pub fn change(
        &mut self,
        node: Node,
        old: Option<&Service>,
        new: Option<&Service>,
        entry: &dyn Fn(&Node) -> Option<Arc<Service>>,
    ) -> Vec<Rejected> {
        let mut work = BTreeSet::new();
        if let Some(o) = old {
            unindex(&mut self.by_addr, &o.addr, &node);
            unindex(&mut self.by_name, o.name.as_str(), &node);
            if self.applied.remove(&node) {
                self.vacate(&o.addr, &node);
                self.later_neighbours(&node, &o.addr, &o.name, &mut work);
            }
        }
        if let Some(n) = new {
            self.by_addr.entry(n.addr).or_default().insert(node.clone());
            self.by_name
                .entry(n.name.clone())
                .or_default()
                .insert(node.clone());
            work.insert(node);
        }
        let mut rejected = Vec::new();
        while let Some(node) = work.pop_first() {
            let Some(service) = entry(&node) else {
                continue;
            };
            self.judged += 1;
            let verdict = self.judge(&node, &service);
            let was = self.applied.contains(&node);
            match verdict {
                Ok(()) => {
                    self.applied.insert(node.clone());
                    let place = self.catalog.get(&service.addr);
                    if place.is_none_or(|(_, s)| !Arc::ptr_eq(s, &service)) {
                        self.catalog
                            .insert(service.addr, (node.clone(), service.clone()));
                        self.published.insert(service.addr, service.clone());
                        self.changed = true;
                    }
                }
                Err(reason) => {
                    if was {
                        self.applied.remove(&node);
                        self.vacate(&service.addr, &node);
                    }
                    if let Some(reason) = reason {
                        rejected.push(Rejected {
                            key: label(&node),
                            reason,
                        });
                    }
                }
            }
            if was != self.applied.contains(&node) {
                self.later_neighbours(&node, &service.addr, &service.name, &mut work);
            }
        }
        rejected
    }

    /// `Ok`: applied. `Err(None)`: an entry of a source with precedence has the address (it
    /// simply wins); `Err(Some(why))`: a clash to report.
    fn judge(&self, node: &Node, s: &Service) -> Result<(), Option<String>> {
        if let Some(owner) = self.first_applied(self.by_addr.get(&s.addr), node) {
            return Err((owner.0 == node.0)
                .then(|| format!("vip: {} is already {}'s address", s.addr, label(owner))));
        }
        if let Some(owner) = self.first_applied(self.by_name.get(s.name.as_str()), node) {
            return Err(Some(format!(
                "name: {:?} is already used by {}",
                s.name,
                label(owner)
            )));
        }
        Ok(())
    }

    /// The first applied entry of `set` before `node`.
    fn first_applied<'a>(&self, set: Option<&'a BTreeSet<Node>>, node: &Node) -> Option<&'a Node> {
        set.into_iter()
            .flat_map(|set| set.range(..node.clone()))
            .find(|n| self.applied.contains(*n))
    }

    fn vacate(&mut self, addr: &ServiceAddr, node: &Node) {
        if self.catalog.get(addr).is_some_and(|(n, _)| n == node) {
            self.catalog.remove(addr);
            self.published.remove(addr);
            self.changed = true;
        }
    }

    fn later_neighbours(
        &self,
        node: &Node,
        addr: &ServiceAddr,
        name: &str,
        work: &mut BTreeSet<Node>,
    ) {
        use std::ops::Bound::{Excluded, Unbounded};
        for set in [self.by_addr.get(addr), self.by_name.get(name)]
            .into_iter()
            .flatten()
        {
            work.extend(set.range((Excluded(node.clone()), Unbounded)).cloned());
        }
    }
}

fn unindex<K, Q>(index: &mut HashMap<K, BTreeSet<Node>>, key: &Q, node: &Node)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(set) = index.get_mut(key) {
        set.remove(node);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

fn label((source, key): &Node) -> String {
    format!("{}:{key}", source.name())
}
