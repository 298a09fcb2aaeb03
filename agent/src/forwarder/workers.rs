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

/// Listeners for every worker, taking over `inherited` (a previous agent's, `[worker][address]`
/// as it had them) where they listen on a configured address, and binding the rest. Every
/// inherited listener kept is served by some worker, even if this agent runs fewer: the
/// connections in its queue must find a reader. Returns the listeners and how many were
/// taken over.
pub fn adopt_or_bind(
    addrs: &[SocketAddr],
    workers: usize,
    inherited: Vec<Vec<std::net::TcpListener>>,
) -> io::Result<(Vec<Vec<std::net::TcpListener>>, usize)> {
    let workers = workers.max(1);
    let mut out: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut taken = 0;
    for addr in addrs {
        let mine: Vec<std::net::TcpListener> = inherited
            .iter()
            .flatten()
            .filter(|l| l.local_addr().is_ok_and(|a| a == *addr))
            .filter_map(|l| l.try_clone().ok())
            .collect();
        let mut served = vec![false; workers];
        for (i, l) in mine.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            served[i % workers] = true;
            out[i % workers].push(l);
            taken += 1;
        }
        for (w, served) in served.iter().enumerate() {
            if !served {
                out[w].push(bind_one(*addr)?);
            }
        }
    }
    let offered = inherited.iter().map(Vec::len).sum::<usize>();
    if offered > taken {
        tracing::warn!(
            offered,
            taken,
            "listeners of the previous agent on addresses no longer configured are closed"
        );
    }
    Ok((out, taken))
}

/// One listener per address family, for the hooks to check that a forwarder listens.
pub fn per_family(listeners: &[Vec<std::net::TcpListener>]) -> Vec<&std::net::TcpListener> {
    let mut found: Vec<&std::net::TcpListener> = Vec::new();
    for l in listeners.iter().flatten() {
        let Ok(a) = l.local_addr() else { continue };
        if !found
            .iter()
            .any(|f| f.local_addr().is_ok_and(|b| b.is_ipv4() == a.is_ipv4()))
        {
            found.push(l);
        }
    }
    found
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
        tokio::spawn(super::settled::drive());
        let sweeping = forwarder.clone();
        tokio::spawn(async move { super::conns::sweep(&sweeping.exit).await });
        for l in listeners {
            tokio::spawn(forwarder.clone().serve(l));
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
    fn inherited_listeners_are_all_served_and_the_rest_bound() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = bind_one(addr).unwrap();
        let port = first.local_addr().unwrap();
        let old = vec![
            vec![first],
            vec![bind_one(port).unwrap()],
            vec![bind_one(port).unwrap()],
        ];
        // Fewer workers than the previous agent: each inherited listener still has one.
        let (two, taken) = adopt_or_bind(&[port], 2, old).unwrap();
        assert_eq!(taken, 3);
        assert_eq!(two.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        // More workers: the extra ones get listeners of their own in the same port group.
        let inherited = vec![vec![two[0][0].try_clone().unwrap()]];
        let (four, taken) = adopt_or_bind(&[port], 4, inherited).unwrap();
        assert_eq!(taken, 1);
        assert!(four.iter().all(|w| w.len() == 1));
        assert!(
            four.iter()
                .flatten()
                .all(|l| l.local_addr().unwrap() == port)
        );
        assert_eq!(per_family(&four).len(), 1);
    }

    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let listener = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
