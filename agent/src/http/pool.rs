//! Upstream connections kept for reuse, per backend of a service: idle HTTP/1.1 keep-alive
//! connections (bounded in number and idle time) and one multiplexed HTTP/2 connection. Ours,
//! not hyper's legacy pool: the balancer picks the backend first, then the pool only answers
//! "a connection to this one", and the bounds are the agent's.

use std::{
    collections::VecDeque,
    io,
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::body::Body;
use crate::{defaults, socket::connect_marked};

/// A connection ready for one request.
pub enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

#[derive(Default)]
struct Slot {
    /// Oldest at the front, most recently used at the back (taken first: warmest).
    idle: VecDeque<(http1::SendRequest<Body>, Instant)>,
    h2: Option<http2::SendRequest<Body>>,
}

/// The pool of one service, a slot per backend (by index, as the service lists them).
pub struct Pool {
    slots: Vec<Mutex<Slot>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(backends: usize) -> Self {
        Pool {
            slots: (0..backends).map(|_| Mutex::default()).collect(),
            max_idle: defaults::POOL_MAX_IDLE_PER_BACKEND,
            idle_timeout: defaults::POOL_IDLE_TIMEOUT,
        }
    }

    fn slot(&self, i: usize) -> Option<MutexGuard<'_, Slot>> {
        Some(self.slots.get(i)?.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A pooled connection to backend `i`, if one is open (`None`: connect anew).
    pub async fn reuse(&self, i: usize, h2: bool) -> Option<Conn> {
        if h2 {
            let s = self.slot(i)?;
            return s
                .h2
                .as_ref()
                .filter(|c| !c.is_closed())
                .cloned()
                .map(Conn::H2);
        }
        loop {
            let (mut c, since) = self.slot(i)?.idle.pop_back()?;
            if since.elapsed() > self.idle_timeout || c.is_closed() {
                continue;
            }
            // Ready once the previous response was read to its end; a connection the backend
            // closed meanwhile fails here and is dropped.
            if c.ready().await.is_ok() {
                return Some(Conn::H1(c));
            }
        }
    }

    /// Back into the pool after a response was read whole (HTTP/1.1). Expired connections
    /// are dropped from the old end (one clock read per put, not one per idle connection;
    /// closed ones go when [`Pool::reuse`] meets them); beyond the bound, the oldest goes.
    pub fn put(&self, i: usize, c: http1::SendRequest<Body>) {
        if c.is_closed() {
            return;
        }
        let Some(mut s) = self.slot(i) else { return };
        let now = Instant::now();
        while s.idle.front().is_some_and(|(c, since)| {
            c.is_closed() || now.duration_since(*since) > self.idle_timeout
        }) {
            s.idle.pop_front();
        }
        if s.idle.len() >= self.max_idle {
            s.idle.pop_front();
        }
        s.idle.push_back((c, now));
    }

    /// Opens a connection to backend `i` at `addr` (HTTP/2 ones are kept for every request).
    pub async fn connect(
        &self,
        i: usize,
        addr: SocketAddr,
        h2: bool,
        mark: u32,
    ) -> Result<Conn, ConnectError> {
        let stream = connect_marked(addr, mark).await.map_err(ConnectError::Io)?;
        let io = TokioIo::new(stream);
        if h2 {
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%addr, "upstream HTTP/2 connection ended: {e}");
                }
            });
            if let Some(mut s) = self.slot(i) {
                s.h2 = Some(send.clone());
            }
            Ok(Conn::H2(send))
        } else {
            let (send, conn) = http1::Builder::new()
                .writev(false)
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%addr, "upstream HTTP/1.1 connection ended: {e}");
                }
            });
            Ok(Conn::H1(send))
        }
    }

    /// Idle HTTP/1.1 connections and open HTTP/2 ones, for the API.
    pub fn idle(&self) -> usize {
        (0..self.slots.len())
            .filter_map(|i| self.slot(i))
            .map(|s| {
                s.idle.iter().filter(|(c, _)| !c.is_closed()).count()
                    + usize::from(s.h2.as_ref().is_some_and(|c| !c.is_closed()))
            })
            .sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
}
