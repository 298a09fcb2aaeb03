//! One request: balanced over the service's backends by the service's algorithm (per request,
//! not per connection), sent on a pooled connection, retried on another backend when that is
//! safe, within the per-try and whole-request timeouts. Every outcome feeds the node-wide
//! health the L4 path uses too: latency to the response's headers for peak-EWMA, connect
//! failures, resets and 5xx responses for outlier ejection.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    client::conn::http1,
    header::{self, HeaderValue},
};
use tokio::time::timeout;
use tracing::debug;

use super::{
    Context, Front, Target, View,
    body::{self, Body, Guard, Held, Replay},
    pool::{Conn, Pool},
    retry,
    route::{ParentRef, Redirect, Request as RouteRequest, Rule},
    stats::{self, Done, Tally},
};
use crate::{
    balance::{Candidate, candidates},
    defaults,
    health::BackendHealth,
};

/// Serves one request of a client at `peer` that came in at `front`.
pub async fn handle(
    ctx: &Context,
    front: &Front,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let grpc = is_grpc(req.headers());
    let (target, rule) = match resolve(ctx, front, &mut req) {
        Ok(found) => found,
        Err((answer, route)) => {
            // The proxy's own answer, counted on the service the request was sent to (none
            // for a gateway's).
            let (service, log) = match front {
                Front::Service(t) => {
                    let v = t.view();
                    (v.name.to_owned(), v.policy.access_log)
                }
                Front::Gateway(_) => (String::new(), false),
            };
            let line = log.then(|| log_line(&req, peer));
            let mut tally = Tally::start(&ctx.stats, &service, route.as_deref(), started, line);
            tally
                .answer(answer.status(), answer.headers(), None)
                .end(true);
            return answer;
        }
    };
    // A rule's timeouts and retries (Gateway API's `timeouts`, GEP-1731's `retry.attempts`)
    // stand in for the destination's own.
    let policy;
    let mut v = target.view();
    if let Some(r) = &rule {
        if let Some(t) = r.try_timeout {
            policy = crate::catalog::Policy {
                try_timeout: Some(t),
                ..v.policy.clone()
            };
            v.policy = &policy;
        }
        if let Some(n) = r.retries {
            v.retries = n;
        }
        if let Some(codes) = &r.retry_codes {
            v.retry_codes = Some(codes);
        }
        if r.retry_backoff.is_some() {
            v.retry_backoff = r.retry_backoff;
        }
    }
    // The tightest of the service's and the rule's request timeouts and the client's own gRPC
    // deadline.
    let deadline = [
        v.policy.request_timeout,
        rule.as_ref().and_then(|r| r.request_timeout),
        retry::grpc_timeout(req.headers()),
    ]
    .into_iter()
    .flatten()
    .min();
    let line = v.policy.access_log.then(|| log_line(&req, peer));
    let route = rule.as_ref().map(|r| r.route.as_str());
    let mut tally = Tally::start(&ctx.stats, v.name, route, started, line);
    let hash = request_hash(v.policy, req.headers()).unwrap_or_else(|| target.client_hash(peer));
    let deadline_at = deadline.map(|d| started + d);
    let attempts = attempts(&v, req, hash, ctx.own_mark, grpc, &tally, deadline_at);
    let answer = match deadline {
        Some(d) => match timeout(d, attempts).await {
            Ok(r) => r,
            Err(_) => Answer::Own(failure(
                grpc,
                StatusCode::GATEWAY_TIMEOUT,
                &format!("no response within the request timeout of {d:?}"),
            )),
        },
        None => attempts.await,
    };
    let mut response = match answer {
        Answer::Own(r) => {
            tally.answer(r.status(), r.headers(), None).end(true);
            r
        }
        Answer::Backend {
            response,
            in_flight,
            reuse,
            addr,
        } => {
            let done = tally.answer(response.status(), response.headers(), Some(addr));
            respond(response, in_flight, reuse, done)
        }
    };
    if let Some(rule) = &rule {
        rule.response_headers.apply(response.headers_mut());
    }
    response
}

/// The access log's view of a request's head.
fn log_line(req: &Request<Incoming>, peer: SocketAddr) -> stats::Line {
    stats::Line {
        service: String::new(),
        route: None,
        method: req.method().clone(),
        host: host_of(req).to_owned(),
        path: req.uri().path().to_owned(),
        peer,
    }
}

/// The hash of a request's key for consistent hashing, where the service hashes a header or a
/// cookie and the request carries it (`None`: the client's address is hashed).
fn request_hash(policy: &crate::catalog::Policy, headers: &HeaderMap) -> Option<u64> {
    use crate::catalog::RequestKey;
    let value: &[u8] = match policy.hash_on.as_ref()? {
        RequestKey::Header(name) => headers.get(name.as_str())?.as_bytes(),
        RequestKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (k, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
                (k == name.as_bytes()).then(|| &v[1..])
            })?,
    };
    Some(crate::balance::key_hash(value))
}

/// The service a request goes to, and the rule that chose it.
type Routed = (Arc<dyn Target>, Option<Arc<Rule>>);

/// The proxy's own answer, and the route that gave it (if one did).
type Refused = (Response<Body>, Option<String>);

/// The service a request goes to: the one it was sent to, unless routes are attached there
/// (or it came in at a gateway), then the matching rule's destination, with the rule's request
/// changes made. `Err`: the proxy's own answer (no route, a redirect, a destination gone).
#[allow(clippy::result_large_err)]
fn resolve(ctx: &Context, front: &Front, req: &mut Request<Incoming>) -> Result<Routed, Refused> {
    let view;
    let parent = match front {
        Front::Service(t) => {
            view = t.view();
            ParentRef::Service(view.name)
        }
        Front::Gateway(g) => ParentRef::Gateway(g),
    };
    let routes = ctx.routes.load();
    if !routes.has(parent) {
        return match front {
            Front::Service(t) => Ok((t.clone(), None)),
            Front::Gateway(g) => Err((not_found(&format!("gateway {g} has no routes")), None)),
        };
    }
    let host = host_of(req).to_owned();
    let found = routes.find(
        parent,
        &RouteRequest {
            host: &host,
            path: req.uri().path(),
            query: req.uri().query(),
            method: req.method(),
            headers: req.headers(),
        },
    );
    let Some(m) = found else {
        return Err((
            not_found(&format!(
                "no route matches {} {}{}",
                req.method(),
                host,
                req.uri().path()
            )),
            None,
        ));
    };
    let rule = m.rule.clone();
    if let Some(r) = &rule.redirect {
        return Err((redirect(r, &host, req.uri()), Some(rule.route.clone())));
    }
    let Some(name) = rule.pick() else {
        return Err((
            failure(
                false,
                StatusCode::SERVICE_UNAVAILABLE,
                "the route has no destination",
            ),
            Some(rule.route.clone()),
        ));
    };
    // Gateway API: a backendRef that does not resolve is answered 500.
    let Some(target) = ctx.directory.service(name) else {
        return Err((
            failure(
                is_grpc(req.headers()),
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!(
                    "route {}: service {name} is not a proxy-mode service now",
                    rule.route
                ),
            ),
            Some(rule.route.clone()),
        ));
    };
    rule.request_headers.apply(req.headers_mut());
    if let (Some(new), Some(old)) = (&rule.rewrite_prefix, m.prefix) {
        let path = req.uri().path();
        let rest = &path[old.trim_end_matches('/').len().min(path.len())..];
        let mut rewritten = format!("{}{rest}", new.trim_end_matches('/'));
        if rewritten.is_empty() {
            rewritten.push('/');
        }
        if let Some(q) = req.uri().query() {
            rewritten = format!("{rewritten}?{q}");
        }
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = rewritten.parse().ok();
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    Ok((target, Some(rule)))
}

/// The host a request names: the URI's authority (HTTP/2) or `Host`.
fn host_of(req: &Request<Incoming>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

fn not_found(why: &str) -> Response<Body> {
    failure(false, StatusCode::NOT_FOUND, why)
}

fn redirect(r: &Redirect, host: &str, uri: &Uri) -> Response<Body> {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = r.hostname.as_deref().unwrap_or(host);
    let path = r.path.as_deref().unwrap_or(uri.path());
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{path}{query}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The request's head, kept to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    /// The request for one backend: HTTP/2 takes the authority in the URI, HTTP/1.1 in `Host`.
    /// A URI already in the form the backend's version wants is kept as it is (the common
    /// case: HTTP/1.1 in, HTTP/1.1 out), with nothing parsed or allocated again.
    fn request(&self, body: Body, h2: bool) -> Request<Body> {
        let mut headers = self.headers.clone();
        let has_authority = self.uri.authority().is_some();
        let uri = if h2 && has_authority && self.uri.scheme().is_some() {
            headers.remove(header::HOST);
            self.uri.clone()
        } else if !h2 && !has_authority {
            self.uri.clone()
        } else {
            self.reformed(&mut headers, h2)
        };
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = uri;
        *r.version_mut() = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *r.headers_mut() = headers;
        r
    }

    /// The URI for the other form: absolute with the authority (HTTP/2), or origin-form with
    /// the authority moved to `Host` (HTTP/1.1).
    fn reformed(&self, headers: &mut HeaderMap, h2: bool) -> Uri {
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                self.headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        if h2 {
            headers.remove(header::HOST);
            let a = authority.unwrap_or_else(|| "localhost".into());
            format!("http://{a}{path}").parse().unwrap_or_default()
        } else {
            if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                headers.insert(header::HOST, a);
            }
            path.parse().unwrap_or_default()
        }
    }
}

/// How a request was answered: by a backend (its response, its place on the backend and the
/// connection to pool again), or by the proxy.
enum Answer {
    Backend {
        response: Response<Incoming>,
        in_flight: InFlight,
        reuse: Option<(Arc<Pool>, usize, Sender)>,
        addr: SocketAddr,
    },
    Own(Response<Body>),
}

/// Why one attempt got no response.
enum TryError {
    Timeout(Duration),
    Http(hyper::Error),
}

/// The attempts of one request, the first on the balancer's choice, each further one on a
/// backend this request has not tried. The retry budget bounds the retries that add load to
/// backends in trouble: after a timeout or a retriable status. A retry after a connection
/// that broke (refused, reset or closed before any answer) is bounded only by `retries`:
/// the backend that broke it does no more work for the request, and when a backend dies every
/// request in flight on it breaks at once; the budget's floor of 3 in flight failed the
/// rest (measured: a backend killed under keep-alive load).
async fn attempts(
    v: &View<'_>,
    req: Request<Incoming>,
    hash: u64,
    mark: u32,
    grpc: bool,
    tally: &Tally,
    deadline: Option<Instant>,
) -> Answer {
    let (parts, incoming) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let head = Head {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers,
    };
    let idempotent = retry::idempotent(&head.method);
    // The upstream speaks what the client speaks: HTTP/2 multiplexes on one connection per
    // backend, HTTP/1.1 takes keep-alive connections from the pool.
    let h2 = head.version == Version::HTTP_2;
    let (replay, first) = Replay::first(incoming, defaults::REPLAY_BODY_MAX);
    let mut first = Some(first);
    // On the stack for the usual few backends: one allocation fewer per request.
    let mut inline;
    let mut spilled;
    let tried: &mut [bool] = if v.backends.len() <= TRIED_INLINE {
        inline = [false; TRIED_INLINE];
        &mut inline[..v.backends.len()]
    } else {
        spilled = vec![false; v.backends.len()];
        &mut spilled
    };
    let mut made = 0u32;
    let mut previous: Option<SocketAddr> = None;
    // The last attempt failed on its connection (refused, reset or closed before an answer):
    // the retry is outside the budget, see `attempts`' doc.
    let mut broken = false;
    let mut last = (
        StatusCode::SERVICE_UNAVAILABLE,
        "no usable backend".to_owned(),
    );
    loop {
        let choices = candidates::candidates(v.backends, tried);
        let Some(i) = v.balancer.pick(&choices, hash) else {
            break;
        };
        drop(choices);
        tried[i] = true;
        let _retry = if made > 0 {
            if !broken
                && !candidates::retry_allowed(
                    v.active.load(Ordering::Relaxed),
                    v.retries_in_flight.load(Ordering::Relaxed),
                )
            {
                debug!(service = v.name, "retry budget spent");
                break;
            }
            v.retries_total.fetch_add(1, Ordering::Relaxed);
            if let Some(p) = previous {
                tally.retry(p);
            }
            let counted = RetryInFlight::start(v.retries_in_flight);
            // The whole-request timeout bounds the wait too: it runs around all attempts.
            if let Some(b) = v.retry_backoff {
                tokio::time::sleep(b).await;
            }
            Some(counted)
        } else {
            None
        };
        made += 1;
        broken = false;
        let more = made <= v.retries;
        let b = &v.backends[i];
        previous = Some(b.addr);
        let fail = || {
            b.health.failure(
                v.outlier_failures,
                v.outlier_ejection,
                candidates::may_eject(v.backends),
            )
        };
        let conn = match v.pool.reuse(i, h2).await {
            Some(c) => c,
            None => {
                let connected = Instant::now();
                match timeout(v.connect_timeout, v.pool.connect(i, b.addr, h2, mark)).await {
                    Ok(Ok(c)) => {
                        b.health.counters.timings.connected(connected.elapsed());
                        c
                    }
                    Ok(Err(e)) => {
                        b.health
                            .counters
                            .connect_failures
                            .fetch_add(1, Ordering::Relaxed);
                        fail();
                        broken = true;
                        debug!(service = v.name, backend = %b.addr, "connect failed: {e}");
                        last = (
                            StatusCode::BAD_GATEWAY,
                            format!("connect to {}: {e}", b.addr),
                        );
                        // Nothing was sent: any request may go to another backend.
                        if more {
                            continue;
                        }
                        break;
                    }
                    Err(_) => {
                        b.health
                            .counters
                            .connect_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        fail();
                        last = (
                            StatusCode::BAD_GATEWAY,
                            format!("connect to {} timed out", b.addr),
                        );
                        if more {
                            continue;
                        }
                        break;
                    }
                }
            }
        };
        let Some(body) = first.take().or_else(|| replay.again()) else {
            break;
        };
        let mut request = head.request(body, h2);
        if grpc && let Some(at) = deadline {
            pass_deadline(request.headers_mut(), at);
        }
        let hold = InFlight::take(b.health.clone());
        let sent = Instant::now();
        match send(conn, request, v.policy.try_timeout).await {
            Ok((response, sender)) => {
                let waited = sent.elapsed();
                let status = response.status();
                // With no other backend left to try, the backend's own answer goes back.
                let again = retry::retriable(status, response.headers(), v.retry_codes)
                    && (idempotent || grpc)
                    && more
                    && replay.again().is_some()
                    && candidates::candidates(v.backends, tried)
                        .iter()
                        .any(|c| c.usable());
                if status.is_server_error() || retry::grpc_status(response.headers()) == Some(14) {
                    fail();
                    b.health.observe(waited);
                } else {
                    b.health.success(waited);
                }
                if again {
                    debug!(service = v.name, backend = %b.addr, %status, "retriable status: trying another");
                    last = (status, format!("{} answered {status}", b.addr));
                    continue;
                }
                return Answer::Backend {
                    response,
                    in_flight: hold,
                    reuse: sender.map(|s| (v.pool.clone(), i, s)),
                    addr: b.addr,
                };
            }
            Err(e) => {
                drop(hold);
                fail();
                last = match e {
                    TryError::Timeout(t) => (
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("{} did not answer within the try timeout of {t:?}", b.addr),
                    ),
                    TryError::Http(e) => {
                        broken = true;
                        b.health.counters.resets.fetch_add(1, Ordering::Relaxed);
                        (StatusCode::BAD_GATEWAY, format!("{}: {e}", b.addr))
                    }
                };
                debug!(service = v.name, backend = %b.addr, "attempt failed: {}", last.1);
                // The backend may have seen the request: only an idempotent one, or one whose
                // body never left, goes to another backend, and only with its body whole.
                let safe = idempotent || !replay.started();
                if more && safe && replay.again().is_some() {
                    continue;
                }
                break;
            }
        }
    }
    Answer::Own(failure(
        grpc,
        last.0,
        &format!("service {}: {}", v.name, last.1),
    ))
}

/// Backends a request's attempts track on the stack; a larger service takes a `Vec`.
const TRIED_INLINE: usize = 32;

/// Tells the backend what is left of the request's deadline, in `grpc-timeout` (gRPC's
/// deadline propagation): a retry gets less than the first try did.
fn pass_deadline(h: &mut HeaderMap, at: Instant) {
    let left = at.saturating_duration_since(Instant::now());
    let ms = left.as_millis().max(1);
    // At most 8 digits: beyond 27 hours in milliseconds, whole seconds.
    let v = if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", left.as_secs().min(99_999_999))
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert("grpc-timeout", v);
    }
}

type Sender = http1::SendRequest<Body>;

async fn send(
    conn: Conn,
    req: Request<Body>,
    try_timeout: Option<Duration>,
) -> Result<(Response<Incoming>, Option<Sender>), TryError> {
    let attempt = async move {
        match conn {
            Conn::H1(mut s) => {
                s.ready().await?;
                let r = s.send_request(req).await?;
                Ok((r, Some(s)))
            }
            Conn::H2(mut s) => Ok((s.send_request(req).await?, None)),
        }
    };
    match try_timeout {
        Some(t) => timeout(t, attempt)
            .await
            .map_err(|_| TryError::Timeout(t))?
            .map_err(TryError::Http),
        None => attempt.await.map_err(TryError::Http),
    }
}

/// A request in flight on a backend: what least-requests balancing counts.
struct InFlight(Arc<BackendHealth>);

impl InFlight {
    fn take(h: Arc<BackendHealth>) -> Self {
        h.counters.active.fetch_add(1, Ordering::Relaxed);
        h.counters.opened.fetch_add(1, Ordering::Relaxed);
        InFlight(h)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
        self.0.counters.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A retry counted in flight for the retry budget while it runs.
struct RetryInFlight<'a>(&'a AtomicU32);

impl<'a> RetryInFlight<'a> {
    fn start(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        RetryInFlight(n)
    }
}

impl Drop for RetryInFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a response body holds until it ends: its request's place on the backend, the
/// HTTP/1.1 connection that goes back to the pool if the body was read whole, and the
/// request's record.
struct Hold {
    _in_flight: InFlight,
    reuse: Option<(Arc<Pool>, usize, Sender)>,
    done: Done,
}

impl Guard for Hold {
    fn trailers(&mut self, t: &HeaderMap) {
        self.done.trailers(t);
    }

    fn end(self, whole: bool) {
        if whole && let Some((pool, i, s)) = self.reuse {
            pool.put(i, s);
        }
        self.done.end(whole);
    }
}

fn respond(
    response: Response<Incoming>,
    in_flight: InFlight,
    reuse: Option<(Arc<Pool>, usize, Sender)>,
    done: Done,
) -> Response<Body> {
    let (mut parts, incoming) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let hold = Hold {
        _in_flight: in_flight,
        reuse,
        done,
    };
    Response::from_parts(parts, Held::new(incoming, hold).boxed_unsync())
}

/// The proxy's own answer when no backend gave one: a plain-text error, or for gRPC a
/// trailers-only response with `UNAVAILABLE` (`DEADLINE_EXCEEDED` after a timeout).
pub fn failure(grpc: bool, status: StatusCode, message: &str) -> Response<Body> {
    let message = format!("switchyard: {message}");
    let mut r = if grpc {
        let mut r = Response::new(body::empty());
        let code = if status == StatusCode::GATEWAY_TIMEOUT {
            "4"
        } else {
            "14"
        };
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(m) = HeaderValue::from_str(&message) {
            h.insert("grpc-message", m);
        }
        r
    } else {
        let mut r = Response::new(body::full(format!("{message}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    r.headers_mut()
        .insert("x-switchyard", HeaderValue::from_static("proxy-error"));
    r
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Headers for one hop only (RFC 9110 §7.6.1), and those the `Connection` header names. `te:
/// trailers` stays: gRPC needs it, and HTTP/2 allows it.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stop_here() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["te", "x-kept"]);
    }

    #[test]
    fn the_upstream_request_carries_its_authority_where_its_version_wants_it() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "weather:80".parse().unwrap());
        let head = Head {
            method: Method::GET,
            uri: "/today?city=x".parse().unwrap(),
            version: Version::HTTP_11,
            headers,
        };
        let h1 = head.request(body::empty(), false);
        assert_eq!(h1.uri(), "/today?city=x");
        assert_eq!(h1.headers()[header::HOST], "weather:80");
        let h2 = head.request(body::empty(), true);
        assert_eq!(h2.uri(), "http://weather:80/today?city=x");
        assert!(h2.headers().get(header::HOST).is_none());
    }
}
