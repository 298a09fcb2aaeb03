//! The userspace forwarder: accepts connections the kernel redirected to it, recovers their
//! original service address, connects to a backend (retrying others) and moves bytes both ways
//! until both sides are done, the connection idles out, or its backend's drain deadline passes.

pub mod affinity;
pub mod conns;
mod copy;
pub mod exit;
mod http_dispatch;
mod occupancy;
mod origdst;
pub mod reserve;
pub mod table;
mod upstream;
pub mod workers;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use std::os::fd::{AsFd, AsRawFd, FromRawFd};

use socket2::SockRef;
use switchyard_common::hash::mix64;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use copy::Buffer;
pub use copy::{CopyError, Moved};
pub use exit::Exit;
pub use http_dispatch::TableDirectory;
pub use origdst::OrigDst;
pub use reserve::DescriptorReserve;
pub use table::{ForwardingDefaults, SharedTable, Table};

use self::{
    occupancy::{Admission, Occupancy},
    table::ProxyService,
    upstream::{Connected, FirstSign},
};
use crate::{balance::candidates, catalog::HashKey, defaults, listener::AcceptFailures};

pub struct Forwarder {
    pub table: SharedTable,
    pub orig: OrigDst,
    pub own_mark: u32,
    /// Keeps descriptors for the control side (see [`reserve`]).
    pub descriptors: DescriptorReserve,
    /// Proxy-mode session affinity, node-wide.
    pub affinity: affinity::AffinityTable,
    /// Stopping: accepting ends, connections drain (see [`exit`]).
    pub exit: Exit,
    /// HTTP mode's routes and destinations.
    pub http: Arc<crate::http::Context>,
}

impl Forwarder {
    /// Accepts until the forwarder stops accepting (see [`exit`]); then takes what the
    /// listener's queue already holds and closes this descriptor of it. Accepted sockets are
    /// not registered with the event loop yet: see [`Forwarder::handle`].
    pub async fn serve(self: Arc<Self>, listener: std::net::TcpListener) {
        let local = listener.local_addr().ok();
        // SAFETY: the listener owns its descriptor, and keeps it open and the same while the
        // AsyncFd holds it.
        let listener =
            match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
                Ok(l) => l,
                Err(e) => return warn!(listen = ?local, "forwarder listener: {e}"),
            };
        info!(listen = ?local, "forwarder listening");
        let mut failures = AcceptFailures::default();
        // Made once: a watch subscription per accepted connection showed in the profile.
        let stopped = self.exit.stopped();
        tokio::pin!(stopped);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut stopped => break,
                accepted = accept(&listener) => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    failures.accepted("forwarder");
                    self.clone().spawn(stream, peer);
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly rather than spin.
                    failures.failed("forwarder", &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // Connections queued before accepting stopped passed the hook while this listener was
        // in its sight: they are served, not reset by the close.
        let listener = listener.into_inner();
        while let Ok((stream, peer)) = accept4(&listener) {
            self.clone().spawn(stream, peer);
        }
        debug!(listen = ?local, "forwarder stopped accepting");
    }

    /// Serves one accepted connection on this thread, counted for the drain and listed for
    /// the cut and drain deadlines (see [`conns`]).
    fn spawn(self: Arc<Self>, stream: std::net::TcpStream, peer: SocketAddr) {
        let listed = conns::Listed::new(stream.as_raw_fd());
        let key = listed.key();
        let task = tokio::spawn(async move {
            let _listed = listed;
            let _open = self.exit.open();
            let Some(_held) = self.descriptors.take() else {
                return refuse(&stream);
            };
            self.handle(stream, peer, key).await
        });
        conns::set_abort(key, task.abort_handle());
    }

    /// One redirected connection: admit it, connect until the backend shows a sign of life,
    /// relay. A client that speaks first (most do) has usually sent its first bytes by the
    /// time it is accepted: they are read at once, before the socket joins the event loop,
    /// as HAProxy does. The connection then starts without a wait for readiness, and the
    /// event loop never hears of bytes already taken.
    async fn handle(&self, client: std::net::TcpStream, peer: SocketAddr, listed: usize) {
        let accepted = Instant::now();
        let Some((service, _admitted)) = self.admit(&client, peer) else {
            return;
        };
        let tcp = service.app_protocol().is_tcp();
        let first = if tcp {
            match copy::read_now(&client, defaults::COPY_BUFFER) {
                Ok(first) => first,
                // Reset by the client before it was served: nothing to pass on.
                Err(_) => return,
            }
        } else {
            None
        };
        let Ok(mut client) = TcpStream::from_std(client) else {
            return;
        };
        if !tcp {
            // Boxed: HTTP's connection state is large, and held inline it would be part of
            // every TCP connection's task too, copied on each spawn.
            match Box::pin(http_dispatch::dispatch(&self.http, &service, client, peer)).await {
                Some(opaque) => client = opaque,
                None => return,
            }
        }
        let Some((upstream, occupied, first)) = self.connect(&service, &client, peer, first).await
        else {
            return;
        };
        let backend = &service.backends[upstream.backend];
        conns::copying_to(listed, &backend.health, peer);
        relay(&service, client, upstream, occupied, first, accepted).await;
    }

    /// The proxy-mode service the client was sent here for, if it takes one more connection.
    /// A refused client is reset.
    fn admit(
        &self,
        client: &std::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<(Arc<ProxyService>, Admission)> {
        let Some(vip) = self.orig.recover(client, peer) else {
            debug!(%peer, "no original destination: not a redirected connection");
            return None;
        };
        let Some(service) = self.table.load().get(&vip) else {
            debug!(%peer, %vip, "original destination is not a proxy-mode service");
            refuse(client);
            return None;
        };
        let shared = &service.shared;
        let Some(admitted) = Admission::take(shared, service.max_connections) else {
            shared.refused_limit.fetch_add(1, Ordering::Relaxed);
            let max = service.max_connections.unwrap_or_default();
            debug!(service = %service.name, %peer, "refused: connection limit {max} reached");
            refuse(client);
            return None;
        };
        Some((service, admitted))
    }

    /// Connects to a backend and waits for the first sign of life: a backend that closes
    /// before either side spoke has served nothing, so another one is tried, as after a
    /// refused connect. `None`: the client was refused (reset), or reset its connection.
    /// With the connection, the client's first read if it spoke first (`first`: it had
    /// spoken by the time it was accepted, so the backend is not watched for a first sign).
    async fn connect<'s>(
        &self,
        service: &'s ProxyService,
        client: &TcpStream,
        peer: SocketAddr,
        spoken: Option<Buffer>,
    ) -> Option<(Connected, Occupancy<'s>, Option<Buffer>)> {
        let mut spoken = spoken;
        let hash = client_hash(peer, service.hash_key);
        let mut attempts = upstream::Attempts::new(service);
        // A sticky client tries its backend first, if that is still one of the service's.
        if service.affinity.is_some()
            && let Some(addr) = self.affinity.get(service.addr, peer.ip(), Instant::now())
        {
            attempts.preferred = service.backends.iter().position(|b| b.addr == addr);
        }
        loop {
            let early = spoken.as_ref().map_or(&[][..], |b| b.filled());
            let u =
                match upstream::connect(service, hash, self.own_mark, &mut attempts, early).await {
                    Ok(u) => u,
                    Err(e) => {
                        service
                            .shared
                            .refused_no_backend
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(service = %service.name, %peer, "refused: {e}");
                        refuse(client);
                        return None;
                    }
                };
            let b = &service.backends[u.backend];
            // The connection occupies its backend from now on; dropped, it lets go.
            let occupied = Occupancy::take(&b.health, &service.shared);
            let sign = if let Some(mut bytes) = spoken.take() {
                bytes.consume(u.sent);
                FirstSign::Client(bytes)
            } else {
                tokio::select! {
                    sign = upstream::first_sign(client, &u.stream, defaults::COPY_BUFFER) => sign,
                // Nobody has spoken: the copy closes an idle connection, or one whose
                // backend's drain deadline has passed, at once.
                    _ = after(service.idle_timeout) => FirstSign::Quiet,
                    _ = b.health.drain_deadline() => FirstSign::Quiet,
                }
            };
            let mut first = None;
            match sign {
                FirstSign::ClientAborted => {
                    debug!(service = %service.name, %peer, "client reset before the first byte");
                    let _ = u.stream.set_zero_linger();
                    return None;
                }
                // The backend's response time, for peak-EWMA (the copy starts after it).
                FirstSign::Server(t) => b.health.observe(t),
                FirstSign::Dead if attempts.may_retry(service) => {
                    drop(occupied);
                    b.health.counters.resets.fetch_add(1, Ordering::Relaxed);
                    b.health.failure(
                        service.outlier_failures,
                        service.outlier_ejection,
                        candidates::may_eject(&service.backends),
                    );
                    debug!(service = %service.name, backend = %b.addr, "closed before the first byte: trying another");
                    continue;
                }
                // Sent whole with the connect: nothing left for the copy to pass on. (An
                // empty first read that was not sent is the client's end of stream.)
                FirstSign::Client(bytes) if u.sent > 0 && bytes.filled().is_empty() => {}
                FirstSign::Client(bytes) => first = Some(bytes),
                FirstSign::Quiet | FirstSign::Dead => {}
            }
            debug!(service = %service.name, %peer, backend = %b.addr, hash, "connected");
            if let Some(timeout) = service.affinity {
                self.affinity
                    .set(service.addr, peer.ip(), b.addr, timeout, Instant::now());
            }
            return Some((u, occupied, first));
        }
    }
}

/// Moves bytes both ways until both sides are done or the connection idles out. (Its
/// backend's drain deadline aborts it from its thread's sweep: see [`conns`].)
async fn relay(
    service: &ProxyService,
    mut client: TcpStream,
    upstream: Connected,
    mut occupied: Occupancy<'_>,
    first: Option<Buffer>,
    accepted: Instant,
) {
    let backend = &service.backends[upstream.backend];
    let counters = &backend.health.counters;
    occupied.open();
    occupied.moved.sent_early(upstream.sent, accepted);
    let mut server = upstream.stream;
    // The backend's response time feeds peak-EWMA balancing as soon as it is known.
    let answered = |m: &Moved| {
        if let Some(t) = m.response_time() {
            backend.health.observe(t);
        }
    };
    let result = copy::bidirectional(
        &mut client,
        &mut server,
        copy::Settings {
            path: service.byte_path,
            buffer: defaults::COPY_BUFFER,
            idle: service.idle_timeout,
        },
        accepted,
        &occupied.moved,
        &answered,
        first,
    )
    .await;
    // The end is counted before the sockets close.
    drop(occupied);
    match result {
        Ok(()) => {}
        Err(CopyError::Idle(idle)) => {
            debug!(service = %service.name, backend = %backend.addr, "idle for {idle:?}: closed");
        }
        Err(CopyError::Io(e)) => {
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                counters.resets.fetch_add(1, Ordering::Relaxed);
            }
            debug!(service = %service.name, backend = %backend.addr, "connection aborted: {e}");
            // An abort passes on as an abort: closing with a FIN would tell the other side
            // that a cut-off stream was complete.
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
    }
}

/// Resolves after `t`, or never.
async fn after(t: Option<Duration>) {
    match t {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

/// Makes the close a reset, so the client learns at once that nothing will answer (the stream
/// closes when its owner drops it, at once).
fn refuse(client: &impl AsFd) {
    let _ = SockRef::from(client).set_linger(Some(Duration::ZERO));
}

/// The next connection of `listener`, its socket non-blocking and not yet in the event loop.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| accept4(l.get_ref())) {
            return accepted;
        }
    }
}

/// `accept4` with the flags the forwarder wants, in the one system call.
fn accept4(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: sockaddr_storage is plain data; the kernel writes at most `len` bytes.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the pointers are valid for the call; the descriptor is the listener's.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = origdst::sockaddr_to_std(&storage, len)
        .ok_or_else(|| std::io::Error::other("accepted a socket of an unknown family"))?;
    Ok((stream, peer))
}

fn client_hash(peer: SocketAddr, key: HashKey) -> u64 {
    let ip = match peer.ip() {
        IpAddr::V4(v4) => u32::from(v4) as u64,
        IpAddr::V6(v6) => {
            let b = u128::from(v6);
            (b >> 64) as u64 ^ b as u64
        }
    };
    match key {
        HashKey::ClientIp => mix64(ip),
        HashKey::ClientIpPort => mix64(ip ^ mix64(peer.port() as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{
        Ring,
        tests::{C, c},
    };

    #[test]
    fn ring_with_real_keys_keeps_survivors() {
        let key = |h: u8| candidates::backend_key(SocketAddr::from(([10, 77, 0, h], 8080)));
        let k = |h: u8| C {
            key: key(h),
            ..c(1, true)
        };
        let all = [k(11), k(12), k(13), k(14)];
        let three = [k(11), k(12), k(14)];
        let (r4, r3) = (Ring::build(&all), Ring::build(&three));
        for c in 100..140u8 {
            let h = client_hash(
                SocketAddr::new(IpAddr::from([10, 77, 0, c]), 5555),
                HashKey::ClientIp,
            );
            let b = all[r4.pick(&all, h).unwrap()].key;
            let a = three[r3.pick(&three, h).unwrap()].key;
            assert!(b == key(13) || a == b, "client {c} moved");
        }
    }
}
