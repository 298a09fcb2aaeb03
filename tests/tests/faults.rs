//! The fault-injection suite: each scenario runs under a steady load whose every request
//! carries a pseudo-random payload checked on its echo, injects one fault, and reports what it
//! counted (requests sent, failed, corrupt, and its own numbers) next to the rule it is judged
//! by (`fault NAME: … | rule: … | PASS`).
//!
//! `SY_FAULT_SECONDS` sets the load per scenario (default 3: the fast part, in `cargo xtask
//! test`), `SY_IDLE_CONNECTIONS` the held connections (default 2,000); `cargo xtask soak` runs
//! the same tests longer and larger and collects the reports from `SY_FAULT_REPORT`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::Duration,
};

use serde_json::Value;
use switchyard_testkit::{
    Agent, Topology, control, entries,
    fault::{self, Idle, Load, Report, Streams, monotonic_ns},
    require_root,
    servers::Etcd,
};

const KERNEL_VIP: &str = "10.96.0.10:80";
const PROXY_VIP: &str = "10.96.0.20:80";
/// Load clients per load: in-flight requests at any instant are at most this many.
const CLIENTS: usize = 4;
/// A saturated forwarder must serve every request started this long after it has room again.
const RECOVERY: Duration = Duration::from_secs(2);
/// Descriptors the agent needs beside two per held connection: its own, the forwarder's
/// reserve for the control side (160), the load's connections.
const HEADROOM: u64 = 1000;

fn vip(s: &str) -> SocketAddr {
    s.parse().expect("a constant address")
}

/// A `[[service]]` over backends `which`.
/// A `[[service]]` table over backends `which`, in `mode`.
fn service(
    topo: &Topology,
    name: &str,
    vip: &str,
    mode: &str,
    which: &[usize],
    extra: &str,
) -> String {
    let extra = format!("mode = \"{mode}\"\n{extra}");
    entries::service(name, vip, &extra, &entries::backends(topo, which))
}

fn pause(seconds: f64) {
    thread::sleep(Duration::from_secs_f64(seconds));
}

fn ms(ns: u128) -> u64 {
    (ns / 1_000_000) as u64
}

/// Whether the API answers `GET /v1/version` within `limit` (a full agent may not accept).
fn api_answers(socket: &Path, limit: Duration) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    let req = b"GET /v1/version HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n";
    let mut got = Vec::new();
    s.write_all(req).is_ok() && s.read_to_end(&mut got).is_ok() && got.starts_with(b"HTTP/1.1 200")
}

/// Whether the metrics endpoint answers `/healthz` within `limit`, asked from the node.
fn metrics_answer(topo: &Topology, limit: Duration) -> bool {
    let addr = topo.metrics();
    topo.node
        .enter(move || {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(limit));
            let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let mut got = Vec::new();
            s.write_all(req.as_bytes()).is_ok()
                && s.read_to_end(&mut got).is_ok()
                && got.starts_with(b"HTTP/1.1 200")
        })
        .unwrap_or(false)
}

fn services(socket: &Path) -> anyhow::Result<Value> {
    let a = control::request(socket, "GET", "/v1/services", None)?;
    anyhow::ensure!(a.status == 200, "GET /v1/services: {} {}", a.status, a.body);
    a.json()
}

#[test]
fn a_backend_killed_under_load_costs_no_request_started_after_it() -> anyhow::Result<()> {
    if !require_root("a_backend_killed_under_load_costs_no_request_started_after_it") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 3)?;
    let config = topo.agent_config(&service(
        &topo,
        "web",
        PROXY_VIP,
        "proxy",
        &[0, 1, 2],
        "retries = 2\noutlier_failures = 2\noutlier_ejection = \"1s\"",
    ));
    let _agent = Agent::start(&topo, &config)?;
    let seconds = fault::load_seconds();
    let load = Load::start(&topo, 0, vip(PROXY_VIP), seconds, &[])?;
    pause(seconds / 3.0);
    topo.kill_backend(1);
    // After the kill returned: the backend is reaped, its sockets closed.
    let killed_at = monotonic_ns();
    let counts = load.finish()?;

    let after = counts.failed_after(killed_at);
    let in_flight = counts.failed - after;
    let mut r = Report::new(
        "kill-backend",
        &format!(
            "requests started after the kill: failed == 0; in flight on the killed backend: \
             at most one per client ({CLIENTS}) may fail (no proxy can finish them); corrupt == 0"
        ),
    );
    r.add_load(&counts);
    r.note("failed_after_kill", after);
    r.note("failed_in_flight", in_flight);
    r.note("errors", counts.first_errors());
    r.check(
        after == 0,
        format!("{after} requests started after the kill failed"),
    );
    r.check(
        in_flight <= CLIENTS as u64,
        format!("{in_flight} in-flight failures"),
    );
    r.check(counts.ok > 0, "nothing succeeded");
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

/// The kernel's proxy-mode fallback counter, from the agent's metrics.
fn fallback_total(topo: &Topology) -> anyhow::Result<u64> {
    let a = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?;
    Ok(control::sample(
        &a.body,
        "switchyard_kernel_events_total{counter=\"proxy_fallback\"}",
    )
    .unwrap_or(0.0) as u64)
}

#[test]
fn both_modes_flow_while_the_agent_restarts() -> anyhow::Result<()> {
    if !require_root("both_modes_flow_while_the_agent_restarts") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(
        &(service(&topo, "kern", KERNEL_VIP, "kernel", &[0, 1, 2], "")
            + &service(&topo, "prox", PROXY_VIP, "proxy", &[0, 1, 2], "")),
    );
    let mut agent = Agent::start(&topo, &config)?;
    let seconds = fault::load_seconds();
    // Stopped explicitly once the restart has been watched; the duration is only a backstop.
    let half = ["--rate", "100"];
    let kernel = Load::start(&topo, 0, vip(KERNEL_VIP), 600.0, &half)?;
    let proxy = Load::start(&topo, 0, vip(PROXY_VIP), 600.0, &half)?;
    let streams = Streams::open(&topo, 0, vip(PROXY_VIP), 4, seconds / 3.0 + 1.0)?;
    pause(seconds / 3.0);
    let stopping = monotonic_ns();
    // SIGTERM: proxy mode goes to the kernel fallback; the old forwarder drains the streams.
    agent.process.stop(Duration::from_secs(30))?;
    drop(agent);
    pause(seconds / 3.0);
    let restarting = monotonic_ns();
    let _agent = Agent::start(&topo, &config)?;
    let ready = monotonic_ns();
    pause(seconds / 3.0);
    let kernel = kernel.stop_and_finish()?;
    let proxy = proxy.stop_and_finish()?;
    let streams = streams.finish()?;
    let fallback = fallback_total(&topo)?;

    let mut r = Report::new(
        "agent-restart",
        "graceful stop and start: kernel mode and proxy mode failed == 0 throughout (proxy mode \
         through the kernel fallback while no forwarder listens); proxied long-lived streams \
         complete; corrupt == 0",
    );
    r.add_load(&kernel);
    r.add_load(&proxy);
    r.add_streams(&streams);
    r.note("kernel_sent", kernel.sent);
    r.note("kernel_failed", kernel.failed);
    r.note("proxy_sent", proxy.sent);
    r.note("proxy_failed", proxy.failed);
    r.note("proxy_fallback", fallback);
    r.note("streams_ok", streams.ok);
    r.note("agent_down_ms", ms(ready - stopping));
    r.note("restart_ms", ms(ready - restarting));
    r.note("proxy_errors", proxy.first_errors());
    r.check(
        kernel.failed == 0,
        format!(
            "kernel mode: {} failed ({})",
            kernel.failed,
            kernel.first_errors()
        ),
    );
    r.check(
        proxy.failed == 0,
        format!(
            "proxy mode: {} failed ({})",
            proxy.failed,
            proxy.first_errors()
        ),
    );
    r.check(kernel.ok > 0 && proxy.ok > 0, "nothing succeeded");
    r.check(
        streams.ok == streams.opened && streams.opened == 4,
        format!("streams: {streams:?}"),
    );
    r.check(fallback > 0, "proxy mode never went through the fallback");
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn both_modes_flow_when_the_agent_is_killed() -> anyhow::Result<()> {
    if !require_root("both_modes_flow_when_the_agent_is_killed") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(
        &(service(&topo, "kern", KERNEL_VIP, "kernel", &[0, 1, 2], "")
            + &service(&topo, "prox", PROXY_VIP, "proxy", &[0, 1, 2], "")),
    );
    let mut agent = Agent::start(&topo, &config)?;
    let seconds = fault::load_seconds();
    let half = ["--rate", "100"];
    let kernel = Load::start(&topo, 0, vip(KERNEL_VIP), 600.0, &half)?;
    let proxy = Load::start(&topo, 0, vip(PROXY_VIP), 600.0, &half)?;
    let streams = Streams::open(&topo, 0, vip(PROXY_VIP), 4, seconds)?;
    pause(seconds / 3.0);
    let kill_sent = monotonic_ns();
    agent.process.kill();
    // After the kill returned: the agent is reaped, its sockets closed.
    let killed_at = monotonic_ns();
    drop(agent);
    pause(seconds / 3.0);
    let _agent = Agent::start(&topo, &config)?;
    pause(seconds / 3.0);
    let kernel = kernel.stop_and_finish()?;
    let proxy = proxy.stop_and_finish()?;
    let streams = streams.finish()?;
    let fallback = fallback_total(&topo)?;

    let after = proxy.failed_after(killed_at);
    // Started while the kernel tore the agent down: a connect then can still land in the
    // queue of a listener about to close. Neither in flight at the kill nor after it.
    let teardown = proxy.failed_after(kill_sent) - after;
    let in_flight = proxy.failed - after - teardown;
    let mut r = Report::new(
        "agent-kill",
        &format!(
            "kill -9: kernel mode failed == 0; proxy mode: requests started after the kill \
             failed == 0 (the kernel fallback), in flight at the kill at most one per client \
             ({CLIENTS}), those started during the teardown counted apart; \
             the streams the dead forwarder carried are the only ones lost; corrupt == 0"
        ),
    );
    r.add_load(&kernel);
    r.add_load(&proxy);
    r.add_streams(&streams);
    r.note("kernel_sent", kernel.sent);
    r.note("kernel_failed", kernel.failed);
    r.note("proxy_sent", proxy.sent);
    r.note("proxy_failed", proxy.failed);
    r.note("proxy_failed_after_kill", after);
    r.note("proxy_failed_during_teardown", teardown);
    r.note("proxy_fallback", fallback);
    r.note("streams_lost", streams.failed);
    r.note("proxy_errors", proxy.first_errors());
    r.check(
        kernel.failed == 0,
        format!("kernel mode: {} failed", kernel.failed),
    );
    r.check(
        after == 0,
        format!("proxy mode: {after} started after the kill failed"),
    );
    r.check(
        in_flight <= CLIENTS as u64,
        format!("proxy mode: {in_flight} in flight failed"),
    );
    r.check(fallback > 0, "proxy mode never went through the fallback");
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn killing_the_registry_source_under_load_costs_no_request() -> anyhow::Result<()> {
    if !require_root("killing_the_registry_source_under_load_costs_no_request") {
        return Ok(());
    }
    const PREFIX: &str = "/sy/faults/";
    let topo = Topology::new(1, 3)?;
    let mut etcd = Etcd::start(&topo.node, 1)?;
    let backends: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", topo.backend(i, false)))
        .collect();
    let entry = |vip: &str, mode: &str| {
        format!(
            r#"{{"vip": "{vip}", "mode": "{mode}", "backends": [{}]}}"#,
            backends.join(", ")
        )
    };
    etcd.put(&format!("{PREFIX}web"), &entry(PROXY_VIP, "proxy"))?;
    etcd.put(&format!("{PREFIX}kern"), &entry(KERNEL_VIP, "kernel"))?;
    let mut agent = Agent::start(&topo, &topo.agent_config(&etcd.agent_section(PREFIX)))?;
    let served = |t: &switchyard_testkit::topology::Tally| {
        (0..3).all(|i| t.get(&Topology::backend_name(i)) == Some(&1))
    };
    topo.wait_until(
        vip(PROXY_VIP),
        3,
        Duration::from_secs(30),
        "served from etcd",
        served,
    )?;
    let before = services(&topo.api_socket())?;

    let seconds = fault::load_seconds();
    let proxy = Load::start(&topo, 0, vip(PROXY_VIP), seconds, &[])?;
    let kernel = Load::start(&topo, 0, vip(KERNEL_VIP), seconds, &["--rate", "50"])?;
    pause(seconds / 3.0);
    etcd.kill(0);
    let proxy = proxy.finish()?;
    let kernel = kernel.finish()?;
    let noticed = agent
        .process
        .wait_for("etcd: disconnected", Duration::from_secs(60))
        .is_ok();
    let after = services(&topo.api_socket())?;
    let still = topo.ask(0, vip(PROXY_VIP), 6)?;

    let mut r = Report::new(
        "kill-registry",
        "failed == 0 and corrupt == 0 while etcd is killed; afterwards the agent still lists \
         and serves the services it had",
    );
    r.add_load(&proxy);
    r.add_load(&kernel);
    r.note("proxy_failed", proxy.failed);
    r.note("kernel_failed", kernel.failed);
    r.note("agent_noticed", noticed);
    r.note("errors", proxy.first_errors());
    r.check(proxy.failed + kernel.failed == 0, "requests failed");
    r.check(before == after, "the services changed");
    r.check(
        still.get("backend-1") == Some(&2) && still.values().sum::<usize>() == 6,
        format!("not served afterwards: {still:?}"),
    );
    r.check(noticed, "the agent never said etcd was gone");
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn at_its_descriptor_limit_the_agent_stays_responsive_and_recovers() -> anyhow::Result<()> {
    if !require_root("at_its_descriptor_limit_the_agent_stays_responsive_and_recovers") {
        return Ok(());
    }
    /// About this many proxied connections fit under the lowered limit.
    const ROOM: u64 = 100;
    /// The descriptors the agent's forwarder leaves for its control side
    /// (`agent/src/forwarder/room.rs`).
    const RESERVE: u64 = 160;
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(&service(&topo, "web", PROXY_VIP, "proxy", &[0, 1, 2], ""));
    let agent = Agent::start(&topo, &config)?;
    let pid = agent.process.pid();
    // Each worker and listener has made what it lazily makes.
    topo.ask(0, vip(PROXY_VIP), 6)?;
    let base = fault::open_fds(pid)? as u64;
    let limit = base + 2 * ROOM + RESERVE;
    fault::set_nofile(pid, limit)?;

    let seconds = fault::load_seconds();
    let load = Load::start(
        &topo,
        0,
        vip(PROXY_VIP),
        600.0,
        &["--rate", "50", "--timeout-ms", "1000"],
    )?;
    // Until the agent cannot take more: five refusals (or timeouts) in a row.
    let idle = Idle::open(
        &topo,
        0,
        vip(PROXY_VIP),
        (3 * ROOM) as usize,
        &["--give-up", "5", "--timeout-ms", "500"],
    )?;
    let opening = idle.opening.clone();
    let full_fds = fault::open_fds(pid)? as u64;
    // Saturated: alive, not spinning, and the control side still answers.
    let cpu0 = fault::cpu_seconds(pid)?;
    pause(seconds.max(2.0));
    let cpu = fault::cpu_seconds(pid)? - cpu0;
    let window = seconds.max(2.0);
    let api = api_answers(&topo.api_socket(), Duration::from_secs(3));
    let metrics = metrics_answer(&topo, Duration::from_secs(3));
    let alive_full = fault::alive(pid);
    let check = idle.release()?;
    let released = monotonic_ns();
    pause(RECOVERY.as_secs_f64() + 1.0);
    let recovered = released + RECOVERY.as_nanos();
    let counts = load.stop_and_finish()?;
    let after = topo.ask_with(0, vip(PROXY_VIP), 6, true, &["--timeout-ms", "2000"])?;
    let warnings = agent.said(&["accept failed"]).len();

    let mut r = Report::new(
        "fd-limit",
        "at the limit: alive, API and metrics answer, under 25% of a core; held connections \
         echo intact; requests started 2s after they close succeed; corrupt == 0",
    );
    r.add_load(&counts);
    r.add_idle(&check);
    r.note("limit", limit);
    r.note("fds_at_full", full_fds);
    r.note("held", check.checked);
    r.note("refused_at_limit", opening.failed);
    r.note("refusal", opening.first_error.clone());
    r.note("cpu_percent_while_full", (cpu / window * 100.0).round());
    r.note("api_answered", api);
    r.note("metrics_answered", metrics);
    r.note("accept_warnings", warnings as u64);
    r.note("load_failed_after_release", counts.failed_after(recovered));
    r.check(alive_full && fault::alive(pid), "the agent died");
    r.check(api, "the API did not answer at the limit");
    r.check(metrics, "metrics did not answer at the limit");
    r.check(
        cpu / window < 0.25,
        format!("{cpu:.2}s CPU in {window}s at the limit"),
    );
    r.check(
        check.checked > 0 && check.failed == 0,
        format!("held connections failed: {check:?}"),
    );
    r.check(
        counts.failed_after(recovered) == 0,
        "load failed after the release",
    );
    r.check(
        after.keys().all(|k| k.starts_with("backend-")) && after.values().sum::<usize>() == 6,
        format!("new connections after the release: {after:?}"),
    );
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn thousands_of_idle_connections_all_still_work_and_new_ones_succeed() -> anyhow::Result<()> {
    if !require_root("thousands_of_idle_connections_all_still_work_and_new_ones_succeed") {
        return Ok(());
    }
    let count = fault::idle_connections();
    // The agent holds two descriptors per proxied connection; what it starts inherits this.
    let nofile = fault::raise_own_nofile(2 * count as u64 + HEADROOM)?;
    // Proxy mode takes what the agent's descriptor limit allows (a container may cap the hard
    // limit: 20,000 here holds about 9,500); kernel mode, which costs the agent nothing per
    // connection, holds the rest, and at least min(N, 2,000) to show it holds too.
    let proxy_count = count.min((nofile.saturating_sub(HEADROOM) / 2) as usize);
    let direct_count = (count - proxy_count).max(count.min(2000));
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(
        &(service(&topo, "kern", KERNEL_VIP, "kernel", &[0, 1, 2], "")
            + &service(&topo, "prox", PROXY_VIP, "proxy", &[0, 1, 2], "")),
    );
    let agent = Agent::start(&topo, &config)?;
    let seconds = fault::load_seconds();
    let load = Load::start(&topo, 0, vip(PROXY_VIP), 600.0, &[])?;
    let proxied = Idle::open(&topo, 0, vip(PROXY_VIP), proxy_count, &[])?;
    let direct = Idle::open(&topo, 0, vip(KERNEL_VIP), direct_count, &[])?;
    let agent_fds = fault::open_fds(agent.process.pid())?;
    // While they are all held: new connections still succeed, in both modes.
    let fresh_proxy = topo.ask(0, vip(PROXY_VIP), 30)?;
    let fresh_kernel = topo.ask(0, vip(KERNEL_VIP), 30)?;
    pause(seconds);
    let (opened_p, opened_k) = (proxied.opening.clone(), direct.opening.clone());
    let checked_p = proxied.release()?;
    let checked_k = direct.release()?;
    let counts = load.stop_and_finish()?;

    let fresh_ok = |t: &switchyard_testkit::topology::Tally| {
        t.keys().all(|k| k.starts_with("backend-")) && t.values().sum::<usize>() == 30
    };
    let mut r = Report::new(
        "idle-connections",
        "N connections in all, proxy mode as many as the agent's descriptor limit allows \
         ((limit - 1000) / 2), kernel mode the rest and at least min(N, 2000): every one opens \
         and, after being held, echoes its payload intact; new connections meanwhile all \
         succeed; the load: failed == 0; corrupt == 0",
    );
    r.add_load(&counts);
    r.add_idle(&checked_p);
    r.add_idle(&checked_k);
    r.note("proxy_held", checked_p.ok);
    r.note("kernel_held", checked_k.ok);
    r.note("agent_fds", agent_fds as u64);
    r.note("nofile", nofile);
    r.note("load_failed", counts.failed);
    r.note(
        "errors",
        format!("{} {}", opened_p.first_error, checked_p.first_error),
    );
    r.note("held_total", checked_p.ok + checked_k.ok);
    r.check(
        opened_p.opened == proxy_count as u64,
        format!("proxy mode: opened {opened_p:?}"),
    );
    r.check(
        opened_k.opened == direct_count as u64,
        format!("kernel mode: opened {opened_k:?}"),
    );
    r.check(
        checked_p.ok == opened_p.opened,
        format!("proxy mode: {checked_p:?}"),
    );
    r.check(
        checked_k.ok == opened_k.opened,
        format!("kernel mode: {checked_k:?}"),
    );
    r.check(
        fresh_ok(&fresh_proxy),
        format!("new proxy connections: {fresh_proxy:?}"),
    );
    r.check(
        fresh_ok(&fresh_kernel),
        format!("new kernel connections: {fresh_kernel:?}"),
    );
    r.check(
        counts.failed == 0,
        format!("load: {} failed ({})", counts.failed, counts.first_errors()),
    );
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}

#[test]
fn malformed_config_and_api_input_are_refused_with_a_reason_and_change_nothing()
-> anyhow::Result<()> {
    if !require_root("malformed_config_and_api_input_are_refused_with_a_reason_and_change_nothing")
    {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(
        &(service(&topo, "kern", KERNEL_VIP, "kernel", &[0, 1, 2], "")
            + &service(&topo, "prox", PROXY_VIP, "proxy", &[0, 1, 2], "")),
    );
    let agent = Agent::start(&topo, &config)?;
    let socket = topo.api_socket();
    let before = services(&socket)?;
    let seconds = fault::load_seconds();
    let proxy = Load::start(&topo, 0, vip(PROXY_VIP), 600.0, &[])?;
    let kernel = Load::start(&topo, 0, vip(KERNEL_VIP), 600.0, &["--rate", "50"])?;
    let started = std::time::Instant::now();

    // The watched file, rewritten with garbage of several kinds.
    let cut = config.find(PROXY_VIP).map_or(config.len() / 2, |i| i + 5);
    let garbage: Vec<(&str, String)> = vec![
        ("binary", "\u{0}\u{1}\u{7f}[[[ garbage ]]] = =\n".repeat(20)),
        ("truncated", config[..cut].to_owned()),
        (
            "bad value",
            config.replace("mode = \"proxy\"", "mode = \"teleport\""),
        ),
        (
            "bad type",
            config.replace("mode = \"proxy\"", "mode = \"proxy\"\nretries = \"many\""),
        ),
        ("duplicate vip", config.replace(KERNEL_VIP, PROXY_VIP)),
    ];
    let mut config_refused = 0u64;
    let mut reasons = Vec::new();
    for (what, text) in &garbage {
        let seen = agent.said(&["nothing applied"]).len();
        agent.rewrite_config(text)?;
        let said = control::wait_for(Duration::from_secs(10), || {
            let lines = agent.said(&["nothing applied"]);
            Ok((lines.len() > seen).then(|| lines[seen].clone()))
        });
        match said {
            Ok(line) => {
                config_refused += 1;
                let why = line.split_once("nothing applied: ").map_or("", |(_, w)| w);
                if why.is_empty() {
                    reasons.push(format!("{what}: no reason given"));
                }
            }
            Err(e) => reasons.push(format!("{what}: not refused ({e})")),
        }
    }

    // The API, sent bad JSON, bad fields and bytes that are not HTTP.
    let b0 = topo.backend(0, false);
    let bad: Vec<(&str, String, String)> = vec![
        ("POST", "/v1/services".into(), "not json".into()),
        (
            "POST",
            "/v1/services".into(),
            "{\"name\": \"x\", \"vip\": ".into(),
        ),
        (
            "POST",
            "/v1/services".into(),
            r#"{"name": 5, "vip": "10.96.0.99:80"}"#.into(),
        ),
        (
            "POST",
            "/v1/services".into(),
            r#"{"name": "x", "vip": "10.96.0.99"}"#.into(),
        ),
        (
            "POST",
            "/v1/services".into(),
            format!(r#"{{"name": "x", "vip": "{PROXY_VIP}"}}"#),
        ),
        (
            "PATCH",
            format!("/v1/services/prox/backends/{b0}"),
            r#"{"weight": 900}"#.into(),
        ),
        (
            "PATCH",
            format!("/v1/services/prox/backends/{b0}"),
            r#"{"state": "sleepy"}"#.into(),
        ),
        (
            "PATCH",
            format!("/v1/services/prox/backends/{b0}"),
            "[1, 2, 3]".into(),
        ),
        ("DELETE", "/v1/services/prox".into(), String::new()),
    ];
    let mut api_refused = 0u64;
    for (method, path, body) in &bad {
        let a = control::request(&socket, method, path, Some(body))?;
        let said = a
            .json()
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned));
        if (400..500).contains(&a.status) && said.is_some_and(|e| !e.is_empty()) {
            api_refused += 1;
        } else {
            reasons.push(format!("{method} {path} {body}: {} {}", a.status, a.body));
        }
    }
    let raw: [&[u8]; 3] = [
        b"\x00\x01\x02\x03 garbage\r\n\r\n",
        b"GET /v1/services HTTP/9.9\r\n\r\n",
        b"POST /v1/services HTTP/1.1\r\nHost: s\r\nContent-Length: -4\r\n\r\n{}",
    ];
    for bytes in raw {
        // Refused: a 4xx, or the connection closed without an answer.
        match control::raw(&socket, bytes) {
            Ok(a) if !(400..500).contains(&a.status) => reasons.push(format!(
                "{:?}: {} {}",
                String::from_utf8_lossy(bytes),
                a.status,
                a.body
            )),
            _ => api_refused += 1,
        }
    }
    let after = services(&socket)?;
    // The good file again: taken as before.
    let applied = agent.said(&["config file changed: applying"]).len();
    agent.rewrite_config(&config)?;
    let retaken = control::wait_for(Duration::from_secs(10), || {
        Ok((agent.said(&["config file changed: applying"]).len() > applied).then_some(()))
    })
    .is_ok();
    pause((seconds - started.elapsed().as_secs_f64()).max(0.5));
    let proxy = proxy.stop_and_finish()?;
    let kernel = kernel.stop_and_finish()?;
    let alive = fault::alive(agent.process.pid());
    let api = api_answers(&socket, Duration::from_secs(5));

    let mut r = Report::new(
        "malformed-input",
        "every garbage config is refused with a reason and every bad API request with a 4xx \
         (JSON ones with an error message); failed == 0; the services unchanged; corrupt == 0",
    );
    r.add_load(&proxy);
    r.add_load(&kernel);
    r.note(
        "configs_refused",
        format!("{config_refused}/{}", garbage.len()),
    );
    r.note(
        "api_refused",
        format!("{api_refused}/{}", bad.len() + raw.len()),
    );
    r.note("errors", proxy.first_errors());
    r.check(
        config_refused == garbage.len() as u64
            && api_refused == (bad.len() + raw.len()) as u64
            && reasons.is_empty(),
        format!("not refused as they should: {reasons:?}"),
    );
    r.check(proxy.failed + kernel.failed == 0, "requests failed");
    r.check(before == after, "the services changed");
    r.check(retaken, "the good file was not taken again");
    r.check(alive && api, "the agent stopped answering");
    r.check(r.corrupt() == 0, "corrupt payloads");
    r.finish()
}
