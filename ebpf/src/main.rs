//! Switchyard's kernel side: cgroup socket hooks that steer connections to service addresses.
//!
//! - `connect4/6`: look the destination up; rewrite it to a backend (kernel mode) or to the
//!   node's forwarder (proxy mode), or refuse at once when the service has nothing usable.
//! - `sock_ops`: when a proxied connection is established, file its original destination
//!   under the connection's 4-tuple; for kernel-mode connections, count each backend's
//!   connections, failures and connect time, and eject failing backends (`learn`).
//! - `getsockopt`: answer the forwarder's question for the original destination from that entry.
//! - `getpeername4/6`: show the application the service address it asked for.
//! - `sendmsg4/6`, `recvmsg4/6`: the same for unconnected UDP, per datagram; replies appear to
//!   come from the service address.
#![no_std]
#![no_main]
// Atomic add and compare-and-swap on map values (see `learn`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod learn;
mod maps;
mod origdst;
mod steer;

use aya_ebpf::{
    macros::{cgroup_sock_addr, cgroup_sockopt, sock_ops},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};

#[cgroup_sock_addr(connect4)]
pub fn sy_connect4(ctx: SockAddrContext) -> i32 {
    steer::connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sy_connect6(ctx: SockAddrContext) -> i32 {
    steer::connect::<true>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sy_sendmsg4(ctx: SockAddrContext) -> i32 {
    steer::sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sy_sendmsg6(ctx: SockAddrContext) -> i32 {
    steer::sendmsg::<true>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sy_recvmsg4(ctx: SockAddrContext) -> i32 {
    origdst::recvmsg::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sy_recvmsg6(ctx: SockAddrContext) -> i32 {
    origdst::recvmsg::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sy_getpeername4(ctx: SockAddrContext) -> i32 {
    origdst::getpeername::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sy_getpeername6(ctx: SockAddrContext) -> i32 {
    origdst::getpeername::<true>(&ctx)
}

#[sock_ops]
pub fn sy_sockops(ctx: SockOpsContext) -> u32 {
    learn::sockops(&ctx);
    origdst::sockops(&ctx)
}

#[cgroup_sockopt(getsockopt)]
pub fn sy_getsockopt(ctx: SockoptContext) -> i32 {
    origdst::getsockopt(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
