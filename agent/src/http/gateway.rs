//! `[[gateway]]`: an HTTP listener on the node for clients the kernel hooks do not steer
//! (ingress). It serves only the routes attached to it; a request no route matches gets a 404
//! from the proxy. Bounded like every listener: a connection limit (beyond it, new connections
//! are reset at once), and the header size and time limits of every HTTP connection. Plain
//! HTTP only: no TLS yet.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde::Deserialize;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::{debug, info};

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
