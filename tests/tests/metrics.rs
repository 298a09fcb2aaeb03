//! Prometheus metrics from the real agent: exact counts after a known workload, an exposition
//! `promtool` accepts, and a real Prometheus server scraping it.

use std::{net::SocketAddr, process::Command, time::Duration};

use switchyard_testkit::{
    Topology,
    agent::Agent,
    control::{self, Answer, sample, wait_for},
    process::{Place, Process},
    require_root,
    servers::TempDir,
};

const WEB: &str = "10.96.0.20:80";
const KERN: &str = "10.96.0.10:80";

fn services(topo: &Topology) -> String {
    let (b0, b1) = (topo.backend(0, false), topo.backend(1, false));
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{WEB}\"\nmode = \"proxy\"\nbackends = [\"{b0}\", \"{b1}\"]\n\n\
         [[service]]\nname = \"kern\"\nvip = \"{KERN}\"\nbackends = [\"{b0}\", \"{b1}\"]\n"
    )
}

fn scrape(topo: &Topology) -> anyhow::Result<String> {
    let a = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?;
    anyhow::ensure!(a.status == 200, "/metrics: {} {}", a.status, a.body);
    Ok(a.body)
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn metrics_count_a_known_workload_exactly() -> anyhow::Result<()> {
    if !require_root("metrics_count_a_known_workload_exactly") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    for path in ["/healthz", "/readyz"] {
        let a = control::get_in(&topo.node, topo.metrics(), path, None)?;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    let web: SocketAddr = WEB.parse()?;
    let t = topo.ask(0, web, 20)?;
    assert_eq!(t.values().sum::<usize>(), 20, "{t:?}");
    let t = topo.ask(0, KERN.parse()?, 10)?;
    assert_eq!(t.values().sum::<usize>(), 10, "{t:?}");

    let labels = |i: usize| format!("{{service=\"web\",backend=\"{}\"}}", topo.backend(i, false));
    // Connections end a moment after the client closes: wait until all 20 are counted closed.
    let text = wait_for(Duration::from_secs(20), || {
        let text = scrape(&topo)?;
        let closed: f64 = (0..2)
            .filter_map(|i| {
                sample(
                    &text,
                    &format!("switchyard_backend_connections_closed_total{}", labels(i)),
                )
            })
            .sum();
        Ok((closed == 20.0).then_some(text))
    })?;
    for i in 0..2 {
        let l = labels(i);
        let name = Topology::backend_name(i);
        assert_eq!(
            value(
                &text,
                &format!("switchyard_backend_connections_opened_total{l}")
            ),
            10.0
        );
        assert_eq!(
            value(
                &text,
                &format!("switchyard_backend_connections_closed_total{l}")
            ),
            10.0
        );
        assert_eq!(
            value(&text, &format!("switchyard_backend_connections_active{l}")),
            0.0
        );
        // Each client read the backend's name and a newline, and sent nothing.
        let name_bytes = (name.len() + 1) as f64;
        assert_eq!(
            value(
                &text,
                &format!("switchyard_backend_received_bytes_total{l}")
            ),
            10.0 * name_bytes
        );
        assert_eq!(
            value(&text, &format!("switchyard_backend_sent_bytes_total{l}")),
            0.0
        );
        assert_eq!(
            value(
                &text,
                &format!("switchyard_backend_connect_duration_seconds_count{l}")
            ),
            10.0
        );
        assert_eq!(
            value(
                &text,
                &format!("switchyard_backend_connection_duration_seconds_count{l}")
            ),
            10.0
        );
        assert_eq!(
            value(
                &text,
                &format!("switchyard_backend_connect_failures_total{l}")
            ),
            0.0
        );
        assert_eq!(value(&text, &format!("switchyard_backend_ejected{l}")), 0.0);
        assert_eq!(value(&text, &format!("switchyard_backend_weight{l}")), 1.0);
    }
    let s = "{service=\"web\"}";
    assert_eq!(
        value(
            &text,
            &format!("switchyard_service_connections_opened_total{s}")
        ),
        20.0
    );
    assert_eq!(
        value(&text, &format!("switchyard_service_connections_active{s}")),
        0.0
    );
    assert_eq!(
        value(
            &text,
            &format!("switchyard_service_refused_no_backend_total{s}")
        ),
        0.0
    );
    assert_eq!(
        value(&text, &format!("switchyard_service_backends_usable{s}")),
        2.0
    );
    assert_eq!(
        value(&text, "switchyard_service_backends{service=\"kern\"}"),
        2.0
    );
    // The kernel's side: 20 connects handed to the forwarder, 10 translated in connect().
    assert_eq!(
        value(
            &text,
            "switchyard_kernel_events_total{counter=\"redirected\"}"
        ),
        20.0
    );
    assert_eq!(
        value(
            &text,
            "switchyard_kernel_events_total{counter=\"translated\"}"
        ),
        10.0
    );
    // The forwarder found every original destination in the slots it maps: none asked the
    // getsockopt hook (one connection at a time, so no slot was taken over before its accept).
    assert_eq!(
        value(
            &text,
            "switchyard_kernel_events_total{counter=\"orig_dst_answered\"}"
        ),
        0.0
    );
    assert!(value(&text, "switchyard_kernel_events_total{counter=\"connect\"}") >= 30.0);
    assert_eq!(value(&text, "switchyard_services"), 2.0);
    assert_eq!(value(&text, "switchyard_ready"), 1.0);
    assert_eq!(
        value(&text, "switchyard_registry_entries{source=\"file\"}"),
        2.0
    );
    assert_eq!(
        value(&text, "switchyard_registry_live{source=\"file\"}"),
        1.0
    );
    assert!(
        value(
            &text,
            "switchyard_registry_staleness_seconds{source=\"file\"}"
        ) >= 0.0
    );
    assert!(value(&text, "switchyard_process_resident_memory_bytes") > 0.0);
    assert!(value(&text, "switchyard_process_open_fds") > 0.0);
    // The same numbers through the API.
    let v = control::request(&topo.api_socket(), "GET", "/v1/services/web/state", None)?.json()?;
    let opened: u64 = (0..2)
        .map(|i| v["backends"][i]["counters"]["opened"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(opened, 20, "{v}");
    Ok(())
}

#[test]
fn promtool_accepts_the_exposition_in_both_formats() -> anyhow::Result<()> {
    if !require_root("promtool_accepts_the_exposition_in_both_formats") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    topo.ask(0, WEB.parse()?, 4)?;
    let plain: Answer = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?;
    assert_eq!(plain.status, 200);
    assert!(
        plain
            .header("content-type")
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4")
    );
    let dir = TempDir::new("sy-promtool-")?;
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &plain.body)?;
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file)?)
        .output()?;
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        plain.body
    );
    // What Prometheus asks for: OpenMetrics, complete.
    let om = control::get_in(
        &topo.node,
        topo.metrics(),
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )?;
    assert!(
        om.header("content-type")
            .unwrap_or("")
            .starts_with("application/openmetrics-text")
    );
    assert!(om.body.ends_with("# EOF\n"));
    let a = control::get_in(&topo.node, topo.metrics(), "/nothing", None)?;
    assert_eq!(a.status, 404);
    Ok(())
}

#[test]
fn a_prometheus_server_scrapes_the_agent() -> anyhow::Result<()> {
    if !require_root("a_prometheus_server_scrapes_the_agent") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    topo.ask(0, WEB.parse()?, 6)?;

    let dir = TempDir::new("sy-prometheus-")?;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: switchyard\n    static_configs:\n      - targets: [\"{}\"]\n",
            topo.metrics()
        ),
    )?;
    let web_listen: SocketAddr = "127.0.0.1:19090".parse()?;
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web_listen}"));
    let mut prometheus = Process::spawn(
        "prometheus",
        cmd,
        Place {
            netns: Some(&topo.node),
            cgroup: None,
        },
    )?;
    prometheus.wait_for(
        "Server is ready to receive web requests",
        Duration::from_secs(60),
    )?;

    let query = |q: &str| -> anyhow::Result<Option<f64>> {
        let a = control::get_in(
            &topo.node,
            web_listen,
            &format!("/api/v1/query?query={q}"),
            None,
        )?;
        let v = a.json()?;
        Ok(v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok()))
    };
    // The target is up and its samples are stored.
    wait_for(Duration::from_secs(60), || {
        Ok((query("up%7Bjob%3D%22switchyard%22%7D")? == Some(1.0)).then_some(()))
    })?;
    wait_for(Duration::from_secs(60), || {
        Ok((query("switchyard_ready")? == Some(1.0)).then_some(()))
    })?;
    let opened = wait_for(Duration::from_secs(60), || {
        query("sum(switchyard_backend_connections_opened_total%7Bservice%3D%22web%22%7D)")
            .map(|v| v.filter(|&n| n == 6.0))
    })?;
    assert_eq!(opened, 6.0);
    // No sample was dropped for a bad name, type or label.
    let a = control::get_in(&topo.node, web_listen, "/api/v1/targets", None)?;
    let v = a.json()?;
    let target = &v["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{v}");
    assert_eq!(target["lastError"], "", "{v}");
    Ok(())
}

/// One scraper that keeps its connection busy: a `/metrics` request, its answer read, again,
/// until `stop`. Returns once its first answer came (or it gave up).
fn busy_scraper(
    topo: &Topology,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use std::io::{BufRead, BufReader, Read, Write};
    let addr = topo.metrics();
    let stream = topo
        .node
        .enter(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let mut first = true;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if writer.write_all(request.as_bytes()).is_err() {
                break;
            }
            // The head, then exactly the body's length: the connection stays usable.
            let mut length = 0usize;
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            if first {
                let _ = ready_tx.send(());
                first = false;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    // A scraper beyond the 64 served waits in the backlog: do not wait on it for long.
    let _ = ready_rx.recv_timeout(Duration::from_secs(2));
    Ok(thread)
}

#[test]
fn healthz_answers_while_scrapers_hold_every_metrics_connection() -> anyhow::Result<()> {
    if !require_root("healthz_answers_while_scrapers_hold_every_metrics_connection") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..70)
        .map(|_| busy_scraper(&topo, stop.clone()))
        .collect::<anyhow::Result<_>>()?;
    let addr = topo.metrics();
    let probe = |path: &'static str| {
        topo.node.enter(move || -> anyhow::Result<String> {
            use std::io::{Read, Write};
            // The kubelet's way: a new connection, a 1 s client timeout.
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes())?;
            let mut got = Vec::new();
            anyhow::Context::with_context(s.read_to_end(&mut got), || {
                format!("{path}: no answer within the 1 s client timeout")
            })?;
            Ok(String::from_utf8_lossy(&got).into_owned())
        })
    };
    for path in ["/healthz", "/readyz", "/healthz"] {
        let answer = probe(path)??;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    // A scrape on a reserved place is told why, not left waiting.
    let answer = probe("/metrics")??;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in scrapers {
        let _ = s.join();
    }
    Ok(())
}
