//! HTTP routes as registry state, beside the services: each source's layer holds its routes by
//! name, saved with its services as last-known-good, and the layers merge by name in
//! [`Source`] order (the first source to name a route serves it, as for a service's address).
//! The merged table is published on its own watch channel: a route change never costs the
//! datapath a catalog apply, and a catalog change never recompiles the routes.
//!
//! Sources check a route before it reaches the registry (its destinations against the catalog,
//! its gateway against the configured ones: [`crate::http::route::Routes::check`]). What the
//! registry holds is compiled whole by the agent's loop; a destination deleted later stays
//! named and is answered 500 (Gateway API's answer for a backendRef that does not resolve).

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;
use tracing::{info, warn};

use super::{Registry, Source, State};
use crate::http::route::{RawRoute, Routes, SharedRoutes};

/// One served route and the source it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteEntry {
    pub source: Source,
    pub route: Arc<RawRoute>,
}

/// Every served route, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub routes: BTreeMap<String, RouteEntry>,
}

impl RouteTable {
    /// The routes as the HTTP proxy compiles them, in name order.
    pub fn raw(&self) -> Vec<RawRoute> {
        self.routes.values().map(|e| (*e.route).clone()).collect()
    }

    /// The layers' routes merged: the first source in precedence order to name a route
    /// serves it.
    fn merge(layers: &BTreeMap<Source, super::Layer>) -> RouteTable {
        let mut routes = BTreeMap::new();
        for (&source, layer) in layers {
            for (name, route) in &layer.routes {
                routes.entry(name.clone()).or_insert_with(|| RouteEntry {
                    source,
                    route: route.clone(),
                });
            }
        }
        RouteTable { routes }
    }
}

impl State {
    /// Re-merges the routes; `true` if the served table changed.
    pub(super) fn merge_routes(&mut self) -> bool {
        let merged = RouteTable::merge(&self.layers);
        if *self.routes == merged {
            return false;
        }
        self.routes = Arc::new(merged);
        true
    }
}

/// A saved route that no longer compiles (the file was edited by hand) is not served.
pub(super) fn restore(source: Source, layer: &mut super::Layer) {
    layer.routes.retain(|name, r| {
        let (_, errors) = Routes::serve(vec![(**r).clone()]);
        for e in &errors {
            warn!(source = source.name(), route = %name, "last-known-good route not served: {e}");
        }
        errors.is_empty() && r.name == *name
    });
}

impl Registry {
    /// Replaces a source's routes with a complete view (the file's, a relist).
    pub fn replace_routes(&self, source: Source, routes: BTreeMap<String, RawRoute>) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        let before = layer.routes.len();
        let mut next = BTreeMap::new();
        for (name, r) in routes {
            // The same route again keeps the allocation the table shares.
            let kept = layer.routes.get(&name).filter(|o| ***o == r).cloned();
            next.insert(name, kept.unwrap_or_else(|| Arc::new(r)));
        }
        let changed = layer.routes != next;
        layer.routes = next;
        if changed {
            info!(
                source = source.name(),
                before,
                now = state.layers[&source].routes.len(),
                "routes replaced"
            );
        }
        self.publish_routes(&mut state);
    }

    /// Sets (or with `None` removes) one route of a source.
    pub fn put_route(&self, source: Source, name: &str, route: Option<RawRoute>) {
        let mut state = self.lock();
        let layer = state.layers.entry(source).or_default();
        match route {
            Some(r) => layer.routes.insert(name.to_owned(), Arc::new(r)),
            None => layer.routes.remove(name),
        };
        self.publish_routes(&mut state);
    }

    /// One source's routes.
    pub fn routes_of(&self, source: Source) -> BTreeMap<String, Arc<RawRoute>> {
        self.lock()
            .layers
            .get(&source)
            .map(|l| l.routes.clone())
            .unwrap_or_default()
    }

    /// The served routes.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.lock().routes.clone()
    }

    /// Every change of the served routes, from the current table on.
    pub fn subscribe_routes(&self) -> tokio::sync::watch::Receiver<Arc<RouteTable>> {
        self.routes_tx.subscribe()
    }

    pub(super) fn publish_routes(&self, state: &mut State) {
        if state.merge_routes() {
            self.routes_tx.send_replace(state.routes.clone());
        }
        if let Some(saver) = &state.last_known_good {
            saver.touch();
        }
    }
}

/// Compiles `table` into what every HTTP connection reads (a route that does not compile is
/// left out, logged).
pub fn compile_into(table: &RouteTable, shared: &SharedRoutes) {
    let (routes, errors) = Routes::serve(table.raw());
    for e in errors {
        warn!("{e}; not served");
    }
    shared.store(routes);
}

/// Compiles every change `changes` brings, until the registry is gone.
pub async fn follow(
    mut changes: tokio::sync::watch::Receiver<Arc<RouteTable>>,
    shared: SharedRoutes,
) {
    while changes.changed().await.is_ok() {
        let table = changes.borrow_and_update().clone();
        compile_into(&table, &shared);
        info!(routes = table.routes.len(), "routes applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, to: &str) -> RawRoute {
        serde_json::from_value(serde_json::json!({
            "name": name, "gateway": "gw", "rule": [{"backends": [{"service": to}]}]
        }))
        .unwrap()
    }

    #[test]
    fn routes_merge_by_name_in_source_order_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("sy-lkg-routes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (r, _rx) = Registry::open(Some(dir.clone()));
        let mut changes = r.subscribe_routes();
        r.replace_routes(
            Source::Kubernetes,
            [("a".into(), route("a", "k")), ("b".into(), route("b", "k"))].into(),
        );
        r.put_route(Source::Api, "a", Some(route("a", "api")));
        assert!(changes.has_changed().unwrap());
        let t = r.routes();
        assert_eq!(t.routes["a"].source, Source::Api);
        assert_eq!(t.routes["a"].route.rules[0].backends[0].service, "api");
        assert_eq!(t.routes["b"].source, Source::Kubernetes);
        // The same view again publishes nothing.
        changes.mark_unchanged();
        r.replace_routes(
            Source::Kubernetes,
            [("a".into(), route("a", "k")), ("b".into(), route("b", "k"))].into(),
        );
        assert!(!changes.has_changed().unwrap());
        r.flush();
        drop(r);
        let (again, _rx) = Registry::open(Some(dir.clone()));
        assert_eq!(*again.routes(), *t);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
