//! The agent's own outgoing sockets: marked with the agent's mark, so the connect hooks never
//! steer them (the forwarder's upstream connections, the active health checks).

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::TcpStream};

/// A connection to `addr` from a socket marked as the agent's own (the connect hooks never
/// steer it), with `TCP_NODELAY`. Where tokio's `TcpSocket::connect` asks the socket for its
/// error (`getsockopt(SO_ERROR)`) after every connect, the readiness that ends the wait says
/// it already: a refused or unreachable connect reports an error or a hang-up with it. The
/// error itself is read only then. One system call saved per connection.
pub async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    Ok(connect_marked_sending(addr, mark, &[]).await?.0)
}

/// [`connect_marked`], and `early` sent as soon as the connection is up: with how many of its
/// bytes went. A backend on the same host has usually answered the handshake by the time
/// `connect` returns (the kernel ran it in the call), so the bytes are sent at once and
/// the connect completes without a wait for readiness: no wake-up of the task, and no
/// connect timer armed, per connection. If the handshake is still under way the send
/// returns `EAGAIN` and the wait is as for any connect.
pub async fn connect_marked_sending(
    addr: SocketAddr,
    mark: u32,
    early: &[u8],
) -> io::Result<(TcpStream, usize)> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    if !early.is_empty() {
        match socket.send_with_flags(early, libc::MSG_NOSIGNAL) {
            Ok(n) => return Ok((TcpStream::from_std(socket.into())?, n)),
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
    Ok((stream, 0))
}
