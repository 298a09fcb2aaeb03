//! A connection's hold on its backend, as a guard: the backend's and the service's active
//! counts go up when the connection takes the backend and come down when the guard drops,
//! however the connection ends (closed, aborted, retried on another backend, or its task
//! cancelled). Once the backend keeps the connection ([`Occupancy::open`]), the drop also
//! counts it closed, with its bytes and its duration.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use super::{copy::Moved, table::ServiceShared};
use crate::health::BackendHealth;

pub struct Occupancy<'a> {
    backend: &'a BackendHealth,
    service: &'a ServiceShared,
    /// When the backend kept the connection (the copy began).
    opened: Option<Instant>,
    /// The bytes the copy moves, counted on the backend at the end.
    pub moved: Moved,
}

impl<'a> Occupancy<'a> {
    /// Counts the connection on its backend and service at once: balancing must see it from
    /// the connect on, not only after the backend's first byte (a slow backend would look idle).
    pub fn take(backend: &'a BackendHealth, service: &'a ServiceShared) -> Self {
        backend.counters.active.fetch_add(1, Ordering::Relaxed);
        service.active.fetch_add(1, Ordering::Relaxed);
        Occupancy {
            backend,
            service,
            opened: None,
            moved: Moved::default(),
        }
    }

    /// The backend keeps the connection: it counts as opened, and its end as closed.
    /// `now`: the clock, as the caller has read it anyway.
    pub fn open_at(&mut self, now: Instant) {
        self.backend.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.opened = Some(now);
    }
}

impl Drop for Occupancy<'_> {
    fn drop(&mut self) {
        let counters = &self.backend.counters;
        if let Some(since) = self.opened {
            let moved = &self.moved;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            counters
                .bytes_out
                .fetch_add(n(&moved.to_backend), Ordering::Relaxed);
            counters
                .bytes_in
                .fetch_add(n(&moved.to_client), Ordering::Relaxed);
            counters.closed.fetch_add(1, Ordering::Relaxed);
            counters.timings.closed(since);
        }
        counters.active.fetch_sub(1, Ordering::Relaxed);
        self.service.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection counted against its service's `max_connections` from admission on (before its
/// upstream connect, so a burst of concurrent connects cannot all pass the check); dropped, it
/// lets its place go.
pub struct Admission(Arc<ServiceShared>);

impl Admission {
    /// Takes a place if fewer than `max` are taken (no limit: always).
    pub fn take(service: &Arc<ServiceShared>, max: Option<u32>) -> Option<Self> {
        let max = max.map_or(u64::MAX, u64::from);
        service
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Admission(service.clone()))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::health::Board;

    #[test]
    fn admission_never_exceeds_the_limit_and_lets_go_on_drop() {
        let shared = Arc::new(ServiceShared::default());
        let held: Vec<Admission> = (0..10)
            .filter_map(|_| Admission::take(&shared, Some(3)))
            .collect();
        assert_eq!(held.len(), 3);
        drop(held);
        assert_eq!(shared.admitted.load(Ordering::Relaxed), 0);
        assert!(Admission::take(&shared, None).is_some());
    }

    #[tokio::test]
    async fn a_cancelled_connection_still_counts_its_end() {
        let board = Board::default();
        let backend = board.get(
            crate::test_helpers::service("s", "10.96.0.1:80", &[]).addr,
            "10.0.0.1:80".parse().unwrap(),
        );
        let service = Arc::new(ServiceShared::default());
        let (b, s) = (backend.clone(), service.clone());
        let task = tokio::spawn(async move {
            let mut held = Occupancy::take(&b, &s);
            held.open_at(std::time::Instant::now());
            held.moved.to_backend.store(5, Ordering::Relaxed);
            std::future::pending::<()>().await
        });
        while backend.counters.opened.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(service.active.load(Ordering::Relaxed), 1);
        task.abort();
        let _ = task.await;
        let c = &backend.counters;
        assert_eq!(c.active.load(Ordering::Relaxed), 0);
        assert_eq!(service.active.load(Ordering::Relaxed), 0);
        assert_eq!(c.closed.load(Ordering::Relaxed), 1);
        assert_eq!(c.bytes_out.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_connection_retried_elsewhere_is_not_counted_closed() {
        let board = Board::default();
        let backend = board.get(
            crate::test_helpers::service("s", "10.96.0.1:80", &[]).addr,
            "10.0.0.1:80".parse().unwrap(),
        );
        let service = ServiceShared::default();
        drop(Occupancy::take(&backend, &service));
        let c = &backend.counters;
        assert_eq!(c.active.load(Ordering::Relaxed), 0);
        assert_eq!(
            (
                c.opened.load(Ordering::Relaxed),
                c.closed.load(Ordering::Relaxed)
            ),
            (0, 0)
        );
    }
}
