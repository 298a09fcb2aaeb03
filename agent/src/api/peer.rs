//! Who may use the API, checked on every connection from the peer's credentials
//! (`SO_PEERCRED`, and `SO_PEERGROUPS` for its supplementary groups) whatever the socket file's
//! permissions became: root, the agent's own user, or a member of `[api] group`. Anyone else
//! is refused (the connection closed unanswered) and logged.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::listener::http::Listener;

/// The API's listener: accepts only trusted peers.
pub struct Trusted {
    inner: UnixListener,
    own_uid: u32,
    group: Option<u32>,
    refused: AtomicU64,
}

impl Trusted {
    pub fn new(inner: UnixListener, group: Option<u32>) -> Self {
        Trusted {
            inner,
            // SAFETY: no arguments, cannot fail.
            own_uid: unsafe { libc::geteuid() },
            group,
            refused: AtomicU64::new(0),
        }
    }
}

/// Root, the agent's own user, or (with a group) a member of it, by primary or supplementary
/// group.
pub fn allowed(uid: u32, gid: u32, groups: &[u32], own_uid: u32, group: Option<u32>) -> bool {
    uid == 0 || uid == own_uid || group.is_some_and(|g| gid == g || groups.contains(&g))
}

/// The peer's supplementary groups, as they were when it connected.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0u32; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
        // SAFETY: a valid fd, and a buffer of `len` bytes that outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<u32>();
        if rc == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` now says how much room it needs.
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            break;
        }
        groups.resize(n.min(65_536), 0);
    }
    Vec::new()
}

impl Listener for Trusted {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, Arc<str>)> {
        loop {
            let (stream, _) = self.inner.accept().await?;
            let (uid, gid, pid) = match stream.peer_cred() {
                Ok(c) => (c.uid(), c.gid(), c.pid().unwrap_or(0)),
                Err(_) => (u32::MAX, u32::MAX, 0),
            };
            let groups = match self.group {
                Some(g) if uid != 0 && uid != self.own_uid && gid != g => peer_groups(&stream),
                _ => Vec::new(),
            };
            if allowed(uid, gid, &groups, self.own_uid, self.group) {
                return Ok((stream, format!("uid {uid} pid {pid}").into()));
            }
            // Logged, but not without bound: a local user looping on connect() must not fill
            // the log.
            let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || n.is_multiple_of(1000) {
                warn!(
                    uid,
                    gid,
                    pid,
                    refused = n,
                    "api: connection refused: the peer is not root, the agent's user or a member \
                     of [api] group"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn root_the_agent_and_the_group_only() {
        assert!(allowed(0, 0, &[], 1000, None));
        assert!(allowed(1000, 1000, &[], 1000, None));
        assert!(!allowed(1001, 1001, &[], 1000, None));
        assert!(!allowed(1001, 1001, &[5], 1000, None));
        assert!(allowed(1001, 7, &[], 1000, Some(7)));
        assert!(allowed(1001, 1001, &[3, 7], 1000, Some(7)));
        assert!(!allowed(1001, 1001, &[3], 1000, Some(7)));
    }
}
