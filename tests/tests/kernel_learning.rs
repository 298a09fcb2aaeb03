//! Kernel mode that learns: the eBPF programs count each backend's connections, failures and
//! connect time themselves, balance on them (`least_connections`, `peak_ewma`) and eject a
//! backend that refuses connects, with no agent in the loop.

use std::{net::SocketAddr, process::Command, time::Duration};

use serde_json::Value;
use switchyard_testkit::{
    Agent, Topology,
    control::{self, wait_for},
    netns,
    process::{Place, Process},
    require_root,
    topology::Tally,
};

const VIP: &str = "10.96.0.10:80";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

fn count(tally: &Tally, backend: usize) -> usize {
    tally
        .get(&Topology::backend_name(backend))
        .copied()
        .unwrap_or(0)
}

/// A `[[service]]` at [`VIP`] with these backend entries (TOML inline tables or strings).
fn service(extra: &str, backends: &[String]) -> String {
    format!(
        "[[service]]\nname = \"learn\"\nvip = \"{VIP}\"\n{extra}\nbackends = [{}]\n",
        backends.join(", ")
    )
}

fn plain(topo: &Topology, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("\"{}\"", topo.backend(i, false)))
        .collect()
}

/// `GET /v1/state`.
fn state(topo: &Topology) -> anyhow::Result<Value> {
    let a = control::request(&topo.api_socket(), "GET", "/v1/state", None)?;
    anyhow::ensure!(a.status == 200, "/v1/state: {} {}", a.status, a.body);
    a.json()
}

/// The live state of backend `i` of the `learn` service.
fn backend(state: &Value, topo: &Topology, i: usize) -> Value {
    let addr = topo.backend(i, false).to_string();
    state["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "learn")
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .find(|b| b["address"] == addr.as_str())
        .unwrap_or_else(|| panic!("no backend {addr} in {state}"))
}

fn kernel(state: &Value, topo: &Topology, i: usize, field: &str) -> u64 {
    let b = backend(state, topo, i);
    b["kernel"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no kernel.{field} in {b}"))
}

/// A file whose existence releases `sy-probe idle`.
struct Release(std::path::PathBuf);

impl Release {
    fn new() -> Self {
        Release(std::env::temp_dir().join(switchyard_testkit::unique("sy-release-")))
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
    fn now(&self) -> anyhow::Result<()> {
        std::fs::write(&self.0, b"")?;
        Ok(())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn kernel_least_connections_sends_no_new_connections_to_a_backend_holding_many()
-> anyhow::Result<()> {
    if !require_root("kernel_least_connections_sends_no_new_connections_to_a_backend_holding_many")
    {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let only_first: Vec<String> = (0..3)
        .map(|i| {
            let state = if i == 0 { "ready" } else { "maint" };
            format!(
                "{{ address = \"{}\", state = \"{state}\" }}",
                topo.backend(i, false)
            )
        })
        .collect();
    let algorithm = "algorithm = \"least_connections\"";
    let agent = Agent::start(&topo, &topo.agent_config(&service(algorithm, &only_first)))?;
    // Twenty connections held open on backend-1 (the only one usable yet).
    let release = Release::new();
    let mut idle = topo.probe(
        0,
        &[
            "idle",
            "--to",
            VIP,
            "--count",
            "20",
            "--release",
            release.path(),
        ],
    )?;
    idle.wait_for("idle opened=20 failed=0", Duration::from_secs(30))?;
    let s = state(&topo)?;
    assert_eq!(kernel(&s, &topo, 0, "established_open"), 20, "{s}");

    agent.rewrite_config(&topo.agent_config(&service(algorithm, &plain(&topo, 3))))?;
    topo.wait_until(vip(), 4, Duration::from_secs(20), "on all backends", |t| {
        count(t, 1) > 0 && count(t, 2) > 0
    })?;
    let tally = topo.ask(0, vip(), 60)?;
    // Two distinct candidates each time: the busy backend always loses.
    assert_eq!(count(&tally, 0), 0, "{tally:?}");
    assert_eq!(count(&tally, 1) + count(&tally, 2), 60, "{tally:?}");
    release.now()?;
    idle.wait_for("idle checked=20 ok=20", Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn kernel_least_connections_stays_weighted() -> anyhow::Result<()> {
    if !require_root("kernel_least_connections_stays_weighted") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let weighted = vec![
        format!("{{ address = \"{}\", weight = 3 }}", topo.backend(0, false)),
        format!("{{ address = \"{}\", weight = 1 }}", topo.backend(1, false)),
    ];
    let config = topo.agent_config(&service("algorithm = \"least_connections\"", &weighted));
    let _agent = Agent::start(&topo, &config)?;
    let release = Release::new();
    let mut idle = topo.probe(
        0,
        &[
            "idle",
            "--to",
            VIP,
            "--count",
            "40",
            "--release",
            release.path(),
        ],
    )?;
    idle.wait_for("idle opened=40 failed=0", Duration::from_secs(30))?;
    let s = state(&topo)?;
    // Open connections per weight stay level: 30 and 10.
    let heavy = kernel(&s, &topo, 0, "established_open");
    assert!((29..=31).contains(&heavy), "{s}");
    assert_eq!(heavy + kernel(&s, &topo, 1, "established_open"), 40, "{s}");
    Ok(())
}

#[test]
fn kernel_ejects_a_refusing_backend_with_the_agent_stopped_and_takes_it_back() -> anyhow::Result<()>
{
    if !require_root("kernel_ejects_a_refusing_backend_with_the_agent_stopped_and_takes_it_back") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 2)?;
    let extra = "algorithm = \"round_robin\"\noutlier_failures = 3\noutlier_ejection = \"2s\"";
    let config = topo.agent_config(&service(extra, &plain(&topo, 2)));
    let agent = Agent::start(&topo, &config)?;
    let tally = topo.ask(0, vip(), 4)?;
    assert_eq!((count(&tally, 0), count(&tally, 1)), (2, 2), "{tally:?}");
    drop(agent);

    // No agent: the pinned programs alone see backend-2 refuse, and eject it on the third.
    topo.kill_backend(1);
    let tally = topo.ask(0, vip(), 20)?;
    assert_eq!(tally.get("error:refused"), Some(&3), "{tally:?}");
    assert_eq!(count(&tally, 0), 17, "{tally:?}");

    // Back after the ejection time (2 s for a first ejection).
    topo.restart_backend(1)?;
    std::thread::sleep(Duration::from_millis(2_200));
    let tally = topo.ask(0, vip(), 10)?;
    assert_eq!((count(&tally, 0), count(&tally, 1)), (5, 5), "{tally:?}");

    // A new agent adopts the programs' counts and shows them.
    let _agent = Agent::start(&topo, &config)?;
    let s = state(&topo)?;
    assert_eq!(kernel(&s, &topo, 1, "ejections"), 1, "{s}");
    assert_eq!(kernel(&s, &topo, 1, "failed"), 3, "{s}");
    assert_eq!(kernel(&s, &topo, 1, "established"), 7, "{s}");
    assert_eq!(kernel(&s, &topo, 0, "established"), 24, "{s}");
    Ok(())
}

#[test]
fn kernel_ejects_at_most_half_and_keeps_a_mostly_failing_service_served() -> anyhow::Result<()> {
    if !require_root("kernel_ejects_at_most_half_and_keeps_a_mostly_failing_service_served") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 4)?;
    let extra = "algorithm = \"round_robin\"\noutlier_failures = 2\noutlier_ejection = \"60s\"";
    let config = topo.agent_config(&service(extra, &plain(&topo, 4)));
    let agent = Agent::start(&topo, &config)?;
    for i in 1..4 {
        topo.kill_backend(i);
    }
    let tally = topo.ask(0, vip(), 60)?;
    let s = state(&topo)?;
    let ejected: Vec<usize> = (1..4)
        .filter(|&i| !backend(&s, &topo, i)["ejected_for_seconds"].is_null())
        .collect();
    // Three of four refuse: two are ejected (half the service), the third stays in.
    assert_eq!(ejected.len(), 2, "{s}");
    assert!(
        backend(&s, &topo, 0)["ejected_for_seconds"].is_null(),
        "{s}"
    );
    let kept = (1..4).find(|i| !ejected.contains(i)).unwrap();
    assert!(kernel(&s, &topo, kept, "failed") > 2, "{s}");
    // Never an empty service: backend-1 keeps answering (at least its round-robin turns; an
    // ejected slot's turn goes to the next slot), the refusals come from the backend that
    // stayed in (a fail-fast would never reach it).
    assert!(count(&tally, 0) >= 15, "{tally:?}");
    let refused = tally.get("error:refused").copied().unwrap_or(0);
    assert_eq!(count(&tally, 0) + refused, 60, "{tally:?}");
    let failed: u64 = (1..4).map(|i| kernel(&s, &topo, i, "failed")).sum();
    assert_eq!(failed, refused as u64, "{s}");
    // The agent logs the kernel's ejections.
    let mut agent = agent;
    agent
        .process
        .wait_for("the kernel ejected the backend", Duration::from_secs(5))?;
    Ok(())
}

/// A backend that is slow to accept: a listener with a backlog of one that takes a
/// connection every `every_ms`, so that with a few clients at once its queue is full and a
/// SYN waits for the client's retransmission (a second) before the handshake completes.
fn slow_acceptor(topo: &Topology, i: usize, every_ms: u64) -> anyhow::Result<Process> {
    let addr = topo.backend(i, false);
    let script = format!(
        "import socket, time\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}', {}))\n\
         s.listen(0)\n\
         print('listening', flush=True)\n\
         while True:\n\
         \x20   time.sleep({})\n\
         \x20   c, _ = s.accept()\n\
         \x20   try:\n\
         \x20       c.sendall(b'{}\\n')\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   c.close()\n",
        addr.ip(),
        addr.port(),
        every_ms as f64 / 1000.0,
        Topology::backend_name(i),
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let mut p = Process::spawn(
        "slow-acceptor",
        cmd,
        Place {
            netns: Some(&topo.backend_ns[i]),
            cgroup: None,
        },
    )?;
    p.wait_for("listening", Duration::from_secs(10))?;
    Ok(p)
}

#[test]
fn kernel_peak_ewma_prefers_the_backend_with_the_shorter_handshake() -> anyhow::Result<()> {
    if !require_root("kernel_peak_ewma_prefers_the_backend_with_the_shorter_handshake") {
        return Ok(());
    }
    // This kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is off): the slow handshake comes
    // from a full accept queue instead.
    let mut topo = Topology::new(1, 2)?;
    topo.kill_backend(0);
    let _slow = slow_acceptor(&topo, 0, 1_500)?;
    let extra = "algorithm = \"peak_ewma\"\noutlier_failures = 1000";
    let _agent = Agent::start(&topo, &topo.agent_config(&service(extra, &plain(&topo, 2))))?;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(topo.probe(
            0,
            &["ask", "--to", VIP, "--count", "25", "--timeout-ms", "8000"],
        )?);
    }
    for c in &mut clients {
        c.wait_exit(Duration::from_secs(120))?;
    }
    let s = state(&topo)?;
    // Opened, not established: a connect to the slow one may outlast the client's patience.
    let (slow, fast) = (
        kernel(&s, &topo, 0, "opened"),
        kernel(&s, &topo, 1, "opened"),
    );
    assert_eq!(slow + fast, 100, "{s}");
    // Round robin would give each 50; the slow one is avoided after its first slow handshake.
    assert!(slow * 5 < fast, "{s}");
    let ewma = |i| backend(&s, &topo, i)["kernel"]["connect_ewma_seconds"].as_f64();
    let (slow_ewma, fast_ewma) = (ewma(0).unwrap(), ewma(1).unwrap());
    // A handshake behind a full queue waits for the SYN's retransmission (a second); the
    // other backend's stays far below (relative: a loaded machine slows every handshake).
    assert!(slow_ewma > 0.3 && slow_ewma > 3.0 * fast_ewma, "{s}");
    // The dropped SYNs were seen through the retransmission callback.
    assert!(kernel(&s, &topo, 0, "syn_retransmits") > 0, "{s}");
    Ok(())
}

#[test]
fn kernel_counts_return_to_zero_after_100000_connections() -> anyhow::Result<()> {
    if !require_root("kernel_counts_return_to_zero_after_100000_connections") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    // Enough ports for 100,000 short connections to three backends within TIME_WAIT.
    netns::run(
        "ip",
        &[
            "netns",
            "exec",
            topo.pods[0].name(),
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    )?;
    let extra = "algorithm = \"least_connections\"";
    let _agent = Agent::start(&topo, &topo.agent_config(&service(extra, &plain(&topo, 3))))?;
    // Four clients at once: the counts must stay exact across CPUs.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(topo.probe(0, &["ask", "--to", VIP, "--count", "25000"])?);
    }
    let mut answered = 0;
    for c in &mut clients {
        c.wait_exit(Duration::from_secs(600))?;
        for line in c.output() {
            if let Some((name, n)) = line.rsplit_once(' ')
                && name.starts_with("backend-")
            {
                answered += n.parse::<usize>()?;
            }
        }
    }
    assert_eq!(answered, 100_000);
    let s = wait_for(Duration::from_secs(20), || {
        let s = state(&topo)?;
        let open: u64 = (0..3)
            .map(|i| kernel(&s, &topo, i, "connecting") + kernel(&s, &topo, i, "established_open"))
            .sum();
        Ok((open == 0 && s["kernel_sockets"] == 0).then_some(s))
    })?;
    let sum = |f: &str| (0..3).map(|i| kernel(&s, &topo, i, f)).sum::<u64>();
    assert_eq!(sum("opened"), 100_000, "{s}");
    assert_eq!(sum("established"), 100_000, "{s}");
    assert_eq!(sum("closed"), 100_000, "{s}");
    assert_eq!(sum("failed"), 0, "{s}");
    Ok(())
}

#[test]
fn kernel_per_backend_metrics_match_a_known_workload() -> anyhow::Result<()> {
    if !require_root("kernel_per_backend_metrics_match_a_known_workload") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 2)?;
    let extra = "algorithm = \"round_robin\"\noutlier_failures = 100";
    let _agent = Agent::start(&topo, &topo.agent_config(&service(extra, &plain(&topo, 2))))?;
    let tally = topo.ask(0, vip(), 10)?;
    assert_eq!((count(&tally, 0), count(&tally, 1)), (5, 5), "{tally:?}");
    topo.kill_backend(1);
    let tally = topo.ask(0, vip(), 4)?;
    assert_eq!(count(&tally, 0), 2, "{tally:?}");
    assert_eq!(tally.get("error:refused"), Some(&2), "{tally:?}");

    let labels = |i: usize| {
        format!(
            "{{service=\"learn\",backend=\"{}\"}}",
            topo.backend(i, false)
        )
    };
    let metric = |text: &str, name: &str, i: usize| {
        let series = format!("switchyard_{name}{}", labels(i));
        control::sample(text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    // A connection is counted closed once its socket reaches CLOSE, a moment after the client
    // is done.
    let text = wait_for(Duration::from_secs(20), || {
        let a = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?;
        anyhow::ensure!(a.status == 200, "/metrics: {}", a.status);
        let open: f64 = (0..2)
            .map(|i| metric(&a.body, "backend_connections_active", i))
            .sum();
        Ok((open == 0.0).then_some(a.body))
    })?;
    let want = [
        ("backend_connections_opened_total", [7.0, 7.0]),
        // Failed connects count as ended, as in proxy mode.
        ("backend_connections_closed_total", [7.0, 7.0]),
        ("backend_connections_established_total", [7.0, 5.0]),
        ("backend_connect_failures_total", [0.0, 2.0]),
        ("backend_ejections_total", [0.0, 0.0]),
        ("backend_ejected", [0.0, 0.0]),
        ("backend_syn_retransmits_total", [0.0, 0.0]),
    ];
    for (name, values) in want {
        for (i, v) in values.into_iter().enumerate() {
            assert_eq!(metric(&text, name, i), v, "{name} of backend {i}\n{text}");
        }
    }
    // The connect-time EWMA of a backend one bridge away is well under the 30 ms it starts at.
    assert!(
        metric(&text, "backend_connect_ewma_seconds", 0) < 0.03,
        "{text}"
    );

    // `ctl state` shows the same counts.
    let ctl = control::ctl(&topo.api_socket(), &["--json", "state"])?;
    let s = ctl.json()?;
    let b = backend(&s, &topo, 1);
    assert_eq!(b["counters"]["opened"], 7, "{b}");
    assert_eq!(b["counters"]["connect_failures"], 2, "{b}");
    let table = control::ctl(&topo.api_socket(), &["state"])?;
    assert!(table.stdout.contains("learn"), "{table:?}");
    Ok(())
}

#[test]
fn kernel_counts_stay_exact_when_a_connect_never_reaches_tcp() -> anyhow::Result<()> {
    if !require_root("kernel_counts_stay_exact_when_a_connect_never_reaches_tcp") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    // The pods have no route to 192.0.2.0/24 (TEST-NET-1): connect() fails with ENETUNREACH
    // before TCP sends anything, so `sock_ops` never sees the socket.
    let backends = vec!["\"192.0.2.10:80\"".to_owned()];
    let _agent = Agent::start(&topo, &topo.agent_config(&service("", &backends)))?;
    let tally = topo.ask(0, vip(), 20)?;
    assert_eq!(tally.get("error:unreachable"), Some(&20), "{tally:?}");
    let s = state(&topo)?;
    let b = &s["services"][0]["backends"][0]["kernel"];
    for field in ["opened", "connecting", "failed", "consecutive_failures"] {
        assert_eq!(b[field], 0, "{field}: {s}");
    }
    // Their cookie entries wait for the LRU (measured: no hook sees these sockets close, see
    // docs/kernel-learning.md); never more than were made.
    assert!(s["kernel_sockets"].as_u64().unwrap() <= 20, "{s}");
    Ok(())
}
