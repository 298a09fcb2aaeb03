//! Kernel mode that learns: the programs count each backend's connections themselves and use
//! the counts at the next `connect()`, with no agent in the loop.
//!
//! - `connect4/6` files the chosen backend under the socket's cookie ([`file`]).
//! - `sock_ops` follows the socket: `TCP_CONNECT_CB` (SYN out: connecting +1, and asks for the
//!   state and retransmission callbacks), `ACTIVE_ESTABLISHED_CB` (connecting −1, active +1,
//!   the connect time into the peak EWMA), `RTO_CB` in `SYN_SENT` (a SYN sent again: counts as
//!   the connect's failure at once), `STATE_CB` to `CLOSE` (active −1, or a failed connect).
//! - After the service's `failures` consecutive failed connects, the backend is ejected: picks
//!   skip it until `ejected_until_ns`, each ejection longer, at most a share of the slots out
//!   at once; a pick that finds only ejected backends takes one anyway (the panic rule).
//! - `least_connections` and `peak_ewma` are power of two choices over the slots on these
//!   counts, per weight.
//!
//! Counters change by atomic adds on the shared entry (exact on every CPU); an ejection is
//! claimed with a compare-and-swap, so two CPUs failing at once eject once. The EWMA is a
//! plain read-modify-write: two samples in the same instant may keep only one.

use core::{
    intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering::Relaxed},
    ptr::addr_of_mut,
};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockOpsContext,
    EbpfContext,
};
use switchyard_common::maps::*;

use crate::maps::*;

const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
/// Picks tried before the panic rule takes an ejected backend anyway. With at most half the
/// slots ejected, eight draws all landing on ejected ones happens about once in 256 picks on a
/// large service, never on one of eight slots or fewer (the draws cover them all).
const TRIES: u32 = 8;
/// Rounds of two draws for the power of two choices (eight candidates, as [`TRIES`]).
const ROUNDS: u32 = 4;
/// Stride between tries: a prime above any slot count, so the tries visit distinct slots and
/// step over a weight's run of equal slots.
const STRIDE: u64 = 65_537;

#[inline(always)]
fn add(field: *mut u64, n: u64) {
    // SAFETY: `field` points into a map value, valid for the program's run. The result is not
    // used, so this is a plain atomic add (`lock xadd`) that every BPF CPU version has. (The
    // BPF target has no `AtomicU64::fetch_add`: it declares no compare-and-swap.)
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(field, n) };
}

#[inline(always)]
fn sub(field: *mut u64) {
    add(field, u64::MAX);
}

#[inline(always)]
fn read(field: *const u64) -> u64 {
    // SAFETY: as for `add`; volatile so each read really happens (other CPUs write it).
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn write(field: *mut u64, v: u64) {
    // SAFETY: as for `add`.
    unsafe { core::ptr::write_volatile(field, v) }
}

/// The backend's entry, if the agent made one.
#[inline(always)]
fn stats(id: BackendId) -> Option<*mut BackendStats> {
    BACKEND_STATS.get_ptr_mut(id)
}

/// Files the backend `connect()` chose for a kernel-mode TCP socket.
#[inline(always)]
pub fn file(cookie: u64, backend: BackendId) {
    let Some(s) = stats(backend) else {
        return;
    };
    let entry = SockLearn {
        backend,
        flags: 0,
        generation: read(unsafe { addr_of_mut!((*s).generation) }),
        started_ns: 0,
    };
    let _ = SOCK_LEARN.insert(cookie, entry, 0);
}

/// Whether connects skip this backend now.
#[inline(always)]
pub fn ejected(id: BackendId, now: u64) -> bool {
    match stats(id) {
        Some(s) => read(unsafe { addr_of_mut!((*s).ejected_until_ns) }) > now,
        None => false,
    }
}

#[inline(always)]
fn slot(svc: &ServiceValue, i: u32) -> Option<BackendId> {
    let key = SlotKey {
        service: svc.id,
        slot: svc.slot_base + i,
    };
    // SAFETY: copied out at once.
    unsafe { SLOTS.get(key) }.copied()
}

/// The slot at `index` or, if its backend is ejected, the next of up to [`TRIES`] slots (a
/// stride apart: a consistent-hash client fails over to the same next entry every time) whose
/// backend is not. All ejected: the first (panic rule).
#[inline(always)]
pub fn skip_ejected(svc: &ServiceValue, index: u64) -> Option<BackendId> {
    let count = svc.slot_count as u64;
    let first = slot(svc, (index % count) as u32)?;
    let now = unsafe { bpf_ktime_get_ns() };
    if !ejected(first, now) {
        return Some(first);
    }
    let mut i = 1;
    while i < TRIES {
        let at = (index + i as u64 * STRIDE) % count;
        if let Some(id) = slot(svc, at as u32) {
            if !ejected(id, now) {
                return Some(id);
            }
        }
        i += 1;
    }
    Some(first)
}

/// One draw of the power of two choices, with what its cost needs.
struct Candidate {
    id: BackendId,
    /// Connections in progress and open.
    load: u64,
    /// Peak EWMA decayed to now, in microseconds (at least 1).
    ewma_us: u64,
    weight: u64,
    ejected: bool,
}

#[inline(always)]
fn candidate(svc: &ServiceValue, i: u32, now: u64) -> Option<Candidate> {
    let id = slot(svc, i)?;
    // SAFETY: copied out at once.
    let weight = unsafe { BACKENDS.get(id) }.map_or(1, |b| b.weight.max(1) as u64);
    let Some(s) = stats(id) else {
        return Some(Candidate {
            id,
            load: 0,
            ewma_us: 1,
            weight,
            ejected: false,
        });
    };
    let s = s as *const BackendStats;
    let load = read(unsafe { &(*s).connecting }).wrapping_add(read(unsafe { &(*s).active }));
    let decayed = decayed_cost(s, now);
    Some(Candidate {
        id,
        // A count that went below zero (a socket filed before a restart wiped the entry)
        // must not look like a huge load.
        load: if load > u32::MAX as u64 { 0 } else { load },
        ewma_us: (decayed >> 10).max(1),
        weight,
        ejected: read(unsafe { &(*s).ejected_until_ns }) > now,
    })
}

/// The cost as picks see it at `now`: the stored EWMA decayed by the time since it was set.
#[inline(always)]
fn decayed_cost(s: *const BackendStats, now: u64) -> u64 {
    let cost = read(unsafe { &(*s).ewma_ns });
    let stamp = read(unsafe { &(*s).ewma_stamp_ns });
    (cost * decay_1024(now.saturating_sub(stamp))) >> 10
}

/// Whether `b` costs less than `a` (costs per weight, compared by cross-multiplying).
#[inline(always)]
fn cheaper(a: &Candidate, b: &Candidate, peak: bool) -> bool {
    if peak {
        let ca = a.ewma_us * (a.load + 1) * b.weight;
        let cb = b.ewma_us * (b.load + 1) * a.weight;
        cb < ca
    } else {
        let ca = (a.load + 1) * b.weight;
        let cb = (b.load + 1) * a.weight;
        // Equal counts (frequent at low load) go to the faster backend.
        cb < ca || (cb == ca && b.ewma_us < a.ewma_us)
    }
}

/// Power of two choices over the service's slots (one per usable backend): two distinct slots
/// at random, the cheaper wins; an ejected one loses; both ejected, draw again.
#[inline(always)]
pub fn p2c(svc: &ServiceValue, peak: bool) -> Option<BackendId> {
    let n = svc.slot_count;
    if n == 1 {
        return slot(svc, 0);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let mut fallback = None;
    let mut round = 0;
    while round < ROUNDS {
        let a = unsafe { bpf_get_prandom_u32() } % n;
        let b = (a + 1 + unsafe { bpf_get_prandom_u32() } % (n - 1)) % n;
        let ca = candidate(svc, a, now)?;
        let cb = candidate(svc, b, now)?;
        if fallback.is_none() {
            fallback = Some(ca.id);
        }
        match (ca.ejected, cb.ejected) {
            (false, false) => {
                return Some(if cheaper(&ca, &cb, peak) {
                    cb.id
                } else {
                    ca.id
                })
            }
            (false, true) => return Some(ca.id),
            (true, false) => return Some(cb.id),
            (true, true) => {}
        }
        round += 1;
    }
    fallback
}

/// `e^(-elapsed / EWMA_DECAY)` in 1/1024ths: `2^(-x·log2 e)`, whole halvings as a shift and
/// the fraction by the chord `1 - f/2` (within 4 % of the exponential).
#[inline(always)]
fn decay_1024(elapsed_ns: u64) -> u64 {
    // Elapsed in 1/1024ths of the decay time, times log2(e) ≈ 1477/1024.
    let k = ((elapsed_ns / (EWMA_DECAY_NS >> 10)) * 1477) >> 10;
    let halvings = k >> 10;
    if halvings >= 11 {
        return 0;
    }
    (1024 - (k & 1023) / 2) >> halvings
}

/// The sock_ops side: runs for every TCP socket of the attached cgroup, before the original
/// destination bookkeeping (which removes `SOCK_ORIG` at close; the ejection cap needs it).
#[inline(always)]
pub fn sockops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(ctx),
        BPF_SOCK_OPS_RTO_CB => retransmit(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => closed(ctx),
        _ => {}
    }
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The socket's entry and its backend's, if that backend is still the one it was filed under.
#[inline(always)]
fn filed(ctx: &SockOpsContext) -> Option<(*mut SockLearn, Option<*mut BackendStats>)> {
    let l = SOCK_LEARN.get_ptr_mut(cookie(ctx))?;
    let (backend, generation) = unsafe { ((*l).backend, (*l).generation) };
    let s = stats(backend).filter(|&s| read(unsafe { &(*s).generation }) == generation);
    Some((l, s))
}

fn connecting(ctx: &SockOpsContext) {
    let Some((l, s)) = filed(ctx) else {
        // A proxied socket: ask for the state callback now, so its original-destination
        // entry also goes when the connect fails (not only once established).
        // SAFETY: a lookup only.
        if unsafe { SOCK_ORIG.get(cookie(ctx)) }.is_some() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        return;
    };
    // The state callback sees SYN_SENT → CLOSE (a failed connect) and the close of an
    // established one; the RTO callback sees a SYN sent again. Only from here on: flags set
    // later would miss a connect that fails at once.
    let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the entry stays valid for this run.
    unsafe {
        (*l).started_ns = now;
        (*l).flags = sock_learn::CONNECTING;
    }
    if let Some(s) = s {
        add(unsafe { addr_of_mut!((*s).connecting) }, 1);
        add(unsafe { addr_of_mut!((*s).opened) }, 1);
    }
}

fn established(ctx: &SockOpsContext) {
    let Some((l, s)) = filed(ctx) else {
        return;
    };
    let (flags, started) = unsafe { ((*l).flags, (*l).started_ns) };
    if flags & sock_learn::CONNECTING == 0 {
        return;
    }
    unsafe { (*l).flags = (flags & !sock_learn::CONNECTING) | sock_learn::ESTABLISHED };
    let Some(s) = s else {
        return;
    };
    sub(unsafe { addr_of_mut!((*s).connecting) });
    add(unsafe { addr_of_mut!((*s).active) }, 1);
    add(unsafe { addr_of_mut!((*s).established) }, 1);
    write(unsafe { addr_of_mut!((*s).consecutive_failures) }, 0);
    let now = unsafe { bpf_ktime_get_ns() };
    observe(s, now.saturating_sub(started), now);
}

/// Peak EWMA: a slower sample is taken at once, a faster one blends in by the time since the
/// last (linkerd2-proxy's rule, as the forwarder's).
#[inline(always)]
fn observe(s: *mut BackendStats, sample: u64, now: u64) {
    let cost_p = unsafe { addr_of_mut!((*s).ewma_ns) };
    let stamp_p = unsafe { addr_of_mut!((*s).ewma_stamp_ns) };
    let cost = read(cost_p);
    let next = if sample > cost {
        sample
    } else {
        let w = decay_1024(now.saturating_sub(read(stamp_p)));
        (cost * w + sample * (1024 - w)) >> 10
    };
    write(cost_p, next);
    write(stamp_p, now);
}

/// A connect still not established after `elapsed` (its SYN sent again, or given up): its
/// handshake takes at least that long, so the cost rises to it at once. It never lowers the
/// cost: a refusal in a microsecond says nothing of how fast the backend answers.
#[inline(always)]
fn at_least(s: *mut BackendStats, elapsed: u64, now: u64) {
    // Against the cost as picks see it now (decayed), not the last stored value.
    if elapsed > decayed_cost(s, now) {
        write(unsafe { addr_of_mut!((*s).ewma_ns) }, elapsed);
        write(unsafe { addr_of_mut!((*s).ewma_stamp_ns) }, now);
    }
}

fn retransmit(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is valid for the program's run.
    let state = unsafe { core::ptr::read_volatile(&(*ctx.ops).state) };
    if state != TCP_SYN_SENT {
        return;
    }
    let Some((l, s)) = filed(ctx) else {
        return;
    };
    let flags = unsafe { (*l).flags };
    if flags & sock_learn::CONNECTING == 0 || flags & sock_learn::FAILURE_COUNTED != 0 {
        return;
    }
    unsafe { (*l).flags = flags | sock_learn::FAILURE_COUNTED };
    if let Some(s) = s {
        add(unsafe { addr_of_mut!((*s).syn_retransmits) }, 1);
        // Without this, a backend that drops SYNs would look cheap until a handshake
        // finally completed (seconds later, or never), and take every pick meanwhile.
        let now = unsafe { bpf_ktime_get_ns() };
        at_least(s, now.saturating_sub(unsafe { (*l).started_ns }), now);
        failure(ctx, s);
    }
}

fn closed(ctx: &SockOpsContext) {
    let Some((l, s)) = filed(ctx) else {
        return;
    };
    let flags = unsafe { (*l).flags };
    if let Some(s) = s {
        if flags & sock_learn::ESTABLISHED != 0 {
            sub(unsafe { addr_of_mut!((*s).active) });
            add(unsafe { addr_of_mut!((*s).closed) }, 1);
        } else if flags & sock_learn::CONNECTING != 0 {
            sub(unsafe { addr_of_mut!((*s).connecting) });
            add(unsafe { addr_of_mut!((*s).failed) }, 1);
            let now = unsafe { bpf_ktime_get_ns() };
            at_least(s, now.saturating_sub(unsafe { (*l).started_ns }), now);
            if flags & sock_learn::FAILURE_COUNTED == 0 {
                failure(ctx, s);
            }
        }
    }
    let _ = SOCK_LEARN.remove(cookie(ctx));
}

/// One more consecutive failure; ejects the backend at the service's threshold if the cap
/// allows.
fn failure(ctx: &SockOpsContext, s: *mut BackendStats) {
    let consecutive = unsafe { addr_of_mut!((*s).consecutive_failures) };
    add(consecutive, 1);
    let service = unsafe { (*s).service };
    let Some(policy) = OUTLIER.get(service).copied() else {
        return;
    };
    if policy.failures == 0 || read(consecutive) < policy.failures as u64 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let until_p = unsafe { addr_of_mut!((*s).ejected_until_ns) };
    let until = read(until_p);
    if until > now || !may_eject(ctx, &policy, now) {
        return;
    }
    let base = policy.base_ms as u64 * 1_000_000;
    let cap = (policy.max_ms as u64 * 1_000_000).max(base);
    let times = read(unsafe { &(*s).ejections }) + 1;
    let time = (base * times).min(cap);
    // SAFETY: as for `add`; the kernel runs BPF_CMPXCHG on every CPU version it accepts.
    let (_, claimed) =
        unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(until_p, until, now + time) };
    if claimed {
        add(unsafe { addr_of_mut!((*s).ejections) }, 1);
        write(consecutive, 0);
    }
}

/// Whether one more ejection keeps the service within `max_ejected_percent` of its slots
/// (judged on the first [`EJECTION_SCAN`] of them).
fn may_eject(ctx: &SockOpsContext, policy: &OutlierPolicy, now: u64) -> bool {
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { SOCK_ORIG.get(cookie(ctx)) }).copied() else {
        return false;
    };
    let key = ServiceKey {
        addr: orig.vip.addr,
        port: orig.vip.port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return false;
    };
    let total = svc.slot_count.min(EJECTION_SCAN);
    let mut out = 0u32;
    let mut i = 0;
    while i < EJECTION_SCAN {
        if i >= total {
            break;
        }
        if let Some(id) = slot(&svc, i) {
            if ejected(id, now) {
                out += 1;
            }
        }
        i += 1;
    }
    (out + 1) * 100 <= total * policy.max_ejected_percent
}
