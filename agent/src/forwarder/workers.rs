//! The forwarder's threads: one single-threaded runtime per core, each accepting on its own
//! listener for every address (`SO_REUSEPORT`: the kernel spreads new connections over them).
//!
//! A connection then lives on one thread from accept to close: no work stealing, no wakeups
//! across threads, the shape HAProxy and nginx have. The control side (registry, reconciler,
//! health checks, API) stays on the main runtime.

use std::{io, net::SocketAddr, sync::Arc, thread::JoinHandle};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::error;

use super::Forwarder;

/// Listeners for every worker: `[worker][address]`. Bound before the kernel can redirect
/// anyone here.
pub fn bind(addrs: &[SocketAddr], workers: usize) -> io::Result<Vec<Vec<std::net::TcpListener>>> {
    (0..workers.max(1))
        .map(|_| addrs.iter().map(|a| bind_one(*a)).collect())
        .collect()
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Accepted sockets inherit it: one system call per listener instead of one per connection.
    socket.set_tcp_nodelay(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("forwarder cannot listen on {addr}: {e}")))?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Starts one thread per worker; they run until the process exits.
pub fn start(
    listeners: Vec<Vec<std::net::TcpListener>>,
    forwarder: Arc<Forwarder>,
) -> io::Result<Vec<JoinHandle<()>>> {
    listeners
        .into_iter()
        .enumerate()
        .map(|(i, mine)| {
            let forwarder = forwarder.clone();
            std::thread::Builder::new()
                .name(format!("sy-forward-{i}"))
                .spawn(move || run(mine, forwarder))
        })
        .collect()
}

fn run(listeners: Vec<std::net::TcpListener>, forwarder: Arc<Forwarder>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return error!("forwarder thread cannot start: {e}"),
    };
    runtime.block_on(async move {
        tokio::spawn(metronome());
        for l in listeners {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(forwarder.clone().serve(l));
                }
                Err(e) => error!("forwarder listener: {e}"),
            }
        }
        std::future::pending::<()>().await
    });
}

/// A timer that is always due within [`BEAT`]. tokio wakes its event loop (an eventfd write,
/// then one more `epoll_wait`) whenever a new timer is due before every timer it already has;
/// with this one, the connect timeout every connection sets never is: a system call and a
/// wake-up saved per connection, for four idle wake-ups a second per worker.
async fn metronome() {
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        beat.tick().await;
    }
}

/// Shorter than any connect timeout worth setting.
const BEAT: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let listener = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
