//! The agent's own outgoing sockets: marked with the agent's mark, so the connect hooks never
//! steer them (the active health checks, HTTP mode's pooled connections, and the forwarder's
//! upstream connections to a backend whose address the hooks would steer).

use std::{io, net::SocketAddr, os::fd::AsRawFd};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::TcpStream};

/// A connection to `addr` from a socket marked as the agent's own (the connect hooks never
/// steer it), with `TCP_NODELAY`. Where tokio's `TcpSocket::connect` asks the socket for its
/// error (`getsockopt(SO_ERROR)`) after every connect, the readiness that ends the wait says
/// it already: a refused or unreachable connect reports an error or a hang-up with it. The
/// error itself is read only then. One system call saved per connection.
pub async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    connect_marked_sending(addr, Some(mark), &[])
        .await?
        .0
        .evented()
}

/// A connected socket, in tokio's event loop or not yet: a connect that completed in the call
/// never needed it, and the forwarder may hand such a socket to its own loop instead
/// (`forwarder::settled`), which saves tokio's `epoll_ctl` to add it and the one to remove
/// it before the close.
#[derive(Debug)]
pub enum Stream {
    Plain(std::net::TcpStream),
    Evented(TcpStream),
}

impl Stream {
    /// The socket in tokio's event loop, added now if it was not.
    pub fn evented(self) -> io::Result<TcpStream> {
        match self {
            Stream::Plain(s) => TcpStream::from_std(s),
            Stream::Evented(s) => Ok(s),
        }
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Plain(s) => s.as_fd(),
            Stream::Evented(s) => s.as_fd(),
        }
    }
}

/// The last ACK of the handshake waits for the first bytes and goes out with them
/// (`TCP_DEFER_ACCEPT` on a connecting socket delays it, as `tcp_rcv_synsent_state_process`
/// does for a socket with data pending). The backend's listener then sees the connection
/// complete with its request already queued: one segment less, and a backend that waits in
/// `epoll` is woken once per connection instead of twice (for the accept, then for the
/// request). Only for a client that spoke first: its bytes are sent right after the connect.
fn ack_with_first_bytes(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: an int option value, its size given, on the socket's own descriptor.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`connect_marked`] (unmarked for `None`: an address the hooks let pass anyway), and
/// `early` sent as soon as the connection is up: with how many of its
/// bytes went. A backend on the same host has usually answered the handshake by the time
/// `connect` returns (the kernel ran it in the call), so the bytes are sent at once and
/// the connect completes without a wait for readiness: no wake-up of the task, no connect
/// timer armed, and a socket not yet in tokio's event loop ([`Stream::Plain`]). If the
/// handshake is still under way the send returns `EAGAIN` and the wait is as for any
/// connect.
pub async fn connect_marked_sending(
    addr: SocketAddr,
    mark: Option<u32>,
    early: &[u8],
) -> io::Result<(Stream, usize)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_tcp_nodelay(true)?;
    if !early.is_empty() {
        // A saving, not a condition of the connect: a kernel that refused it would otherwise
        // make every backend look down.
        let _ = ack_with_first_bytes(&socket);
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if !early.is_empty() {
        match socket.send_with_flags(early, libc::MSG_NOSIGNAL) {
            Ok(n) => return Ok((Stream::Plain(socket.into()), n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Refused or reset during the handshake: as a failed connect.
            Err(e) => return Err(e),
        }
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok((Stream::Evented(stream), 0))
}
