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

use super::table::ProxyService;
use crate::{
    catalog::AppProtocol,
    http::{self, detect},
};

/// Serves the connection as HTTP (`None` once it is done), or hands it back for the L4 path.
pub async fn dispatch(
    service: &Arc<ProxyService>,
    client: TcpStream,
    peer: SocketAddr,
    own_mark: u32,
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
    http::serve(service.clone(), client, peer, own_mark).await;
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
