//! Connecting to a backend: the balancer's choice first, then other backends, within the retry
//! budget. Every outcome feeds the node-wide health (latency, outlier ejection).

use std::{io, net::SocketAddr, sync::atomic::Ordering, time::Instant};

use tokio::{net::TcpStream, time::timeout_at};
use tracing::debug;

use super::{
    copy::{self, Buffer},
    table::ProxyService,
};
use crate::{
    balance::{Candidate as _, candidates},
    socket::{Stream, connect_marked_sending},
};

/// A connected upstream and the index of its backend in the service.
pub struct Connected {
    /// Outside tokio's event loop if the connect completed in the call.
    pub stream: Stream,
    pub backend: usize,
    /// How many of the `early` bytes went with the connect.
    pub sent: usize,
    /// When the connect completed: the clock read once for what follows it.
    pub at: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no usable backend")]
    NoBackend,
    /// The agent's own shortage (descriptors, memory): no backend's fault, and another backend
    /// would fare no better.
    #[error("no resources for an upstream socket: {0}")]
    Local(io::Error),
    #[error("{attempts} attempts failed, last on {addr}: {source}")]
    Exhausted {
        attempts: u32,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// The attempts of one client connection: which backends were tried, and how many times.
pub struct Attempts {
    pub tried: Vec<bool>,
    pub made: u32,
    /// Tried first if usable (session affinity's backend), before the balancer's choice.
    pub preferred: Option<usize>,
}

impl Attempts {
    pub fn new(service: &ProxyService) -> Self {
        Attempts {
            tried: vec![false; service.backends.len()],
            made: 0,
            preferred: None,
        }
    }

    /// Whether another backend may still be tried.
    pub fn may_retry(&self, service: &ProxyService) -> bool {
        self.made <= service.retries && retry_allowed(service)
    }
}

/// Tries the balancer's choice, then up to `retries` *other* backends while the retry budget
/// allows. `client` is the client's hash for consistent-hash services. `early`: the client's
/// first bytes, sent as soon as a connection is up (see [`connect_marked_sending`]).
pub async fn connect(
    service: &ProxyService,
    client: u64,
    own_mark: u32,
    attempts: &mut Attempts,
    early: &[u8],
) -> Result<Connected, ConnectError> {
    let mut last: Option<(SocketAddr, io::Error)> = None;
    loop {
        let started = Instant::now();
        let choices = candidates::candidates_at(&service.backends, &attempts.tried, started);
        let preferred = attempts
            .preferred
            .take()
            .filter(|&i| choices.get(i).is_some_and(|c| c.usable()));
        let Some(i) = preferred.or_else(|| service.balancer.pick(&choices, client)) else {
            break;
        };
        drop(choices);
        attempts.tried[i] = true;
        let retry = attempts.made > 0;
        if retry {
            service.shared.retries.fetch_add(1, Ordering::Relaxed);
            service
                .shared
                .retries_in_flight
                .fetch_add(1, Ordering::Relaxed);
        }
        attempts.made += 1;
        let upstream = &service.backends[i];
        let result = match timeout_at(
            (started + service.connect_timeout).into(),
            connect_marked_sending(upstream.addr, service.marked.then_some(own_mark), early),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                upstream
                    .health
                    .counters
                    .connect_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            }
        };
        if retry {
            service
                .shared
                .retries_in_flight
                .fetch_sub(1, Ordering::Relaxed);
        }
        match result {
            Ok((stream, sent)) => {
                let at = Instant::now();
                let took = at.saturating_duration_since(started);
                upstream.health.success_at(took, at);
                upstream.health.counters.timings.connected(took);
                return Ok(Connected {
                    stream,
                    backend: i,
                    sent,
                    at,
                });
            }
            Err(e) if is_local(&e) => return Err(ConnectError::Local(e)),
            Err(e) => {
                upstream
                    .health
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                upstream.health.failure(
                    service.outlier_failures,
                    service.outlier_ejection,
                    candidates::may_eject(&service.backends),
                );
                debug!(service = %service.name, backend = %upstream.addr, "connect failed: {e}");
                last = Some((upstream.addr, e));
            }
        }
        if attempts.made > service.retries || !retry_allowed(service) {
            break;
        }
    }
    match last {
        None => Err(ConnectError::NoBackend),
        Some((addr, source)) => Err(ConnectError::Exhausted {
            attempts: attempts.made,
            addr,
            source,
        }),
    }
}

/// Whether the service's retry budget lets another attempt start now.
fn retry_allowed(service: &ProxyService) -> bool {
    candidates::retry_allowed(
        service.shared.active.load(Ordering::Relaxed),
        service.shared.retries_in_flight.load(Ordering::Relaxed),
    )
}

/// Whether a failed connect says nothing about the backend: the agent is short of descriptors
/// or memory.
fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The first sign of life on a fresh upstream connection.
pub enum FirstSign {
    /// The client spoke first: its first read (bytes, or its end of stream), for the copy to
    /// pass on.
    Client(Buffer),
    /// The caller stopped waiting (idle timeout, drain deadline): copy as usual.
    Quiet,
    /// The backend spoke first, this long after the watch began: its response time.
    Server(std::time::Duration),
    /// The backend closed or reset before either side sent a byte.
    Dead,
    /// The client reset its connection before the copy began. (The read took the socket's
    /// error, so the copy would only see an end of stream and pass on a FIN.)
    ClientAborted,
}

/// Waits for the first sign of life on a fresh upstream connection. A backend that closes or
/// resets before either side sent a byte (it died between accept and its first byte) has
/// served nothing, so another backend may take the client, as for a refused connect. Once the
/// client has spoken, or the backend has, this is an ordinary connection. No timer of its own
/// (one per connection would cost a wake-up of the event loop): the caller bounds the wait
/// with the idle timeout and the drain deadline, as for the copy.
pub async fn first_sign(client: &TcpStream, server: &TcpStream, max: usize) -> FirstSign {
    let started = std::time::Instant::now();
    let mut s = [0u8; 1];
    tokio::select! {
        // The client speaking first is the common case: check it first. Its bytes are read
        // for the copy at once (a read only returns on data or the client's end of stream,
        // however readiness was reported). The backend is only peeked: its bytes stay for
        // the copy.
        biased;
        r = copy::read_first(client, max) => match r {
            Ok(first) => FirstSign::Client(first),
            Err(_) => FirstSign::ClientAborted,
        },
        r = server.peek(&mut s) => match r {
            Ok(0) | Err(_) => FirstSign::Dead,
            Ok(_) => FirstSign::Server(started.elapsed()),
        },
    }
}
