//! Listener handover between two agents on one node (HAProxy's `expose-fd listeners`, Envoy's
//! hot restart): a new agent takes the running agent's listening sockets over a Unix socket in
//! the run directory (`SCM_RIGHTS`), so the kernel's accept queues are never without a reader
//! and no connection attempt is refused or reset while the agents change places.
//!
//! The exchange, one `SOCK_SEQPACKET` message each (every message one line of text, at most one
//! descriptor):
//!
//! ```text
//! new → old   take <pid>
//! old → new   forwarder <worker> <addr>   + fd      (every worker's listener, every address)
//!             api                          + fd
//!             metrics                      + fd
//!             offered <pid>
//! new → old   accepting                    (the new agent serves on them now)
//! old → new   stopped                      (the old agent stopped accepting; it drains)
//! ```
//!
//! The old agent changes nothing in the kernel from `take` on (the new one adopts the pinned
//! maps); if the new agent goes away before `accepting`, the old one carries on as before.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};

/// The longest message of the exchange.
const MESSAGE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("handover: the other agent said {0:?}, not what the exchange expects")]
    Protocol(String),
    #[error("handover: the other agent closed the exchange before {0}")]
    Closed(&'static str),
}

/// The listening sockets that move from one agent to the next.
#[derive(Default)]
pub struct Listeners {
    /// `[worker][address]`, as the forwarder's workers hold them.
    pub forwarder: Vec<Vec<std::net::TcpListener>>,
    pub api: Option<std::os::unix::net::UnixListener>,
    pub metrics: Option<std::net::TcpListener>,
}

impl Listeners {
    pub fn count(&self) -> usize {
        self.forwarder.iter().map(Vec::len).sum::<usize>()
            + self.api.is_some() as usize
            + self.metrics.is_some() as usize
    }
}

/// The agent's run directory: the API socket's (the handover socket lives beside it).
pub fn run_dir(api_socket: Option<&Path>) -> PathBuf {
    api_socket
        .and_then(Path::parent)
        .unwrap_or(Path::new(crate::defaults::RUN_DIR))
        .to_owned()
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> HandoverError + '_ {
    move |source| HandoverError::Io {
        path: path.to_owned(),
        source,
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn send(sock: &OwnedFd, line: &str, fd: Option<&OwnedFd>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd.as_fd()];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(line.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// One message: its line (`None`: the peer closed) and the descriptor it carried.
fn recv(sock: &OwnedFd) -> io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for f in fds {
                // More than one descriptor is not part of the exchange: the rest are closed.
                fd.get_or_insert(f);
            }
        }
    }
    if got.bytes == 0 && fd.is_none() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&buf[..got.bytes.min(MESSAGE)])
        .trim()
        .to_owned();
    Ok(Some((line, fd)))
}

/// The new agent's side: the listeners it was given, and the line back to the old agent.
pub struct Taken {
    sock: OwnedFd,
    pub listeners: Listeners,
    /// The previous agent's process id.
    pub from_pid: u32,
}

/// Asks the agent serving `path` for its listeners. `Ok(None)`: no agent answers there.
pub fn take(path: &Path, timeout: Duration) -> Result<Option<Taken>, HandoverError> {
    let err = io_err(path);
    let Ok(addr) = SocketAddrUnix::new(path) else {
        return Ok(None);
    };
    let sock = seqpacket().map_err(&err)?;
    match rustix::net::connect(&sock, &addr) {
        Ok(()) => {}
        // Nobody there, or a socket a dead agent left: a fresh start.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => return Ok(None),
        Err(e) => return Err(err(e.into())),
    }
    sockopt::set_socket_timeout(&sock, sockopt::Timeout::Recv, Some(timeout))
        .map_err(|e| err(e.into()))?;
    send(&sock, &format!("take {}", std::process::id()), None).map_err(&err)?;
    let mut listeners = Listeners::default();
    let from_pid = loop {
        let Some((line, fd)) = recv(&sock).map_err(&err)? else {
            return Err(HandoverError::Closed("offering its listeners"));
        };
        let mut words = line.split_whitespace();
        match (words.next(), fd) {
            (Some("forwarder"), Some(fd)) => {
                let worker: usize = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .filter(|&w| w < 4096)
                    .ok_or_else(|| HandoverError::Protocol(line.clone()))?;
                if listeners.forwarder.len() <= worker {
                    listeners.forwarder.resize_with(worker + 1, Vec::new);
                }
                listeners.forwarder[worker].push(std::net::TcpListener::from(fd));
            }
            (Some("api"), Some(fd)) => {
                listeners.api = Some(std::os::unix::net::UnixListener::from(fd));
            }
            (Some("metrics"), Some(fd)) => {
                listeners.metrics = Some(std::net::TcpListener::from(fd));
            }
            (Some("offered"), None) => {
                break words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            }
            _ => return Err(HandoverError::Protocol(line)),
        }
    };
    Ok(Some(Taken {
        sock,
        listeners,
        from_pid,
    }))
}

impl Taken {
    /// Tells the old agent that this one accepts now; returns once it has stopped accepting
    /// (or after `timeout`: it drains on regardless).
    pub fn accepting(self, timeout: Duration) -> Result<(), HandoverError> {
        let path = PathBuf::from("handover");
        let err = io_err(&path);
        sockopt::set_socket_timeout(&self.sock, sockopt::Timeout::Recv, Some(timeout))
            .map_err(|e| err(e.into()))?;
        send(&self.sock, "accepting", None).map_err(&err)?;
        match recv(&self.sock).map_err(&err)? {
            Some((l, _)) if l == "stopped" => Ok(()),
            Some((l, _)) => Err(HandoverError::Protocol(l)),
            None => Err(HandoverError::Closed("saying it stopped")),
        }
    }
}

/// The old agent's side: the socket a successor connects to.
pub struct Offer {
    listener: OwnedFd,
    path: PathBuf,
    /// The socket file's inode, to tell it from a successor's.
    inode: Option<u64>,
}

impl Offer {
    /// Binds the handover socket at `path` (mode 0600), replacing one nobody answers on.
    pub fn bind(path: &Path) -> Result<Offer, HandoverError> {
        let err = io_err(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(&err)?;
        }
        let sock = seqpacket().map_err(&err)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let addr = SocketAddrUnix::new(&tmp).map_err(|e| err(e.into()))?;
        rustix::net::bind(&sock, &addr).map_err(|e| err(e.into()))?;
        let placed = (|| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            rustix::net::listen(&sock, 4)?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        use std::os::unix::fs::MetadataExt;
        Ok(Offer {
            listener: sock,
            path: path.to_owned(),
            inode: std::fs::metadata(path).ok().map(|m| m.ino()),
        })
    }

    /// Waits (blocking: run it on a thread of its own) for a successor that asks to take
    /// over. Connections from other users are turned away.
    pub fn next(&self) -> Result<Request, HandoverError> {
        let err = io_err(&self.path);
        loop {
            let sock = rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC)
                .map_err(|e| err(e.into()))?;
            let allowed = sockopt::socket_peercred(&sock)
                .is_ok_and(|c| c.uid.is_root() || c.uid == rustix::process::geteuid());
            if !allowed {
                tracing::warn!(path = %self.path.display(), "handover asked by another user: refused");
                continue;
            }
            // A successor that stops answering must not hold the old agent forever.
            let _ = sockopt::set_socket_timeout(
                &sock,
                sockopt::Timeout::Recv,
                Some(crate::defaults::HANDOVER_TIMEOUT),
            );
            match recv(&sock) {
                Ok(Some((line, _))) if line.starts_with("take ") => {
                    let pid = line[5..].trim().parse().unwrap_or(0);
                    return Ok(Request { sock, pid });
                }
                Ok(other) => {
                    tracing::warn!(said = ?other.map(|o| o.0), "handover: not a request to take over");
                }
                Err(e) => tracing::warn!("handover: {e}"),
            }
        }
    }

    /// Removes the socket file if it is still this agent's (a successor binds its own).
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if let (Some(ours), Ok(meta)) = (self.inode, std::fs::metadata(&self.path))
            && ours == meta.ino()
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Successors' requests as they come, for the agent's main loop; the blocking accept runs on
/// a thread of its own for the life of the process.
pub struct Successors {
    rx: tokio::sync::mpsc::Receiver<Request>,
    offer: std::sync::Arc<Offer>,
}

impl Successors {
    pub fn start(offer: Offer) -> std::io::Result<Successors> {
        let offer = std::sync::Arc::new(offer);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let o = offer.clone();
        std::thread::Builder::new()
            .name("sy-handover".into())
            .spawn(move || {
                loop {
                    match o.next() {
                        Ok(request) => {
                            if tx.blocking_send(request).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("handover socket: {e}; no successor can take over");
                            return;
                        }
                    }
                }
            })?;
        Ok(Successors { rx, offer })
    }

    /// The next successor asking (never, once the socket failed).
    pub async fn next(&mut self) -> Request {
        match self.rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    /// Removes the handover socket (if still this agent's): a stop without successor.
    pub fn remove(&self) {
        self.offer.remove();
    }
}

/// A successor's request to take over.
pub struct Request {
    sock: OwnedFd,
    /// The successor's process id, as it said.
    pub pid: u32,
}

impl Request {
    /// Sends every listener; then waits until the successor accepts on them. `Ok(true)`: it
    /// does, this agent must stop accepting ([`Request::stopped`]); `Ok(false)`: it went away
    /// first, this agent carries on.
    pub fn offer(&self, listeners: &Listeners) -> Result<bool, HandoverError> {
        let path = PathBuf::from("handover");
        let err = io_err(&path);
        for (worker, mine) in listeners.forwarder.iter().enumerate() {
            for l in mine {
                let addr = l
                    .local_addr()
                    .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
                let fd = OwnedFd::from(l.try_clone().map_err(&err)?);
                send(&self.sock, &format!("forwarder {worker} {addr}"), Some(&fd)).map_err(&err)?;
            }
        }
        if let Some(l) = &listeners.api {
            let fd = OwnedFd::from(l.try_clone().map_err(&err)?);
            send(&self.sock, "api", Some(&fd)).map_err(&err)?;
        }
        if let Some(l) = &listeners.metrics {
            let fd = OwnedFd::from(l.try_clone().map_err(&err)?);
            send(&self.sock, "metrics", Some(&fd)).map_err(&err)?;
        }
        send(&self.sock, &format!("offered {}", std::process::id()), None).map_err(&err)?;
        match recv(&self.sock) {
            Ok(Some((line, _))) if line == "accepting" => Ok(true),
            Ok(Some((line, _))) => Err(HandoverError::Protocol(line)),
            Ok(None) => Ok(false),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Tells the successor that this agent no longer accepts.
    pub fn stopped(self) {
        let _ = send(&self.sock, "stopped", None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_move_and_keep_their_queue() {
        let dir = std::env::temp_dir().join(format!("sy-handover-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let offer = Offer::bind(&path).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A connection queued before the handover is accepted after it, by the new owner.
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        let mine = Listeners {
            forwarder: vec![vec![listener]],
            api: None,
            metrics: None,
        };
        let old = std::thread::spawn(move || {
            let request = offer.next().unwrap();
            assert!(request.offer(&mine).unwrap());
            drop(mine);
            request.stopped();
            offer.remove();
        });
        let taken = take(&path, Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(taken.from_pid, std::process::id());
        assert_eq!(taken.listeners.count(), 1);
        let got = taken.listeners.forwarder[0][0].try_clone().unwrap();
        assert_eq!(got.local_addr().unwrap(), addr);
        taken.accepting(Duration::from_secs(5)).unwrap();
        old.join().unwrap();
        got.set_nonblocking(false).unwrap();
        let (_s, _) = got.accept().unwrap();
        assert!(!path.exists(), "the old agent removed its own socket");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_successor_that_goes_away_before_accepting_leaves_the_old_agent_serving() {
        let dir = std::env::temp_dir().join(format!("sy-handover-gone-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let offer = Offer::bind(&path).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mine = Listeners {
            forwarder: vec![vec![listener]],
            api: None,
            metrics: None,
        };
        let old = std::thread::spawn(move || {
            let request = offer.next().unwrap();
            request.offer(&mine).unwrap()
        });
        let taken = take(&path, Duration::from_secs(5)).unwrap().unwrap();
        drop(taken);
        assert!(!old.join().unwrap(), "the old agent must carry on");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nobody_there_is_a_fresh_start() {
        let path = std::env::temp_dir().join(format!("sy-handover-none-{}", std::process::id()));
        assert!(take(&path, Duration::from_secs(1)).unwrap().is_none());
    }
}
