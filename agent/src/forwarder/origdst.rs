//! Recovering where a redirected connection was going.
//!
//! First from the slot the `sock_ops` program wrote for it, which the agent has mapped into its
//! memory: no system call (see [`OrigSlots`]). A connection whose slot another one took over
//! before the accept asks the `getsockopt` hook, which answers on the accepted socket as
//! conntrack answers `SO_ORIGINAL_DST` after iptables' REDIRECT. The forwarder asks with its own
//! TCP-level option (`ORIG_DST_SOCKOPT`), which the kernel turns away without the locks and the
//! conntrack lookup that `SO_ORIGINAL_DST` costs before the hook runs. When the hook is not
//! attached (agent in the root cgroup), the same entry is read from the map.

use std::{
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Mutex,
};

use std::net::TcpStream;
use switchyard_common::maps::{ORIG_DST_SOCKOPT, SockTuple};

use crate::datapath::{OrigDstTable, OrigSlots, addr, origslots::Accepted};

pub struct OrigDst {
    pub slots: Option<OrigSlots>,
    pub hook: bool,
    pub table: Mutex<OrigDstTable>,
}

impl OrigDst {
    /// Called as soon as a connection is accepted (see [`OrigSlots::prefetch`]).
    pub fn prefetch(&self, peer: SocketAddr) {
        if let Some(slots) = &self.slots {
            slots.prefetch(&addr::to_words(peer.ip()), peer.port());
        }
    }

    /// `peer` is the address `accept` returned and `listen` the listener's own: with the slot,
    /// no system call at all.
    pub fn recover(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        listen: Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        if let (Some(slots), Some(listen)) = (&self.slots, listen) {
            let client = addr::to_words(peer.ip());
            let forwarder = addr::to_words(listen.ip());
            let accepted = Accepted {
                client: &client,
                client_port: peer.port(),
                forwarder: (!listen.ip().is_unspecified()).then_some(&forwarder),
                forwarder_port: listen.port(),
            };
            if let Some(vip) = slots.take(&accepted) {
                return Some(SocketAddr::new(addr::from_words(&vip.addr), vip.port));
            }
        }
        if self.hook
            && let Some(found) = getsockopt_original_dst(stream)
        {
            return Some(found);
        }
        let local = stream.local_addr().ok()?;
        // The client's view of the connection is the mirror of ours.
        let tuple = SockTuple {
            local: addr::to_words(peer.ip()),
            remote: addr::to_words(local.ip()),
            local_port: peer.port(),
            remote_port: local.port(),
        };
        let vip = self.table.lock().ok()?.consume(&tuple)?;
        Some(SocketAddr::new(addr::from_words(&vip.addr), vip.port))
    }
}

fn getsockopt_original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let fd = stream.as_raw_fd();
    // SAFETY: sockaddr_storage is plain data; the kernel writes at most `len` bytes.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            ORIG_DST_SOCKOPT,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    sockaddr_to_std(&storage, len)
}

pub(super) fn sockaddr_to_std(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length checked.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: family and length checked.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                ip.to_canonical(),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}
