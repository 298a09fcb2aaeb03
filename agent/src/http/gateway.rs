//! `[[gateway]]`: an HTTP listener on the node for clients the kernel hooks do not steer
//! (ingress). It serves only the routes attached to it; a request no route matches gets a 404
//! from the proxy. Bounded like every listener: a connection limit (beyond it, new connections
//! are reset at once), and the header size and time limits of every HTTP connection. Plain
//! HTTP only: no TLS yet.
//!
//! [`Gateways`] follows the file's `[[gateway]]` tables: a gateway added, changed or removed in
//! an edit is started, rebound or stopped (its open connections run on), the others are left
//! alone.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Deserialize;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{Context, Front};
use crate::{defaults, listener::AcceptFailures};

/// `[[gateway]]` as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub name: String,
    /// `0.0.0.0:80` for every address of the node.
    pub listen: SocketAddr,
    #[serde(default = "max_connections")]
    pub max_connections: u32,
}

fn max_connections() -> u32 {
    defaults::GATEWAY_MAX_CONNECTIONS
}

/// The names of the gateways listening now: what a route's `gateway` may name.
#[derive(Clone, Default)]
pub struct GatewayNames(Arc<RwLock<BTreeSet<String>>>);

impl GatewayNames {
    pub fn contains(&self, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    fn set(&self, names: BTreeSet<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = names;
    }
}

/// The running gateways; dropping this stops them all.
#[derive(Default)]
pub struct Gateways {
    running: Vec<(GatewayConfig, JoinHandle<()>)>,
    names: GatewayNames,
}

impl Gateways {
    pub fn names(&self) -> GatewayNames {
        self.names.clone()
    }

    /// Makes the running gateways `wanted`: unchanged ones keep listening, changed and removed
    /// ones stop accepting (their connections run on), new and changed ones bind. The error
    /// names each gateway that could not bind (the others are applied).
    pub async fn apply(
        &mut self,
        wanted: &[GatewayConfig],
        ctx: &Arc<Context>,
    ) -> Result<(), String> {
        let mut keep = Vec::new();
        for (g, task) in self.running.drain(..) {
            if wanted.contains(&g) {
                keep.push((g, task));
            } else {
                info!(gateway = %g.name, listen = %g.listen, "gateway stopped (changed or removed)");
                task.abort();
            }
        }
        self.running = keep;
        let mut errors = Vec::new();
        for g in wanted {
            if self.running.iter().any(|(r, _)| r == g) {
                continue;
            }
            match start(g, ctx.clone()).await {
                Ok(task) => self.running.push((g.clone(), task)),
                Err(e) => {
                    warn!("{e}");
                    errors.push(e.to_string());
                }
            }
        }
        self.names
            .set(self.running.iter().map(|(g, _)| g.name.clone()).collect());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for Gateways {
    fn drop(&mut self) {
        for (_, t) in &self.running {
            t.abort();
        }
    }
}

/// Binds the gateway's listener (an error names the gateway) and serves it until the handle is
/// aborted.
pub async fn start(g: &GatewayConfig, ctx: Arc<Context>) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(g.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("gateway {}: listen {}: {e}", g.name, g.listen),
        )
    })?;
    info!(gateway = %g.name, listen = %g.listen, "gateway listening (HTTP, no TLS)");
    let name: Arc<str> = g.name.as_str().into();
    let room = Arc::new(Semaphore::new(g.max_connections as usize));
    Ok(tokio::spawn(async move {
        let mut failures = AcceptFailures::default();
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    failures.accepted("gateway");
                    let Ok(permit) = room.clone().try_acquire_owned() else {
                        debug!(gateway = %name, %peer, "refused: connection limit reached");
                        let _ = stream.set_zero_linger();
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (ctx, front) = (ctx.clone(), Front::Gateway(name.clone()));
                    tokio::spawn(async move {
                        super::serve(ctx, front, stream, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    failures.failed("gateway", &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }))
}
