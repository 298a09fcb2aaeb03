//! Proxy mode's forwarder: byte integrity, backpressure, load-aware balancing, retries, outlier
//! ejection, health checks, draining, limits.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use switchyard_testkit::{
    Agent, Topology, entries,
    expect::{count, errors},
    require_root,
    topology::Tally,
};

const VIP: &str = "10.96.0.20:80";
const SINK_VIP: &str = "10.96.0.21:9090";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// A proxy-mode service over backends `which`, with extra settings.
/// The proxy-mode service `web` over backends `which`, with extra settings.
fn service(topo: &Topology, which: &[usize], extra: &str) -> String {
    let extra = format!("mode = \"proxy\"\n{extra}");
    entries::service("web", VIP, &extra, &entries::backends(topo, which))
}

#[test]
fn large_payloads_arrive_intact_both_ways_on_each_byte_path() -> anyhow::Result<()> {
    if !require_root("large_payloads_arrive_intact_both_ways_on_each_byte_path") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let services = service(&topo, &[0], "byte_path = \"copy\"")
        + &service(&topo, &[0], "byte_path = \"splice\"")
            .replace("name = \"web\"", "name = \"web-splice\"")
            .replace(VIP, "10.96.0.22:80");
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;
    for (to, seed) in [(VIP, "7"), ("10.96.0.22:80", "8")] {
        // 32 MiB each way; the echo backend sends everything back, then half-closes after the
        // client's half-close: both FINs must cross the forwarder.
        let out = topo.probe_output(
            0,
            &["stream", "--to", to, "--bytes", "33554432", "--seed", seed],
        )?;
        assert!(
            out.iter().any(|l| l.starts_with("stream ok 33554432")),
            "{to}: {out:?}"
        );
    }
    Ok(())
}

#[test]
fn a_slow_backend_slows_the_client_down_on_each_byte_path() -> anyhow::Result<()> {
    if !require_root("a_slow_backend_slows_the_client_down_on_each_byte_path") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let sink = SocketAddr::new(
        topo.backend(0, false).ip(),
        switchyard_testkit::topology::SINK_PORT,
    );
    let mut services = String::new();
    for (i, path) in ["copy", "splice"].iter().enumerate() {
        services += &format!(
            "[[service]]\nname = \"sink-{path}\"\nvip = \"10.96.0.2{}:9090\"\nmode = \"proxy\"\nbyte_path = \"{path}\"\nbackends = [\"{sink}\"]\n\n",
            i + 1
        );
    }
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;
    for to in [SINK_VIP, "10.96.0.22:9090"] {
        let out = topo.probe_output(0, &["flood", "--to", to, "--seconds", "3"])?;
        let wrote: u64 = out
            .iter()
            .find_map(|l| {
                l.strip_prefix("flood wrote ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(u64::MAX);
        // The sink reads 1 MB/s: about 3 MB in 3 s. What else the client could write is what
        // the socket buffers on the way hold (a few MB each); without backpressure it would be
        // gigabytes.
        assert!(
            wrote < 48 << 20,
            "{to}: the client wrote {wrote} bytes into a 1 MB/s sink in 3 s"
        );
    }
    Ok(())
}

#[test]
fn least_connections_and_peak_ewma_move_load_away_from_a_slow_backend() -> anyhow::Result<()> {
    if !require_root("least_connections_and_peak_ewma_move_load_away_from_a_slow_backend") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 3)?;
    topo.restart_backend_with(0, &["--delay-ms", "300"])?;
    for algorithm in ["least_connections", "peak_ewma"] {
        let config = topo.agent_config(&service(
            &topo,
            &[0, 1, 2],
            &format!("algorithm = \"{algorithm}\""),
        ));
        let _agent = Agent::start(&topo, &config)?;
        let topo = &topo;
        let tallies: Vec<Tally> = thread::scope(|s| {
            let workers: Vec<_> = (0..6)
                .map(|_| s.spawn(move || topo.ask(0, vip(), 20)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker"))
                .collect::<Result<_, _>>()
        })?;
        let slow: usize = tallies.iter().map(|t| count(t, 0)).sum();
        let all: usize = tallies.iter().map(|t| t.values().sum::<usize>()).sum();
        assert_eq!(all, 120);
        assert!(tallies.iter().all(|t| errors(t) == 0), "{tallies:?}");
        // Even shares would give the slow backend 40 of 120; "clearly fewer" is under half that.
        assert!(
            slow < 20,
            "{algorithm}: the slow backend got {slow} of {all}: {tallies:?}"
        );
        eprintln!("{algorithm}: the slow backend got {slow} of {all}");
    }
    Ok(())
}

#[test]
fn a_backend_killed_under_load_costs_no_connection_and_is_ejected_then_returns()
-> anyhow::Result<()> {
    if !require_root("a_backend_killed_under_load_costs_no_connection_and_is_ejected_then_returns")
    {
        return Ok(());
    }
    let mut topo = Topology::new(1, 3)?;
    let config = topo.agent_config(&service(
        &topo,
        &[0, 1, 2],
        "algorithm = \"round_robin\"\noutlier_failures = 2\noutlier_ejection = \"1s\"",
    ));
    let mut agent = Agent::start(&topo, &config)?;
    let load = topo.probe(0, &["ask", "--to", VIP, "--count", "400"])?;
    thread::sleep(Duration::from_millis(100));
    topo.kill_backend(1);
    let mut load = load;
    load.wait_exit(Duration::from_secs(60))?;
    let tally: Tally = load
        .output()
        .iter()
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        })
        .collect();
    assert_eq!(errors(&tally), 0, "client connections failed: {tally:?}");
    assert_eq!(tally.values().sum::<usize>(), 400);
    agent
        .process
        .wait_for("backend ejected", Duration::from_secs(10))?;
    topo.restart_backend(1)?;
    // Back in rotation once its ejection is over (slow start ramps its weight up, so give it a
    // few rounds).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = topo.ask(0, vip(), 30)?;
        assert_eq!(errors(&t), 0, "{t:?}");
        if count(&t, 1) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend-2 never came back: {t:?}"
        );
    }
    agent
        .process
        .wait_for("ejection over", Duration::from_secs(1))?;
    Ok(())
}

#[test]
fn a_health_check_takes_a_dead_backend_out_of_the_kernels_choices() -> anyhow::Result<()> {
    if !require_root("a_health_check_takes_a_dead_backend_out_of_the_kernels_choices") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 3)?;
    let backends: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", topo.backend(i, false)))
        .collect();
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"k\"\nvip = \"10.96.0.10:80\"\nmode = \"kernel\"\n\
         health = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 2, fall = 2 }}\n\
         backends = [{}]\n",
        backends.join(", ")
    ));
    let mut agent = Agent::start(&topo, &config)?;
    let kernel_vip: SocketAddr = "10.96.0.10:80".parse()?;
    topo.kill_backend(2);
    agent
        .process
        .wait_for("health check: down", Duration::from_secs(10))?;
    // The kernel's slots no longer hold it: every connect succeeds.
    let t = topo.ask(0, kernel_vip, 30)?;
    assert_eq!(errors(&t), 0, "{t:?}");
    assert_eq!(count(&t, 0) + count(&t, 1), 30, "{t:?}");
    topo.restart_backend(2)?;
    agent
        .process
        .wait_for("health check: up again", Duration::from_secs(10))?;
    let t = topo.ask(0, kernel_vip, 30)?;
    assert!(count(&t, 2) > 0, "{t:?}");
    Ok(())
}

#[test]
fn draining_keeps_open_connections_until_the_deadline_and_sends_new_ones_elsewhere()
-> anyhow::Result<()> {
    if !require_root(
        "draining_keeps_open_connections_until_the_deadline_and_sends_new_ones_elsewhere",
    ) {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let config = |state: &str| {
        topo.agent_config(&format!(
            "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nmode = \"proxy\"\ndrain_timeout = \"2s\"\n\
             backends = [{{ address = \"{}\", state = \"{state}\" }}, \"{}\"]\n",
            topo.backend(0, false),
            topo.backend(1, false)
        ))
    };
    let agent = Agent::start(&topo, &config("ready"))?;
    // Long-lived connections, pinging every 100 ms for up to 20 s; some land on backend-1.
    let mut held: Vec<_> = (0..4)
        .map(|_| topo.probe(0, &["hold", "--to", VIP, "--seconds", "20"]))
        .collect::<Result<_, _>>()?;
    for h in &mut held {
        h.wait_for("name ", Duration::from_secs(5))?;
    }
    let on_drained: Vec<usize> = (0..held.len())
        .filter(|&i| held[i].output().iter().any(|l| l == "name backend-1"))
        .collect();
    assert!(
        !on_drained.is_empty(),
        "round robin put no connection on backend-1"
    );
    let drained_at = Instant::now();
    agent.rewrite_config(&config("drain"))?;
    thread::sleep(Duration::from_millis(500));
    // New connections avoid the drained backend ...
    let t = topo.ask(0, vip(), 10)?;
    assert_eq!(count(&t, 1), 10, "{t:?}");
    // ... while its open ones run on until the deadline, then close.
    for &i in &on_drained {
        held[i].wait_exit(Duration::from_secs(15))?;
        let ended = drained_at.elapsed();
        let out = held[i].output();
        assert!(out.iter().any(|l| l.ends_with("closed")), "{out:?}");
        assert!(
            ended >= Duration::from_secs(2),
            "closed before the drain deadline: {ended:?}"
        );
    }
    // The others were left alone.
    for (i, h) in held.iter_mut().enumerate() {
        if !on_drained.contains(&i) {
            assert!(
                h.output().iter().all(|l| !l.ends_with("closed")),
                "{:?}",
                h.output()
            );
        }
    }
    Ok(())
}

#[test]
fn limits_and_fail_fast_refuse_at_once() -> anyhow::Result<()> {
    if !require_root("limits_and_fail_fast_refuse_at_once") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let services = service(&topo, &[0], "max_connections = 2")
        + &format!(
            "[[service]]\nname = \"empty\"\nvip = \"10.96.0.30:80\"\nmode = \"proxy\"\nbackends = [{{ address = \"{}\", state = \"maint\" }}]\n",
            topo.backend(0, false)
        );
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;
    let mut held: Vec<_> = (0..2)
        .map(|_| topo.probe(0, &["hold", "--to", VIP, "--seconds", "10"]))
        .collect::<Result<_, _>>()?;
    for h in &mut held {
        h.wait_for("name backend-1", Duration::from_secs(5))?;
    }
    let t = topo.ask_with(0, vip(), 1, true, &["--timeout-ms", "5000"])?;
    assert!(
        t.contains_key("error:reset") || t.contains_key("error:eof"),
        "third connection: {t:?}"
    );
    // Nothing usable: refused in connect() itself.
    let t = topo.ask_with(
        0,
        "10.96.0.30:80".parse()?,
        1,
        true,
        &["--timeout-ms", "5000"],
    )?;
    assert_eq!(t.get("error:refused"), Some(&1), "{t:?}");
    Ok(())
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() -> anyhow::Result<()> {
    if !require_root("an_idle_connection_is_closed_after_the_idle_timeout") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let _agent = Agent::start(
        &topo,
        &topo.agent_config(&service(&topo, &[0], "idle_timeout = \"500ms\"")),
    )?;
    let out = topo.probe_output(
        0,
        &["hold", "--to", VIP, "--seconds", "10", "--ping-ms", "0"],
    )?;
    assert!(
        out.iter()
            .any(|l| l.starts_with("held") && l.ends_with("closed")),
        "{out:?}"
    );
    // A busy connection is not idle.
    let out = topo.probe_output(
        0,
        &["hold", "--to", VIP, "--seconds", "1.5", "--ping-ms", "100"],
    )?;
    assert!(out.iter().any(|l| l.ends_with("completed")), "{out:?}");
    Ok(())
}

#[test]
fn ring_hash_keeps_clients_on_their_backend_when_another_goes() -> anyhow::Result<()> {
    if !require_root("ring_hash_keeps_clients_on_their_backend_when_another_goes") {
        return Ok(());
    }
    let topo = Topology::new(1, 4)?;
    let sources: Vec<String> = (100..140).map(|h| format!("10.77.0.{h}")).collect();
    for s in &sources {
        topo.pods[0].ip(&["addr", "add", &format!("{s}/32"), "dev", "eth0"])?;
    }
    let sources = sources.join(",");
    let map = |topo: &Topology| -> anyhow::Result<Vec<(String, String)>> {
        let t = topo.ask_with(0, vip(), 1, true, &["--sources", &sources])?;
        Ok(t.keys()
            .filter_map(|k| k.split_once('/'))
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect())
    };
    let agent = Agent::start(
        &topo,
        &topo.agent_config(&service(&topo, &[0, 1, 2, 3], "algorithm = \"ring_hash\"")),
    )?;
    let before = map(&topo)?;
    assert_eq!(before.len(), 40);
    assert_eq!(
        before,
        map(&topo)?,
        "the same clients must land on the same backends"
    );
    agent.rewrite_config(&topo.agent_config(&service(
        &topo,
        &[0, 1, 3],
        "algorithm = \"ring_hash\"",
    )))?;
    // Wait until the change is live (no client on backend-3 any more).
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let after = map(&topo)?;
        if after.iter().all(|(_, b)| b != "backend-3") || Instant::now() > deadline {
            break after;
        }
        thread::sleep(Duration::from_millis(100));
    };
    for ((src, b), (_, a)) in before.iter().zip(&after) {
        if b != "backend-3" {
            assert_eq!(
                a, b,
                "{src} moved from {b} to {a} though its backend stayed"
            );
        } else {
            assert_ne!(a, "backend-3");
        }
    }
    Ok(())
}

/// Accepts one connection within a few seconds, or says none came.
fn accept_one(listener: &std::net::TcpListener) -> anyhow::Result<std::net::TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => anyhow::bail!("no connection reached the backend: {e}"),
        }
    }
}

#[test]
fn an_abort_on_either_side_reaches_the_other_as_an_abort_on_each_byte_path() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    if !require_root("an_abort_on_either_side_reaches_the_other_as_an_abort_on_each_byte_path") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    // The backend is the test's own socket, in the backend's namespace, so that it can read
    // exactly how its connection ended and end its own with a reset.
    let backend: SocketAddr = SocketAddr::new(topo.backend(0, false).ip(), 7100);
    let listener = topo.backend_ns[0].enter(move || std::net::TcpListener::bind(backend))??;
    listener.set_nonblocking(true)?;
    let mut services = String::new();
    for (name, vip, path) in [
        ("abort-copy", "10.96.0.30:7100", "copy"),
        ("abort-splice", "10.96.0.31:7100", "splice"),
    ] {
        services += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nmode = \"proxy\"\n\
             byte_path = \"{path}\"\nbackends = [\"{backend}\"]\n\n"
        );
    }
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;
    for vip in ["10.96.0.30:7100", "10.96.0.31:7100"] {
        // The client resets: the backend must see a reset, not an orderly end.
        let mut client = topo.probe(0, &["abort", "--to", vip, "--reset", "--bytes", "1000"])?;
        let mut conn = accept_one(&listener)?;
        conn.write_all(b"hello\n")?;
        let mut buf = [0u8; 4096];
        let mut read = 0;
        let ended = loop {
            match conn.read(&mut buf) {
                Ok(0) => break "an orderly end (FIN)".to_owned(),
                Ok(n) => read += n,
                Err(e) => break format!("{:?}", e.kind()),
            }
        };
        client.wait_exit(Duration::from_secs(10))?;
        assert_eq!(
            ended,
            "ConnectionReset",
            "{vip}: the client's reset reached the backend as {ended}, after {read} bytes; \
             client: {:?}",
            client.output()
        );
        assert!(read <= 1000, "{vip}: {read} bytes, more than were sent");

        // The backend resets after 1000 bytes: the client must read them, then a reset.
        let mut client = topo.probe(0, &["abort", "--to", vip])?;
        let conn = accept_one(&listener)?;
        (&conn).write_all(&[b'y'; 1000])?;
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
        drop(conn);
        client.wait_exit(Duration::from_secs(10))?;
        let out = client.output();
        assert!(
            out.iter().any(|l| l == "ended reset 1000"),
            "{vip}: the backend's reset should reach the client after its 1000 bytes: {out:?}"
        );
    }
    Ok(())
}
