//! Routes: rules attached to a service (mesh: requests sent to its address) or to a gateway
//! (ingress), each sending matching requests to weighted destination services, with header
//! changes, a URL prefix rewrite or a redirect. The schema is the file's `[[route]]` table
//! and the API's JSON; the order is Gateway API's (docs/http.md):
//!
//! 1. the most specific hostname: an exact one, then the longest `*.suffix`, then any host;
//! 2. an exact path, then a regular expression (implementation-specific in Gateway API; Envoy
//!    Gateway ranks it here too), then the longest path prefix (whole segments);
//! 3. a rule with a method match before one without;
//! 4. more header matches first, then more query-parameter matches;
//! 5. the order written: route by route, rule by rule, match by match.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use hyper::{HeaderMap, Method, header::HeaderName, http::HeaderValue};
use regex::Regex;
use serde::Deserialize;

/// What a route is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Parent {
    Service(String),
    Gateway(String),
}

/// A parent named by a borrowed name, to look routes up by.
#[derive(Clone, Copy, Debug)]
pub enum ParentRef<'a> {
    Service(&'a str),
    Gateway(&'a str),
}

/// `[[route]]` as written.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    /// Mesh: requests to this service's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Ingress: requests to this gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// `host`, `*.suffix`; none: any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Any of them; none: every request.
    #[serde(default)]
    pub matches: Vec<RawMatch>,
    #[serde(default)]
    pub backends: Vec<RawDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<RawHeaders>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<RawHeaders>,
    /// Replaces the matched path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RawRedirect>,
    /// The whole request, retries included (Gateway API's `timeouts.request`); tighter than
    /// the destination service's `request_timeout`, never looser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    /// One attempt up to the response's headers (`timeouts.backendRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub try_timeout: Option<String>,
    /// Extra attempts on other backends (GEP-1731 `retry.attempts`); the destination's
    /// `retries` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// The statuses, 400 to 599, that send a request to another backend (GEP-1731
    /// `retry.codes`), instead of 502, 503 and 504.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_codes: Vec<u16>,
    /// The wait before each retry (GEP-1731 `retry.backoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub service: String,
    /// Gateway API's range and default.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// 301 or 302 (Gateway API's Core set); 302 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// Gateway API's weight bound.
const MAX_WEIGHT: u32 = 1_000_000;
/// Extra attempts a rule may ask for: more only lengthen a failing request (the service's
/// retry budget bounds them too).
const MAX_RETRIES: u32 = 10;
/// Statuses a rule may list in `retry_codes`.
const MAX_RETRY_CODES: usize = 32;
/// The longest wait a rule may put before each retry: a request waits it once per retry.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum Path {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct Match {
    path: Path,
    method: Option<Method>,
    headers: Vec<(HeaderName, String)>,
    query: Vec<(String, String)>,
}

#[derive(Debug, Default)]
pub struct HeaderEdit {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn apply(&self, h: &mut HeaderMap) {
        for (k, v) in &self.set {
            h.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            h.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            h.remove(k);
        }
    }
}

#[derive(Debug)]
pub struct Redirect {
    pub hostname: Option<String>,
    pub path: Option<String>,
    pub scheme: Option<String>,
    pub status: u16,
}

/// One rule, ready to serve.
#[derive(Debug)]
pub struct Rule {
    pub route: String,
    pub destinations: Vec<(String, u32)>,
    pub request_headers: HeaderEdit,
    pub response_headers: HeaderEdit,
    pub rewrite_prefix: Option<String>,
    pub redirect: Option<Redirect>,
    pub request_timeout: Option<Duration>,
    pub try_timeout: Option<Duration>,
    pub retries: Option<u32>,
    /// Sorted, without repeats; `None`: the default set.
    pub retry_codes: Option<Vec<u16>>,
    pub retry_backoff: Option<Duration>,
}

impl Rule {
    /// A destination by weight.
    pub fn pick(&self) -> Option<&str> {
        let total: u64 = self.destinations.iter().map(|d| d.1 as u64).sum();
        if total == 0 {
            return None;
        }
        let mut n = fastrand::u64(..total);
        for (s, w) in &self.destinations {
            if n < *w as u64 {
                return Some(s);
            }
            n -= *w as u64;
        }
        None
    }
}

#[derive(Debug)]
enum Host {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
    Any,
}

#[derive(Debug)]
struct Entry {
    parent: Parent,
    host: Host,
    matcher: Match,
    rule: Arc<Rule>,
}

/// A request as routes see it.
pub struct Request<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// A match: the rule, and the path prefix it matched (for a rewrite).
pub struct Matched<'a> {
    pub rule: &'a Arc<Rule>,
    pub prefix: Option<&'a str>,
}

/// One parent's entries, indexed by host so that a request looks only at the entries its host
/// can match: the exact host's, then the suffixes (longest first), then any host's, each list
/// in the order above.
#[derive(Debug, Default)]
struct ParentEntries {
    exact: HashMap<String, Vec<Entry>>,
    suffix: Vec<Entry>,
    any: Vec<Entry>,
}

/// Every route, indexed by parent and host, each list sorted once in the order above.
#[derive(Debug, Default)]
pub struct Routes {
    /// By service name, then by gateway name: a request looks its parent up by a borrowed
    /// name, with nothing allocated per request.
    services: HashMap<String, ParentEntries>,
    gateways: HashMap<String, ParentEntries>,
    raw: Vec<RawRoute>,
}

/// How a route's parent is checked.
pub struct Known<'a> {
    /// Whether a service name may be a destination (or a mesh parent).
    pub service: &'a dyn Fn(&str) -> bool,
    /// Whether a gateway name is a gateway.
    pub gateway: &'a dyn Fn(&str) -> bool,
}

impl Routes {
    /// Compiles and checks routes; `known` says whether a service name may be a destination,
    /// `gateways` names the gateways. The error names the route and field; nothing is taken
    /// from a list with an error in it.
    pub fn build(
        raw: Vec<RawRoute>,
        known: &dyn Fn(&str) -> bool,
        gateways: &[String],
    ) -> Result<Routes, String> {
        let mut entries = Vec::new();
        let mut names = std::collections::HashSet::new();
        let gateway = |g: &str| gateways.iter().any(|x| x == g);
        let k = Known {
            service: known,
            gateway: &gateway,
        };
        for (ri, r) in raw.iter().enumerate() {
            let at = format!("route[{ri}] \"{}\"", r.name);
            if !names.insert(r.name.clone()) {
                return Err(format!("{at}: name: already used by another route"));
            }
            entries.extend(compile(r, &k).map_err(|e| format!("{at}: {e}"))?);
        }
        Ok(Routes::index(entries, raw))
    }

    /// Checks one route as the API and the other sources send it: the error starts with the
    /// field at fault (`rule[0].backends[1].service: …`).
    pub fn check(r: &RawRoute, known: &Known) -> Result<(), String> {
        compile(r, known).map(drop)
    }

    /// Serves `raw` (routes already checked where they came from), leaving out any that no
    /// longer compiles (a hand-edited last-known-good), each with its error. Destinations are
    /// not checked here: one that is gone when a request comes is answered 500.
    pub fn serve(raw: Vec<RawRoute>) -> (Routes, Vec<String>) {
        let any = |_: &str| true;
        let k = Known {
            service: &any,
            gateway: &any,
        };
        let mut entries = Vec::new();
        let mut kept = Vec::with_capacity(raw.len());
        let mut errors = Vec::new();
        for r in raw {
            match compile(&r, &k) {
                Ok(e) => {
                    entries.extend(e);
                    kept.push(r);
                }
                Err(e) => errors.push(format!("route \"{}\": {e}", r.name)),
            }
        }
        (Routes::index(entries, kept), errors)
    }

    fn index(mut entries: Vec<Entry>, raw: Vec<RawRoute>) -> Routes {
        // A stable sort keeps the written order among equals.
        entries.sort_by_key(precedence);
        let mut services: HashMap<String, ParentEntries> = HashMap::new();
        let mut gateways: HashMap<String, ParentEntries> = HashMap::new();
        for e in entries {
            let p = match &e.parent {
                Parent::Service(n) => services.entry(n.clone()).or_default(),
                Parent::Gateway(n) => gateways.entry(n.clone()).or_default(),
            };
            match &e.host {
                Host::Exact(h) => p.exact.entry(h.clone()).or_default().push(e),
                Host::Suffix(_) => p.suffix.push(e),
                Host::Any => p.any.push(e),
            }
        }
        Routes {
            services,
            gateways,
            raw,
        }
    }

    fn entries(&self, parent: ParentRef<'_>) -> Option<&ParentEntries> {
        match parent {
            ParentRef::Service(n) => self.services.get(n),
            ParentRef::Gateway(n) => self.gateways.get(n),
        }
    }

    /// The routes as written (for the API and `ctl state`).
    pub fn raw(&self) -> &[RawRoute] {
        &self.raw
    }

    /// Whether any route is attached to `parent`.
    pub fn has(&self, parent: ParentRef<'_>) -> bool {
        self.entries(parent).is_some()
    }

    /// The first rule of `parent` that matches `req`.
    pub fn find<'a>(&'a self, parent: ParentRef<'_>, req: &Request) -> Option<Matched<'a>> {
        let p = self.entries(parent)?;
        let host = req.host.rsplit_once(':').map_or(req.host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                req.host
            }
        });
        let host = host.to_ascii_lowercase();
        let exact = p.exact.get(&host).map(Vec::as_slice).unwrap_or_default();
        let suffix = p.suffix.iter().filter(|e| match &e.host {
            Host::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
            _ => false,
        });
        exact
            .iter()
            .chain(suffix)
            .chain(p.any.iter())
            .find_map(|e| matches(e, req))
    }
}

/// Whether `e` (its host already matched) matches the rest of `req`.
fn matches<'a>(e: &'a Entry, req: &Request) -> Option<Matched<'a>> {
    let m = &e.matcher;
    let prefix = match &m.path {
        Path::Any => None,
        Path::Exact(p) => (req.path == p).then_some(None)?,
        Path::Prefix(p) => prefix_match(req.path, p).then_some(Some(p.as_str()))?,
        Path::Regex(r) => r.is_match(req.path).then_some(None)?,
    };
    if m.method.as_ref().is_some_and(|x| x != req.method) {
        return None;
    }
    let headers_ok = m.headers.iter().all(|(k, v)| {
        req.headers
            .get_all(k)
            .iter()
            .any(|h| h.as_bytes() == v.as_bytes())
    });
    let query_ok = m.query.iter().all(|(k, v)| {
        req.query.is_some_and(|q| {
            q.split('&')
                .any(|kv| kv.split_once('=').unwrap_or((kv, "")) == (k.as_str(), v.as_str()))
        })
    });
    (headers_ok && query_ok).then_some(Matched {
        rule: &e.rule,
        prefix,
    })
}

/// Route names: what the API's paths and `ctl` take.
const MAX_NAME: usize = 253;

/// One route's entries; the error starts with the field at fault.
fn compile(r: &RawRoute, known: &Known) -> Result<Vec<Entry>, String> {
    if r.name.is_empty() || r.name.len() > MAX_NAME || r.name.chars().any(char::is_control) {
        return Err(format!(
            "name: 1 to {MAX_NAME} characters, no control characters"
        ));
    }
    let parent = match (&r.service, &r.gateway) {
        (Some(s), None) if (known.service)(s) => Parent::Service(s.clone()),
        (Some(s), None) => {
            return Err(format!("service: `{s}` is not a proxy-mode service"));
        }
        (None, Some(g)) if (known.gateway)(g) => Parent::Gateway(g.clone()),
        (None, Some(g)) => return Err(format!("gateway: `{g}` is not a gateway")),
        _ => return Err("gateway: a route needs exactly one of service or gateway".into()),
    };
    let mut hosts = Vec::new();
    for (hi, h) in r.hostnames.iter().enumerate() {
        hosts.push(host(h).map_err(|e| format!("hostnames[{hi}]: {e}"))?);
    }
    if hosts.is_empty() {
        hosts.push(Host::Any);
    }
    if r.rules.is_empty() {
        return Err("rule: a route needs at least one rule".into());
    }
    let mut entries = Vec::new();
    for (ui, u) in r.rules.iter().enumerate() {
        let at = format!("rule[{ui}]");
        let rule = Arc::new(rule(&r.name, u, known.service).map_err(|e| format!("{at}.{e}"))?);
        let matches: Vec<RawMatch> = if u.matches.is_empty() {
            vec![RawMatch::default()]
        } else {
            u.matches.clone()
        };
        for (mi, m) in matches.iter().enumerate() {
            let matcher = matcher(m).map_err(|e| format!("{at}.matches[{mi}].{e}"))?;
            for h in &hosts {
                entries.push(Entry {
                    parent: parent.clone(),
                    host: host_copy(h),
                    matcher: Match {
                        path: path_copy(&matcher.path),
                        method: matcher.method.clone(),
                        headers: matcher.headers.clone(),
                        query: matcher.query.clone(),
                    },
                    rule: rule.clone(),
                });
            }
        }
    }
    Ok(entries)
}

/// Gateway API's prefix: whole path segments (`/api` matches `/api` and `/api/x`, not
/// `/apix`).
fn prefix_match(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty()
        || path == p
        || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
}

/// Sort key: smaller first.
type Precedence = (
    u8,
    Reverse<usize>,
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
);

fn precedence(e: &Entry) -> Precedence {
    let (host_kind, host_len) = match &e.host {
        Host::Exact(h) => (0, h.len()),
        Host::Suffix(s) => (1, s.len()),
        Host::Any => (2, 0),
    };
    let (path_kind, path_len) = match &e.matcher.path {
        Path::Exact(p) => (0, p.len()),
        Path::Regex(_) => (1, 0),
        Path::Prefix(p) => (2, p.trim_end_matches('/').len()),
        Path::Any => (2, 0),
    };
    (
        host_kind,
        Reverse(host_len),
        path_kind,
        Reverse(path_len),
        e.matcher.method.is_none(),
        Reverse(e.matcher.headers.len()),
        Reverse(e.matcher.query.len()),
    )
}

fn host(h: &str) -> Result<Host, String> {
    let h = h.to_ascii_lowercase();
    if h == "*" {
        return Ok(Host::Any);
    }
    let (suffix, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h.as_str()),
    };
    let ok = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !ok {
        return Err(format!("`{h}` is not a host name or *.suffix"));
    }
    Ok(if suffix {
        Host::Suffix(format!(".{name}"))
    } else {
        Host::Exact(name.to_owned())
    })
}

fn host_copy(h: &Host) -> Host {
    match h {
        Host::Exact(s) => Host::Exact(s.clone()),
        Host::Suffix(s) => Host::Suffix(s.clone()),
        Host::Any => Host::Any,
    }
}

fn path_copy(p: &Path) -> Path {
    match p {
        Path::Any => Path::Any,
        Path::Exact(s) => Path::Exact(s.clone()),
        Path::Prefix(s) => Path::Prefix(s.clone()),
        Path::Regex(r) => Path::Regex(r.clone()),
    }
}

fn matcher(m: &RawMatch) -> Result<Match, String> {
    let path = match (&m.path_exact, &m.path_prefix, &m.path_regex) {
        (None, None, None) => Path::Any,
        (Some(p), None, None) => Path::Exact(abs_path(p).map_err(|e| format!("path_exact: {e}"))?),
        (None, Some(p), None) => {
            Path::Prefix(abs_path(p).map_err(|e| format!("path_prefix: {e}"))?)
        }
        (None, None, Some(r)) => {
            // Bounded compiled size: a route from the API must not take unbounded memory.
            let re = regex::RegexBuilder::new(&format!("^(?:{r})$"))
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("path_regex: {e}"))?;
            Path::Regex(re)
        }
        _ => return Err("path_exact, path_prefix, path_regex: at most one".into()),
    };
    let method = match &m.method {
        None => None,
        Some(s) => Some(
            Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("method: `{s}` is not a method"))?,
        ),
    };
    let mut headers = Vec::new();
    for (k, v) in &m.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("headers: `{k}` is not a header name"))?;
        headers.push((name, v.clone()));
    }
    Ok(Match {
        path,
        method,
        headers,
        query: m
            .query
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

fn abs_path(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` must start with /"));
    }
    Ok(p.to_owned())
}

fn edit(raw: &Option<RawHeaders>, field: &str) -> Result<HeaderEdit, String> {
    let Some(raw) = raw else {
        return Ok(HeaderEdit::default());
    };
    let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("{field}: `{k}` is not a header name"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("{field}.{k}: not a header value"))?;
        Ok((name, value))
    };
    Ok(HeaderEdit {
        set: raw.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: raw.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: raw
            .remove
            .iter()
            .map(|k| {
                HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("{field}.remove: `{k}` is not a header name"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn rule(route: &str, u: &RawRule, known: &dyn Fn(&str) -> bool) -> Result<Rule, String> {
    let redirect = match &u.redirect {
        None => None,
        Some(r) => {
            let status = r.status.unwrap_or(302);
            if status != 301 && status != 302 {
                return Err(format!("redirect.status: {status} is not 301 or 302"));
            }
            if let Some(s) = &r.scheme
                && s != "http"
                && s != "https"
            {
                return Err(format!("redirect.scheme: `{s}` is not http or https"));
            }
            Some(Redirect {
                hostname: r.hostname.clone(),
                path: r.path.clone(),
                scheme: r.scheme.clone(),
                status,
            })
        }
    };
    let mut destinations = Vec::new();
    for (bi, b) in u.backends.iter().enumerate() {
        if !known(&b.service) {
            return Err(format!(
                "backends[{bi}].service: `{}` is not a proxy-mode service",
                b.service
            ));
        }
        if b.weight > MAX_WEIGHT {
            return Err(format!(
                "backends[{bi}].weight: {} is above {MAX_WEIGHT}",
                b.weight
            ));
        }
        destinations.push((b.service.clone(), b.weight));
    }
    if redirect.is_none() {
        if destinations.is_empty() {
            return Err("backends: a rule needs a destination or a redirect".into());
        }
        if destinations.iter().all(|d| d.1 == 0) {
            return Err("backends: the weights sum to 0".into());
        }
    }
    if let Some(p) = &u.rewrite_prefix {
        abs_path(p).map_err(|e| format!("rewrite_prefix: {e}"))?;
    }
    let positive = |field: &str, t: &Option<String>| -> Result<Option<Duration>, String> {
        let Some(t) = t else { return Ok(None) };
        let d = crate::catalog::duration::parse(t).map_err(|e| format!("{field}: {e}"))?;
        if d.is_zero() {
            return Err(format!("{field}: must be positive"));
        }
        Ok(Some(d))
    };
    let request_timeout = positive("request_timeout", &u.request_timeout)?;
    let try_timeout = positive("try_timeout", &u.try_timeout)?;
    if let (Some(t), Some(r)) = (try_timeout, request_timeout)
        && t > r
    {
        return Err("try_timeout: at most request_timeout".into());
    }
    if let Some(n) = u.retries
        && n > MAX_RETRIES
    {
        return Err(format!("retries: {n} is above {MAX_RETRIES}"));
    }
    let retry_codes = retry_codes(&u.retry_codes)?;
    let retry_backoff = positive("retry_backoff", &u.retry_backoff)?;
    if let Some(b) = retry_backoff
        && b > MAX_RETRY_BACKOFF
    {
        return Err(format!(
            "retry_backoff: {b:?} is above {MAX_RETRY_BACKOFF:?}"
        ));
    }
    Ok(Rule {
        route: route.to_owned(),
        destinations,
        request_headers: edit(&u.request_headers, "request_headers")?,
        response_headers: edit(&u.response_headers, "response_headers")?,
        rewrite_prefix: u.rewrite_prefix.clone(),
        redirect,
        request_timeout,
        try_timeout,
        retries: u.retries,
        retry_codes,
        retry_backoff,
    })
}

/// A rule's `retry_codes`: statuses from 400 to 599 (the range GEP-1731 allows), a bounded
/// number of them.
fn retry_codes(codes: &[u16]) -> Result<Option<Vec<u16>>, String> {
    if codes.is_empty() {
        return Ok(None);
    }
    if codes.len() > MAX_RETRY_CODES {
        return Err(format!(
            "retry_codes: {} codes, at most {MAX_RETRY_CODES}",
            codes.len()
        ));
    }
    if let Some(c) = codes.iter().find(|c| !(400..=599).contains(*c)) {
        return Err(format!("retry_codes: {c} is not a status from 400 to 599"));
    }
    let mut codes = codes.to_vec();
    codes.sort_unstable();
    codes.dedup();
    Ok(Some(codes))
}

/// The routes every HTTP connection reads, replaced whole (file load, API change).
#[derive(Clone, Default)]
pub struct SharedRoutes(Arc<RwLock<Arc<Routes>>>);

impl SharedRoutes {
    pub fn load(&self) -> Arc<Routes> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, routes: Routes) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(toml_text: &str) -> Result<Routes, String> {
        #[derive(Deserialize)]
        struct F {
            route: Vec<RawRoute>,
        }
        let f: F = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Routes::build(
            f.route,
            &|s| ["a", "b", "c", "web"].contains(&s),
            &["gw".to_owned()],
        )
    }

    fn find<'a>(
        r: &'a Routes,
        host: &str,
        path_q: &str,
        method: Method,
        h: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut headers = HeaderMap::new();
        for (k, v) in h {
            headers.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (path, query) = match path_q.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_q, None),
        };
        let req = Request {
            host,
            path,
            query,
            method: &method,
            headers: &headers,
        };
        r.find(ParentRef::Gateway("gw"), &req)
            .map(|m| m.rule.destinations[0].0.as_str())
    }

    const ORDERED: &str = r#"
[[route]]
name = "any"
gateway = "gw"
[[route.rule]]
matches = [{ path_prefix = "/" }]
backends = [{ service = "a" }]
[[route.rule]]
matches = [{ path_regex = "/items/[0-9]+" }]
backends = [{ service = "c" }]
[[route.rule]]
matches = [{ path_prefix = "/api" }]
backends = [{ service = "b" }]
[[route.rule]]
matches = [{ path_exact = "/api/login" }]
backends = [{ service = "c" }]
[[route.rule]]
matches = [{ path_prefix = "/api", method = "POST" }]
backends = [{ service = "c" }]
[[route.rule]]
matches = [{ path_prefix = "/api", headers = { x-canary = "1" } }]
backends = [{ service = "web" }]
[[route.rule]]
matches = [{ path_prefix = "/q", query = { v = "2" } }]
backends = [{ service = "b" }]

[[route]]
name = "hosts"
gateway = "gw"
hostnames = ["*.example.com", "exact.example.com"]
[[route.rule]]
backends = [{ service = "web" }]
"#;

    #[test]
    fn rules_apply_in_gateway_api_order() {
        let r = routes(ORDERED).unwrap();
        let get = Method::GET;
        assert_eq!(find(&r, "h", "/", get.clone(), &[]), Some("a"));
        assert_eq!(find(&r, "h", "/other", get.clone(), &[]), Some("a"));
        // The longer prefix wins over `/`, whole segments only.
        assert_eq!(find(&r, "h", "/api/x", get.clone(), &[]), Some("b"));
        assert_eq!(find(&r, "h", "/apix", get.clone(), &[]), Some("a"));
        // Exact beats prefix, even written later.
        assert_eq!(find(&r, "h", "/api/login", get.clone(), &[]), Some("c"));
        // A method match beats none; more header matches beat fewer.
        assert_eq!(find(&r, "h", "/api/x", Method::POST, &[]), Some("c"));
        assert_eq!(
            find(&r, "h", "/api/x", get.clone(), &[("x-canary", "1")]),
            Some("web")
        );
        // Regular expressions, whole path.
        assert_eq!(find(&r, "h", "/items/42", get.clone(), &[]), Some("c"));
        assert_eq!(find(&r, "h", "/items/42x", get.clone(), &[]), Some("a"));
        // Query parameters.
        assert_eq!(find(&r, "h", "/q?u=1&v=2", get.clone(), &[]), Some("b"));
        assert_eq!(find(&r, "h", "/q?v=3", get.clone(), &[]), Some("a"));
        // A matching hostname beats any host; the port is not part of it.
        assert_eq!(
            find(&r, "x.example.com", "/api/x", get.clone(), &[]),
            Some("web")
        );
        assert_eq!(
            find(&r, "exact.example.com:80", "/", get.clone(), &[]),
            Some("web")
        );
        assert_eq!(find(&r, "example.com", "/", get, &[]), Some("a"));
    }

    #[test]
    fn a_weighted_rule_splits_by_weight() {
        let r = routes(
            "[[route]]\nname = \"canary\"\ngateway = \"gw\"\n[[route.rule]]\n\
             backends = [{ service = \"a\", weight = 90 }, { service = \"b\", weight = 10 }]\n",
        )
        .unwrap();
        let rule = r.gateways["gw"].any[0].rule.clone();
        let b = (0..10_000).filter(|_| rule.pick() == Some("b")).count();
        assert!((800..1200).contains(&b), "{b} of 10000 to the 10 % side");
    }

    #[test]
    fn bad_routes_are_refused_with_the_field_named() {
        let base = "[[route]]\nname = \"r\"\ngateway = \"gw\"\n[[route.rule]]\n";
        let cases = [
            (
                "backends = [{ service = \"nope\" }]",
                "route[0] \"r\": rule[0].backends[0].service: `nope` is not a proxy-mode service",
            ),
            (
                "matches = [{ path_regex = \"(\" }]\nbackends = [{ service = \"a\" }]",
                "rule[0].matches[0].path_regex:",
            ),
            (
                "backends = [{ service = \"a\", weight = 0 }, { service = \"b\", weight = 0 }]",
                "rule[0].backends: the weights sum to 0",
            ),
            (
                "matches = [{ path_prefix = \"api\" }]\nbackends = [{ service = \"a\" }]",
                "path_prefix: `api` must start with /",
            ),
            (
                "redirect = { status = 308 }",
                "redirect.status: 308 is not 301 or 302",
            ),
        ];
        for (rest, want) in cases {
            let e = routes(&format!("{base}{rest}\n")).unwrap_err();
            assert!(e.contains(want), "{rest}: {e}");
        }
        let e = routes("[[route]]\nname = \"r\"\ngateway = \"nogw\"\n[[route.rule]]\nbackends = [{ service = \"a\" }]\n").unwrap_err();
        assert!(e.contains("gateway: `nogw` is not a gateway"), "{e}");
    }
}
