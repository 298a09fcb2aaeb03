//! The connections each forwarder thread serves, listed where that thread's own task can
//! reach them: the exit's cut and a backend's drain deadline close them from that one task.
//! Watched from every connection instead (two channel subscriptions, each registered, polled
//! at each of the connection's wake-ups and dropped), they cost every connection for events
//! that come at most a few times in the agent's life.
//!
//! A list per thread, not one shared: a connection's task never leaves the thread that
//! accepted it (one single-threaded runtime per core), so its entry is only ever touched
//! there, without a lock, and a descriptor in the list is always the live connection's.

use std::{
    cell::RefCell,
    net::SocketAddr,
    os::fd::{BorrowedFd, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use slab::Slab;
use tokio::task::AbortHandle;
use tracing::info;

use super::exit::Exit;
use crate::health::{BackendHealth, board};

struct Entry {
    client: RawFd,
    abort: Option<AbortHandle>,
    /// Set once the copy begins: the backend whose drain deadline ends the connection.
    backend: Option<(Arc<BackendHealth>, SocketAddr)>,
}

thread_local! {
    static CONNS: RefCell<Slab<Entry>> = const { RefCell::new(Slab::new()) };
}

/// A connection's place in its thread's list, taken out when it is dropped (the connection
/// ended, or was cut, on this thread).
pub struct Listed(usize);

impl Listed {
    /// Lists the connection whose client socket is `client`.
    pub fn new(client: RawFd) -> Listed {
        Listed(CONNS.with_borrow_mut(|c| {
            c.insert(Entry {
                client,
                abort: None,
                backend: None,
            })
        }))
    }

    pub fn key(&self) -> usize {
        self.0
    }
}

/// The connection listed at `key` began its copy on `backend`: that backend's drain deadline
/// now ends it.
pub fn copying_to(key: usize, backend: &Arc<BackendHealth>, peer: SocketAddr) {
    CONNS.with_borrow_mut(|c| {
        if let Some(e) = c.get_mut(key) {
            e.backend = Some((backend.clone(), peer));
        }
    });
    if backend.draining() {
        board::drains_changed();
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        // `try_remove`: a thread-local being torn down at thread exit has nothing left.
        let _ = CONNS.try_with(|c| c.borrow_mut().try_remove(self.0));
    }
}

/// How to abort the task of the connection listed at `key` (set right after its spawn; if
/// the task is already gone, nothing is listed there).
pub fn set_abort(key: usize, abort: AbortHandle) {
    CONNS.with_borrow_mut(|c| {
        if let Some(e) = c.get_mut(key) {
            e.abort = Some(abort);
        }
    });
}

/// Resets and aborts every connection of this thread; how many.
fn cut_all() -> u64 {
    CONNS.with_borrow_mut(|c| {
        let mut n = 0;
        for (_, e) in c.iter_mut() {
            if let Some(abort) = e.abort.take() {
                // SAFETY: the entry's task owns the socket and is still alive (it takes its
                // entry out when it ends, on this thread, and it runs only after this).
                let fd = unsafe { BorrowedFd::borrow_raw(e.client) };
                // A cut-off stream must not look complete.
                let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                abort.abort();
                n += 1;
            }
        }
        n
    })
}

/// Aborts this thread's connections whose backend's drain deadline has passed (their sockets
/// close with a FIN, as at the end of a copy); the earliest deadline still to come.
fn close_drained(now: Instant) -> Option<Instant> {
    CONNS.with_borrow_mut(|c| {
        let mut next: Option<Instant> = None;
        for (_, e) in c.iter_mut() {
            let Some((backend, peer)) = &e.backend else {
                continue;
            };
            let Some(at) = backend.drain_at() else {
                continue;
            };
            if at > now {
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            if let Some(abort) = e.abort.take() {
                backend
                    .counters
                    .drained_closed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(backend = %backend.addr, %peer, "drain deadline: connection closed");
                abort.abort();
            }
        }
        next
    })
}

/// This thread's sweep: closes its connections at their backends' drain deadlines, and all of
/// them at the exit's cut (then any that start after it too).
pub async fn sweep(exit: &Exit) {
    let mut drains = board::drains();
    let mut cut = exit.cut_signal();
    let mut next: Option<Instant> = None;
    loop {
        let deadline = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cut.wait_for(|c| *c) => break,
            _ = drains.changed() => {}
            _ = deadline => {}
        }
        next = close_drained(Instant::now());
    }
    loop {
        exit.count_cut(cut_all());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, os::fd::AsRawFd as _};

    use super::*;
    use crate::forwarder::exit::Drained;

    #[tokio::test]
    async fn the_drain_waits_for_connections_then_the_sweep_cuts_the_rest() {
        let exit = Arc::new(Exit::default());
        let sweeping = exit.clone();
        tokio::spawn(async move { sweep(&sweeping).await });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let accepted = tokio::net::TcpStream::from_std(accepted).unwrap();
        let listed = Listed::new(accepted.as_raw_fd());
        let key = listed.key();
        let e = exit.clone();
        let task = tokio::spawn(async move {
            let _listed = listed;
            let _open = e.open();
            let _keep = accepted;
            std::future::pending::<()>().await
        });
        set_abort(key, task.abort_handle());
        // One turn of this single-threaded runtime runs the sweep and the task to their waits.
        tokio::task::yield_now().await;
        assert_eq!(exit.open_now(), 1);
        let drained = exit.drain(Duration::from_millis(100)).await;
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(
            drained,
            Drained {
                open_at_start: 1,
                cut: 1
            }
        );
        assert_eq!(
            CONNS.with_borrow(Slab::len),
            0,
            "the entry left with its task"
        );
        // Reset, not a clean end of stream.
        let mut c = client;
        let got = c.read(&mut [0u8; 8]);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
    }
}
