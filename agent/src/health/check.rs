//! Active health checks: one task per checked backend, TCP connect or HTTP GET, with rise and
//! fall counts (HAProxy's semantics). Probes carry the agent's mark, so they are never steered.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
};

use tokio::{task::JoinHandle, time::timeout};
use tracing::{info, warn};

use imbl::ordmap::DiffItem;

use super::{BackendHealth, Board, Verdict};
use crate::{
    catalog::{Catalog, HealthCheck, Probe, Service, ServiceAddr},
    socket::connect_marked,
};

/// The running checks, reconciled with each catalog.
#[derive(Default)]
pub struct Checker {
    tasks: HashMap<(ServiceAddr, SocketAddr), Running>,
    /// The catalog last reconciled (a persistent map: kept whole at no cost).
    last: Option<Catalog>,
}

/// One backend's check task. `stopped` is set (under its lock) before the task is aborted: a
/// task still running its last probe on another thread then gives no verdict after its check
/// was removed and its verdict reset.
struct Running {
    check: HealthCheck,
    task: JoinHandle<()>,
    stopped: Arc<Mutex<bool>>,
}

impl Checker {
    /// Starts checks for new (or changed) backends and stops the others. Looks at the services
    /// that differ from the last catalog reconciled (all of them the first time): a change to
    /// one service costs that service, whatever the catalog's size.
    pub fn reconcile(&mut self, catalog: &Catalog, board: &Arc<Board>, own_mark: u32) {
        let mut wanted = HashMap::new();
        // The running checks to judge again: all, or those of the services that changed.
        let judged: Vec<(ServiceAddr, SocketAddr)> = match self.last.replace(catalog.clone()) {
            None => {
                catalog.services.values().for_each(|s| want(&mut wanted, s));
                self.tasks.keys().copied().collect()
            }
            Some(last) => {
                let mut judged = Vec::new();
                for item in last.services.diff(&catalog.services) {
                    let (old, new) = match item {
                        DiffItem::Add(_, n) => (None, Some(n)),
                        DiffItem::Remove(_, o) => (Some(o), None),
                        DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
                    };
                    if let Some(o) = old.filter(|o| o.policy.health.is_some()) {
                        judged.extend(o.backends.iter().map(|b| (o.addr, b.addr)));
                    }
                    if let Some(n) = new {
                        want(&mut wanted, n);
                    }
                }
                judged
            }
        };
        for k in judged {
            let Some(running) = self.tasks.get(&k) else {
                continue;
            };
            if wanted.get(&k) == Some(&running.check) {
                continue;
            }
            *running.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
            running.task.abort();
            self.tasks.remove(&k);
            // A check that goes takes its verdict with it: the backend is judged by the other
            // signals alone (a changed check's new task judges on from the old verdict).
            if !wanted.contains_key(&k)
                && let Some(h) = board.find(k.0, k.1)
            {
                let was = h.verdict();
                h.set_verdict(Verdict::Unknown);
                if was == Verdict::Down {
                    info!(service = %k.0, backend = %k.1, "health check removed: no longer held down");
                }
            }
        }
        for (k, check) in wanted {
            if self.tasks.contains_key(&k) {
                continue;
            }
            let health = board.get(k.0, k.1);
            let board = board.clone();
            let c = check.clone();
            let stopped = Arc::new(Mutex::new(false));
            let s = stopped.clone();
            let task = tokio::spawn(async move { run(health, c, board, own_mark, s).await });
            self.tasks.insert(
                k,
                Running {
                    check,
                    task,
                    stopped,
                },
            );
        }
    }
}

/// The checks one service asks for, by (service, backend).
fn want(wanted: &mut HashMap<(ServiceAddr, SocketAddr), HealthCheck>, s: &Service) {
    if let Some(check) = &s.policy.health {
        for b in &s.backends {
            wanted.insert((s.addr, b.addr), check.clone());
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for running in self.tasks.values() {
            running.task.abort();
        }
    }
}

async fn run(
    health: Arc<BackendHealth>,
    check: HealthCheck,
    board: Arc<Board>,
    own_mark: u32,
    stopped: Arc<Mutex<bool>>,
) {
    let mut interval = tokio::time::interval(check.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ups, mut downs) = (0u32, 0u32);
    loop {
        interval.tick().await;
        let ok = probe(health.addr, &check, own_mark).await;
        let c = &health.counters;
        if ok {
            c.checks_passed.fetch_add(1, Ordering::Relaxed);
            (ups, downs) = (ups + 1, 0);
        } else {
            c.checks_failed.fetch_add(1, Ordering::Relaxed);
            (ups, downs) = (0, downs + 1);
        }
        let verdict = match health.verdict() {
            Verdict::Down | Verdict::Unknown if ups >= check.rise => Verdict::Up,
            Verdict::Up | Verdict::Unknown if downs >= check.fall => Verdict::Down,
            v => v,
        };
        let old = health.verdict();
        let changed = {
            let stopped = stopped.lock().unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
            health.set_verdict(verdict)
        };
        if changed {
            match verdict {
                Verdict::Down => {
                    warn!(service = %health.service, backend = %health.addr, "health check: down after {} failures", check.fall)
                }
                _ if old == Verdict::Down => {
                    info!(service = %health.service, backend = %health.addr, "health check: up again")
                }
                _ => {}
            }
            board.changed.notify_one();
        }
    }
}

async fn probe(addr: SocketAddr, check: &HealthCheck, own_mark: u32) -> bool {
    let attempt = async {
        let stream = connect_marked(addr, own_mark).await.ok()?;
        match &check.probe {
            Probe::Tcp => Some(()),
            Probe::Http { path, status } => http_status(stream, addr, path)
                .await
                .map(|got| (got == *status).then_some(()))?,
        }
    };
    matches!(timeout(check.timeout, attempt).await, Ok(Some(())))
}

/// `GET path` over `stream` with hyper's client: whatever the server's framing (a head split
/// over reads, any length), only a well-formed answer gives a status. `path` was checked at
/// validation (no CR, LF or space can reach the request line).
async fn http_status(stream: tokio::net::TcpStream, addr: SocketAddr, path: &str) -> Option<u16> {
    use hyper::header::{HOST, USER_AGENT};
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    let request = hyper::Request::get(path)
        .header(HOST, addr.to_string())
        .header(USER_AGENT, "switchyard-health")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        answer = sender.send_request(request) => answer.ok().map(|r| r.status().as_u16()),
        // The connection ended (or failed) before an answer.
        _ = conn.as_mut() => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;

    /// A server that answers once with `parts`, written one at a time with a pause between.
    async fn server(parts: Vec<Vec<u8>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut head).await;
                for p in &parts {
                    let _ = s.write_all(p).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        addr
    }

    fn http(status: u16) -> HealthCheck {
        HealthCheck {
            probe: Probe::Http {
                path: "/healthz".into(),
                status,
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 1,
        }
    }

    #[tokio::test]
    async fn an_http_check_reads_a_whole_answer_however_it_arrives() {
        let parts = [
            "HTTP/1.1 2".to_owned(),
            "00 OK\r\n".to_owned(),
            format!("X-Long: {}\r\n", "x".repeat(200)),
            "Content-Length: 2\r\n\r\nok".to_owned(),
        ];
        let addr = server(parts.map(String::into_bytes).to_vec()).await;
        assert!(probe(addr, &http(200), 0).await, "a split 200 is a pass");
        assert!(
            !probe(addr, &http(204), 0).await,
            "another status is a fail"
        );
        let garbage = server(vec![b"backend-1\n".to_vec()]).await;
        assert!(!probe(garbage, &http(200), 0).await, "not HTTP: a fail");
    }
}
