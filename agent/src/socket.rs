//! The agent's own outgoing sockets: marked with the agent's mark, so the connect hooks never
//! steer them (the forwarder's upstream connections, the active health checks).

use std::{io, net::SocketAddr, os::fd::AsRawFd};

use tokio::net::{TcpSocket, TcpStream};

/// Connects a socket marked as the agent's own, so the connect hooks never steer it.
pub async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
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
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}
