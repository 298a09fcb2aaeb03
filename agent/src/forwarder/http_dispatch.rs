//! The branch from the L4 path to HTTP mode, for services with an `app_protocol` other than
//! `tcp`: `auto` peeks at the client's first bytes, and whatever is not HTTP comes back to the
//! L4 path with those bytes still unread.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::net::TcpStream;

use super::table::{ProxyService, SharedTable};
use crate::{
    catalog::AppProtocol,
    http::{self, detect},
};

/// Serves the connection as HTTP (`None` once it is done), or hands it back for the L4 path.
pub async fn dispatch(
    ctx: &Arc<http::Context>,
    service: &Arc<ProxyService>,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<TcpStream> {
    if service.app_protocol() == AppProtocol::Auto {
        match detect::detect(&client).await {
            detect::Detected::Http => {}
            detect::Detected::Opaque => return Some(client),
            detect::Detected::Gone => return None,
        }
    }
    // The client connection counts on its service (connection limit, retry budget) while open.
    let _open = Open::count(&service.shared.active);
    let front = http::Front::Service(service.clone());
    http::serve(ctx.clone(), front, client, peer).await;
    None
}

/// A client connection counted open until it ends, however it ends.
struct Open<'a>(&'a AtomicU64);

impl<'a> Open<'a> {
    fn count(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Open(n)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Route destinations from the forwarder's table.
pub struct TableDirectory(pub SharedTable);

impl http::Directory for TableDirectory {
    fn service(&self, name: &str) -> Option<Arc<dyn http::Target>> {
        let s: Arc<dyn http::Target> = self.0.load().by_name(name)?;
        Some(s)
    }
}
