//! HTTP mode's observability and request hashing: a known workload through a VIP (curl) and
//! the exact counts in `/metrics` and `ctl state` (by status class, route and backend, the
//! proxy's own answers, a retry); a route rule's own retry codes and backoff, counted; the
//! access log only where a service turns it on; Maglev and
//! ring hash on a request header or a cookie, the client's address where a request lacks it.
//! Real clients (curl) and real servers (sy-http).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use switchyard_testkit::{
    Agent, Topology,
    control::{self, sample},
    http::{HttpBackends, backends_seen, curl},
    require_root,
};

const VIP: &str = "10.96.0.60:80";

fn service(topo: &Topology, name: &str, vip: &str, backends: &[usize], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|&i| format!("\"{}\"", HttpBackends::addr(topo, i)))
        .collect();
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nmode = \"proxy\"\n\
         app_protocol = \"http\"\n{extra}\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

/// The sum of every sample of `family` whose labels contain all of `labels`.
fn sum(expo: &str, family: &str, labels: &[&str]) -> f64 {
    expo.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn statuses(lines: &[String]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for l in lines.iter().filter_map(|l| l.strip_prefix("status ")) {
        *seen.entry(l.to_owned()).or_default() += 1;
    }
    seen
}

#[test]
fn a_known_workload_gives_exact_counts_in_metrics_and_ctl_state() -> anyhow::Result<()> {
    if !require_root("a_known_workload_gives_exact_counts_in_metrics_and_ctl_state") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _http = HttpBackends::start(&topo)?;
    let route = r#"
[[route]]
name = "weather-api"
service = "weather-backend"
[[route.rule]]
matches = [{ path_exact = "/" }, { path_prefix = "/status" }]
backends = [{ service = "weather-backend" }]
"#;
    let config = topo
        .agent_config(&(service(&topo, "weather-backend", VIP, &[0, 1], "retries = 2") + route));
    let _agent = Agent::start(&topo, &config)?;
    let url = |p: &str| format!("http://{VIP}{p}");
    let mut args = vec!["-o".to_owned(), "/dev/null".to_owned()];
    args.extend(["-w".to_owned(), "status %{http_code}\\n".to_owned()]);
    // 6 × 200, 2 × 404 from the backends, one 503 retried once (the other backend answers
    // 503 too, and with no third backend its answer goes back), one 404 from the proxy (no
    // rule matches).
    for p in ["/", "/", "/", "/", "/", "/", "/status/404", "/status/404"] {
        args.push(url(p));
    }
    args.push(url("/status/503"));
    args.push(url("/nothing"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&topo, &args)?;
    let want: BTreeMap<String, usize> = [("200", 6), ("404", 3), ("503", 1)]
        .into_iter()
        .map(|(s, n)| (s.to_owned(), n))
        .collect();
    assert_eq!(statuses(&out), want, "{out:?}");

    let expo = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?.body;
    let svc = r#"service="weather-backend""#;
    let api = r#"route="weather-api""#;
    let (b0, b1) = (HttpBackends::addr(&topo, 0), HttpBackends::addr(&topo, 1));
    for b in [b0, b1] {
        let s = format!(
            r#"switchyard_http_requests_total{{service="weather-backend",route="weather-api",backend="{b}",class="2xx"}}"#
        );
        assert_eq!(sample(&expo, &s), Some(3.0), "round robin: 3 each\n{expo}");
    }
    let req = "switchyard_http_requests_total";
    let from_backends = |class: &str| {
        sum(&expo, req, &[svc, api, &format!(r#"class="{class}""#)])
            - sum(
                &expo,
                req,
                &[svc, api, r#"backend="""#, &format!(r#"class="{class}""#)],
            )
    };
    assert_eq!(from_backends("4xx"), 2.0, "{expo}");
    assert_eq!(from_backends("5xx"), 1.0, "{expo}");
    assert_eq!(
        sum(&expo, req, &[svc, r#"backend="""#, r#"class="5xx""#]),
        0.0,
        "the last backend's 503 went back, not one of the proxy's\n{expo}"
    );
    assert_eq!(sum(&expo, req, &[svc, api]), 9.0, "{expo}");
    assert_eq!(
        sample(
            &expo,
            r#"switchyard_http_requests_total{service="weather-backend",route="",backend="",class="4xx"}"#
        ),
        Some(1.0),
        "the proxy's own 404\n{expo}"
    );
    assert_eq!(
        sum(&expo, "switchyard_http_retries_total", &[svc, api]),
        1.0,
        "{expo}"
    );
    assert_eq!(
        sample(
            &expo,
            r#"switchyard_service_retries_total{service="weather-backend"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sum(
            &expo,
            "switchyard_http_request_duration_seconds_count",
            &[svc]
        ),
        10.0,
        "{expo}"
    );
    assert_eq!(
        sample(
            &expo,
            r#"switchyard_http_requests_in_flight{service="weather-backend",route="weather-api"}"#
        ),
        Some(0.0),
        "{expo}"
    );
    // No raw codes or paths among the labels.
    assert!(
        !expo.lines().any(|l| l.starts_with("switchyard_http_")
            && (l.contains("/status") || l.contains("\"503\""))),
        "{expo}"
    );

    // ctl state: the service's requests, then its route's.
    let state = control::ctl(&topo.api_socket(), &["state", "weather-backend"])?;
    assert_eq!(state.code, 0, "{state:?}");
    assert!(
        state
            .stdout
            .contains("requests: 2xx 6, 4xx 3, 5xx 1 (by the proxy 1)  retries 1  in flight 0"),
        "{}",
        state.stdout
    );
    assert!(
        state
            .stdout
            .contains("route weather-api: 2xx 6, 4xx 2, 5xx 1 (by the proxy 0)  retries 1"),
        "{}",
        state.stdout
    );
    Ok(())
}

/// GEP-1731's `retry.codes` and `retry.backoff` from the config file: a rule's codes replace
/// the default 502/503/504, and each retry waits the rule's backoff first.
#[test]
fn a_rules_retry_codes_replace_the_default_set_and_its_retries_wait_the_backoff()
-> anyhow::Result<()> {
    if !require_root("a_rules_retry_codes_replace_the_default_set_and_its_retries_wait_the_backoff")
    {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _http = HttpBackends::start(&topo)?;
    let route = r#"
[[route]]
name = "codes"
service = "weather-backend"
[[route.rule]]
matches = [{ path_exact = "/status/500" }]
backends = [{ service = "weather-backend" }]
retry_codes = [500]
retry_backoff = "300ms"
retries = 1
[[route.rule]]
matches = [{ path_exact = "/status/503" }]
backends = [{ service = "weather-backend" }]
retry_codes = [500]
[[route.rule]]
matches = [{ path_prefix = "/status" }]
backends = [{ service = "weather-backend" }]
"#;
    let config = topo
        .agent_config(&(service(&topo, "weather-backend", VIP, &[0, 1], "retries = 2") + route));
    let _agent = Agent::start(&topo, &config)?;
    let get = |p: &str| -> anyhow::Result<(String, Duration)> {
        let started = Instant::now();
        let url = format!("http://{VIP}{p}");
        let out = curl(&topo, &["-o", "/dev/null", "-w", "%{http_code}", &url])?;
        Ok((out.join(""), started.elapsed()))
    };
    let retries = || -> anyhow::Result<f64> {
        let expo = control::get_in(&topo.node, topo.metrics(), "/metrics", None)?.body;
        Ok(sum(
            &expo,
            "switchyard_http_retries_total",
            &[r#"service="weather-backend""#, r#"route="codes""#],
        ))
    };
    // Listed: tried again on the other backend (which answers 500 too, and goes back), after
    // the backoff.
    let (code, took) = get("/status/500")?;
    assert_eq!(code, "500");
    assert_eq!(retries()?, 1.0);
    assert!(took >= Duration::from_millis(300), "no backoff: {took:?}");
    // The rule's codes replace the default set: its 503 goes back untried.
    assert_eq!(get("/status/503")?.0, "503");
    assert_eq!(retries()?, 1.0, "503 is not in the rule's codes");
    // A rule without codes keeps the default: 500 goes back, 502 is tried again.
    assert_eq!(get("/status/501")?.0, "501");
    assert_eq!(retries()?, 1.0, "501 is not in the default set");
    assert_eq!(get("/status/502")?.0, "502");
    assert_eq!(retries()?, 2.0, "502 is in the default set");
    Ok(())
}

#[test]
fn the_access_log_has_a_line_per_request_only_where_turned_on() -> anyhow::Result<()> {
    if !require_root("the_access_log_has_a_line_per_request_only_where_turned_on") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let _http = HttpBackends::start(&topo)?;
    let quiet = service(&topo, "quiet", VIP, &[0], "");
    let loud = service(&topo, "loud", "10.96.0.61:80", &[0], "access_log = true");
    let agent = Agent::start(&topo, &topo.agent_config(&(quiet + &loud)))?;
    curl(
        &topo,
        &[&format!("http://{VIP}/a"), &format!("http://{VIP}/b")],
    )?;
    curl(
        &topo,
        &[
            "http://10.96.0.61:80/first",
            "http://10.96.0.61:80/status/404",
        ],
    )?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        agent.said(&["switchyard::access", "quiet"]).is_empty(),
        "off by default: {:?}",
        agent.said(&["switchyard::access"])
    );
    let lines = agent.said(&["switchyard::access", "service=loud"]);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let backend = format!("backend={}", HttpBackends::addr(&topo, 0));
    for (line, (path, status)) in lines.iter().zip([("/first", 200), ("/status/404", 404)]) {
        for want in [
            "method=GET",
            "host=10.96.0.61",
            &format!("path={path} "),
            &format!("status={status} "),
            &backend,
            "retries=0",
            "seconds=",
        ] {
            assert!(line.contains(want), "{want:?} missing: {line}");
        }
    }
    Ok(())
}

#[test]
fn maglev_and_ring_hash_keep_a_header_or_cookie_on_one_backend() -> anyhow::Result<()> {
    if !require_root("maglev_and_ring_hash_keep_a_header_or_cookie_on_one_backend") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    let by_header = service(
        &topo,
        "by-header",
        VIP,
        &[0, 1, 2],
        "algorithm = \"maglev\"\nhash_key = \"header:X-User\"",
    );
    let by_cookie = service(
        &topo,
        "by-cookie",
        "10.96.0.61:80",
        &[0, 1, 2],
        "algorithm = \"ring_hash\"\nhash_key = \"cookie:session\"",
    );
    let _agent = Agent::start(&topo, &topo.agent_config(&(by_header + &by_cookie)))?;
    for (vip, key) in [(VIP, "header"), ("10.96.0.61:80", "cookie")] {
        let url = format!("http://{vip}/");
        let set = |v: &str| -> Vec<String> {
            match key {
                "header" => vec!["-H".into(), format!("x-user: {v}")],
                _ => vec!["-b".into(), format!("theme=dark; session={v}")],
            }
        };
        // One key: every request on one backend, over one client connection.
        let mut args = set("alice");
        args.extend(std::iter::repeat_n(url.clone(), 12));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let one = backends_seen(&curl(&topo, &args)?);
        assert_eq!(one.len(), 1, "{key}: {one:?}");
        assert_eq!(one.values().sum::<usize>(), 12);
        // Different keys spread (`--next` starts a request with its own headers).
        let mut args: Vec<String> = Vec::new();
        for i in 0..30 {
            if i > 0 {
                args.push("--next".into());
            }
            args.extend(set(&format!("user-{i}")));
            args.push(url.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let spread = backends_seen(&curl(&topo, &args)?);
        assert_eq!(spread.values().sum::<usize>(), 30, "{key}: {spread:?}");
        assert_eq!(
            spread.len(),
            3,
            "{key}: 30 keys reach every backend: {spread:?}"
        );
        // The same keys again land where they did.
        let again = backends_seen(&curl(&topo, &args)?);
        assert_eq!(again, spread, "{key}");
        // Without the key: the client's address, one backend for this pod.
        let bare: Vec<String> = std::iter::repeat_n(url.clone(), 12).collect();
        let bare: Vec<&str> = bare.iter().map(String::as_str).collect();
        let fallback = backends_seen(&curl(&topo, &bare)?);
        assert_eq!(fallback.len(), 1, "{key}: {fallback:?}");
    }
    Ok(())
}
