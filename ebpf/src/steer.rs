//! Choosing where a `connect()` to a service address goes.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_set_retval,
        bpf_sk_release,
    },
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use switchyard_common::{
    addr::{is_v4_mapped, v4_mapped},
    counters::Counter,
    hash::client_hash,
    maps::*,
    Addr,
};

use crate::{learn, maps::*};

/// Cgroup hooks return 1 to let the call proceed, 0 to refuse it.
pub const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Where the destination should point after the hook.
struct Target {
    addr: Addr,
    port: u16,
    /// The backend chosen in kernel mode ([`NO_BACKEND`] for the forwarder).
    backend: BackendId,
}

const NO_BACKEND: BackendId = u32::MAX;

/// `V6`: the hook is `connect6`. A const, so each program gets its own straight-line code:
/// the verifier rejects context reads at computed offsets.
#[inline(always)]
pub fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    bump(Counter::Connect);
    steer::<V6, false>(ctx)
}

/// An unconnected UDP `sendto()`: translated per datagram, like a connect.
#[inline(always)]
pub fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    steer::<V6, true>(ctx)
}

#[inline(always)]
fn steer<const V6: bool, const SEND: bool>(ctx: &SockAddrContext) -> i32 {
    let v6 = V6;
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() {
        return ALLOW;
    }
    let own_mark = settings().map(|s| s.own_mark).unwrap_or(0);
    if own_mark != 0 && unsafe { (*sk).mark } == own_mark {
        bump(Counter::SkippedOwn);
        return ALLOW;
    }
    let vip = if v6 {
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    } else {
        v4_mapped(sa.user_ip4)
    };
    let key = ServiceKey {
        addr: vip,
        port: u16::from_be(sa.user_port as u16),
        proto: sa.protocol as u8,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return ALLOW;
    };
    bump(Counter::ServiceHit);
    if opted_out(key.port) {
        bump(Counter::OptedOut);
        return ALLOW;
    }

    let proxy_mode = svc.mode == mode::PROXY && key.proto == PROTO_TCP;
    // Proxy mode while no forwarder listens: balanced here, as kernel mode would.
    let fallback = proxy_mode && svc.slot_count != 0 && !forwarder_listening(&vip);
    let proxied = proxy_mode && !fallback;
    let target = if proxied {
        // Nothing usable (all drained, in maintenance or down): refuse here rather than hand
        // the forwarder a connection it can only reset.
        if svc.slot_count == 0 {
            None
        } else {
            forwarder(&vip)
        }
    } else {
        let client = client_addr(sk, v6);
        pick_backend(ctx, &svc, &client)
    };
    let Some(target) = target else {
        bump(Counter::FailFast);
        debug!(
            ctx,
            "service port {} has no usable backend: refused", key.port
        );
        // Refuse at once with a clear errno instead of letting the client time out.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    };
    if !v6 && !is_v4_mapped(&target.addr) {
        // An IPv4 socket cannot reach an IPv6 backend; the agent never writes such a pair.
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let vip_endpoint = Endpoint {
        addr: vip,
        port: key.port,
        _pad: 0,
    };
    if key.proto == PROTO_TCP {
        let orig = OrigDst {
            vip: vip_endpoint,
            // A fallback connection goes straight to its backend, as in kernel mode.
            mode: if proxied { mode::PROXY } else { mode::KERNEL },
            _pad: [0; 3],
        };
        let _ = SOCK_ORIG.insert(cookie, orig, 0);
        if !SEND && target.backend != NO_BACKEND {
            learn::file(cookie, target.backend);
        }
    } else {
        // Replies from this backend on this socket are shown as coming from the service.
        let rev = RevKey {
            cookie,
            addr: target.addr,
            port: target.port,
            _pad: [0; 6],
        };
        let _ = REV_NAT.insert(rev, vip_endpoint, 0);
    }
    if v6 {
        sa.user_ip6[0] = target.addr[0];
        sa.user_ip6[1] = target.addr[1];
        sa.user_ip6[2] = target.addr[2];
        sa.user_ip6[3] = target.addr[3];
    } else {
        sa.user_ip4 = target.addr[3];
    }
    // user_port is a be16 held in a u32 and must be written 4 bytes wide.
    sa.user_port = target.port.to_be() as u32;
    if SEND {
        bump(Counter::SendTranslated);
    } else if proxied {
        bump(Counter::Redirected);
    } else if fallback {
        bump(Counter::Fallback);
    } else {
        bump(Counter::Translated);
    }
    ALLOW
}

/// A sidecar's cgroup (or one of its ancestors) or a mesh's port is left alone.
#[inline(always)]
fn opted_out(port: u16) -> bool {
    // SAFETY: lookups only.
    if unsafe { OPT_OUT_PORTS.get(port as u32) }.is_some() {
        return true;
    }
    for level in 0..MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if unsafe { OPT_OUT_CGROUPS.get(id) }.is_some() {
            return true;
        }
    }
    false
}

/// Whether a forwarder socket listens for this family: the agent files one of its listening
/// sockets in `FORWARDER_LISTENERS`, and the kernel takes it out when the socket closes, so a
/// killed agent's entry is gone with its last descriptor (see docs/zero-downtime.md).
#[inline(always)]
fn forwarder_listening(vip: &Addr) -> bool {
    let index: u32 = if is_v4_mapped(vip) {
        LISTENER_V4
    } else {
        LISTENER_V6
    };
    let map = core::ptr::from_ref(&FORWARDER_LISTENERS).cast_mut().cast();
    // SAFETY: a lookup in a sockmap returns a referenced socket or null; the reference is
    // given back at once.
    let sk = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref(&index).cast()) };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk) };
    true
}

/// The node forwarder for this family; v4-mapped service addresses use the IPv4 forwarder.
#[inline(always)]
fn forwarder(vip: &Addr) -> Option<Target> {
    let s = settings()?;
    let fw = if is_v4_mapped(vip) {
        &s.forwarder4
    } else {
        &s.forwarder6
    };
    if fw.port == 0 {
        return None;
    }
    Some(Target {
        addr: fw.addr,
        port: fw.port,
        backend: NO_BACKEND,
    })
}

#[inline(always)]
fn client_addr(sk: *mut aya_ebpf::bindings::bpf_sock, v6: bool) -> Addr {
    // SAFETY: `sk` was checked non-null by the caller.
    unsafe {
        if v6 {
            [
                (*sk).src_ip6[0],
                (*sk).src_ip6[1],
                (*sk).src_ip6[2],
                (*sk).src_ip6[3],
            ]
        } else {
            v4_mapped((*sk).src_ip4)
        }
    }
}

#[inline(always)]
fn pick_backend(ctx: &SockAddrContext, svc: &ServiceValue, client: &Addr) -> Option<Target> {
    if svc.slot_count == 0 {
        return None;
    }
    let sticky = svc.flags & service_flags::AFFINITY != 0;
    let netns = if sticky || svc.algorithm == algorithm::MAGLEV {
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    } else {
        0
    };
    let affinity_key = AffinityKey {
        service: svc.id,
        _pad: 0,
        netns,
        addr: *client,
    };
    let now = if sticky {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if sticky {
        if let Some(target) = sticky_backend(&affinity_key, svc.affinity_timeout_s, now) {
            bump(Counter::AffinityHit);
            return Some(target);
        }
    }
    let index = match svc.algorithm {
        // Load-aware: `learned_pick` draws its own candidates.
        algorithm::LEAST_CONNECTIONS | algorithm::PEAK_EWMA => 0,
        algorithm::ROUND_ROBIN => match RR.get_ptr_mut(svc.id) {
            // The BPF target has no fetch-and-add in Rust: a plain increment is exact for one
            // CPU at a time; two CPUs connecting in the same instant may share a position.
            // SAFETY: an aligned u64 in an array map.
            Some(p) => unsafe {
                let position = *p;
                *p = position.wrapping_add(1);
                position
            },
            None => 0,
        },
        algorithm::MAGLEV => client_hash(netns, client),
        _ => (unsafe { bpf_get_prandom_u32() }) as u64,
    };
    let id = learned_pick(svc, index)?;
    let backend = *unsafe { BACKENDS.get(id) }?;
    if sticky {
        let value = AffinityValue {
            backend: id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(affinity_key, value, 0);
    }
    Some(Target {
        addr: backend.addr,
        port: backend.port,
        backend: id,
    })
}

/// The backend for a fresh pick: the load-aware algorithms choose by the programs' counts;
/// the others take the slot at `index`, stepping over ejected backends.
#[inline(always)]
fn learned_pick(svc: &ServiceValue, index: u64) -> Option<BackendId> {
    match svc.algorithm {
        algorithm::LEAST_CONNECTIONS => learn::p2c(svc, false),
        algorithm::PEAK_EWMA => learn::p2c(svc, true),
        _ => learn::skip_ejected(svc, index),
    }
}

/// The client's previous backend, if it was used within the timeout, is still one of this
/// service's backends (ids are reused once a backend goes, and entries outlive it) and is ready.
#[inline(always)]
fn sticky_backend(key: &AffinityKey, timeout_s: u32, now: u64) -> Option<Target> {
    let entry = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: the entry stays valid for this run (RCU); a racing update only changes the time.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_used_ns) > timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    let member = MemberKey {
        service: key.service,
        backend: entry.backend,
    };
    MEMBERS.get_ptr(member)?;
    let backend = *unsafe { BACKENDS.get(entry.backend) }?;
    if backend.state != state::READY {
        return None;
    }
    entry.last_used_ns = now;
    Some(Target {
        addr: backend.addr,
        port: backend.port,
        backend: entry.backend,
    })
}
