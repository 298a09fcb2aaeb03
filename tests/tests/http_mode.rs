//! HTTP mode (`app_protocol`): requests balanced one by one over pooled upstream connections,
//! HTTP/1.1 keep-alive and HTTP/2 multiplexed, `auto` detection that passes other protocols
//! through untouched, retries that hide a dead backend but never replay a sent POST, per-try
//! and whole-request timeouts. Real clients (curl, redis-cli) and real servers (sy-http on
//! hyper, redis-server).

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use switchyard_testkit::{
    Agent, Process, Topology,
    http::{HttpBackends, backends_seen, curl, run_in_pod},
    process::Place,
    require_root,
};

const VIP: &str = "10.96.0.40:80";

/// A proxy-mode service on the HTTP port of backends `which`.
fn service(topo: &Topology, which: &[usize], extra: &str) -> String {
    let list: Vec<String> = which
        .iter()
        .map(|&i| format!("\"{}\"", HttpBackends::addr(topo, i)))
        .collect();
    format!(
        "[[service]]\nname = \"weather-backend\"\nvip = \"{VIP}\"\nmode = \"proxy\"\n{extra}\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

/// `n` requests for `path` on one client connection (curl reuses it for every URL), with
/// curl's own count of the connections it opened appended as `connects N` lines.
fn one_connection(topo: &Topology, path: &str, n: usize, extra: &[&str]) -> Vec<String> {
    let url = format!("http://{VIP}{path}");
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-w", "connects %{num_connects}\\n"]);
    for _ in 0..n {
        args.push(&url);
    }
    curl(topo, &args).expect("curl")
}

fn connects(lines: &[String]) -> usize {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("connects ")?.parse::<usize>().ok())
        .sum()
}

#[test]
fn one_client_connection_spreads_its_requests_over_every_backend() -> anyhow::Result<()> {
    if !require_root("one_client_connection_spreads_its_requests_over_every_backend") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    // The L4 path first: one connection, one backend, as every L4 balancer does.
    let agent = Agent::start(&topo, &topo.agent_config(&service(&topo, &[0, 1, 2], "")))?;
    let out = one_connection(&topo, "/", 30, &[]);
    assert_eq!(connects(&out), 1, "{out:?}");
    let seen = backends_seen(&out);
    assert_eq!(
        seen.len(),
        1,
        "tcp: one connection stays on one backend: {seen:?}"
    );
    drop(agent);

    let config = topo.agent_config(&service(&topo, &[0, 1, 2], "app_protocol = \"http\""));
    let _agent = Agent::start(&topo, &config)?;
    // HTTP/1.1 keep-alive: curl sends each URL in turn on its one connection.
    let out = one_connection(&topo, "/", 30, &[]);
    assert_eq!(connects(&out), 1, "one client connection: {out:?}");
    let seen = backends_seen(&out);
    // Round robin per request: 10 each.
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{seen:?}"
    );
    assert_eq!(
        out.iter().filter(|l| *l == "HTTP/1.1").count(),
        30,
        "{out:?}"
    );
    // HTTP/2: nghttp multiplexes every URL on one connection (curl 7.88 breaks its own
    // prior-knowledge connections on reuse); upstream, each backend's one HTTP/2 connection.
    let urls: Vec<String> = (0..30).map(|i| format!("http://{VIP}/r{i}")).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (ok, out) = run_in_pod(&topo, 0, "nghttp", &urls)?;
    assert!(ok, "{out:?}");
    let seen = backends_seen(&out);
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{seen:?}"
    );
    assert_eq!(
        out.iter().filter(|l| *l == "HTTP/2.0").count(),
        30,
        "the upstream speaks what the client speaks: {out:?}"
    );
    Ok(())
}

#[test]
fn auto_serves_http_and_passes_redis_through_untouched() -> anyhow::Result<()> {
    if !require_root("auto_serves_http_and_passes_redis_through_untouched") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _http = HttpBackends::start(&topo)?;
    let redis_addr = format!("{}:6379", topo.backend(0, false).ip());
    let mut redis = Command::new("redis-server");
    redis.args([
        "--bind",
        &topo.backend(0, false).ip().to_string(),
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]);
    let mut redis = Process::spawn(
        "redis-server",
        redis,
        Place {
            netns: Some(&topo.backend_ns[0]),
            cgroup: None,
        },
    )?;
    redis.wait_for("Ready to accept connections", Duration::from_secs(10))?;
    let services = service(&topo, &[0, 1], "app_protocol = \"auto\"")
        + &format!(
            "[[service]]\nname = \"cache\"\nvip = \"10.96.0.41:6379\"\nmode = \"proxy\"\n\
             app_protocol = \"auto\"\nbackends = [\"{redis_addr}\"]\n\n"
        );
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;

    let out = one_connection(&topo, "/", 10, &[]);
    assert_eq!(backends_seen(&out).len(), 2, "auto detected HTTP: {out:?}");

    let cli = |args: &[&str]| {
        let mut all = vec!["-h", "10.96.0.41", "-p", "6379"];
        all.extend_from_slice(args);
        run_in_pod(&topo, 0, "redis-cli", &all)
    };
    let (ok, out) = cli(&["SET", "weather", "sunny"])?;
    assert!(ok && out == ["OK"], "{out:?}");
    let (ok, out) = cli(&["GET", "weather"])?;
    assert!(ok && out == ["sunny"], "redis through auto: {out:?}");
    // A server-first protocol (sy-probe's: the backend names itself first) waits out the
    // detection and still gets through.
    let sy_probe = format!(
        "[[service]]\nname = \"first\"\nvip = \"10.96.0.42:80\"\nmode = \"proxy\"\n\
         app_protocol = \"auto\"\nbackends = [\"{}\"]\n\n",
        topo.backend(1, false)
    );
    drop(_agent);
    let _agent = Agent::start(&topo, &topo.agent_config(&sy_probe))?;
    let tally = topo.ask(0, "10.96.0.42:80".parse()?, 2)?;
    assert_eq!(tally.get("backend-2"), Some(&2), "{tally:?}");
    Ok(())
}

#[test]
fn retries_hide_a_dead_backend_but_never_replay_a_post_whose_body_was_sent() -> anyhow::Result<()> {
    if !require_root("retries_hide_a_dead_backend_but_never_replay_a_post_whose_body_was_sent") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let mut http = HttpBackends::start(&topo)?;
    let config = topo.agent_config(&service(&topo, &[0, 1, 2], "app_protocol = \"http\""));
    let _agent = Agent::start(&topo, &config)?;
    // Warm every backend's pool, then kill one: its pooled connection and every new connect
    // fail, and each GET goes on to another backend.
    let out = one_connection(&topo, "/", 6, &[]);
    assert_eq!(backends_seen(&out).len(), 3, "{out:?}");
    http.kill(0);
    let out = curl(
        &topo,
        &[
            "-w",
            "status %{http_code}\\n",
            &format!("http://{VIP}/"),
            &format!("http://{VIP}/"),
            &format!("http://{VIP}/"),
            &format!("http://{VIP}/"),
            &format!("http://{VIP}/"),
            &format!("http://{VIP}/"),
        ],
    )?;
    let statuses: Vec<&String> = out.iter().filter(|l| l.starts_with("status")).collect();
    assert!(
        statuses.iter().all(|s| *s == "status 200") && statuses.len() == 6,
        "GETs hide the dead backend: {out:?}"
    );
    assert!(!backends_seen(&out).contains_key("backend-1"), "{out:?}");

    // A POST whose body reached a backend that then died is not sent again: the client gets a
    // 502 from the proxy, and exactly one of the two live backends has exited.
    let out = curl(
        &topo,
        &[
            "-w",
            "status %{http_code}\\n",
            "--data",
            "order=42",
            &format!("http://{VIP}/exit"),
        ],
    )?;
    assert!(out.contains(&"status 502".to_owned()), "{out:?}");
    assert!(
        out.iter()
            .any(|l| l.contains("switchyard: service weather-backend")),
        "the proxy says why: {out:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let alive = [1, 2].iter().filter(|&&i| http.running(i)).count();
    assert_eq!(alive, 1, "the POST reached one backend only");
    Ok(())
}

#[test]
fn per_try_and_whole_request_timeouts_answer_504() -> anyhow::Result<()> {
    if !require_root("per_try_and_whole_request_timeouts_answer_504") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _http = HttpBackends::start(&topo)?;
    let config = topo.agent_config(&service(
        &topo,
        &[0, 1],
        "app_protocol = \"http\"\ntry_timeout = \"200ms\"\nrequest_timeout = \"1s\"",
    ));
    let _agent = Agent::start(&topo, &config)?;
    let status = |path: &str| -> anyhow::Result<(String, Duration)> {
        let started = Instant::now();
        let out = curl(
            &topo,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{VIP}{path}"),
            ],
        )?;
        Ok((out.join(""), started.elapsed()))
    };
    assert_eq!(status("/delay/10")?.0, "200", "within the try timeout");
    // Each try gives up after 200 ms and the GET goes to the other backend, which is as slow:
    // 504 once the tries are spent, well before the 5 s the backend would take.
    let (code, took) = status("/delay/5000")?;
    assert_eq!(code, "504");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let mut seen = BTreeMap::new();
    for _ in 0..4 {
        *seen.entry(status("/")?.0).or_insert(0) += 1;
    }
    assert_eq!(
        seen.get("200"),
        Some(&4),
        "the slow tries left no harm: {seen:?}"
    );

    // The whole request's bound: retries stop when it passes.
    drop(_agent);
    let config = topo.agent_config(&service(
        &topo,
        &[0, 1],
        "app_protocol = \"http\"\nrequest_timeout = \"300ms\"",
    ));
    let _agent = Agent::start(&topo, &config)?;
    let (code, took) = status("/delay/5000")?;
    assert_eq!(code, "504");
    assert!(took < Duration::from_secs(2), "{took:?}");
    Ok(())
}
