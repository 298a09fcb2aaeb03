//! Unpinning connected UDP sockets from a backend that left.
//!
//! `sendmsg4/6` does not run for `send()` on a connected UDP socket, so such a socket keeps the
//! backend `connect4/6` chose, even after that backend is removed or fails (a standing Cilium
//! complaint). The agent destroys those sockets through `sock_diag` (`SOCK_DESTROY`, what
//! `ss -K` does): the application's blocked `recv()` wakes with `ECONNABORTED`, the socket is
//! disconnected, and its next `connect()` goes through the hook again and gets a live backend.
//! `sock_diag` sees one network namespace, so this runs in each namespace that has a process in
//! the steered cgroup, and destroys only sockets the hooks steered to that backend (their
//! cookie is in `REV_NAT`).

use std::{
    collections::HashSet,
    fs, io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// A connected UDP socket reports `TCP_ESTABLISHED`.
const ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// One network namespace per distinct `ns/net` of the processes in `cgroup` (and below).
pub fn namespaces(cgroup: &Path) -> Vec<PathBuf> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(d) = dirs.pop() {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    let mut seen = HashSet::new();
    pids.into_iter()
        .map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
        .filter(|p| fs::metadata(p).is_ok_and(|m| seen.insert((m.dev(), m.ino()))))
        .collect()
}

/// Destroys, in the namespace `netns`, the connected UDP sockets whose peer is one of `gone`
/// and for which `steered(cookie, peer)` holds. Returns how many were destroyed.
pub fn destroy_in(
    netns: &Path,
    gone: &[SocketAddr],
    steered: &(dyn Fn(u64, SocketAddr) -> bool + Sync),
) -> io::Result<usize> {
    let ns = fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a namespace fd; setns affects this (scoped, short-lived) thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let diag = Diag::open()?;
            let mut destroyed = 0;
            for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                for msg in diag.dump_udp(family)? {
                    let peer = peer_of(&msg);
                    let cookie = msg.id.cookie[0] as u64 | (msg.id.cookie[1] as u64) << 32;
                    if msg.state as u32 == ESTABLISHED
                        && gone.contains(&peer)
                        && steered(cookie, peer)
                        && diag.destroy(&msg).is_ok()
                    {
                        destroyed += 1;
                    }
                }
            }
            Ok(destroyed)
        })
        .join()
        .map_err(|_| io::Error::other("sock_diag thread panicked"))?
    })
}

fn peer_of(msg: &DiagMsg) -> SocketAddr {
    let port = u16::from_be_bytes(msg.id.dport);
    let ip = if msg.family as i32 == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(
            msg.id.dst[0],
            msg.id.dst[1],
            msg.id.dst[2],
            msg.id.dst[3],
        ))
    } else {
        Ipv6Addr::from(msg.id.dst).to_canonical()
    };
    SocketAddr::new(ip, port)
}

/// One netlink datagram of `sock_diag` replies: its diag messages are added to `out`; `true`
/// when it ends the answer (DONE, or an ACK). The kernel wrote it, but a length or error code
/// that does not fit is an error, never a panic.
pub(crate) fn parse_datagram(buf: &[u8], out: &mut Vec<DiagMsg>) -> io::Result<bool> {
    let mut at = 0usize;
    let n = buf.len();
    while at + size_of::<NlMsgHdr>() <= n {
        // SAFETY: bounds checked; unaligned read of plain data.
        let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        let len = hdr.len as usize;
        if len < size_of::<NlMsgHdr>() || len > n - at {
            return Err(io::Error::other("malformed netlink reply"));
        }
        let body = &buf[at + size_of::<NlMsgHdr>()..at + len];
        match hdr.kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                return if code == 0 {
                    Ok(true)
                } else {
                    // `-code` overflows for i32::MIN.
                    Err(io::Error::from_raw_os_error(code.saturating_neg()))
                };
            }
            _ if body.len() >= size_of::<DiagMsg>() => {
                // SAFETY: length checked; unaligned read of plain data.
                out.push(unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) });
            }
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    Ok(false)
}

/// The peers of parsed diag messages (what the agent matches against a removed backend).
pub(crate) fn peers(msgs: &[DiagMsg]) -> Vec<SocketAddr> {
    msgs.iter().map(peer_of).collect()
}

struct Diag {
    fd: std::os::fd::OwnedFd,
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: plain `repr(C)` data, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

impl Diag {
    fn open() -> io::Result<Diag> {
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        // SAFETY: a fresh descriptor.
        Ok(Diag {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    fn send(&self, kind: u16, flags: u16, req: &Request) -> io::Result<()> {
        let hdr = NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + size_of::<Request>()) as u32,
            kind,
            flags: libc::NLM_F_REQUEST as u16 | flags,
            seq: 1,
            pid: 0,
        };
        let mut buf = as_bytes(&hdr).to_vec();
        buf.extend_from_slice(as_bytes(req));
        // SAFETY: sending our own buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads replies until DONE (or one ACK/ERROR); returns the diag messages.
    fn receive(&self) -> io::Result<Vec<DiagMsg>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receiving into our own buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if parse_datagram(&buf[..n as usize], &mut out)? {
                return Ok(out);
            }
        }
    }

    fn dump_udp(&self, family: u8) -> io::Result<Vec<DiagMsg>> {
        let req = Request {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            states: 1 << ESTABLISHED,
            ..Default::default()
        };
        self.send(SOCK_DIAG_BY_FAMILY, libc::NLM_F_DUMP as u16, &req)?;
        self.receive()
    }

    fn destroy(&self, msg: &DiagMsg) -> io::Result<()> {
        let req = Request {
            family: msg.family,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            id: msg.id,
            ..Default::default()
        };
        self.send(SOCK_DESTROY, libc::NLM_F_ACK as u16, &req)?;
        self.receive().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let hdr = NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + body.len()) as u32,
            kind,
            ..Default::default()
        };
        let mut out = as_bytes(&hdr).to_vec();
        out.extend_from_slice(body);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    #[test]
    fn replies_are_read_and_nonsense_is_an_error_not_a_panic() {
        let mut diag = DiagMsg {
            family: libc::AF_INET as u8,
            ..Default::default()
        };
        diag.id.dst[..4].copy_from_slice(&[10, 0, 0, 7]);
        diag.id.dport = 53u16.to_be_bytes();
        let mut datagram = message(SOCK_DIAG_BY_FAMILY, as_bytes(&diag));
        let mut out = Vec::new();
        assert!(!parse_datagram(&datagram, &mut out).unwrap());
        datagram.extend(message(NLMSG_DONE, &[0; 4]));
        assert!(parse_datagram(&datagram, &mut out).unwrap());
        assert_eq!(peers(&out), ["10.0.0.7:53".parse().unwrap(); 2]);

        // An error code whose negation overflows.
        let e = parse_datagram(&message(NLMSG_ERROR, &i32::MIN.to_ne_bytes()), &mut out);
        assert!(e.is_err());
        // A length past the datagram, and one shorter than a header.
        let mut long = message(NLMSG_DONE, &[]);
        long[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_datagram(&long, &mut out).is_err());
        let mut short = message(NLMSG_DONE, &[]);
        short[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_datagram(&short, &mut out).is_err());
    }
}
