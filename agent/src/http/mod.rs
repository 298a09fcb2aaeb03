//! HTTP mode: a proxy-mode service with `app_protocol = "http"`, `"grpc"` or `"auto"` (once
//! detected) is served request by request. The client's connection is an HTTP/1.1 or HTTP/2
//! server connection (hyper-util's `auto` tells them apart by the preface); each request is
//! balanced on its own over the service's backends and sent on a pooled upstream connection,
//! retried on another backend when that is safe. docs/http.md has the design.
//!
//! This module sees a service only through [`Target`], so it does not depend on the forwarder
//! that dispatches to it.

pub mod body;
pub mod detect;
pub mod gateway;
pub mod pool;
mod proxy;
mod retry;
pub mod route;
pub mod stats;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64},
    },
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::debug;

pub use self::pool::Pool;
use self::route::SharedRoutes;
use crate::{
    balance::{Balancer, Upstream},
    catalog::{AppProtocol, Policy},
    defaults,
};

/// What the HTTP proxy needs of a service: its backends with their node-wide health, its
/// balancer, its policy, the counters it shares with the L4 path, and its pool.
pub struct View<'a> {
    pub name: &'a str,
    pub backends: &'a [Upstream],
    pub balancer: &'a Balancer,
    pub policy: &'a Policy,
    pub connect_timeout: Duration,
    /// Extra attempts on other backends after a failed one.
    pub retries: u32,
    /// The statuses that send a request to another backend, where a route rule lists its own
    /// (`None`: 502, 503, 504; see [`retry::retriable`]).
    pub retry_codes: Option<&'a [u16]>,
    /// The wait before each retry (a route rule's `retry_backoff`); none by default.
    pub retry_backoff: Option<Duration>,
    pub outlier_failures: u32,
    pub outlier_ejection: Duration,
    /// Client connections open (the retry budget's base).
    pub active: &'a AtomicU64,
    pub retries_in_flight: &'a AtomicU32,
    pub retries_total: &'a AtomicU64,
    pub pool: &'a Arc<Pool>,
}

pub trait Target: Send + Sync + 'static {
    fn view(&self) -> View<'_>;
    /// The client's hash for consistent-hash balancing (the same one the L4 path uses).
    fn client_hash(&self, peer: SocketAddr) -> u64;
}

/// Route destinations by service name (the forwarder's table answers).
pub trait Directory: Send + Sync + 'static {
    fn service(&self, name: &str) -> Option<Arc<dyn Target>>;
}

/// What every HTTP connection shares: the routes, the services they send to, the mark of
/// the agent's own sockets, the request counters.
pub struct Context {
    pub routes: SharedRoutes,
    pub directory: Arc<dyn Directory>,
    pub own_mark: u32,
    pub stats: Arc<stats::Stats>,
}

/// Where a client connection came in: a service's address (mesh) or a gateway (ingress).
#[derive(Clone)]
pub enum Front {
    Service(Arc<dyn Target>),
    Gateway(Arc<str>),
}

/// Serves one client connection until it closes.
pub async fn serve(ctx: Arc<Context>, front: Front, client: TcpStream, peer: SocketAddr) {
    let grpc = match &front {
        Front::Service(t) => t.view().policy.app_protocol == AppProtocol::Grpc,
        Front::Gateway(_) => false,
    };
    let io = TokioIo::new(client);
    let handler = service_fn(move |req| {
        let (ctx, front) = (ctx.clone(), front.clone());
        async move { Ok::<_, Infallible>(proxy::handle(&ctx, &front, req, peer).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(defaults::HTTP_HEADER_TIMEOUT)
        .max_buf_size(defaults::HTTP_MAX_HEADER_BYTES)
        // A response's head and a small body in one buffer, sent with one `write` (vectored
        // writes cost the kernel more for the few hundred bytes most answers are).
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(defaults::HTTP2_MAX_STREAMS)
        .max_header_list_size(defaults::HTTP_MAX_HEADER_BYTES as u32);
    if grpc {
        builder = builder.http2_only();
    }
    if let Err(e) = builder.serve_connection(io, handler).await {
        debug!(%peer, "HTTP client connection ended: {e}");
    }
}
