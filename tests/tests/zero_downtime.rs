//! Proxy mode across agent restarts, under steady load (a new connection per request) and
//! long-lived streams that check their bytes, with a proxy-mode service of three backends:
//! a graceful restart, an upgrade with listener handover, and `kill -9` of the agent.
//!
//! While no forwarder listens, the connect hook balances proxy-mode services in the kernel
//! (the fallback); a new agent started while the old one runs takes its listening sockets over
//! and the old one drains (docs/zero-downtime.md).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use switchyard_testkit::{
    Agent, Topology, control,
    fault::{Load, Report, Streams, monotonic_ns},
    require_root,
};

const PROXY_VIP: &str = "10.96.0.20:80";
/// Load clients: at most this many requests are in flight at any instant.
const CLIENTS: usize = 4;
const LOAD: [&str; 4] = ["--rate", "100", "--clients", "4"];

fn vip() -> SocketAddr {
    PROXY_VIP.parse().expect("a constant address")
}

fn config(topo: &Topology, forwarder: &str) -> String {
    let backends: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", topo.backend(i, false)))
        .collect();
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"prox\"\nvip = \"{PROXY_VIP}\"\nmode = \"proxy\"\nbackends = [{}]\n",
        backends.join(", ")
    ));
    config.replace("[forwarder]\n", &format!("[forwarder]\n{forwarder}"))
}

fn pause(seconds: f64) {
    thread::sleep(Duration::from_secs_f64(seconds));
}

/// The kernel's fallback counter, as the agent exports it.
fn fallback_total(topo: &Topology) -> anyhow::Result<f64> {
    let a = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?;
    Ok(control::sample(
        &a.body,
        "switchyard_kernel_events_total{counter=\"proxy_fallback\"}",
    )
    .unwrap_or(0.0))
}

/// Asks `/healthz` (metrics) and `GET /v1/version` (API) every 20 ms until stopped; counts
/// the times neither agent answered.
struct Watch {
    stop: Arc<AtomicBool>,
    asked: Arc<AtomicU64>,
    missed: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watch {
    fn start(topo: &Topology) -> anyhow::Result<Self> {
        let (stop, asked, missed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let node = topo.node.file()?;
        let (addr, socket) = (topo.metrics(), topo.api_socket());
        let (s, a, m) = (stop.clone(), asked.clone(), missed.clone());
        let thread = thread::spawn(move || {
            // This thread's sockets live in the node's namespace, where the metrics listen.
            // SAFETY: a valid namespace descriptor; setns affects this thread only.
            if unsafe { libc::setns(node.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                m.fetch_add(1, Ordering::Relaxed);
                return;
            }
            while !s.load(Ordering::Relaxed) {
                let ok = healthz(addr) && api_version(&socket);
                a.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    m.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(Watch {
            stop,
            asked,
            missed,
            thread: Some(thread),
        })
    }

    /// (asked, missed)
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.asked.load(Ordering::Relaxed),
            self.missed.load(Ordering::Relaxed),
        )
    }
}

fn healthz(addr: SocketAddr) -> bool {
    let limit = Duration::from_secs(1);
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut got = Vec::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_end(&mut got).is_ok()
        && got.starts_with(b"HTTP/1.1 200")
}

fn api_version(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let req = b"GET /v1/version HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n";
    let mut got = Vec::new();
    s.write_all(req).is_ok() && s.read_to_end(&mut got).is_ok() && got.starts_with(b"HTTP/1.1 200")
}

#[test]
fn a_graceful_restart_loses_no_proxied_connection() -> anyhow::Result<()> {
    if !require_root("a_graceful_restart_loses_no_proxied_connection") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = config(&topo, "");
    let mut agent = Agent::start(&topo, &config)?;
    let load = Load::start(&topo, 0, vip(), 600.0, &LOAD)?;
    let streams = Streams::open(&topo, 0, vip(), 4, 4.0)?;
    pause(1.0);
    // SIGTERM: the fallback takes new connections, the old forwarder drains the streams.
    let stopping = monotonic_ns();
    let status = agent.process.stop(Duration::from_secs(30))?;
    let stopped = monotonic_ns();
    anyhow::ensure!(status.success(), "agent exit: {status}");
    let old = agent.process.output().join("\n");
    drop(agent);
    pause(1.0);
    let agent = Agent::start(&topo, &config)?;
    pause(1.0);
    let load = load.stop_and_finish()?;
    let streams = streams.finish()?;
    let fallback = fallback_total(&topo)?;

    let mut r = Report::new(
        "proxy-graceful-restart",
        "failed == 0, corrupt == 0; long-lived streams complete",
    );
    r.add_load(&load);
    r.add_streams(&streams);
    r.note("streams_ok", streams.ok);
    r.note("stop_ms", ((stopped - stopping) / 1_000_000) as u64);
    r.note("fallback_connections", fallback);
    r.note("errors", load.first_errors());
    r.check(load.failed == 0, format!("{} requests failed", load.failed));
    r.check(
        streams.ok == streams.opened && streams.opened == 4,
        format!("streams: {streams:?}"),
    );
    r.check(fallback > 0.0, "no connection went through the fallback");
    r.check(
        old.contains("balanced in the kernel"),
        "the stopping agent did not say the fallback started",
    );
    r.check(
        !agent.said(&["kernel fallback ended"]).is_empty(),
        "the new agent did not say the fallback ended",
    );
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn an_upgrade_hands_the_listeners_over_and_the_old_agent_drains() -> anyhow::Result<()> {
    if !require_root("an_upgrade_hands_the_listeners_over_and_the_old_agent_drains") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = config(&topo, "");
    let mut old = Agent::start(&topo, &config)?;
    let watch = Watch::start(&topo)?;
    let load = Load::start(&topo, 0, vip(), 600.0, &LOAD)?;
    let streams = Streams::open(&topo, 0, vip(), 4, 5.0)?;
    pause(1.0);
    let new = Agent::start(&topo, &config)?;
    old.process
        .wait_for("handed the listeners over", Duration::from_secs(10))?;
    // The old agent's streams run on through it while the new one serves new connections.
    anyhow::ensure!(
        switchyard_testkit::fault::alive(old.process.pid()),
        "the old agent exited before its connections ended"
    );
    pause(1.0);
    let status = old.process.wait_exit(Duration::from_secs(30))?;
    anyhow::ensure!(status.success(), "old agent exit: {status}");
    pause(0.5);
    let load = load.stop_and_finish()?;
    let streams = streams.finish()?;
    let (asked, missed) = watch.finish();
    let fallback = fallback_total(&topo)?;

    let mut r = Report::new(
        "proxy-upgrade-handover",
        "failed == 0, corrupt == 0; the old agent's streams complete through it; /healthz and \
         the API always answer; nothing goes through the fallback",
    );
    r.add_load(&load);
    r.add_streams(&streams);
    r.note("streams_ok", streams.ok);
    r.note("health_asked", asked);
    r.note("health_missed", missed);
    r.note("fallback_connections", fallback);
    r.note("errors", load.first_errors());
    r.check(load.failed == 0, format!("{} requests failed", load.failed));
    r.check(
        streams.ok == streams.opened && streams.opened == 4,
        format!("streams: {streams:?}"),
    );
    r.check(
        missed == 0,
        format!("{missed} of {asked} health checks missed"),
    );
    r.check(fallback == 0.0, "connections went through the fallback");
    r.check(
        !old.said(&["drained", "cut=0"]).is_empty(),
        "the old agent did not drain cleanly",
    );
    r.check(
        !new.said(&["took the listeners over"]).is_empty(),
        "the new agent did not take the listeners over",
    );
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn a_handed_over_agent_cuts_what_outlives_its_drain_deadline() -> anyhow::Result<()> {
    if !require_root("a_handed_over_agent_cuts_what_outlives_its_drain_deadline") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = config(&topo, "drain_on_exit = \"1s\"\n");
    let mut old = Agent::start(&topo, &config)?;
    let streams = Streams::open(&topo, 0, vip(), 2, 30.0)?;
    pause(0.5);
    let _new = Agent::start(&topo, &config)?;
    let status = old.process.wait_exit(Duration::from_secs(20))?;
    anyhow::ensure!(status.success(), "old agent exit: {status}");
    let streams = streams.finish()?;
    // Reset, never a clean end: a cut-off stream must not look complete.
    assert_eq!(streams.failed, 2, "{streams:?}");
    assert_eq!(streams.corrupt, 0, "{streams:?}");
    assert!(
        streams.failures.iter().all(|f| f.contains("reset")),
        "{streams:?}"
    );
    let said = old.said(&["drained", "cut=2"]);
    assert!(!said.is_empty(), "{}", old.process.output().join("\n"));
    Ok(())
}

#[test]
fn kill_9_sends_new_connections_through_the_kernel_fallback_at_once() -> anyhow::Result<()> {
    if !require_root("kill_9_sends_new_connections_through_the_kernel_fallback_at_once") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = config(&topo, "");
    let mut agent = Agent::start(&topo, &config)?;
    let load = Load::start(&topo, 0, vip(), 600.0, &LOAD)?;
    let streams = Streams::open(&topo, 0, vip(), 4, 3.0)?;
    pause(1.0);
    agent.process.kill();
    // After the kill returned: the agent is reaped, its sockets closed.
    let killed_at = monotonic_ns();
    drop(agent);
    pause(1.5);
    let load = load.stop_and_finish()?;
    let streams = streams.finish()?;
    // The next agent reports what the fallback carried.
    let agent = Agent::start(&topo, &config)?;
    let fallback = fallback_total(&topo)?;

    let after = load.failed_after(killed_at);
    let in_flight = load.failed - after;
    let mut r = Report::new(
        "proxy-kill-9",
        &format!(
            "requests started after the kill: failed == 0 (the kernel fallback); lost: only what \
             the dead forwarder carried (the streams, at most one request per client \
             ({CLIENTS})); corrupt == 0"
        ),
    );
    r.add_load(&load);
    r.add_streams(&streams);
    r.note("failed_after_kill", after);
    r.note("failed_in_flight", in_flight);
    r.note("streams_lost", streams.failed);
    r.note("fallback_connections", fallback);
    r.note("errors", load.first_errors());
    r.check(
        after == 0,
        format!("{after} requests started after the kill failed"),
    );
    r.check(
        in_flight <= CLIENTS as u64,
        format!("{in_flight} in-flight failures"),
    );
    r.check(
        streams.failed == streams.opened,
        format!("streams the dead forwarder carried survived? {streams:?}"),
    );
    r.check(fallback > 0.0, "no connection went through the fallback");
    let ended = agent.said(&["kernel fallback ended"]);
    r.check(
        !ended.is_empty(),
        "the new agent did not report the fallback",
    );
    r.note("new_agent_said", ended.first().cloned().unwrap_or_default());
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn an_agent_started_while_the_old_one_drains_takes_the_api_and_metrics_over() -> anyhow::Result<()>
{
    if !require_root("an_agent_started_while_the_old_one_drains_takes_the_api_and_metrics_over") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = config(&topo, "");
    let mut old = Agent::start(&topo, &config)?;
    let watch = Watch::start(&topo)?;
    let load = Load::start(&topo, 0, vip(), 600.0, &LOAD)?;
    let streams = Streams::open(&topo, 0, vip(), 4, 4.0)?;
    pause(0.5);
    // SIGTERM, not waited for: the old agent drains its streams, new connections go to the
    // kernel fallback, and its API still answers.
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(old.process.pid() as i32, libc::SIGTERM) };
    old.process
        .wait_for("draining proxied connections", Duration::from_secs(10))?;
    pause(0.5);
    let new = Agent::start(&topo, &config)?;
    old.process.wait_for(
        "handed the API and metrics listeners over",
        Duration::from_secs(10),
    )?;
    let status = old.process.wait_exit(Duration::from_secs(30))?;
    anyhow::ensure!(status.success(), "old agent exit: {status}");
    pause(0.5);
    let load = load.stop_and_finish()?;
    let streams = streams.finish()?;
    let (asked, missed) = watch.finish();

    let mut r = Report::new(
        "proxy-restart-during-drain",
        "failed == 0, corrupt == 0; the draining agent's streams complete; /healthz and the API \
         always answer",
    );
    r.add_load(&load);
    r.add_streams(&streams);
    r.note("health_asked", asked);
    r.note("health_missed", missed);
    r.note("errors", load.first_errors());
    r.check(load.failed == 0, format!("{} requests failed", load.failed));
    r.check(
        streams.ok == streams.opened && streams.opened == 4,
        format!("streams: {streams:?}"),
    );
    r.check(
        missed == 0,
        format!("{missed} of {asked} health checks missed"),
    );
    r.check(
        !new.said(&["took the listeners over"]).is_empty(),
        "the new agent did not take the API and metrics over",
    );
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn an_agent_told_not_to_take_over_leaves_the_running_one_alone() -> anyhow::Result<()> {
    if !require_root("an_agent_told_not_to_take_over_leaves_the_running_one_alone") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = config(&topo, "");
    let _running = Agent::start(&topo, &config)?;
    let mut second = Agent::spawn_with(&topo, &config, &["--no-handover"])?;
    let status = second.process.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    let said = second.process.output().join("\n");
    assert!(said.contains("answers already"), "{said}");
    assert!(!said.contains("eBPF programs attached"), "{said}");
    // The running agent's forwarder still gets the proxy-mode connections.
    let before = fallback_total(&topo)?;
    let tally = topo.ask(0, vip(), 6)?;
    assert_eq!(tally.values().sum::<usize>(), 6, "{tally:?}");
    assert!(tally.keys().all(|k| k.starts_with("backend-")), "{tally:?}");
    assert_eq!(fallback_total(&topo)?, before, "went through the fallback");
    Ok(())
}
