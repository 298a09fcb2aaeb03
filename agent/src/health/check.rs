//! Active health checks: one task per checked backend, TCP connect or HTTP GET, with rise and
//! fall counts (HAProxy's semantics). Probes carry the agent's mark, so they are never steered.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
    time::timeout,
};
use tracing::{info, warn};

use super::{BackendHealth, Board, Verdict};
use crate::{
    catalog::{Catalog, HealthCheck, Probe, ServiceAddr},
    socket::connect_marked,
};

/// The running checks, reconciled with each catalog.
#[derive(Default)]
pub struct Checker {
    tasks: HashMap<(ServiceAddr, SocketAddr), (HealthCheck, JoinHandle<()>)>,
}

impl Checker {
    /// Starts checks for new (or changed) backends and stops the others.
    pub fn reconcile(&mut self, catalog: &Catalog, board: &Arc<Board>, own_mark: u32) {
        let mut wanted = HashMap::new();
        for (addr, s) in &catalog.services {
            if let Some(check) = &s.policy.health {
                for b in &s.backends {
                    wanted.insert((*addr, b.addr), check.clone());
                }
            }
        }
        self.tasks.retain(|k, (check, task)| {
            let keep = wanted.get(k) == Some(check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (k, check) in wanted {
            if self.tasks.contains_key(&k) {
                continue;
            }
            let health = board.get(k.0, k.1);
            let board = board.clone();
            let c = check.clone();
            let task = tokio::spawn(async move { run(health, c, board, own_mark).await });
            self.tasks.insert(k, (check, task));
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

async fn run(health: Arc<BackendHealth>, check: HealthCheck, board: Arc<Board>, own_mark: u32) {
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
        if health.set_verdict(verdict) {
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
        let mut stream = connect_marked(addr, own_mark).await.ok()?;
        match &check.probe {
            Probe::Tcp => Some(()),
            Probe::Http { path, status } => {
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: switchyard-health\r\n\r\n"
                );
                stream.write_all(req.as_bytes()).await.ok()?;
                let mut head = [0u8; 64];
                let n = stream.read(&mut head).await.ok()?;
                let line = std::str::from_utf8(&head[..n]).ok()?;
                let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
                (code == *status).then_some(())
            }
        }
    };
    matches!(timeout(check.timeout, attempt).await, Ok(Some(())))
}
