//! The userspace forwarder: accepts connections the kernel redirected to it, recovers their
//! original service address, connects to a backend (retrying others) and copies bytes both ways.

mod origdst;
pub mod table;
mod upstream;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tokio::{
    io::copy_bidirectional_with_sizes,
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

pub use origdst::OrigDst;
pub use table::{SharedTable, Table};

use crate::defaults;

pub struct Forwarder {
    pub table: SharedTable,
    pub orig: OrigDst,
    pub own_mark: u32,
}

impl Forwarder {
    /// Accepts until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let local = listener.local_addr().ok();
        info!(listen = ?local, "forwarder listening");
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.handle(stream, peer).await });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly rather than spin.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let Some(vip) = self.orig.recover(&client) else {
            debug!(%peer, "no original destination: not a redirected connection");
            return;
        };
        let Some(service) = self.table.load().get(&vip) else {
            debug!(%peer, %vip, "original destination is not a proxy-mode service");
            return;
        };
        let upstream = match upstream::connect(&service, self.own_mark).await {
            Ok(u) => u,
            Err(e) => {
                warn!(service = %service.name, %peer, "refused: {e}");
                return;
            }
        };
        let backend = &service.backends[upstream.backend];
        backend.stats.opened.fetch_add(1, Ordering::Relaxed);
        backend.stats.active.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let mut server = upstream.stream;
        let result = copy_bidirectional_with_sizes(
            &mut client,
            &mut server,
            defaults::COPY_BUFFER,
            defaults::COPY_BUFFER,
        )
        .await;
        backend.stats.active.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = result {
            debug!(service = %service.name, backend = %backend.addr, "connection ended: {e}");
        }
    }
}
