//! The state a stand-in's request handlers and its test-facing methods share: one store behind
//! a lock, and a signal that wakes the watches and blocking queries waiting for a change.

use std::{
    sync::{Condvar, Mutex, MutexGuard},
    time::Duration,
};

#[derive(Default)]
pub struct Shared<S> {
    store: Mutex<S>,
    changed: Condvar,
}

impl<S> Shared<S> {
    /// The store (a handler that panicked leaves it as it was).
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes everyone waiting for a change.
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Gives the store up until a change or for at most `limit`, then takes it again.
    pub fn wait<'a>(&self, store: MutexGuard<'a, S>, limit: Duration) -> MutexGuard<'a, S> {
        self.changed
            .wait_timeout(store, limit)
            .map_or_else(|e| e.into_inner().0, |(guard, _)| guard)
    }
}
