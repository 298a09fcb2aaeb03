//! Per-backend health and counters, node-wide.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::{catalog::ServiceAddr, defaults};

/// Counters of one backend of one service.
#[derive(Debug, Default)]
pub struct Counters {
    pub active: AtomicU64,
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub connect_failures: AtomicU64,
    pub connect_timeouts: AtomicU64,
    pub resets: AtomicU64,
    pub ejections: AtomicU64,
    pub drained_closed: AtomicU64,
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Connect latency and connection duration histograms (exported by the metrics).
    pub timings: super::Timings,
}

/// The active checks' verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    /// Not checked (no health check configured) or not yet decided.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

#[derive(Debug, Default)]
struct Outlier {
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

#[derive(Debug)]
struct Ewma {
    cost_ns: f64,
    stamp: Instant,
}

#[derive(Debug)]
pub struct BackendHealth {
    pub service: ServiceAddr,
    pub addr: SocketAddr,
    pub counters: Counters,
    verdict: AtomicU8,
    /// Fast path of `is_ejected`: nonzero while an ejection may be running (no lock taken
    /// on every connection when nothing is ejected).
    ejected: std::sync::atomic::AtomicBool,
    /// Consecutive failures; reset by every success without a lock.
    consecutive: std::sync::atomic::AtomicU32,
    outlier: Mutex<Outlier>,
    ewma: Mutex<Ewma>,
    /// When the backend last became usable again (for slow start).
    returned_at: Mutex<Option<Instant>>,
    /// Set while the backend is draining (or removed): open connections close at this instant.
    drain: watch::Sender<Option<Instant>>,
    /// Mirrors `drain.is_some()` for the per-connection check, which would otherwise take
    /// the watch's lock. Written under that lock, before `drains_changed`.
    draining: std::sync::atomic::AtomicBool,
}

impl BackendHealth {
    fn new(service: ServiceAddr, addr: SocketAddr) -> Self {
        BackendHealth {
            service,
            addr,
            counters: Counters::default(),
            verdict: AtomicU8::new(Verdict::Unknown as u8),
            ejected: std::sync::atomic::AtomicBool::new(false),
            consecutive: std::sync::atomic::AtomicU32::new(0),
            outlier: Mutex::new(Outlier::default()),
            ewma: Mutex::new(Ewma {
                cost_ns: defaults::EWMA_DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            returned_at: Mutex::new(None),
            drain: watch::channel(None).0,
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn verdict(&self) -> Verdict {
        match self.verdict.load(Ordering::Relaxed) {
            1 => Verdict::Up,
            2 => Verdict::Down,
            _ => Verdict::Unknown,
        }
    }

    /// Returns whether the verdict changed.
    pub fn set_verdict(&self, v: Verdict) -> bool {
        let old = self.verdict.swap(v as u8, Ordering::Relaxed);
        if old == Verdict::Down as u8 && v == Verdict::Up {
            self.mark_returned();
        }
        old != v as u8
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        if !self.ejected.load(Ordering::Relaxed) {
            return false;
        }
        let mut o = lock(&self.outlier);
        match o.ejected_until {
            Some(t) if now < t => true,
            Some(_) => {
                o.ejected_until = None;
                self.ejected.store(false, Ordering::Relaxed);
                drop(o);
                info!(service = %self.service, backend = %self.addr, "ejection over: backend returns");
                self.mark_returned();
                false
            }
            None => false,
        }
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        lock(&self.outlier).ejected_until
    }

    fn mark_returned(&self) {
        *lock(&self.returned_at) = Some(Instant::now());
    }

    /// Weight scaled down for a while after the backend returns, so a recovered backend is not
    /// flooded at once (linear ramp over `slow_start`).
    pub fn effective_weight(&self, weight: u32, now: Instant, slow_start: Duration) -> u32 {
        let Some(since) = *lock(&self.returned_at) else {
            return weight;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= slow_start || slow_start.is_zero() {
            return weight;
        }
        let share = elapsed.as_secs_f64() / slow_start.as_secs_f64();
        ((weight as f64 * share).ceil() as u32).clamp(1, weight.max(1))
    }

    /// A connect succeeded after `rtt`.
    pub fn success(&self, rtt: Duration) {
        self.success_at(rtt, Instant::now());
    }

    /// [`success`](Self::success) with the time the sample ended, already read by the caller.
    pub fn success_at(&self, rtt: Duration, now: Instant) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.observe_at(rtt, now);
    }

    /// A latency sample (connect time, or time to the first response byte).
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt, Instant::now());
    }

    /// [`observe`](Self::observe) at `now`: each clock read is tens of nanoseconds on a
    /// paravirtualized clock, and a new connection reads it often.
    pub fn observe_at(&self, rtt: Duration, now: Instant) {
        let mut e = lock(&self.ewma);
        let sample = rtt.as_nanos() as f64;
        if sample > e.cost_ns {
            // Peak: jump up at once, decay down slowly.
            e.cost_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(e.stamp).as_secs_f64();
            let w = (-elapsed / defaults::EWMA_DECAY.as_secs_f64()).exp();
            e.cost_ns = e.cost_ns * w + sample * (1.0 - w);
        }
        e.stamp = now;
    }

    /// A connect failed (or the backend reset a connection). Returns true if this failure
    /// ejected the backend; `may_eject` says whether the service's ejection cap allows it.
    /// Each ejection lasts `base` times the number of ejections so far, capped.
    pub fn failure(&self, threshold: u32, base: Duration, may_eject: bool) -> bool {
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if consecutive < threshold || !may_eject {
            return false;
        }
        let mut o = lock(&self.outlier);
        if o.ejected_until.is_some() {
            return false;
        }
        o.times_ejected += 1;
        let time = (base * o.times_ejected).min(defaults::OUTLIER_MAX_EJECTION.max(base));
        o.ejected_until = Some(Instant::now() + time);
        self.ejected.store(true, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        self.counters.ejections.fetch_add(1, Ordering::Relaxed);
        warn!(
            service = %self.service,
            backend = %self.addr,
            seconds = time.as_secs(),
            times = o.times_ejected,
            "backend ejected after {threshold} consecutive failures"
        );
        true
    }

    /// The peak-EWMA cost, decayed for the time since the last sample: a backend avoided for
    /// being slow is tried again once its cost has decayed (linkerd2-proxy does the same).
    pub fn latency_ns(&self) -> f64 {
        let e = lock(&self.ewma);
        let elapsed = e.stamp.elapsed().as_secs_f64();
        e.cost_ns * (-elapsed / defaults::EWMA_DECAY.as_secs_f64()).exp()
    }

    /// Starts (or keeps) a drain: open connections close at `now + timeout`.
    pub fn drain(&self, timeout: Duration) {
        let started = self.drain.send_if_modified(|d| {
            if d.is_some() {
                return false;
            }
            *d = Some(Instant::now() + timeout);
            // Under the watch's lock, so that a concurrent undrain cannot reorder the two.
            self.draining.store(true, Ordering::SeqCst);
            true
        });
        if started {
            drains_changed();
        }
    }

    /// Ends a drain (the backend is ready again).
    pub fn undrain(&self) {
        let ended = self.drain.send_if_modified(|d| {
            self.draining.store(false, Ordering::SeqCst);
            d.take().is_some()
        });
        if ended {
            drains_changed();
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// When open connections to this backend close, if it is draining.
    pub fn drain_at(&self) -> Option<Instant> {
        *self.drain.borrow()
    }

    /// Resolves when this backend's drain deadline passes (never, if it is not draining).
    pub async fn drain_deadline(&self) {
        let mut rx = self.drain.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            match deadline {
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t.into()) => return,
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
                None => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// Bumped whenever any backend's drain deadline is set or lifted: the forwarder's threads then
/// look at their connections again (one watch for the node, not one per connection).
static DRAINS: std::sync::LazyLock<watch::Sender<()>> =
    std::sync::LazyLock::new(|| watch::Sender::new(()));

/// Tells whoever watches [`drains`] that a drain deadline changed, or that a connection began
/// on a draining backend.
pub fn drains_changed() {
    DRAINS.send_replace(());
}

/// Changes of any backend's drain deadline.
pub fn drains() -> watch::Receiver<()> {
    DRAINS.subscribe()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every backend's health, node-wide, plus a signal for verdict changes the kernel must learn.
#[derive(Default)]
pub struct Board {
    backends: Mutex<HashMap<(ServiceAddr, SocketAddr), Arc<BackendHealth>>>,
    /// Fired when an active check's verdict changes.
    pub changed: Notify,
}

impl Board {
    pub fn get(&self, service: ServiceAddr, addr: SocketAddr) -> Arc<BackendHealth> {
        lock(&self.backends)
            .entry((service, addr))
            .or_insert_with(|| Arc::new(BackendHealth::new(service, addr)))
            .clone()
    }

    /// The backend's entry if there is one (unlike [`Board::get`], never creates it).
    pub fn find(&self, service: ServiceAddr, addr: SocketAddr) -> Option<Arc<BackendHealth>> {
        lock(&self.backends).get(&(service, addr)).cloned()
    }

    /// Forgets backends no longer in the catalog; connections still holding one keep it (and
    /// its drain deadline) until they close.
    /// `keep` is asked about the board's entries only (a few per proxied or checked backend),
    /// never about the whole catalog.
    pub fn retain(
        &self,
        keep: impl Fn(&ServiceAddr, &SocketAddr) -> bool,
    ) -> Vec<Arc<BackendHealth>> {
        let mut map = lock(&self.backends);
        let gone: Vec<(ServiceAddr, SocketAddr)> =
            map.keys().filter(|(s, a)| !keep(s, a)).copied().collect();
        gone.iter().filter_map(|k| map.remove(k)).collect()
    }

    /// Backends the active checks hold down: the kernel stops choosing them.
    pub fn down(&self) -> HashSet<(ServiceAddr, SocketAddr)> {
        lock(&self.backends)
            .iter()
            .filter(|(_, h)| h.verdict() == Verdict::Down)
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn all(&self) -> Vec<Arc<BackendHealth>> {
        lock(&self.backends).values().cloned().collect()
    }
}
