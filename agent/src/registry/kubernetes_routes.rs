//! The Kubernetes source's routes: Gateway API `HTTPRoute` and `GRPCRoute` objects
//! (`gateway.networking.k8s.io/v1`, the `gateway-api` crate's types) become `[[route]]`s of
//! the Kubernetes layer, listed then watched like Services.
//!
//! - A parentRef to a `Service` (mesh) attaches the route to that Service's proxy-mode TCP
//!   entries (the parentRef's `port`, or every port); one to a `Gateway` (the default kind)
//!   attaches it to the agent's `[[gateway]]` of the Gateway's name: the agent does not read
//!   Gateway objects or open listeners for them. A route on a gateway this agent does not have
//!   is kept and serves nothing.
//! - A backendRef to a Service and port sends to that port's entry; one that does not resolve
//!   (no such Service yet, a kernel-mode one) is kept and its share of requests is answered
//!   500, as Gateway API asks. Routes are resolved again on every catalog change.
//! - Supported: matches on path (Exact, PathPrefix, RegularExpression), Exact headers and
//!   query parameters, method (GRPCRoute: Exact service and method); filters
//!   RequestHeaderModifier, ResponseHeaderModifier, URLRewrite with ReplacePrefixMatch,
//!   RequestRedirect (scheme, hostname, ReplaceFullPath, 301/302); weighted backendRefs;
//!   `timeouts.request` and `timeouts.backendRequest`; `retry.attempts`, `retry.codes` and
//!   `retry.backoff` (GEP-1731).
//! - Anything else (a mirror, CORS, a regex header match, a redirect port, a per-backendRef
//!   filter) makes the object not applied, logged once with the object and the field: never
//!   half of an object.

use std::{
    collections::{BTreeMap, BTreeSet},
    str::FromStr,
};

use futures::StreamExt;
use gateway_api::apis::{experimental::httproutes as h, standard::grpcroutes as g};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{utils::StreamBackoff, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::{Registry, Rejected, Source};
use crate::{
    catalog::{Mode, Protocol},
    http::route::{
        Known, RawDestination, RawHeaders, RawMatch, RawRedirect, RawRoute, RawRule, Routes,
    },
};

/// Which kind of route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Http,
    Grpc,
}

impl Kind {
    fn resource(self) -> ApiResource {
        let (kind, plural) = match self {
            Kind::Http => ("HTTPRoute", "httproutes"),
            Kind::Grpc => ("GRPCRoute", "grpcroutes"),
        };
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind),
            plural,
        )
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Http => "HTTPRoute",
            Kind::Grpc => "GRPCRoute",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Kind::Http => "httproute",
            Kind::Grpc => "grpcroute",
        }
    }
}

/// (kind, namespace, name)
type Key = (Kind, String, String);

/// What the source knows of the route objects.
#[derive(Default)]
struct Objects {
    specs: BTreeMap<Key, serde_json::Value>,
    /// Lists in progress.
    listing: BTreeMap<Kind, BTreeMap<Key, serde_json::Value>>,
    /// Kinds listed once (or not served: the CRD is not installed).
    listed: BTreeSet<Kind>,
    /// The reason each object was last not applied, so a reason is logged once.
    refused: BTreeMap<Key, String>,
}

fn key_of(kind: Kind, o: &DynamicObject) -> Key {
    (
        kind,
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

impl Objects {
    fn on_event(&mut self, kind: Kind, event: watcher::Event<DynamicObject>) {
        let spec = |o: &DynamicObject| o.data.get("spec").cloned().unwrap_or_default();
        match event {
            watcher::Event::Init => {
                self.listing.insert(kind, BTreeMap::new());
            }
            watcher::Event::InitApply(o) => {
                if let Some(l) = self.listing.get_mut(&kind) {
                    l.insert(key_of(kind, &o), spec(&o));
                }
            }
            watcher::Event::InitDone => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                self.specs.retain(|k, _| k.0 != kind);
                self.specs.extend(listed);
                self.listed.insert(kind);
            }
            watcher::Event::Apply(o) => {
                self.specs.insert(key_of(kind, &o), spec(&o));
            }
            watcher::Event::Delete(o) => {
                let k = key_of(kind, &o);
                self.specs.remove(&k);
                self.refused.remove(&k);
            }
        }
    }

    /// Every object's routes, resolved against the registry now; objects that cannot be
    /// honoured are logged (once per reason) and left out.
    fn routes(&mut self, registry: &Registry) -> BTreeMap<String, RawRoute> {
        let mut out = BTreeMap::new();
        for (key, spec) in &self.specs {
            let (kind, ns, name) = key;
            let made = match kind {
                Kind::Http => parse::<h::HttpRouteSpec>(spec).and_then(|s| http_routes(&s, ns)),
                Kind::Grpc => parse::<g::GrpcRouteSpec>(spec).and_then(|s| grpc_routes(&s, ns)),
            }
            .and_then(|rules| attach(registry, key, rules));
            match made {
                Ok(routes) => {
                    if self.refused.remove(key).is_some() {
                        info!(object = %format!("{} {ns}/{name}", kind.name()), "route applied now");
                    }
                    out.extend(routes.into_iter().map(|r| (r.name.clone(), r)));
                }
                Err(why) => {
                    if self.refused.get(key) != Some(&why) {
                        let rejected = Rejected {
                            key: format!("{} {ns}/{name}", kind.name()),
                            reason: format!("route not applied: {why}"),
                        };
                        registry.reject(Source::Kubernetes, &rejected);
                        self.refused.insert(key.clone(), why);
                    }
                }
            }
        }
        out
    }
}

fn parse<T: DeserializeOwned>(spec: &serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(spec.clone())
        .map_err(|e| format!("spec.{}: {}", e.path(), e.inner()))
}

/// What an object says before its parents are resolved.
struct Parsed {
    parents: Vec<Parent>,
    hostnames: Vec<String>,
    rules: Vec<RawRule>,
}

struct Parent {
    kind: String,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
}

/// A backendRef before resolution.
struct Backend {
    kind: Option<String>,
    group: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
    weight: Option<i32>,
}

fn backend(at: &str, b: Backend, ns: &str) -> Result<RawDestination, String> {
    if b.group.as_deref().is_some_and(|g| !g.is_empty())
        || b.kind.as_deref().is_some_and(|k| k != "Service")
    {
        return Err(format!("{at}: only Service backends are supported"));
    }
    let weight = b.weight.unwrap_or(1);
    let weight = u32::try_from(weight).map_err(|_| format!("{at}.weight: {weight} is negative"))?;
    let Some(port) = b.port else {
        return Err(format!("{at}.port: required for a Service"));
    };
    // Resolved by `attach`: `service` holds the reference until then.
    Ok(RawDestination {
        service: format!(
            "{}\u{0}{}\u{0}{port}",
            b.namespace.as_deref().unwrap_or(ns),
            b.name
        ),
        weight,
    })
}

fn headers_of(
    at: &str,
    set: Option<Vec<(String, String)>>,
    add: Option<Vec<(String, String)>>,
    remove: Option<Vec<String>>,
) -> Result<RawHeaders, String> {
    let map = |v: Option<Vec<(String, String)>>,
               field: &str|
     -> Result<BTreeMap<String, String>, String> {
        let mut m = BTreeMap::new();
        for (k, val) in v.unwrap_or_default() {
            if m.insert(k.to_ascii_lowercase(), val).is_some() {
                return Err(format!("{at}.{field}: `{k}` is named twice"));
            }
        }
        Ok(m)
    };
    Ok(RawHeaders {
        set: map(set, "set")?,
        add: map(add, "add")?,
        remove: remove.unwrap_or_default(),
    })
}

fn duration(at: &str, d: &Option<String>) -> Result<Option<String>, String> {
    let Some(d) = d else { return Ok(None) };
    let parsed = gateway_api::Duration::from_str(d).map_err(|e| format!("{at}: {e}"))?;
    let ms = parsed.as_millis();
    // Gateway API: zero turns the timeout off.
    Ok((ms > 0).then(|| format!("{ms}ms")))
}

fn http_routes(s: &h::HttpRouteSpec, ns: &str) -> Result<Parsed, String> {
    let parents = s
        .parent_refs
        .iter()
        .flatten()
        .map(|p| Parent {
            kind: p.kind.clone().unwrap_or_else(|| "Gateway".into()),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            port: p.port,
        })
        .collect();
    let mut rules = Vec::new();
    for (ri, r) in s.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{ri}]");
        let mut rule = RawRule::default();
        for (mi, m) in r.matches.iter().flatten().enumerate() {
            let at = format!("{at}.matches[{mi}]");
            let mut raw = RawMatch::default();
            if let Some(p) = &m.path {
                let value = p.value.clone().unwrap_or_else(|| "/".into());
                match p.r#type {
                    Some(h::HttpRouteRulesMatchesPathType::Exact) => raw.path_exact = Some(value),
                    Some(h::HttpRouteRulesMatchesPathType::RegularExpression) => {
                        raw.path_regex = Some(value)
                    }
                    _ => raw.path_prefix = Some(value),
                }
            }
            for (hi, x) in m.headers.iter().flatten().enumerate() {
                if matches!(
                    x.r#type,
                    Some(h::HttpRouteRulesMatchesHeadersType::RegularExpression)
                ) {
                    return Err(format!(
                        "{at}.headers[{hi}].type: RegularExpression is not supported"
                    ));
                }
                raw.headers
                    .insert(x.name.to_ascii_lowercase(), x.value.clone());
            }
            for (qi, q) in m.query_params.iter().flatten().enumerate() {
                if matches!(
                    q.r#type,
                    Some(h::HttpRouteRulesMatchesQueryParamsType::RegularExpression)
                ) {
                    return Err(format!(
                        "{at}.queryParams[{qi}].type: RegularExpression is not supported"
                    ));
                }
                raw.query.insert(q.name.clone(), q.value.clone());
            }
            if let Some(method) = &m.method {
                let text = serde_json::to_value(method)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned));
                raw.method = text;
            }
            rule.matches.push(raw);
        }
        for (fi, f) in r.filters.iter().flatten().enumerate() {
            let at = format!("{at}.filters[{fi}]");
            let kind = serde_json::to_value(&f.r#type)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            match kind.as_str() {
                "RequestHeaderModifier" => {
                    let m = f
                        .request_header_modifier
                        .as_ref()
                        .ok_or(format!("{at}.requestHeaderModifier: missing"))?;
                    rule.request_headers = Some(headers_of(
                        &format!("{at}.requestHeaderModifier"),
                        m.set.as_ref().map(|v| {
                            v.iter()
                                .map(|x| (x.name.clone(), x.value.clone()))
                                .collect()
                        }),
                        m.add.as_ref().map(|v| {
                            v.iter()
                                .map(|x| (x.name.clone(), x.value.clone()))
                                .collect()
                        }),
                        m.remove.clone(),
                    )?);
                }
                "ResponseHeaderModifier" => {
                    let m = f
                        .response_header_modifier
                        .as_ref()
                        .ok_or(format!("{at}.responseHeaderModifier: missing"))?;
                    rule.response_headers = Some(headers_of(
                        &format!("{at}.responseHeaderModifier"),
                        m.set.as_ref().map(|v| {
                            v.iter()
                                .map(|x| (x.name.clone(), x.value.clone()))
                                .collect()
                        }),
                        m.add.as_ref().map(|v| {
                            v.iter()
                                .map(|x| (x.name.clone(), x.value.clone()))
                                .collect()
                        }),
                        m.remove.clone(),
                    )?);
                }
                "URLRewrite" => {
                    let u = f
                        .url_rewrite
                        .as_ref()
                        .ok_or(format!("{at}.urlRewrite: missing"))?;
                    if u.hostname.is_some() {
                        return Err(format!("{at}.urlRewrite.hostname: not supported"));
                    }
                    let Some(p) = &u.path else { continue };
                    match (&p.replace_prefix_match, &p.replace_full_path) {
                        (Some(prefix), None) => rule.rewrite_prefix = Some(prefix.clone()),
                        _ => {
                            return Err(format!(
                                "{at}.urlRewrite.path: only ReplacePrefixMatch is supported"
                            ));
                        }
                    }
                }
                "RequestRedirect" => {
                    let x = f
                        .request_redirect
                        .as_ref()
                        .ok_or(format!("{at}.requestRedirect: missing"))?;
                    if x.port.is_some() {
                        return Err(format!("{at}.requestRedirect.port: not supported"));
                    }
                    let path = match &x.path {
                        None => None,
                        Some(p) => match (&p.replace_full_path, &p.replace_prefix_match) {
                            (Some(full), None) => Some(full.clone()),
                            _ => {
                                return Err(format!(
                                    "{at}.requestRedirect.path: only ReplaceFullPath is supported"
                                ));
                            }
                        },
                    };
                    let scheme = x
                        .scheme
                        .as_ref()
                        .and_then(|s| serde_json::to_value(s).ok())
                        .and_then(|v| v.as_str().map(str::to_owned));
                    let status = match x.status_code {
                        None => None,
                        Some(c) => Some(
                            u16::try_from(c)
                                .map_err(|_| format!("{at}.requestRedirect.statusCode: {c}"))?,
                        ),
                    };
                    rule.redirect = Some(RawRedirect {
                        hostname: x.hostname.clone(),
                        path,
                        scheme,
                        status,
                    });
                }
                other => return Err(format!("{at}.type: {other} is not supported")),
            }
        }
        let mut refs = Vec::new();
        for (bi, b) in r.backend_refs.iter().flatten().enumerate() {
            let at = format!("{at}.backendRefs[{bi}]");
            if b.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                return Err(format!(
                    "{at}.filters: per-backendRef filters are not supported"
                ));
            }
            refs.push(backend(
                &at,
                Backend {
                    kind: b.kind.clone(),
                    group: b.group.clone(),
                    name: b.name.clone(),
                    namespace: b.namespace.clone(),
                    port: b.port,
                    weight: b.weight,
                },
                ns,
            )?);
        }
        rule.backends = refs;
        if let Some(t) = &r.timeouts {
            rule.request_timeout = duration(&format!("{at}.timeouts.request"), &t.request)?;
            rule.try_timeout =
                duration(&format!("{at}.timeouts.backendRequest"), &t.backend_request)?;
        }
        if let Some(retry) = &r.retry {
            if let Some(n) = retry.attempts {
                // Gateway API counts attempts after the first as retries too.
                rule.retries =
                    Some(u32::try_from(n).map_err(|_| format!("{at}.retry.attempts: {n}"))?);
            }
            // Out-of-range codes are refused by the rule's own check, with the field named.
            rule.retry_codes = retry
                .codes
                .iter()
                .flatten()
                .map(|c| u16::try_from(*c).map_err(|_| format!("{at}.retry.codes: {c}")))
                .collect::<Result<_, _>>()?;
            rule.retry_backoff = duration(&format!("{at}.retry.backoff"), &retry.backoff)?;
        }
        rules.push(rule);
    }
    if rules.is_empty() {
        // Gateway API: no rules is one rule sending everything to no backend (404s here).
        return Err("spec.rules: none given".into());
    }
    Ok(Parsed {
        parents,
        hostnames: s.hostnames.clone().unwrap_or_default(),
        rules,
    })
}

fn grpc_routes(s: &g::GrpcRouteSpec, ns: &str) -> Result<Parsed, String> {
    let parents = s
        .parent_refs
        .iter()
        .flatten()
        .map(|p| Parent {
            kind: p.kind.clone().unwrap_or_else(|| "Gateway".into()),
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            port: p.port,
        })
        .collect();
    let mut rules = Vec::new();
    for (ri, r) in s.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{ri}]");
        let mut rule = RawRule::default();
        for (mi, m) in r.matches.iter().flatten().enumerate() {
            let at = format!("{at}.matches[{mi}]");
            let mut raw = RawMatch::default();
            if let Some(x) = &m.method {
                if matches!(
                    x.r#type,
                    Some(g::GrpcRouteRulesMatchesMethodType::RegularExpression)
                ) {
                    return Err(format!(
                        "{at}.method.type: RegularExpression is not supported"
                    ));
                }
                // gRPC's path is `/package.Service/Method`.
                match (&x.service, &x.method) {
                    (Some(svc), Some(method)) => raw.path_exact = Some(format!("/{svc}/{method}")),
                    (Some(svc), None) => raw.path_prefix = Some(format!("/{svc}")),
                    (None, Some(method)) => {
                        raw.path_regex = Some(format!("/[^/]+/{}", regex::escape(method)))
                    }
                    (None, None) => {}
                }
            }
            for (hi, x) in m.headers.iter().flatten().enumerate() {
                if matches!(
                    x.r#type,
                    Some(g::GrpcRouteRulesMatchesHeadersType::RegularExpression)
                ) {
                    return Err(format!(
                        "{at}.headers[{hi}].type: RegularExpression is not supported"
                    ));
                }
                raw.headers
                    .insert(x.name.to_ascii_lowercase(), x.value.clone());
            }
            rule.matches.push(raw);
        }
        for (fi, f) in r.filters.iter().flatten().enumerate() {
            let at = format!("{at}.filters[{fi}]");
            if let Some(m) = &f.request_header_modifier {
                rule.request_headers = Some(headers_of(
                    &format!("{at}.requestHeaderModifier"),
                    m.set.as_ref().map(|v| {
                        v.iter()
                            .map(|x| (x.name.clone(), x.value.clone()))
                            .collect()
                    }),
                    m.add.as_ref().map(|v| {
                        v.iter()
                            .map(|x| (x.name.clone(), x.value.clone()))
                            .collect()
                    }),
                    m.remove.clone(),
                )?);
            } else if let Some(m) = &f.response_header_modifier {
                rule.response_headers = Some(headers_of(
                    &format!("{at}.responseHeaderModifier"),
                    m.set.as_ref().map(|v| {
                        v.iter()
                            .map(|x| (x.name.clone(), x.value.clone()))
                            .collect()
                    }),
                    m.add.as_ref().map(|v| {
                        v.iter()
                            .map(|x| (x.name.clone(), x.value.clone()))
                            .collect()
                    }),
                    m.remove.clone(),
                )?);
            } else {
                let kind = serde_json::to_value(&f.r#type)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                return Err(format!("{at}.type: {kind} is not supported"));
            }
        }
        for (bi, b) in r.backend_refs.iter().flatten().enumerate() {
            let at = format!("{at}.backendRefs[{bi}]");
            if b.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                return Err(format!(
                    "{at}.filters: per-backendRef filters are not supported"
                ));
            }
            rule.backends.push(backend(
                &at,
                Backend {
                    kind: b.kind.clone(),
                    group: b.group.clone(),
                    name: b.name.clone(),
                    namespace: b.namespace.clone(),
                    port: b.port,
                    weight: b.weight,
                },
                ns,
            )?);
        }
        rules.push(rule);
    }
    if rules.is_empty() {
        return Err("spec.rules: none given".into());
    }
    Ok(Parsed {
        parents,
        hostnames: s.hostnames.clone().unwrap_or_default(),
        rules,
    })
}

/// The proxy-mode TCP entry names of Service `ns/name` (at `port`, or every port) in the
/// Kubernetes layer.
fn service_entries(registry: &Registry, ns: &str, name: &str, port: Option<i32>) -> Vec<String> {
    let prefix = match port {
        Some(p) => format!("{ns}/{name}:{p}/tcp"),
        None => format!("{ns}/{name}:"),
    };
    registry
        .keys(Source::Kubernetes, &prefix)
        .into_iter()
        .filter(|k| port.is_some() || k.contains("/tcp"))
        .filter_map(|k| registry.get(Source::Kubernetes, &k))
        .filter(|s| s.mode == Mode::Proxy && s.addr.protocol == Protocol::Tcp)
        .map(|s| s.name.clone())
        .collect()
}

/// The object's routes, one per parent it resolves to, destinations resolved (or named as
/// they would be, for a 500 until they resolve).
fn attach(registry: &Registry, key: &Key, parsed: Parsed) -> Result<Vec<RawRoute>, String> {
    let (kind, ns, name) = key;
    let mut rules = parsed.rules;
    for r in &mut rules {
        for d in &mut r.backends {
            let mut parts = d.service.split('\u{0}');
            let (Some(bns), Some(bname), Some(port)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let port: Option<i32> = port.parse().ok();
            d.service = service_entries(registry, bns, bname, port)
                .into_iter()
                .next()
                .unwrap_or_else(|| format!("{bname}.{bns}"));
        }
    }
    let mut parents = Vec::new();
    for (pi, p) in parsed.parents.iter().enumerate() {
        let pns = p.namespace.as_deref().unwrap_or(ns);
        match p.kind.as_str() {
            "Gateway" => parents.push((None, Some(p.name.clone()))),
            "Service" => {
                let entries = service_entries(registry, pns, &p.name, p.port);
                if entries.is_empty() {
                    debug!(
                        "{} {ns}/{name}: parentRefs[{pi}]: Service {pns}/{} has no proxy-mode TCP port (yet)",
                        kind.name(),
                        p.name
                    );
                }
                parents.extend(entries.into_iter().map(|e| (Some(e), None)));
            }
            other => {
                return Err(format!(
                    "spec.parentRefs[{pi}].kind: {other} is not Gateway or Service"
                ));
            }
        }
    }
    if parents.is_empty() {
        return Err("spec.parentRefs: no parent this agent serves (a Gateway, or a Service in proxy mode with a TCP port)".into());
    }
    let base = format!("{}/{ns}/{name}", kind.prefix());
    let any = |_: &str| true;
    let known = Known {
        service: &any,
        gateway: &any,
    };
    let mut out = Vec::new();
    for (i, (service, gateway)) in parents.into_iter().enumerate() {
        let route = RawRoute {
            name: if i == 0 {
                base.clone()
            } else {
                format!("{base}#{}", i + 1)
            },
            service,
            gateway,
            hostnames: parsed.hostnames.clone(),
            rules: rules.clone(),
        };
        Routes::check(&route, &known).map_err(|e| format!("as a route: {e}"))?;
        out.push(route);
    }
    Ok(out)
}

/// Follows HTTPRoutes and GRPCRoutes until the task is dropped; re-resolves on every catalog
/// change. Errors here never mark the source down (the Services are what it serves): a
/// cluster without Gateway API's CRDs answers 404, which counts as "no routes of that kind".
pub async fn follow(registry: Registry, client: Client) {
    let watch = |kind: Kind| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource());
        let events = watcher(api, watcher::Config::default());
        Box::pin(StreamBackoff::new(
            events,
            super::kubernetes::retry_backoff(),
        ))
    };
    let mut http = watch(Kind::Http);
    let mut grpc = watch(Kind::Grpc);
    let mut catalog = registry.subscribe();
    let mut objects = Objects::default();
    let mut published: Option<BTreeMap<String, RawRoute>> = None;
    let mut services_synced = false;
    // Work waiting: a route event (done at once) or a catalog change (done at the next tick,
    // so a catalog changing fast costs one resolution per tick, not one per change).
    let mut dirty = true;
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        // Whether to resolve now: after a route event, or at a tick with work waiting.
        let run = tokio::select! {
            Some(e) = http.next() => {
                on(&mut objects, Kind::Http, e);
                dirty = true;
                true
            }
            Some(e) = grpc.next() => {
                on(&mut objects, Kind::Grpc, e);
                dirty = true;
                true
            }
            changed = catalog.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
                false
            }
            _ = tick.tick() => true,
        };
        // Resolved only once both kinds are listed and the Services have been (a route on a
        // Service listed a moment later would be refused for nothing). The Services' relist
        // may change nothing in the catalog: the tick notices that they are live.
        services_synced = services_synced || registry.is_live(Source::Kubernetes);
        if !run || !dirty || objects.listed.len() < 2 || !services_synced {
            continue;
        }
        dirty = false;
        let routes = objects.routes(&registry);
        if published.as_ref() != Some(&routes) {
            registry.replace_routes(Source::Kubernetes, routes.clone());
            published = Some(routes);
        }
    }
}

/// How often routes are resolved again after catalog changes (and checked for the first time
/// once the Services are listed).
const RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

fn on(objects: &mut Objects, kind: Kind, e: Result<watcher::Event<DynamicObject>, watcher::Error>) {
    match e {
        Ok(event) => objects.on_event(kind, event),
        Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => {
            if objects.listed.insert(kind) {
                info!(
                    "kubernetes: {} is not served (Gateway API's CRDs not installed?): no such routes",
                    kind.name()
                );
            }
        }
        Err(e) => warn!(
            "kubernetes: {}: {e}; retrying, routes as they were",
            kind.name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Result<Parsed, String> {
        http_routes(&parse::<h::HttpRouteSpec>(&v)?, "ns")
    }

    #[test]
    fn an_httproute_becomes_rules_and_unsupported_fields_are_named() {
        let p = spec(serde_json::json!({
            "parentRefs": [{"name": "weather-gateway"}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}, "method": "GET",
                             "headers": [{"name": "X-Canary", "value": "1"}]}],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "b"}]}},
                    {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}
                ],
                "backendRefs": [{"name": "web", "port": 80, "weight": 9}, {"name": "canary", "port": 80}],
                "timeouts": {"request": "1m30s", "backendRequest": "500ms"},
                "retry": {"attempts": 2, "codes": [500, 503], "backoff": "100ms"}
            }]
        }))
        .unwrap();
        let r = &p.rules[0];
        assert_eq!(r.matches[0].path_prefix.as_deref(), Some("/v1"));
        assert_eq!(r.matches[0].method.as_deref(), Some("GET"));
        assert_eq!(r.matches[0].headers["x-canary"], "1");
        assert_eq!(r.rewrite_prefix.as_deref(), Some("/v2"));
        assert_eq!(r.backends[0].weight, 9);
        assert_eq!(r.backends[1].weight, 1);
        assert_eq!(r.request_timeout.as_deref(), Some("90000ms"));
        assert_eq!(r.try_timeout.as_deref(), Some("500ms"));
        assert_eq!(r.retries, Some(2));
        assert_eq!(r.retry_codes, [500, 503]);
        assert_eq!(r.retry_backoff.as_deref(), Some("100ms"));
        assert_eq!(p.parents[0].kind, "Gateway");

        let e = spec(serde_json::json!({
            "parentRefs": [{"name": "g"}],
            "rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "m", "port": 80}}}],
                       "backendRefs": [{"name": "web", "port": 80}]}]
        }))
        .err()
        .unwrap();
        assert!(
            e.contains("spec.rules[0].filters[0].type: RequestMirror is not supported"),
            "{e}"
        );
        let e = spec(serde_json::json!({
            "parentRefs": [{"name": "g"}],
            "rules": [{"backendRefs": [{"name": "web"}]}]
        }))
        .err()
        .unwrap();
        assert!(
            e.contains("spec.rules[0].backendRefs[0].port: required"),
            "{e}"
        );
    }
}
