//! `/v1/routes`: HTTP routes, as JSON with the fields of a `[[route]]` table. A `PUT` is
//! checked whole before the registry sees it (every field as the file checks it, each
//! destination a proxy-mode service served now, the gateway one listening now), so a refused
//! request changes nothing and names its field. Routes made here are the API's layer: they
//! win over another source's route of the same name (the answer says so) and are saved as
//! last-known-good.

use hyper::StatusCode;
use serde_json::{Value, json};

use super::{
    Api,
    routes::{Answer, Refusal, bad, conflict, invalid, refuse},
    view::{RouteBackend, RouteList, RouteState, RouteView, RuleState},
};
use crate::{
    catalog::{Catalog, Mode, Protocol},
    http::route::{Known, RawMatch, RawRoute, Routes},
    listener::http::Reply,
    registry::{
        Source,
        routes::{RouteEntry, RouteTable},
    },
};

fn no_route(name: &str) -> Refusal {
    refuse(
        StatusCode::NOT_FOUND,
        Some("name"),
        format!("name: no route named {name:?}"),
    )
}

/// Whether `name` is a proxy-mode TCP service of `catalog` (what HTTP mode can send to).
fn proxy_service(catalog: &Catalog, name: &str) -> bool {
    catalog
        .services
        .values()
        .any(|s| s.name == name && s.mode == Mode::Proxy && s.addr.protocol == Protocol::Tcp)
}

fn view(name: &str, e: &RouteEntry, note: Option<String>) -> RouteView {
    RouteView {
        name: name.to_owned(),
        source: e.source,
        route: serde_json::to_value(&*e.route).unwrap_or(Value::Null),
        note,
    }
}

/// A match as one line: `prefix /api GET x-canary=1 ?v=2`.
fn describe(m: &RawMatch) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &m.path_exact {
        parts.push(format!("exact {p}"));
    }
    if let Some(p) = &m.path_prefix {
        parts.push(format!("prefix {p}"));
    }
    if let Some(p) = &m.path_regex {
        parts.push(format!("regex {p}"));
    }
    if let Some(x) = &m.method {
        parts.push(x.clone());
    }
    parts.extend(m.headers.iter().map(|(k, v)| format!("{k}={v}")));
    parts.extend(m.query.iter().map(|(k, v)| format!("?{k}={v}")));
    if parts.is_empty() {
        parts.push("any".into());
    }
    parts.join(" ")
}

/// What `ctl state` shows of each route.
pub fn states(table: &RouteTable, catalog: &Catalog) -> Vec<RouteState> {
    table
        .routes
        .iter()
        .map(|(name, e)| {
            let r = &e.route;
            let parent = match (&r.service, &r.gateway) {
                (Some(s), _) => format!("service {s}"),
                (None, Some(g)) => format!("gateway {g}"),
                (None, None) => "-".into(),
            };
            RouteState {
                name: name.clone(),
                source: e.source,
                parent,
                hostnames: r.hostnames.clone(),
                rules: r
                    .rules
                    .iter()
                    .map(|u| RuleState {
                        matches: u.matches.iter().map(describe).collect(),
                        backends: u
                            .backends
                            .iter()
                            .map(|b| RouteBackend {
                                service: b.service.clone(),
                                weight: b.weight,
                                resolved: proxy_service(catalog, &b.service),
                            })
                            .collect(),
                        redirect: u.redirect.as_ref().map(|x| {
                            format!(
                                "{} -> {}://{}{}",
                                x.status.unwrap_or(302),
                                x.scheme.as_deref().unwrap_or("(same)"),
                                x.hostname.as_deref().unwrap_or("(same host)"),
                                x.path.as_deref().unwrap_or("(same path)")
                            )
                        }),
                    })
                    .collect(),
                requests: None,
            }
        })
        .collect()
}

/// A route from a request body; the path's `name` is the route's (the body may leave it out).
pub fn parse_route(body: &[u8], name: &str) -> Result<RawRoute, Refusal> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|e| bad(None, format!("not JSON: {e}")))?;
    let Some(fields) = value.as_object_mut() else {
        return Err(bad(
            None,
            "the body must be an object with the fields of a [[route]] table",
        ));
    };
    match fields.get("name") {
        None => {
            fields.insert("name".into(), json!(name));
        }
        Some(given) if given.as_str() != Some(name) => {
            return Err(bad(
                Some("name"),
                format!("name: {given} differs from the path's {name:?}"),
            ));
        }
        Some(_) => {}
    }
    serde_path_to_error::deserialize::<_, RawRoute>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." => invalid(inner.to_string()),
            _ => invalid(format!("{path}: {inner}")),
        }
    })
}

impl Api {
    pub(super) fn list_routes(&self) -> Reply {
        let table = self.live.registry.routes();
        let routes = table.routes.iter().map(|(n, e)| view(n, e, None)).collect();
        Reply::json(StatusCode::OK, &RouteList { routes })
    }

    pub(super) fn get_route(&self, name: &str) -> Answer {
        let table = self.live.registry.routes();
        let e = table.routes.get(name).ok_or_else(|| no_route(name))?;
        Ok(Reply::json(StatusCode::OK, &view(name, e, None)))
    }

    pub(super) fn put_route(&self, name: &str, body: &[u8]) -> Answer {
        let r = parse_route(body, name)?;
        let _edit = self.edit_lock();
        let catalog = self.live.registry.catalog();
        let service = |s: &str| proxy_service(&catalog, s);
        let gateway = |g: &str| self.gateways.contains(g);
        Routes::check(
            &r,
            &Known {
                service: &service,
                gateway: &gateway,
            },
        )
        .map_err(invalid)?;
        let before = self.live.registry.routes();
        let existed = before.routes.contains_key(name);
        let lower = before
            .routes
            .get(name)
            .map(|e| e.source)
            .filter(|s| *s != Source::Api);
        self.live.registry.put_route(Source::Api, name, Some(r));
        let note = lower.map(|s| {
            format!(
                "the API's route overrides the {} source's; DELETE /v1/routes/{name} hands it back",
                s.name()
            )
        });
        let table = self.live.registry.routes();
        let e = table.routes.get(name).ok_or_else(|| no_route(name))?;
        let status = if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(Reply::json(status, &view(name, e, note)))
    }

    pub(super) fn delete_route(&self, name: &str) -> Answer {
        let _edit = self.edit_lock();
        if !self.live.registry.routes_of(Source::Api).contains_key(name) {
            let table = self.live.registry.routes();
            return match table.routes.get(name) {
                Some(e) => Err(conflict(
                    "name",
                    format!(
                        "name: route {name:?} comes from the {} source; the API can override it \
                         but not delete it (change it there)",
                        e.source.name()
                    ),
                )),
                None => Err(no_route(name)),
            };
        }
        self.live.registry.put_route(Source::Api, name, None);
        let table = self.live.registry.routes();
        let mut answer = json!({ "deleted": name });
        if let Some(e) = table.routes.get(name) {
            answer["note"] = json!(format!(
                "the {} source's route serves again",
                e.source.name()
            ));
        }
        Ok(Reply::json(StatusCode::OK, &answer))
    }

    fn edit_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.edits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_without_a_name_takes_the_paths_and_fields_are_named() {
        let r = parse_route(
            br#"{"gateway":"g","rule":[{"backends":[{"service":"a"}]}]}"#,
            "w",
        )
        .unwrap();
        assert_eq!(r.name, "w");
        let e = parse_route(
            br#"{"gateway":"g","rule":[{"backends":[{"service":"a","weigth":2}]}]}"#,
            "w",
        )
        .unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("rule[0].backends[0].weigth"),
            "{}",
            e.error
        );
        let e = parse_route(br#"{"name":"x","gateway":"g"}"#, "w").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"));
    }
}
