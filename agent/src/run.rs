//! `switchyard agent`: load, attach, apply the catalog, serve until told to stop.

use std::{path::Path, sync::Arc};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::AgentConfig,
    datapath, defaults,
    forwarder::{DescriptorReserve, Forwarder, ForwardingDefaults, OrigDst, SharedTable, workers},
    health::{Board, check::Checker},
    reconcile::Reconciler,
    registry::{Registry, Source, file},
};

pub async fn agent(config_path: &Path) -> anyhow::Result<()> {
    // Before any socket: each proxied connection takes two descriptors (see limits).
    match crate::limits::raise_nofile() {
        Ok(n) if n.now > n.was => info!(was = n.was, now = n.now, "raised the descriptor limit"),
        Ok(n) => info!(limit = n.now, "descriptor limit"),
        Err(e) => warn!("{e}; the forwarder may run out of descriptors early"),
    }
    // Read and check everything before touching the kernel: a bad file changes nothing.
    let (mut config, loaded_text) = AgentConfig::load_with_text(config_path)?;

    // Listen before the kernel can send anyone here: one listener per forwarder thread.
    let threads = match config.forwarder.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = workers::bind(&config.forwarder.listen, threads)?;

    // The registry serves the last-known-good at once; the file is the first source to answer.
    let (registry, mut catalogs) = Registry::open(config.registry.state_dir.clone());
    // Handed over, not copied: a large file's catalog would otherwise stay in memory twice.
    let file_catalog = std::mem::take(&mut config.catalog);
    registry.replace(Source::File, file::entries(&file_catalog), &[]);
    drop(file_catalog);

    let (datapath, maps, orig) = datapath::load(&config.datapath)?;
    let table = SharedTable::default();
    let board = Arc::new(Board::default());
    let mut reconciler = Reconciler::new(
        maps,
        table.clone(),
        board.clone(),
        ForwardingDefaults {
            connect_timeout: config.forwarder.connect_timeout,
            retries: config.forwarder.retries,
        },
    );
    let mut checker = Checker::default();
    reconciler.set_settings(&config.forwarder.listen, defaults::OWN_MARK)?;
    reconciler.set_opt_out(&datapath.opt_out_cgroups, &config.datapath.exclude_ports)?;
    reconciler.adopt()?;
    let mut catalog = catalogs.borrow_and_update().clone();
    checker.reconcile(&catalog, &board, defaults::OWN_MARK);
    reconciler.apply(&catalog)?;
    trim_heap();

    // HTTP mode: the file's routes (checked when the file was read) and its gateways.
    let routes = crate::http::route::SharedRoutes::default();
    routes.store(
        crate::http::route::Routes::build(
            std::mem::take(&mut config.routes),
            &|_| true,
            &config
                .gateways
                .iter()
                .map(|g| g.name.clone())
                .collect::<Vec<_>>(),
        )
        .map_err(anyhow::Error::msg)?,
    );
    let http = Arc::new(crate::http::Context {
        routes,
        directory: Arc::new(crate::forwarder::TableDirectory(table.clone())),
        own_mark: defaults::OWN_MARK,
    });
    let mut _gateways = Vec::new();
    for g in &config.gateways {
        _gateways.push(AbortOnDrop(
            crate::http::gateway::start(g, http.clone()).await?,
        ));
    }
    let forwarder = Arc::new(Forwarder {
        http,
        table,
        orig: OrigDst {
            hook: datapath.getsockopt_hook,
            table: std::sync::Mutex::new(orig),
        },
        own_mark: defaults::OWN_MARK,
        descriptors: DescriptorReserve::new(),
    });
    workers::start(listeners, forwarder.clone())?;

    // ── Local API and Prometheus metrics (see api/, metrics/) ─────────────────────────────────
    // Served until this function returns (dropping the guards stops them and removes the
    // socket). Ready: the programs are attached and the first catalog is applied (just above).
    let live = crate::live::Live {
        registry: registry.clone(),
        board: board.clone(),
        table: forwarder.table.clone(),
    };
    let api = crate::api::Api::new(live.clone(), config.forwarder.listen.clone());
    let _api = crate::api::start(&config.api, api)?;
    let kernel = reconciler.maps().counters_handle()?;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = crate::metrics::Metrics::new(live, Some(kernel), ready.clone());
    let _metrics = crate::metrics::start(&config.metrics, metrics).await?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    // ─────────────────────────────────────────────────────────────────────────────────────────

    info!(
        services = catalog.services.len(),
        cgroup = %datapath.cgroup.display(),
        "switchyard agent ready"
    );

    let watcher = tokio::spawn(file::watch(
        registry.clone(),
        config_path.to_owned(),
        loaded_text,
    ));
    let _sources = crate::registry::start_sources(&registry, &config);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            changed = catalogs.changed() => {
                if changed.is_err() {
                    break "registry closed";
                }
                catalog = catalogs.borrow_and_update().clone();
                checker.reconcile(&catalog, &board, defaults::OWN_MARK);
                match reconciler.apply(&catalog) {
                    Ok(changes) => {
                        unpin_udp(&datapath, &reconciler, &changes.udp_gone);
                        if changes.added + changes.updated + changes.removed >= 1_000 {
                            trim_heap();
                        }
                    }
                    Err(e) => warn!("catalog not fully applied: {e}"),
                }
            }
            _ = board.changed.notified() => {
                // A health verdict changed: the kernel's choices follow.
                match reconciler.apply(&catalog) {
                    Ok(changes) => unpin_udp(&datapath, &reconciler, &changes.udp_gone),
                    Err(e) => warn!("health change not fully applied: {e}"),
                }
            }
        }
    };
    watcher.abort();
    registry.flush();
    info!(
        pin_dir = %datapath.pin_dir.display(),
        "{which}: stopping; kernel-mode services keep working (programs and maps stay pinned; \
         `switchyard cleanup` removes them)"
    );
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

/// `switchyard cleanup`: detach and remove everything the agent pinned.
pub fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    let removed = datapath::pin::cleanup(pin_dir)?;
    println!(
        "{}: detached {} links, removed {} maps{}",
        pin_dir.display(),
        removed.links,
        removed.maps,
        if removed.unmounted {
            ", unmounted its bpffs"
        } else {
            ""
        }
    );
    Ok(())
}

/// Disconnects connected UDP sockets still pinned to backends that left (see `datapath::udp`).
fn unpin_udp(
    datapath: &datapath::Datapath,
    reconciler: &Reconciler,
    gone: &[std::net::SocketAddr],
) {
    if gone.is_empty() {
        return;
    }
    let maps = reconciler.maps();
    let steered = |cookie, peer| maps.steered_udp(cookie, peer);
    let mut destroyed = 0;
    tokio::task::block_in_place(|| {
        for ns in datapath::udp::namespaces(&datapath.cgroup) {
            match datapath::udp::destroy_in(&ns, gone, &steered) {
                Ok(n) => destroyed += n,
                Err(e) => warn!(netns = %ns.display(), "cannot disconnect UDP sockets: {e}"),
            }
        }
    });
    if destroyed > 0 {
        info!(sockets = destroyed, backends = ?gone, "disconnected UDP sockets pinned to departed backends");
    }
}

/// Hands memory freed by a large catalog change (parse trees, old copies) back to the system:
/// glibc keeps it in per-thread arenas otherwise, and the agent's RSS would show the peak.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
}

/// A task that ends with its owner (the gateways end when the agent does).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
