//! The endpoints: one function from (method, path, body) to an answer, the same for the socket
//! and for the fuzzer. Every change is checked whole (the entry as the file would check it,
//! then against the other services) before the registry sees it, so a refused request changes
//! nothing.

use std::net::SocketAddr;

use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{
    Api, state,
    view::{
        self, RegistryView, ServiceList, ServiceView, SourceView, StateList, VersionView, entry,
    },
};
use crate::{
    catalog::{
        BackendState, Service,
        entry::{backend_from_json, check_service, service_from_json},
    },
    listener::http::Reply,
    live::Ownership,
    registry::Source,
};

/// A refused request: status, reason, and the field at fault.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) error: String,
    pub(super) field: Option<String>,
}

pub(super) type Answer = Result<Reply, Refusal>;

pub(super) fn refuse(status: StatusCode, field: Option<&str>, error: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error: error.into(),
        field: field.map(str::to_owned),
    }
}

pub(super) fn bad(field: Option<&str>, error: impl Into<String>) -> Refusal {
    refuse(StatusCode::BAD_REQUEST, field, error)
}

pub(super) fn conflict(field: &str, error: impl Into<String>) -> Refusal {
    refuse(StatusCode::CONFLICT, Some(field), error)
}

fn no_service(name: &str) -> Refusal {
    refuse(
        StatusCode::NOT_FOUND,
        Some("name"),
        format!("name: no service named {name:?}"),
    )
}

/// A message from the entry checks (`backends[0].weight: …`, `unknown field `x`, …`) as a
/// refusal naming its field.
pub(super) fn invalid(message: String) -> Refusal {
    let field = field_of(&message);
    Refusal {
        status: StatusCode::BAD_REQUEST,
        error: message,
        field,
    }
}

/// The field a message is about: the `path: ` it starts with, refined by serde's
/// ``unknown field `x` `` and ``missing field `x` ``.
pub fn field_of(message: &str) -> Option<String> {
    let (prefix, rest) = match message.split_once(": ") {
        Some((p, rest)) if is_field_path(p) => (Some(p), rest),
        _ => (None, message),
    };
    let named = ["unknown field `", "missing field `"].iter().find_map(|m| {
        let (_, after) = rest.split_once(m)?;
        let (name, _) = after.split_once('`')?;
        Some(name.to_owned())
    });
    match (prefix, named) {
        // serde_path_to_error's path may already end at the unknown field.
        (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => Some(p.to_owned()),
        (Some(p), Some(n)) => Some(format!("{p}.{n}")),
        (None, Some(n)) => Some(n),
        (p, None) => p.map(str::to_owned),
    }
}

fn is_field_path(p: &str) -> bool {
    p.starts_with(|c: char| c.is_ascii_lowercase())
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
}

/// Decodes one `%XX`-encoded path segment.
fn decode(segment: &str) -> Result<String, Refusal> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(None, format!("path: bad percent-encoding in {segment:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(None, format!("path: {segment:?} is not UTF-8")))
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Reply {
    let mut r = Reply::error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not served on {path}; it takes {allow}"),
        None,
    );
    r.allow = Some(allow);
    r
}

/// `PATCH …/backends/ADDR`: what to change.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendPatch {
    weight: Option<u32>,
    state: Option<BackendState>,
}

impl Api {
    /// Answers one request. Never panics, whatever the bytes.
    pub fn handle(&self, method: &Method, path: &str, body: &[u8]) -> Reply {
        match self.route(method, path, body) {
            Ok(reply) => reply,
            Err(r) => Reply::error(r.status, r.error, r.field),
        }
    }

    fn route(&self, method: &Method, path: &str, body: &[u8]) -> Answer {
        let raw: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let raw = match raw.split_last() {
            Some((last, rest)) if last.is_empty() && !rest.is_empty() => rest,
            _ => &raw[..],
        };
        let segments: Vec<String> = raw.iter().map(|s| decode(s)).collect::<Result<_, _>>()?;
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let m = method;
        let not_allowed = |allow| Ok(method_not_allowed(m, path, allow));
        match s.as_slice() {
            ["v1", "version"] => match *m {
                Method::GET => Ok(self.version()),
                _ => not_allowed("GET"),
            },
            ["v1", "registry"] => match *m {
                Method::GET => Ok(self.registry_status()),
                _ => not_allowed("GET"),
            },
            ["v1", "state"] => match *m {
                Method::GET => Ok(self.all_state()),
                _ => not_allowed("GET"),
            },
            ["v1", "services"] => match *m {
                Method::GET => Ok(self.list()),
                Method::POST => self.create(body),
                _ => not_allowed("GET, POST"),
            },
            ["v1", "services", name] => match *m {
                Method::GET => self.get(name),
                Method::PUT => self.replace(name, body),
                Method::DELETE => self.delete(name),
                _ => not_allowed("GET, PUT, DELETE"),
            },
            ["v1", "services", name, "state"] => match *m {
                Method::GET => self.state(name),
                _ => not_allowed("GET"),
            },
            ["v1", "services", name, "override"] => match *m {
                Method::DELETE => self.release(name),
                _ => not_allowed("DELETE"),
            },
            ["v1", "services", name, "backends"] => match *m {
                Method::POST => self.add_backend(name, body),
                _ => not_allowed("POST"),
            },
            ["v1", "services", name, "backends", addr] => match *m {
                Method::PATCH => self.patch_backend(name, addr, body),
                Method::DELETE => self.remove_backend(name, addr),
                _ => not_allowed("PATCH, DELETE"),
            },
            ["v1", "routes"] => match *m {
                Method::GET => Ok(self.list_routes()),
                _ => not_allowed("GET"),
            },
            ["v1", "routes", name] => match *m {
                Method::GET => self.get_route(name),
                Method::PUT => self.put_route(name, body),
                Method::DELETE => self.delete_route(name),
                _ => not_allowed("GET, PUT, DELETE"),
            },
            ["v1", ..] => Err(refuse(
                StatusCode::NOT_FOUND,
                None,
                format!("no such endpoint: {m} {path} (see README: API and ctl)"),
            )),
            _ => Err(refuse(
                StatusCode::NOT_FOUND,
                None,
                format!("no such endpoint: {m} {path}; the API's paths start with /v1/"),
            )),
        }
    }

    fn view(&self, s: &Service, owner: Option<Ownership>, note: Option<String>) -> ServiceView {
        ServiceView {
            name: s.name.clone(),
            source: owner.map(|o| o.source),
            overrides: owner.and_then(|o| o.overrides),
            service: entry(s),
            note,
        }
    }

    /// The served service named `name`, with its view.
    fn served(&self, name: &str, note: Option<String>) -> Option<ServiceView> {
        // Look-ups in the registry's indexes: an answer about one service costs the same
        // whatever the catalog's size.
        let s = self.live.registry.served_named(name)?;
        let owner = self.live.registry.owner(&s);
        Some(self.view(&s, owner, note))
    }

    fn list(&self) -> Reply {
        let catalog = self.live.registry.catalog();
        let owners = self.live.owners(&catalog);
        let mut services: Vec<ServiceView> = catalog
            .services
            .values()
            .map(|s| self.view(s, owners.get(&s.name).copied(), None))
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Reply::json(StatusCode::OK, &ServiceList { services })
    }

    fn get(&self, name: &str) -> Answer {
        let v = self.served(name, None).ok_or_else(|| no_service(name))?;
        Ok(Reply::json(StatusCode::OK, &v))
    }

    fn all_state(&self) -> Reply {
        let snap = self.live.snapshot();
        let owners = self.live.owners(&snap.catalog);
        let mut services: Vec<_> = snap
            .catalog
            .services
            .values()
            .map(|s| state::state(&snap, s, owners.get(&s.name).map(|o| o.source)))
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let kernel_sockets = self.live.kernel_sockets();
        Reply::json(
            StatusCode::OK,
            &StateList {
                services,
                kernel_sockets,
                routes: super::http_routes::states(&self.live.registry.routes(), &snap.catalog),
            },
        )
    }

    fn state(&self, name: &str) -> Answer {
        let snap = self.live.snapshot();
        let s = snap.service(name).ok_or_else(|| no_service(name))?;
        let owner = self.live.registry.owner(s).map(|o| o.source);
        Ok(Reply::json(StatusCode::OK, &state::state(&snap, s, owner)))
    }

    fn registry_status(&self) -> Reply {
        let sources = self
            .live
            .registry
            .status()
            .into_iter()
            .map(|s| SourceView {
                source: s.source,
                entries: s.entries,
                live: s.live,
                last_sync: s.last_sync.map(view::rfc3339),
                staleness_seconds: s.staleness_seconds,
                rejected_total: s.rejected_total,
                last_error: s.last_error,
            })
            .collect();
        Reply::json(
            StatusCode::OK,
            &RegistryView {
                services: self.live.registry.catalog().services.len(),
                sources,
            },
        )
    }

    fn version(&self) -> Reply {
        Reply::json(
            StatusCode::OK,
            &VersionView {
                version: env!("CARGO_PKG_VERSION").into(),
                build: view::build(),
                pid: std::process::id(),
                uptime_seconds: self.started.elapsed().as_secs_f64(),
            },
        )
    }

    /// A whole entry from a request body; `name` is the path's, if any.
    fn parse_entry(&self, body: &[u8], name: Option<&str>) -> Result<Service, Refusal> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| bad(None, format!("not JSON: {e}")))?;
        let Some(fields) = value.as_object() else {
            return Err(bad(
                None,
                "the body must be an object with the fields of a [[service]] table",
            ));
        };
        match (name, fields.get("name")) {
            (None, None) => return Err(bad(Some("name"), "name: required")),
            (Some(path), Some(given)) if given.as_str() != Some(path) => {
                return Err(bad(
                    Some("name"),
                    format!(
                        "name: {given} differs from the path's {path:?} (a service is renamed by \
                         creating the new name and deleting the old)"
                    ),
                ));
            }
            _ => {}
        }
        service_from_json(body, name.unwrap_or_default(), &self.listen).map_err(invalid)
    }

    /// Refuses `s` if it would take the address of another served service, or clash within
    /// the API's own layer.
    fn check_place(&self, s: &Service) -> Result<(), Refusal> {
        let catalog = self.live.registry.catalog();
        if let Some(other) = catalog.services.get(&s.addr)
            && other.name != s.name
        {
            return Err(conflict(
                "vip",
                format!(
                    "vip: {} is already the address of service {:?}",
                    s.addr, other.name
                ),
            ));
        }
        let own = self.live.registry.entries(Source::Api);
        if let Some(reason) = crate::registry::clash(&own, &s.name, s) {
            let field = field_of(&reason);
            return Err(Refusal {
                status: StatusCode::CONFLICT,
                error: reason,
                field,
            });
        }
        Ok(())
    }

    fn create(&self, body: &[u8]) -> Answer {
        let s = self.parse_entry(body, None)?;
        let _edit = self.lock();
        let exists = self.live.registry.served_named(&s.name).is_some()
            || self
                .live
                .registry
                .entries(Source::Api)
                .contains_key(&s.name);
        if exists {
            return Err(conflict(
                "name",
                format!(
                    "name: service {:?} already exists; PUT /v1/services/{} replaces it",
                    s.name, s.name
                ),
            ));
        }
        self.check_place(&s)?;
        self.live
            .registry
            .put(Source::Api, &s.name, Some(s.clone()));
        let v = self
            .served(&s.name, None)
            .unwrap_or_else(|| self.view(&s, None, None));
        Ok(Reply::json(StatusCode::CREATED, &v))
    }

    fn replace(&self, name: &str, body: &[u8]) -> Answer {
        let s = self.parse_entry(body, Some(name))?;
        let _edit = self.lock();
        let existed = self.live.registry.served_named(&s.name).is_some()
            || self.live.registry.entries(Source::Api).contains_key(name);
        self.check_place(&s)?;
        let lower = self.lower_source(&s);
        self.live.registry.put(Source::Api, name, Some(s.clone()));
        let note = lower.map(|src| {
            format!(
                "the API's entry overrides the {} source's; DELETE /v1/services/{name}/override \
                 hands it back",
                src.name()
            )
        });
        let v = self
            .served(name, note)
            .unwrap_or_else(|| self.view(&s, None, None));
        let status = if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        Ok(Reply::json(status, &v))
    }

    /// The first source below the API that names `s` (by name or address).
    fn lower_source(&self, s: &Service) -> Option<Source> {
        self.live.registry.below_api(&s.addr, &s.name)
    }

    fn delete(&self, name: &str) -> Answer {
        let _edit = self.lock();
        let api = self.live.registry.entries(Source::Api);
        let Some(own) = api.get(name) else {
            let served = self.live.registry.served_named(name);
            return match served.and_then(|s| self.live.registry.owner(&s)) {
                Some(o) => Err(conflict(
                    "name",
                    format!(
                        "name: service {name:?} comes from the {} source; the API can override \
                         it but not delete it (change it there)",
                        o.source.name()
                    ),
                )),
                None => Err(no_service(name)),
            };
        };
        if let Some(lower) = self.lower_source(own) {
            return Err(conflict(
                "name",
                format!(
                    "name: the API's {name:?} overrides the {} source's service; \
                     DELETE /v1/services/{name}/override hands it back",
                    lower.name()
                ),
            ));
        }
        self.live.registry.put(Source::Api, name, None);
        Ok(Reply::json(StatusCode::OK, &json!({ "deleted": name })))
    }

    fn release(&self, name: &str) -> Answer {
        let _edit = self.lock();
        let api = self.live.registry.entries(Source::Api);
        let Some(own) = api.get(name) else {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                Some("name"),
                format!("name: the API does not override a service named {name:?}"),
            ));
        };
        let Some(lower) = self.lower_source(own) else {
            return Err(conflict(
                "name",
                format!(
                    "name: {name:?} is the API's own service, not an override; \
                     DELETE /v1/services/{name} deletes it"
                ),
            ));
        };
        self.live.registry.put(Source::Api, name, None);
        let note = format!("handed back to the {} source", lower.name());
        match self.served(name, Some(note.clone())) {
            Some(v) => Ok(Reply::json(StatusCode::OK, &v)),
            None => Ok(Reply::json(
                StatusCode::OK,
                &json!({ "released": name, "note": note }),
            )),
        }
    }

    /// Applies `change` to the service `name` and stores the result as the API's entry. A
    /// service of another source is copied into the API's layer first (the API's layer wins),
    /// and the answer says so.
    fn edit_service(
        &self,
        name: &str,
        change: impl FnOnce(&mut Service) -> Result<usize, Refusal>,
    ) -> Answer {
        let _edit = self.lock();
        let api = self.live.registry.entries(Source::Api);
        let (base, copied) = match api.get(name) {
            Some(s) => (s.clone(), None),
            None => {
                let s = self
                    .live
                    .registry
                    .served_named(name)
                    .ok_or_else(|| no_service(name))?;
                let from = self.live.registry.owner(&s).map(|o| o.source);
                ((*s).clone(), from)
            }
        };
        let mut s = base;
        let index = change(&mut s)?;
        check_service(&s, &self.listen).map_err(|m| backend_invalid(m, index))?;
        self.check_place(&s)?;
        self.live.registry.put(Source::Api, name, Some(s.clone()));
        let note = copied.map(|src| {
            format!(
                "the {} source's service is now overridden by the API with this change (later \
                 changes at the source do not apply); DELETE /v1/services/{name}/override hands \
                 it back",
                src.name()
            )
        });
        let v = self
            .served(name, note)
            .unwrap_or_else(|| self.view(&s, None, None));
        Ok(Reply::json(StatusCode::OK, &v))
    }

    fn add_backend(&self, name: &str, body: &[u8]) -> Answer {
        let b = backend_from_json(body).map_err(|m| {
            let mut r = invalid(m);
            if r.field.is_none() && r.error.contains("ip:port") {
                r.field = Some("address".into());
            }
            r
        })?;
        let reply = self.edit_service(name, |s| {
            if s.backends.iter().any(|o| o.addr == b.addr) {
                return Err(conflict(
                    "address",
                    format!("address: {} is already a backend of {name:?}", b.addr),
                ));
            }
            s.backends.push(b);
            Ok(s.backends.len() - 1)
        })?;
        Ok(Reply {
            status: StatusCode::CREATED,
            ..reply
        })
    }

    fn patch_backend(&self, name: &str, addr: &str, body: &[u8]) -> Answer {
        let addr = parse_addr(addr)?;
        let mut de = serde_json::Deserializer::from_slice(body);
        let patch: BackendPatch = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return bad(None, format!("not JSON: {inner}"));
            }
            match path.as_str() {
                "." => invalid(inner.to_string()),
                _ => invalid(format!("{path}: {inner}")),
            }
        })?;
        de.end()
            .map_err(|e| bad(None, format!("not JSON: trailing characters: {e}")))?;
        if patch.weight.is_none() && patch.state.is_none() {
            return Err(bad(
                None,
                "give the backend's new weight, state, or both: {\"weight\": 2, \"state\": \"drain\"}",
            ));
        }
        self.edit_service(name, |s| {
            let index = s
                .backends
                .iter()
                .position(|b| b.addr == addr)
                .ok_or_else(|| no_backend(name, addr))?;
            let b = &mut s.backends[index];
            if let Some(w) = patch.weight {
                b.weight = w;
            }
            if let Some(state) = patch.state {
                b.state = state;
            }
            Ok(index)
        })
    }

    fn remove_backend(&self, name: &str, addr: &str) -> Answer {
        let addr = parse_addr(addr)?;
        self.edit_service(name, |s| {
            let index = s
                .backends
                .iter()
                .position(|b| b.addr == addr)
                .ok_or_else(|| no_backend(name, addr))?;
            s.backends.remove(index);
            Ok(usize::MAX)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.edits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, Refusal> {
    s.parse().map_err(|_| {
        bad(
            Some("address"),
            format!("address: `{s}` is not an ip:port address (IPv6 as [ip]:port)"),
        )
    })
}

fn no_backend(name: &str, addr: SocketAddr) -> Refusal {
    refuse(
        StatusCode::NOT_FOUND,
        Some("address"),
        format!("address: {addr} is not a backend of {name:?}"),
    )
}

/// A check's message about the backend at `index` names the request's own field (`weight`,
/// `address`) rather than the service's list.
fn backend_invalid(message: String, index: usize) -> Refusal {
    let own = format!("backends[{index}]");
    let field = match message.strip_prefix(&own) {
        Some(rest) => match rest.strip_prefix('.') {
            Some(sub) => sub.split_once(':').map(|(f, _)| f.to_owned()),
            None => Some("address".to_owned()),
        },
        None => field_of(&message),
    };
    Refusal {
        status: StatusCode::BAD_REQUEST,
        error: message,
        field,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_messages() {
        let cases = [
            (
                "backends[0]: port 0 is not a backend port",
                Some("backends[0]"),
            ),
            (
                "backends[1].weight: 1000 is out of range",
                Some("backends[1].weight"),
            ),
            ("unknown field `colour`, expected one of …", Some("colour")),
            (
                "backends[0]: unknown field `wait`, expected …",
                Some("backends[0].wait"),
            ),
            ("missing field `vip`", Some("vip")),
            ("not JSON: expected value at line 1 column 1", None),
            ("vip: invalid socket address syntax", Some("vip")),
        ];
        for (m, want) in cases {
            assert_eq!(field_of(m).as_deref(), want, "{m}");
        }
    }

    #[test]
    fn backend_errors_name_the_requests_field() {
        let r = backend_invalid("backends[2].weight: 900 is out of range 0..=256".into(), 2);
        assert_eq!(r.field.as_deref(), Some("weight"));
        let r = backend_invalid("backends[2]: 10.0.0.1:0 … families must match".into(), 2);
        assert_eq!(r.field.as_deref(), Some("address"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("%5Bfd00%3A%3A1%5D:80").unwrap(), "[fd00::1]:80");
        assert!(decode("%zz").is_err());
        assert!(decode("%").is_err());
        assert!(decode("%ff").is_err());
    }
}
