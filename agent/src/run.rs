//! `switchyard agent`: load, attach, apply the catalog, serve until told to stop.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tracing::info;

use crate::{
    config::AgentConfig,
    datapath, defaults,
    forwarder::{Forwarder, OrigDst, SharedTable},
    reconcile::Reconciler,
};

pub async fn agent(config_path: &Path) -> anyhow::Result<()> {
    // Read and check everything before touching the kernel: a bad file changes nothing.
    let config = AgentConfig::load(config_path)?;

    // Listen before the kernel can send anyone here.
    let mut listeners = Vec::new();
    for addr in &config.forwarder.listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("forwarder cannot listen on {addr}"))?;
        listeners.push(l);
    }

    let (datapath, maps, orig) = datapath::load(&config.datapath)?;
    let table = SharedTable::default();
    let mut reconciler = Reconciler::new(
        maps,
        table.clone(),
        config.forwarder.connect_timeout,
        config.forwarder.retries,
    );
    reconciler.set_settings(&config.forwarder.listen, defaults::OWN_MARK)?;
    reconciler.apply(&config.catalog)?;

    let forwarder = Arc::new(Forwarder {
        table,
        orig: OrigDst {
            hook: datapath.getsockopt_hook,
            table: std::sync::Mutex::new(orig),
        },
        own_mark: defaults::OWN_MARK,
    });
    let tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(forwarder.clone().serve(l)))
        .collect();
    info!(
        services = config.catalog.services.len(),
        cgroup = %datapath.cgroup.display(),
        "switchyard agent ready"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{which}: stopping; programs are detached");
    for t in tasks {
        t.abort();
    }
    if let Ok(counters) = reconciler.maps().counters() {
        let summary: Vec<String> = counters
            .iter()
            .map(|(c, n)| format!("{}={n}", c.name()))
            .collect();
        info!("kernel counters: {}", summary.join(" "));
    }
    drop(datapath);
    Ok(())
}
