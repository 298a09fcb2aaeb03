//! How the forwarder stops: it stops accepting (the listeners go to a successor, or the kernel
//! fallback takes new connections), copies the connections it has until they end or the drain
//! deadline, then closes what is left with a reset and counts it.

use std::{
    os::fd::{BorrowedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::sync::watch;

/// Shared by every worker thread (tokio's watch channels work across runtimes).
pub struct Exit {
    /// `true` once the forwarder must stop accepting.
    stop: watch::Sender<bool>,
    /// `true` once the drain deadline has passed.
    cut: watch::Sender<bool>,
    open: AtomicU64,
    cut_count: AtomicU64,
}

impl Default for Exit {
    fn default() -> Self {
        Exit {
            stop: watch::Sender::new(false),
            cut: watch::Sender::new(false),
            open: AtomicU64::new(0),
            cut_count: AtomicU64::new(0),
        }
    }
}

/// What a drain came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when the drain began.
    pub open_at_start: u64,
    /// Connections still open at the deadline, closed with a reset.
    pub cut: u64,
}

/// Counts one connection as open while it lives.
pub struct Open<'a>(&'a Exit);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Exit {
    pub fn stop_accepting(&self) {
        self.stop.send_replace(true);
    }

    /// Closes every connection now, as the deadline would.
    pub fn cut_now(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves once the forwarder must stop accepting.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn open(&self) -> Open<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self)
    }

    pub fn open_now(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Runs `connection` until it ends or the drain deadline passes; then the client socket
    /// `client` is reset (a cut-off stream must not look complete) and the cut is counted.
    pub async fn guard<F: Future<Output = ()>>(&self, client: RawFd, connection: F) {
        let _open = self.open();
        let mut cut = self.cut.subscribe();
        // Pinned here, not in the select: it must still own the socket when the cut is seen.
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = cut.wait_for(|c| *c) => {
                // SAFETY: `client` is owned by `connection`, which is still alive here.
                let fd = unsafe { BorrowedFd::borrow_raw(client) };
                let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                self.cut_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits until every connection has ended or `deadline` has passed, then cuts the rest.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        let open_at_start = self.open_now();
        let until = tokio::time::Instant::now() + deadline;
        while self.open_now() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.open_now() > 0 {
            self.cut.send_replace(true);
            // Each connection's task notices on its own thread: give them a moment.
            let grace = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.open_now() > 0 && tokio::time::Instant::now() < grace {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Drained {
            open_at_start,
            cut: self.cut_count.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_connections_then_cuts_the_rest() {
        let exit = std::sync::Arc::new(Exit::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let accepted = tokio::net::TcpStream::from_std(accepted).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&accepted);
        let e = exit.clone();
        let task = tokio::spawn(async move {
            e.guard(fd, async move {
                let _keep = accepted;
                std::future::pending::<()>().await
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(exit.open_now(), 1);
        let drained = exit.drain(Duration::from_millis(100)).await;
        task.await.unwrap();
        assert_eq!(
            drained,
            Drained {
                open_at_start: 1,
                cut: 1
            }
        );
        // Reset, not a clean end of stream.
        use std::io::Read as _;
        let mut c = client;
        let mut buf = [0u8; 8];
        let got = c.read(&mut buf);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
    }
}
