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
pub mod settled;
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
use crate::socket::Stream;
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
                    self.orig.prefetch(peer);
                    self.clone().spawn(stream, peer, local);
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
            self.clone().spawn(stream, peer, local);
        }
        debug!(listen = ?local, "forwarder stopped accepting");
    }

    /// Serves one accepted connection on this thread, counted for the drain and listed for
    /// the cut and drain deadlines (see [`conns`]).
    fn spawn(
        self: Arc<Self>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        listen: Option<SocketAddr>,
    ) {
        let listed = conns::Listed::new(stream.as_raw_fd());
        let key = listed.key();
        let task = tokio::spawn(async move {
            let _listed = listed;
            let _open = self.exit.open();
            let Some(_held) = self.descriptors.take() else {
                return refuse(&stream);
            };
            // Boxed: the connection's future is large, and a spawned future is copied on its
            // way into the task (`memcpy` under `tokio::spawn` in the profile); boxed, only
            // the pointer is, and the future is written once, where the connection starts.
            Box::pin(self.handle(stream, peer, listen, key)).await
        });
        conns::set_abort(key, task.abort_handle());
    }

    /// One redirected connection: admit it, connect until the backend shows a sign of life,
    /// relay. A client that speaks first (most do) has usually sent its first bytes by the
    /// time it is accepted: they are read at once, before the socket joins the event loop,
    /// as HAProxy does. The connection then starts without a wait for readiness, and the
    /// event loop never hears of bytes already taken.
    async fn handle(
        &self,
        client: std::net::TcpStream,
        peer: SocketAddr,
        listen: Option<SocketAddr>,
        listed: usize,
    ) {
        let accepted = Instant::now();
        let Some((service, _admitted)) = self.admit(&client, peer, listen) else {
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
        // A client that spoke stays out of tokio's event loop for now: its bytes go with the
        // connect, and the copy may start on the thread's settled loop (see `carry`).
        let client = if first.is_some() {
            Stream::Plain(client)
        } else {
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
            Stream::Evented(client)
        };
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
        listen: Option<SocketAddr>,
    ) -> Option<(Arc<ProxyService>, Admission)> {
        let Some(vip) = self.orig.recover(client, peer, listen) else {
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
        client: &Stream,
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
                // Nobody has spoken: both sockets are in tokio's event loop (no early bytes,
                // so the connect waited there), and the first sign is watched for.
                match (client, &u.stream) {
                    (Stream::Evented(c), Stream::Evented(s)) => tokio::select! {
                        sign = upstream::first_sign(c, s, defaults::COPY_BUFFER) => sign,
                        // The copy closes an idle connection, or one whose backend's drain
                        // deadline has passed, at once.
                        _ = after(service.idle_timeout) => FirstSign::Quiet,
                        _ = b.health.drain_deadline() => FirstSign::Quiet,
                    },
                    // Not watched: copied as usual.
                    _ => FirstSign::Quiet,
                }
            };
            let mut first = None;
            match sign {
                FirstSign::ClientAborted => {
                    debug!(service = %service.name, %peer, "client reset before the first byte");
                    refuse(&u.stream);
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
/// backend's drain deadline aborts it from its thread's sweep: see [`conns`].) A keep-alive
/// connection moves on to its thread's settled loop after its first exchange, and back to the
/// task's copy if it turns to bulk (see [`settled`]).
async fn relay(
    service: &ProxyService,
    client: Stream,
    upstream: Connected,
    mut occupied: Occupancy<'_>,
    first: Option<Buffer>,
    accepted: Instant,
) {
    let backend = &service.backends[upstream.backend];
    let counters = &backend.health.counters;
    occupied.open_at(upstream.at);
    occupied
        .moved
        .sent_early(upstream.sent, accepted, upstream.at);
    // The backend's response time feeds peak-EWMA balancing as soon as it is known.
    let answered = |m: &Moved| {
        if let Some(t) = m.response_time() {
            backend.health.observe(t);
        }
    };
    let settings = copy::Settings {
        path: service.byte_path,
        buffer: defaults::COPY_BUFFER,
        idle: service.idle_timeout,
        settle: true,
    };
    let tally = Tally {
        moved: &occupied.moved,
        answered: &answered,
        answer: Some(settled::Answer {
            asked: upstream.at,
            health: backend.health.clone(),
        }),
    };
    let (result, sockets) = carry(client, upstream.stream, settings, accepted, tally, first).await;
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
            sockets.abort();
        }
    }
}

/// What a connection's copy counts, and who is told of the backend's first answer.
struct Tally<'a> {
    moved: &'a Moved,
    /// Told by the task's copy.
    answered: &'a (dyn Fn(&Moved) + Sync),
    /// Told by the settled loop, for a connection that starts there.
    answer: Option<settled::Answer>,
}

/// The copy, on the task or on the thread's settled loop, until it ends; the sockets, to
/// close.
async fn carry(
    client: Stream,
    server: Stream,
    settings: copy::Settings,
    accepted: Instant,
    tally: Tally<'_>,
    mut first: Option<Buffer>,
) -> (Result<(), CopyError>, Sockets) {
    let Tally {
        moved,
        answered,
        answer,
    } = tally;
    let mut settings = settings;
    settings.settle &= settings.idle.is_none() && settled::available();
    // A connection whose client's first bytes all went with a connect that completed in the
    // call starts on the settled loop: neither socket ever joins tokio's event loop, which
    // saves the two `epoll_ctl` that take them out of it before the close, and the task's
    // wake-ups for the first exchange. The loop reports the backend's first answer itself.
    let mut answer = answer;
    let mut sockets = match (client, server) {
        (Stream::Plain(c), Stream::Plain(s)) if settings.settle && first.is_none() => {
            Sockets::Settled(c, s)
        }
        (c, s) => match Sockets::moved(c.evented(), s.evented(), Sockets::Evented) {
            Ok(sockets) => {
                answer = None;
                sockets
            }
            Err(e) => return (Err(CopyError::Io(e)), Sockets::Gone),
        },
    };
    let result = loop {
        sockets = match sockets {
            Sockets::Evented(mut client, mut server) => {
                let r = copy::bidirectional(
                    &mut client,
                    &mut server,
                    settings,
                    accepted,
                    moved,
                    answered,
                    first.take(),
                )
                .await;
                match r {
                    Ok(copy::Copied::Settled) => {
                        match Sockets::moved(client.into_std(), server.into_std(), Sockets::Settled)
                        {
                            Ok(moved) => moved,
                            Err(e) => {
                                sockets = Sockets::Gone;
                                break Err(CopyError::Io(e));
                            }
                        }
                    }
                    r => {
                        sockets = Sockets::Evented(client, server);
                        break r.map(|_| ());
                    }
                }
            }
            Sockets::Settled(client, server) => {
                match settled::copy(&client, &server, moved, answer.take()).await {
                    // Bulk: back to the task's copy, for good.
                    Ok(settled::Ended::Bulk) => {
                        settings.settle = false;
                        let (c, s) = (TcpStream::from_std(client), TcpStream::from_std(server));
                        match Sockets::moved(c, s, Sockets::Evented) {
                            Ok(moved) => moved,
                            Err(e) => {
                                sockets = Sockets::Gone;
                                break Err(CopyError::Io(e));
                            }
                        }
                    }
                    r => {
                        sockets = Sockets::Settled(client, server);
                        break r.map(|_| ()).map_err(CopyError::Io);
                    }
                }
            }
            Sockets::Gone => break Ok(()),
        };
    };
    (result, sockets)
}

/// A connection's two sockets, in tokio's event loop or in the thread's settled loop.
enum Sockets {
    Evented(TcpStream, TcpStream),
    Settled(std::net::TcpStream, std::net::TcpStream),
    /// Lost moving between the two (a failed `epoll_ctl`): closed already.
    Gone,
}

impl Sockets {
    /// Both sockets, moved from one event loop to the other; either failing loses both.
    fn moved<T>(
        client: std::io::Result<T>,
        server: std::io::Result<T>,
        to: fn(T, T) -> Sockets,
    ) -> std::io::Result<Sockets> {
        Ok(to(client?, server?))
    }

    /// Makes both closes resets.
    fn abort(&self) {
        match self {
            Sockets::Evented(c, s) => {
                refuse(c);
                refuse(s);
            }
            Sockets::Settled(c, s) => {
                refuse(c);
                refuse(s);
            }
            Sockets::Gone => {}
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

    use crate::catalog::{BytePath, ServiceAddr};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The forwarder's copy between a client and an echoing backend, on a thread with its
    /// settled loop, as on a worker thread.
    struct Relayed {
        client: TcpStream,
        backend: TcpStream,
        copy: tokio::task::JoinHandle<(Result<(), CopyError>, &'static str, u64, u64)>,
    }

    async fn relayed() -> Relayed {
        relayed_from(false, None).await
    }

    /// `plain`: both sockets start outside tokio's event loop, as for a client whose first
    /// bytes went with the connect; `answer` is then told by the settled loop.
    async fn relayed_from(plain: bool, answer: Option<settled::Answer>) -> Relayed {
        if !settled::available() {
            tokio::spawn(settled::drive());
            tokio::task::yield_now().await;
        }
        let (client, fc) = pair().await;
        let (fs, backend) = pair().await;
        let (fc, fs) = if plain {
            let plain = |s: TcpStream| Stream::Plain(s.into_std().unwrap());
            (plain(fc), plain(fs))
        } else {
            (Stream::Evented(fc), Stream::Evented(fs))
        };
        let copy = tokio::spawn(async move {
            let settings = copy::Settings {
                path: BytePath::Splice,
                buffer: 64 * 1024,
                idle: None,
                settle: true,
            };
            let moved = Moved::default();
            let tally = Tally {
                moved: &moved,
                answered: &|_| {},
                answer,
            };
            let (r, sockets) = carry(fc, fs, settings, Instant::now(), tally, None).await;
            let on = match sockets {
                Sockets::Evented(..) => "task",
                Sockets::Settled(..) => "settled",
                Sockets::Gone => "gone",
            };
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            (r, on, n(&moved.to_backend), n(&moved.spliced))
        });
        Relayed {
            client,
            backend,
            copy,
        }
    }

    /// One request and its answer, the backend echoing.
    async fn exchange(r: &mut Relayed, message: &[u8]) {
        r.client.write_all(message).await.unwrap();
        let mut got = vec![0; message.len()];
        r.backend.read_exact(&mut got).await.unwrap();
        r.backend.write_all(&got).await.unwrap();
        let mut back = vec![0; message.len()];
        r.client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, message);
    }

    #[tokio::test]
    async fn a_keep_alive_connection_settles_and_ends_with_a_half_close() {
        let mut r = relayed().await;
        let mut sent = 0;
        for i in 0..50u32 {
            let m = format!("request {i} ").repeat(1 + i as usize % 7);
            exchange(&mut r, m.as_bytes()).await;
            sent += m.len() as u64;
        }
        // The client is done asking; the backend answers on after the end it saw.
        r.client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        r.backend.write_all(b"after your end").await.unwrap();
        r.backend.shutdown().await.unwrap();
        let mut tail = Vec::new();
        r.client.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"after your end");
        let (result, on, to_backend, _) = r.copy.await.unwrap();
        result.unwrap();
        assert_eq!(on, "settled", "the connection never left its task");
        assert_eq!(to_backend, sent, "bytes counted on both loops");
        assert_eq!(settled::connections(), 0);
    }

    /// As above, on a loop that makes each send its own system call.
    #[tokio::test]
    async fn a_keep_alive_connection_settles_where_io_uring_is_refused() {
        tokio::spawn(settled::drive_without_io_uring());
        tokio::task::yield_now().await;
        let mut r = relayed().await;
        for i in 0..20u32 {
            exchange(&mut r, format!("request {i}").as_bytes()).await;
        }
        r.client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.backend.read_to_end(&mut rest).await.unwrap();
        r.backend.shutdown().await.unwrap();
        let mut tail = Vec::new();
        r.client.read_to_end(&mut tail).await.unwrap();
        let (result, on, _, _) = r.copy.await.unwrap();
        result.unwrap();
        assert_eq!(on, "settled");
        assert!(rest.is_empty() && tail.is_empty());
    }

    #[tokio::test]
    async fn a_connection_whose_client_spoke_starts_settled_and_tells_the_response_time() {
        let service = ServiceAddr {
            vip: "10.96.0.1:80".parse().unwrap(),
            protocol: crate::catalog::Protocol::Tcp,
        };
        let health = crate::health::Board::default().get(service, "10.77.0.11:80".parse().unwrap());
        let answer = settled::Answer {
            asked: Instant::now(),
            health: health.clone(),
        };
        let mut r = relayed_from(true, Some(answer)).await;
        r.client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = [0; 18];
        r.backend.read_exact(&mut got).await.unwrap();
        assert_eq!(
            settled::connections(),
            1,
            "not on the settled loop from the start"
        );
        // Slower than the default cost: the sample raises it at once (peak-EWMA).
        tokio::time::sleep(Duration::from_millis(80)).await;
        // The answer and the end of stream together, as from a server that closes.
        r.backend
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        r.backend.shutdown().await.unwrap();
        let mut back = Vec::new();
        r.client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"HTTP/1.1 200 OK\r\n\r\n");
        drop(r.client);
        let (result, on, to_backend, _) = r.copy.await.unwrap();
        result.unwrap();
        assert_eq!(on, "settled");
        assert_eq!(to_backend, 18);
        let cost = health.latency_ns();
        assert!(cost > 70e6, "response time not told: cost {cost} ns");
    }

    #[tokio::test]
    async fn a_connection_that_starts_settled_and_carries_bulk_goes_to_splice() {
        let mut r = relayed_from(true, None).await;
        exchange(&mut r, b"hello").await;
        bulk_both_ways(r).await;
    }

    #[tokio::test]
    async fn a_settled_connection_that_turns_to_bulk_goes_back_to_splice() {
        let mut r = relayed().await;
        for _ in 0..3 {
            exchange(&mut r, b"small").await;
        }
        bulk_both_ways(r).await;
    }

    /// 8 MiB from the client, echoed: the copy ends on the task's copy, by splice.
    async fn bulk_both_ways(r: Relayed) {
        let size = 8 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let Relayed {
            client,
            mut backend,
            copy,
        } = r;
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = backend.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let (mut cr, mut cw) = client.into_split();
        let sent = data.clone();
        let send = tokio::spawn(async move {
            cw.write_all(&sent).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        send.await.unwrap();
        echo.await.unwrap();
        assert!(back == data, "bulk after settling arrived changed");
        let (result, on, _, spliced) = copy.await.unwrap();
        result.unwrap();
        assert_eq!(on, "task");
        assert!(spliced > 0, "bulk never went by splice");
    }

    /// A backend whose socket is full when the client speaks: the loop's send of the first
    /// message finds no room (`EAGAIN` from the batch of sends), keeps it, and sends it and
    /// the rest in order once the backend reads.
    #[tokio::test]
    async fn a_settled_connection_to_a_full_backend_keeps_every_byte_in_order() {
        if !settled::available() {
            tokio::spawn(settled::drive());
            tokio::task::yield_now().await;
        }
        let (mut client, fc) = pair().await;
        let (fs, mut backend) = pair().await;
        let fs = fs.into_std().unwrap();
        let mut full = 0;
        loop {
            match std::io::Write::write(&mut &fs, &[7; 64 * 1024]) {
                Ok(n) => full += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let copy = tokio::spawn(async move {
            let settings = copy::Settings {
                path: BytePath::Splice,
                buffer: 64 * 1024,
                idle: None,
                settle: true,
            };
            let moved = Moved::default();
            let tally = Tally {
                moved: &moved,
                answered: &|_| {},
                answer: None,
            };
            let (fc, fs) = (Stream::Plain(fc.into_std().unwrap()), Stream::Plain(fs));
            let (r, _) = carry(fc, fs, settings, Instant::now(), tally, None).await;
            (r, moved.to_backend.load(Ordering::Relaxed))
        });
        let message = |i: usize| format!("{i:>99}").into_bytes();
        for i in 0..50 {
            client.write_all(&message(i)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len() - full, 50 * 99);
        assert!(got[..full].iter().all(|&b| b == 7));
        let want: Vec<u8> = (0..50).flat_map(message).collect();
        assert!(
            got[full..] == want,
            "the bytes arrived changed or reordered"
        );
        drop((client, backend));
        let (result, to_backend) = copy.await.unwrap();
        result.unwrap();
        assert_eq!(to_backend, want.len() as u64);
    }

    #[tokio::test]
    async fn a_settled_connection_aborted_leaves_the_loop_and_a_reset_ends_it() {
        let mut r = relayed().await;
        for _ in 0..3 {
            exchange(&mut r, b"ping").await;
        }
        assert_eq!(settled::connections(), 1);
        r.copy.abort();
        assert!(r.copy.await.unwrap_err().is_cancelled());
        assert_eq!(
            settled::connections(),
            0,
            "a cut connection stays on the loop"
        );

        let mut r = relayed().await;
        for _ in 0..3 {
            exchange(&mut r, b"ping").await;
        }
        r.backend.set_zero_linger().unwrap();
        drop(r.backend);
        let (result, on, _, _) = r.copy.await.unwrap();
        assert_eq!(on, "settled");
        assert!(matches!(result, Err(CopyError::Io(_))), "{result:?}");
    }

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
