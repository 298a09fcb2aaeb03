//! Remembering what a steered socket asked for, and telling it back.
//!
//! `connect` files `SOCK_ORIG[cookie]`. When a proxied connection is established, `sock_ops`
//! copies it under the 4-tuple, the key the forwarder's accepted socket can name (it sees the
//! mirror tuple), twice: into `ORIG_SLOTS`, an array the forwarder has mapped and reads with no
//! system call, and into `ORIG_DST`, which the forwarder's
//! `getsockopt(SOL_TCP, ORIG_DST_SOCKOPT)` reads and removes when the slot was taken over by
//! another connection. Both entries of a client socket go when it closes.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use switchyard_common::{addr::v4_mapped, counters::Counter, maps::*, Addr};

use crate::maps::*;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_TCP: i32 = 6;
const TCP_CLOSE: u32 = 7;

pub fn sockops(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(ctx),
        _ => {}
    }
    0
}

fn established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { SOCK_ORIG.get(cookie) }).copied() else {
        return;
    };
    // Ask for the state callback, so the cookie entry goes when the socket closes.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    if orig.mode != mode::PROXY {
        return;
    }
    let Some(tuple) = tuple(ctx) else {
        return;
    };
    let _ = ORIG_DST.insert(tuple, orig.vip, 0);
    // The forwarder reads the slot after its accept, which this connection's last handshake
    // packet (sent after this returns) makes possible: the slot is written by then.
    if let Some(slot) = ORIG_SLOTS.get_ptr_mut(orig_slot_index(&tuple.local, tuple.local_port)) {
        // SAFETY: a pointer into the array's value, valid for the program's run.
        unsafe {
            (*slot).tuple = tuple;
            (*slot).vip = orig.vip;
            core::ptr::write_volatile(&mut (*slot).check, orig_slot_check(&tuple, &orig.vip));
        }
    }
}

/// A tracked socket closed: its entries go. A proxied client's `ORIG_DST` entry is still there
/// if the forwarder read its slot instead.
fn closed(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let proxied = (unsafe { SOCK_ORIG.get(cookie) }).is_some_and(|o| o.mode == mode::PROXY);
    let _ = SOCK_ORIG.remove(cookie);
    if !proxied {
        return;
    }
    if let Some(tuple) = tuple(ctx) {
        let _ = ORIG_DST.remove(tuple);
    }
}

/// The connection as this (client) socket sees it.
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> Option<SockTuple> {
    // Every field is read up front: branching on the family first lets LLVM pick a field
    // *address*, and the verifier rejects context reads at computed offsets.
    // SAFETY: the context pointer is valid for the program's run.
    let ops = unsafe { &*ctx.ops };
    let (local4, remote4) = (volatile(&ops.local_ip4), volatile(&ops.remote_ip4));
    let local6 = [0, 1, 2, 3].map(|i| volatile(&ops.local_ip6[i]));
    let remote6 = [0, 1, 2, 3].map(|i| volatile(&ops.remote_ip6[i]));
    let (local_port, remote_port) = (volatile(&ops.local_port), volatile(&ops.remote_port));
    let (local, remote) = match volatile(&ops.family) {
        AF_INET => (v4_mapped(local4), v4_mapped(remote4)),
        AF_INET6 => (local6, remote6),
        _ => return None,
    };
    Some(SockTuple {
        local,
        remote,
        local_port: local_port as u16,
        // remote_port is a be16 shifted into the upper half of the word.
        remote_port: u32::from_be(remote_port) as u16,
    })
}

/// Answers the forwarder's `getsockopt(SOL_TCP, ORIG_DST_SOCKOPT)` on its accepted sockets
/// (what conntrack's `SO_ORIGINAL_DST` is after a REDIRECT); every other call passes through
/// untouched.
pub fn getsockopt(ctx: &SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_TCP || so.optname != ORIG_DST_SOCKOPT {
        return 1;
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return 1;
    }
    // The accepted socket's remote end is the client's local end, and vice versa. All fields
    // are read before branching (see `established`).
    // SAFETY: `sk` was checked non-null.
    let sk = unsafe { &*sk };
    let (dst4, src4) = (volatile(&sk.dst_ip4), volatile(&sk.src_ip4));
    let dst6 = [0, 1, 2, 3].map(|i| volatile(&sk.dst_ip6[i]));
    let src6 = [0, 1, 2, 3].map(|i| volatile(&sk.src_ip6[i]));
    let (dst_port, src_port) = (volatile(&sk.dst_port), volatile(&sk.src_port));
    let family = volatile(&sk.family);
    let (client, forwarder): (Addr, Addr) = match family {
        AF_INET => (v4_mapped(dst4), v4_mapped(src4)),
        AF_INET6 => (dst6, src6),
        _ => return 1,
    };
    let tuple = SockTuple {
        local: client,
        remote: forwarder,
        local_port: u16::from_be(dst_port),
        remote_port: src_port as u16,
    };
    // SAFETY: the value is copied out at once.
    let Some(vip) = (unsafe { ORIG_DST.get(tuple) }).copied() else {
        return 1;
    };
    let start = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    let written = if family == AF_INET {
        write_sockaddr_in(start, end, &vip)
    } else {
        write_sockaddr_in6(start, end, &vip)
    };
    let Some(len) = written else {
        return 1;
    };
    // Read once: the forwarder asks once per connection.
    let _ = ORIG_DST.remove(tuple);
    bump(Counter::OrigDstAnswered);
    // Volatile: LLVM would otherwise merge these two adjacent u32 stores into one 8-byte store
    // to the context, which the verifier rejects.
    unsafe {
        core::ptr::write_volatile(&mut so.optlen, len);
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    1
}

#[inline(always)]
fn volatile<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is always valid to read.
    unsafe { core::ptr::read_volatile(field) }
}

/// `struct sockaddr_in { u16 family; be16 port; be32 addr; u8 zero[8]; }`
#[inline(always)]
fn write_sockaddr_in(start: *mut u8, end: *mut u8, vip: &Endpoint) -> Option<i32> {
    const LEN: usize = 16;
    if start.is_null() || (start as usize) + LEN > end as usize {
        return None;
    }
    // SAFETY: bounds checked against optval_end above.
    unsafe {
        (start as *mut u16).write_unaligned(AF_INET as u16);
        (start.add(2) as *mut u16).write_unaligned(vip.port.to_be());
        (start.add(4) as *mut u32).write_unaligned(vip.addr[3]);
        (start.add(8) as *mut u64).write_unaligned(0);
    }
    Some(LEN as i32)
}

/// `struct sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16]; u32 scope_id; }`
#[inline(always)]
fn write_sockaddr_in6(start: *mut u8, end: *mut u8, vip: &Endpoint) -> Option<i32> {
    const LEN: usize = 28;
    if start.is_null() || (start as usize) + LEN > end as usize {
        return None;
    }
    // SAFETY: bounds checked against optval_end above.
    unsafe {
        (start as *mut u16).write_unaligned(AF_INET6 as u16);
        (start.add(2) as *mut u16).write_unaligned(vip.port.to_be());
        (start.add(4) as *mut u32).write_unaligned(0);
        (start.add(8) as *mut u32).write_unaligned(vip.addr[0]);
        (start.add(12) as *mut u32).write_unaligned(vip.addr[1]);
        (start.add(16) as *mut u32).write_unaligned(vip.addr[2]);
        (start.add(20) as *mut u32).write_unaligned(vip.addr[3]);
        (start.add(24) as *mut u32).write_unaligned(0);
    }
    Some(LEN as i32)
}

/// An application asking for its peer sees the service address, not the backend.
#[inline(always)]
pub fn getpeername<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let v6 = V6;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { SOCK_ORIG.get(cookie) }).copied() else {
        return 1;
    };
    let sa = unsafe { &mut *ctx.sock_addr };
    if v6 {
        sa.user_ip6[0] = orig.vip.addr[0];
        sa.user_ip6[1] = orig.vip.addr[1];
        sa.user_ip6[2] = orig.vip.addr[2];
        sa.user_ip6[3] = orig.vip.addr[3];
    } else {
        sa.user_ip4 = orig.vip.addr[3];
    }
    sa.user_port = orig.vip.port.to_be() as u32;
    1
}

/// A UDP reply from a backend this socket reached through a service address is shown as coming
/// from the service address (runs only when the application asks for the source).
#[inline(always)]
pub fn recvmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let from = if V6 {
        [
            volatile(&sa.user_ip6[0]),
            volatile(&sa.user_ip6[1]),
            volatile(&sa.user_ip6[2]),
            volatile(&sa.user_ip6[3]),
        ]
    } else {
        v4_mapped(volatile(&sa.user_ip4))
    };
    let key = RevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: from,
        port: u16::from_be(volatile(&sa.user_port) as u16),
        _pad: [0; 6],
    };
    // SAFETY: the value is copied out at once.
    let Some(vip) = (unsafe { REV_NAT.get(key) }).copied() else {
        return 1;
    };
    if V6 {
        sa.user_ip6[0] = vip.addr[0];
        sa.user_ip6[1] = vip.addr[1];
        sa.user_ip6[2] = vip.addr[2];
        sa.user_ip6[3] = vip.addr[3];
    } else {
        sa.user_ip4 = vip.addr[3];
    }
    sa.user_port = vip.port.to_be() as u32;
    bump(Counter::RecvTranslated);
    1
}
