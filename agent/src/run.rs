//! `switchyard agent`: load, attach, apply the catalog, serve until told to stop.

use std::{path::Path, sync::Arc};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::AgentConfig,
    datapath, defaults, fallback,
    forwarder::{
        DescriptorReserve, Exit, Forwarder, ForwardingDefaults, OrigDst, SharedTable, workers,
    },
    handover,
    health::{Board, check::Checker},
    reconcile::Reconciler,
    registry::{Registry, Source, file},
};

/// How `switchyard agent` treats another agent on the node.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Take a running agent's listeners over, and offer them to a successor.
    pub handover: bool,
    /// Once handed over and drained, wait for SIGTERM before exiting.
    pub wait_after_handover: bool,
}

/// Why the main loop ended.
enum Stop {
    Signal(&'static str),
    HandedOver(handover::Request),
}

pub async fn agent(config_path: &Path, options: Options) -> anyhow::Result<()> {
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
    // A running agent hands its listening sockets over: the kernel's accept queues never lack
    // a reader, so no connection attempt is refused while the agents change places.
    let run_dir = handover::run_dir(config.api.socket.as_deref());
    let handover_path = run_dir.join(defaults::HANDOVER_SOCKET);
    let mut taken = None;
    if options.handover {
        match tokio::task::block_in_place(|| {
            handover::take(&handover_path, defaults::HANDOVER_TIMEOUT)
        }) {
            Ok(t) => taken = t,
            Err(e) => warn!("{e}; starting without the running agent's listeners"),
        }
    }
    let mut inherited = taken
        .as_mut()
        .map(|t: &mut handover::Taken| std::mem::take(&mut t.listeners))
        .unwrap_or_default();
    if let Some(t) = &taken {
        info!(
            from_pid = t.from_pid,
            listeners = inherited.count(),
            "took the listeners over from the running agent"
        );
    }
    // Not handed over, yet an agent answers on the API socket: refuse before touching the
    // kernel (the maps and the hooks' listener slots are that agent's).
    if taken.is_none()
        && let Some(path) = &config.api.socket
        && std::os::unix::net::UnixStream::connect(path).is_ok()
    {
        anyhow::bail!(
            "api.socket: {} answers already: another agent is serving there{}",
            path.display(),
            if options.handover {
                " and offers no handover"
            } else {
                " (--no-handover)"
            }
        );
    }
    let (listeners, _) = workers::adopt_or_bind(
        &config.forwarder.listen,
        threads,
        std::mem::take(&mut inherited.forwarder),
    )?;

    // The registry serves the last-known-good at once; the file is the first source to answer.
    let (registry, mut catalogs) = Registry::open(config.registry.state_dir.clone());
    // Handed over, not copied: a large file's catalog would otherwise stay in memory twice.
    let file_catalog = std::mem::take(&mut config.catalog);
    registry.replace(Source::File, file::entries(&file_catalog), &[]);
    drop(file_catalog);

    let (mut datapath, maps, orig) = datapath::load(&config.datapath)?;
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

    // HTTP mode: the routes every source gives (the file's were checked when it was read) and
    // the file's gateways.
    let routes = crate::http::route::SharedRoutes::default();
    registry.replace_routes(
        Source::File,
        file::routes(&std::mem::take(&mut config.routes)),
    );
    let http_stats = Arc::new(crate::http::stats::Stats::default());
    let route_changes = registry.subscribe_routes();
    crate::registry::routes::compile_into(&route_changes.borrow(), &routes);
    let _routes = AbortOnDrop(tokio::spawn(crate::registry::routes::follow(
        route_changes,
        routes.clone(),
    )));
    let http = Arc::new(crate::http::Context {
        routes,
        directory: Arc::new(crate::forwarder::TableDirectory(table.clone())),
        own_mark: defaults::OWN_MARK,
        stats: http_stats.clone(),
    });
    let mut gateways = crate::http::gateway::Gateways::default();
    gateways
        .apply(&config.gateways, &http)
        .await
        .map_err(anyhow::Error::msg)?;
    let forwarder = Arc::new(Forwarder {
        http,
        table,
        orig: OrigDst {
            slots: orig.slots,
            hook: datapath.getsockopt_hook,
            table: std::sync::Mutex::new(orig.table),
        },
        own_mark: defaults::OWN_MARK,
        descriptors: DescriptorReserve::new(),
        affinity: Default::default(),
        exit: Exit::default(),
    });
    // Other descriptors of the same sockets: what a successor is offered.
    let kept: Vec<Vec<std::net::TcpListener>> = listeners
        .iter()
        .map(|w| w.iter().map(|l| l.try_clone()).collect())
        .collect::<std::io::Result<_>>()?;
    workers::start(listeners, forwarder.clone())?;
    // From now on the hooks send proxy-mode connections here, not to the kernel fallback.
    reconciler.set_listeners(&workers::per_family(&kept))?;
    fallback::ended(reconciler.maps(), &run_dir);

    // ── Local API and Prometheus metrics (see api/, metrics/) ─────────────────────────────────
    // Served until this function returns (dropping the guards stops them and removes the
    // socket). Ready: the programs are attached and the first catalog is applied (just above).
    let live = crate::live::Live {
        registry: registry.clone(),
        board: board.clone(),
        table: forwarder.table.clone(),
        kernel: Some(Arc::new(reconciler.maps().learned_handle()?)),
        http: http_stats,
    };
    // The programs eject on their own; the agent says so in its log.
    let _learned = AbortOnDrop(tokio::spawn(datapath::learned::watch(
        reconciler.maps().learned_handle()?,
    )));
    let api = crate::api::Api::new(live.clone(), config.forwarder.listen.clone())
        .with_gateways(gateways.names());
    let mut api_server = crate::api::start_on(&config.api, api, inherited.api.take())?;
    let kernel = reconciler.maps().counters_handle()?;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = crate::metrics::Metrics::new(live, Some(kernel), ready.clone());
    let mut metrics_server =
        crate::metrics::start_on(&config.metrics, metrics, inherited.metrics.take()).await?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(inherited);
    // Everything is served here now: the previous agent stops accepting and drains.
    if let Some(t) = taken {
        match tokio::task::block_in_place(|| t.accepting(defaults::HANDOVER_TIMEOUT)) {
            Ok(()) => info!("the previous agent stopped accepting; it drains its connections"),
            Err(e) => warn!("{e}"),
        }
    }
    let mut successors = if options.handover {
        match handover::Offer::bind(&handover_path).map(handover::Successors::start) {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                warn!("handover thread: {e}; a new agent will not find this one");
                None
            }
            Err(e) => {
                warn!("{e}; a new agent will not find this one");
                None
            }
        }
    } else {
        None
    };
    // ─────────────────────────────────────────────────────────────────────────────────────────

    info!(
        services = catalog.services.len(),
        cgroup = %datapath.cgroup.display(),
        "switchyard agent ready"
    );

    let (settings_tx, mut settings) = tokio::sync::watch::channel(Arc::new(config.clone()));
    let watcher = tokio::spawn(file::watch(
        registry.clone(),
        config_path.to_owned(),
        loaded_text,
        settings_tx,
    ));
    let mut sources = crate::reload::Sources::start(&registry, &config);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = loop {
        tokio::select! {
            _ = term.recv() => break Stop::Signal("SIGTERM"),
            _ = int.recv() => break Stop::Signal("SIGINT"),
            request = next_successor(&mut successors) => {
                // From here until it accepts, nothing changes the maps: the new agent adopts
                // them as they are.
                info!(pid = request.pid, "a new agent asks for the listeners: handing them over");
                let offered = listeners_of(&kept, api_server.as_ref(), metrics_server.as_ref())
                    .map_err(|e| handover::HandoverError::Io {
                        path: handover_path.clone(),
                        source: e,
                    })
                    .and_then(|l| tokio::task::block_in_place(|| request.offer(&l)));
                match offered {
                    Ok(true) => break Stop::HandedOver(request),
                    Ok(false) => warn!("the new agent went away before accepting: carrying on"),
                    Err(e) => warn!("{e}; carrying on"),
                }
                // Whatever the new agent did meanwhile, the maps match this agent's catalog and
                // listeners again.
                if let Err(e) = reconciler.apply(&catalog) {
                    warn!("catalog not fully applied: {e}");
                }
                if let Err(e) = reconciler.set_listeners(&workers::per_family(&kept)) {
                    warn!("{e}: proxy-mode connects go to the kernel fallback");
                }
            }
            changed = catalogs.changed() => {
                if changed.is_err() {
                    break Stop::Signal("registry closed");
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
            Ok(()) = settings.changed() => {
                // The file's other sections: live where they can be, said where they cannot.
                let edited = settings.borrow_and_update().clone();
                if edited.gateways != config.gateways {
                    match gateways.apply(&edited.gateways, &forwarder.http).await {
                        Ok(()) => info!(gateways = edited.gateways.len(), "config file changed: [[gateway]] applied"),
                        Err(e) => warn!("config file changed: [[gateway]] not all applied: {e}"),
                    }
                    config.gateways = edited.gateways.clone();
                }
                crate::reload::apply(&mut config, &edited, &mut sources, &registry, |d| {
                    let ids = datapath::opt_out_cgroups(d).map_err(|e| e.to_string())?;
                    reconciler.set_opt_out(&ids, &d.exclude_ports).map_err(|e| e.to_string())
                });
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
    drop(sources);
    let mut handed_over = matches!(stop, Stop::HandedOver(_));
    match stop {
        Stop::HandedOver(request) => {
            // The new agent owns the maps, the sockets and the last-known-good from now on.
            forwarder.exit.stop_accepting();
            if let Some(a) = api_server.take() {
                a.hand_over();
            }
            drop(metrics_server.take());
            drop(kept);
            // Its programs are attached and pinned; these links of ours would run beside them.
            datapath.release_links();
            info!(
                to_pid = request.pid,
                open = forwarder.exit.open_now(),
                "handed the listeners over to the new agent; draining"
            );
            request.stopped();
        }
        Stop::Signal(which) => {
            registry.flush();
            // New connections go to the kernel fallback before any listener closes; the ones
            // already past the hook are still accepted.
            match reconciler.clear_listeners() {
                Ok(()) => fallback::started(reconciler.maps()),
                Err(e) => warn!("{e}: proxy-mode connects may be refused until an agent listens"),
            }
            tokio::time::sleep(defaults::LISTENER_SETTLE).await;
            forwarder.exit.stop_accepting();
            drop(kept);
            info!(
                pin_dir = %datapath.pin_dir.display(),
                open = forwarder.exit.open_now(),
                "{which}: stopping; kernel-mode services keep working (programs and maps stay \
                 pinned; `switchyard cleanup` removes them); draining proxied connections"
            );
        }
    }
    // While it drains, the API and metrics keep answering, and an agent started meanwhile
    // takes them over. SIGTERM again (the kubelet's, after a handover) lets the drain run on;
    // SIGINT cuts it short.
    let drain = forwarder.exit.drain(config.forwarder.drain_on_exit);
    let mut drain = std::pin::pin!(drain);
    let drained = loop {
        tokio::select! {
            d = drain.as_mut() => break d,
            _ = int.recv() => forwarder.exit.cut_now(),
            request = next_successor(&mut successors), if !handed_over => {
                info!(pid = request.pid, "a new agent asks for the API and metrics listeners");
                let offered = listeners_of(&[], api_server.as_ref(), metrics_server.as_ref())
                    .map_err(|e| handover::HandoverError::Io {
                        path: handover_path.clone(),
                        source: e,
                    })
                    .and_then(|l| tokio::task::block_in_place(|| request.offer(&l)));
                match offered {
                    Ok(true) => {
                        if let Some(a) = api_server.take() {
                            a.hand_over();
                        }
                        drop(metrics_server.take());
                        handed_over = true;
                        request.stopped();
                        info!("handed the API and metrics listeners over; draining");
                    }
                    Ok(false) => warn!("the new agent went away before accepting"),
                    Err(e) => warn!("{e}"),
                }
            }
        }
    };
    info!(
        open = drained.open_at_start,
        cut = drained.cut,
        deadline_s = config.forwarder.drain_on_exit.as_secs(),
        "drained: connections ran to their end; cut = closed at the drain deadline"
    );
    if let Some(s) = &successors {
        // Only if it is still this agent's (a successor binds its own).
        s.remove();
    }
    if handed_over && options.wait_after_handover {
        info!("handed over and drained: waiting for SIGTERM");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
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

/// The next successor asking to take over (never, without a handover socket).
async fn next_successor(successors: &mut Option<handover::Successors>) -> handover::Request {
    match successors {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Other descriptors of every listening socket this agent serves, for a successor.
fn listeners_of(
    forwarder: &[Vec<std::net::TcpListener>],
    api: Option<&crate::api::ApiServer>,
    metrics: Option<&crate::metrics::MetricsServer>,
) -> std::io::Result<handover::Listeners> {
    Ok(handover::Listeners {
        forwarder: forwarder
            .iter()
            .map(|w| w.iter().map(|l| l.try_clone()).collect())
            .collect::<std::io::Result<_>>()?,
        api: api
            .and_then(|a| a.listener())
            .map(|l| l.try_clone())
            .transpose()?,
        metrics: metrics
            .and_then(|m| m.listener())
            .map(|l| l.try_clone())
            .transpose()?,
    })
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

/// Hands memory freed by a large catalog change (parse trees, old copies) back to the system,
/// so that the agent's RSS does not show the peak. The agent allocates with mimalloc (see
/// `main.rs`); what C code allocates stays with glibc, which keeps free memory in its arenas.
fn trim_heap() {
    // SAFETY: both only release memory that is free.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libc::malloc_trim(0);
    }
}

/// A task that ends with its owner (the main loop's helpers and the gateways end when the
/// agent does).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
