//! Connecting to a backend, retrying on another one when a connect fails.

use std::{io, net::SocketAddr, os::fd::AsRawFd, sync::atomic::Ordering};

use tokio::{
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::debug;

use super::table::{Attempt, ProxyService};

/// A connected upstream and the index of its backend in the service.
pub struct Connected {
    pub stream: TcpStream,
    pub backend: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no usable backend")]
    NoBackend,
    #[error("all {attempts} attempts failed, last on {addr}: {source}")]
    Exhausted {
        attempts: u32,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// Tries a backend chosen by the service's balancer, then up to `retries` *other* backends.
pub async fn connect(service: &ProxyService, own_mark: u32) -> Result<Connected, ConnectError> {
    let mut tried = vec![false; service.backends.len()];
    let mut last: Option<(SocketAddr, io::Error)> = None;
    let mut attempts = 0;
    while attempts <= service.retries {
        let candidates: Vec<Attempt> = service
            .backends
            .iter()
            .zip(&tried)
            .map(|(upstream, &tried)| Attempt { upstream, tried })
            .collect();
        let Some(i) = service.balancer.pick(&candidates) else {
            break;
        };
        tried[i] = true;
        attempts += 1;
        let upstream = &service.backends[i];
        match connect_one(upstream.addr, own_mark, service).await {
            Ok(stream) => return Ok(Connected { stream, backend: i }),
            Err(e) => {
                upstream
                    .stats
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(service = %service.name, backend = %upstream.addr, "connect failed: {e}");
                last = Some((upstream.addr, e));
            }
        }
    }
    match last {
        None => Err(ConnectError::NoBackend),
        Some((addr, source)) => Err(ConnectError::Exhausted {
            attempts,
            addr,
            source,
        }),
    }
}

async fn connect_one(
    addr: SocketAddr,
    own_mark: u32,
    service: &ProxyService,
) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    set_mark(&socket, own_mark)?;
    socket.set_nodelay(true)?;
    match timeout(service.connect_timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Marks the socket as the agent's own, so the connect hooks never steer it.
fn set_mark(socket: &TcpSocket, mark: u32) -> io::Result<()> {
    // SAFETY: a valid fd and a u32 option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
