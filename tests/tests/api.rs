//! The local API and `switchyard ctl`, against the real agent: every endpoint through the socket
//! and through ctl, changes that reach the datapath at once, refusals that name the field and
//! change nothing, bounded clients, the socket's permissions, and changes kept across restarts.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use switchyard_testkit::{
    Agent, Topology,
    control::{self, Answer, TempFile, wait_for},
    entries,
    expect::count,
    require_root,
    topology::Tally,
};

const WEB: &str = "10.96.0.20:80";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The file's proxy-mode service `web` over backends `which`, with extra settings.
fn web(topo: &Topology, which: &[usize], extra: &str) -> String {
    let extra = format!("mode = \"proxy\"\n{extra}");
    entries::service("web", WEB, &extra, &entries::backends(topo, which))
}

fn ok(a: Answer) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (200..300).contains(&a.status),
        "refused ({}): {}",
        a.status,
        a.body
    );
    a.json()
}

/// Asks `vip` until `want` holds (a change reaches the datapath within the reconcile), for up
/// to 20 s; returns the last tally.
fn ask_until(
    topo: &Topology,
    vip: &str,
    n: usize,
    want: impl Fn(&Tally) -> bool,
) -> anyhow::Result<Tally> {
    let mut last = Tally::new();
    let found = wait_for(Duration::from_secs(20), || {
        last = topo.ask(0, addr(vip), n)?;
        Ok(want(&last).then_some(()))
    });
    found
        .map(|()| last.clone())
        .map_err(|e| e.context(format!("last tally {last:?}")))
}

#[test]
fn every_endpoint_answers_through_the_socket_and_through_ctl() -> anyhow::Result<()> {
    if !require_root("every_endpoint_answers_through_the_socket_and_through_ctl") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&web(&topo, &[0, 1], "")))?;
    let sock = topo.api_socket();
    let sock = sock.as_path();

    // Version and build.
    let v = ok(control::request(sock, "GET", "/v1/version", None)?)?;
    assert_eq!(v["version"], "0.1.0");
    let c = control::ctl(sock, &["version"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains("agent:  switchyard 0.1.0"), "{c:?}");

    // The file's service, listed with its source.
    let v = ok(control::request(sock, "GET", "/v1/services", None)?)?;
    assert_eq!(v["services"][0]["name"], "web");
    assert_eq!(v["services"][0]["source"], "file");
    let c = control::ctl(sock, &["services"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.starts_with("NAME"), "{c:?}");
    assert!(
        c.stdout
            .lines()
            .any(|l| l.starts_with("web ") && l.ends_with("file")),
        "{c:?}"
    );
    let c = control::ctl(sock, &["services", "--json"])?;
    assert_eq!(c.json()?["services"][0]["service"]["vip"], WEB);

    // Create (socket): a kernel-mode service, live at once.
    let b2 = topo.backend(2, false).to_string();
    let body = json!({"name": "kern", "vip": "10.96.0.30:80", "backends": [b2]}).to_string();
    let created = control::request(sock, "POST", "/v1/services", Some(&body))?;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()?["source"], "api");
    let t = ask_until(&topo, "10.96.0.30:80", 3, |t| count(t, 2) == 3)?;
    assert_eq!(count(&t, 2), 3);

    // Create (ctl, from a TOML file): a proxy-mode service.
    let file = TempFile::new(
        "sy-svc-",
        &format!(
            "[[service]]\nname = \"prox\"\nvip = \"10.96.0.31:80\"\nmode = \"proxy\"\nbackends = [\"{}\"]\n",
            topo.backend(0, false)
        ),
    )?;
    let c = control::ctl(sock, &["service", "create", file.path()])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains("source:    api"), "{c:?}");
    ask_until(&topo, "10.96.0.31:80", 2, |t| count(t, 0) == 2)?;

    // Get.
    let v = ok(control::request(sock, "GET", "/v1/services/prox", None)?)?;
    assert_eq!(v["service"]["mode"], "proxy");
    let c = control::ctl(sock, &["service", "get", "kern"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains(&b2), "{c:?}");

    // Replace (ctl, JSON): the proxy service moves to backend-2.
    let file = TempFile::new(
        "sy-svc-",
        &json!({"vip": "10.96.0.31:80", "mode": "proxy", "backends": [b2]}).to_string(),
    )?;
    let c = control::ctl(sock, &["service", "replace", "prox", file.path()])?;
    assert_eq!(c.code, 0, "{c:?}");
    ask_until(&topo, "10.96.0.31:80", 2, |t| count(t, 2) == 2)?;
    // Replace (socket): back to backend-1.
    let body = json!({"vip": "10.96.0.31:80", "mode": "proxy",
                      "backends": [topo.backend(0, false).to_string()]});
    ok(control::request(
        sock,
        "PUT",
        "/v1/services/prox",
        Some(&body.to_string()),
    )?)?;
    ask_until(&topo, "10.96.0.31:80", 2, |t| count(t, 0) == 2)?;

    // Backends: add (ctl), weight (socket), state (ctl), remove (socket, then ctl).
    let b1 = topo.backend(1, false).to_string();
    let c = control::ctl(sock, &["backend", "add", "prox", &b1, "--weight", "2"])?;
    assert_eq!(c.code, 0, "{c:?}");
    ask_until(&topo, "10.96.0.31:80", 6, |t| {
        count(t, 1) == 4 && count(t, 0) == 2
    })?;
    let path = format!("/v1/services/prox/backends/{b1}");
    let v = ok(control::request(
        sock,
        "PATCH",
        &path,
        Some(r#"{"weight": 1}"#),
    )?)?;
    assert_eq!(v["service"]["backends"][1]["weight"], 1);
    let c = control::ctl(sock, &["backend", "maint", "prox", &b1])?;
    assert_eq!(c.code, 0, "{c:?}");
    ask_until(&topo, "10.96.0.31:80", 4, |t| count(t, 0) == 4)?;
    let c = control::ctl(sock, &["backend", "ready", "prox", &b1])?;
    assert_eq!(c.code, 0, "{c:?}");
    let c = control::ctl(
        sock,
        &[
            "backend", "set", "prox", &b1, "--weight", "3", "--state", "ready",
        ],
    )?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(
        c.stdout
            .lines()
            .any(|l| l.starts_with(&b1) && l.contains(" 3 ")),
        "{c:?}"
    );
    ok(control::request(sock, "DELETE", &path, None)?)?;
    let c = control::ctl(sock, &["backend", "add", "prox", &b1])?;
    assert_eq!(c.code, 0, "{c:?}");
    let c = control::ctl(sock, &["backend", "remove", "prox", &b1])?;
    assert_eq!(c.code, 0, "{c:?}");

    // Live state.
    let v = ok(control::request(
        sock,
        "GET",
        "/v1/services/prox/state",
        None,
    )?)?;
    assert_eq!(
        v["backends"][0]["address"],
        topo.backend(0, false).to_string()
    );
    assert!(
        v["backends"][0]["counters"]["opened"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    assert!(v["forwarder"]["active"].is_u64(), "{v}");
    let v = ok(control::request(sock, "GET", "/v1/state", None)?)?;
    assert_eq!(v["services"].as_array().map(Vec::len), Some(3), "{v}");
    let c = control::ctl(sock, &["state"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(
        c.stdout.contains("BACKEND") && c.stdout.contains("prox"),
        "{c:?}"
    );
    let c = control::ctl(sock, &["state", "prox", "--json"])?;
    assert_eq!(c.json()?["name"], "prox");

    // Registry status: the API's layer has two entries, the file's one.
    let v = ok(control::request(sock, "GET", "/v1/registry", None)?)?;
    let sources = v["sources"].as_array().cloned().unwrap_or_default();
    let of = |name: &str| sources.iter().find(|s| s["source"] == name).cloned();
    assert_eq!(
        of("api").map(|s| s["entries"].clone()),
        Some(json!(2)),
        "{v}"
    );
    assert_eq!(
        of("file").map(|s| s["live"].clone()),
        Some(json!(true)),
        "{v}"
    );
    assert!(
        of("file").is_some_and(|s| s["staleness_seconds"].is_f64()),
        "{v}"
    );
    let c = control::ctl(sock, &["registry"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(
        c.stdout.contains("STALENESS") && c.stdout.contains("api"),
        "{c:?}"
    );

    // Delete (socket and ctl): the addresses stop being served.
    ok(control::request(sock, "DELETE", "/v1/services/kern", None)?)?;
    let c = control::ctl(sock, &["service", "delete", "prox"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert_eq!(c.stdout.trim(), "deleted prox");
    ask_until(&topo, "10.96.0.31:80", 1, |t| {
        count(t, 0) + count(t, 1) + count(t, 2) == 0
    })?;
    let v = ok(control::request(sock, "GET", "/v1/services", None)?)?;
    assert_eq!(v["services"].as_array().map(Vec::len), Some(1), "{v}");

    // Exit statuses scripts can trust.
    let c = control::ctl(sock, &["service", "get", "nope"])?;
    assert_eq!(c.code, 1, "{c:?}");
    assert!(
        c.stderr.contains("no service named \"nope\"") && c.stderr.contains("[field: name]"),
        "{c:?}"
    );
    let c = control::ctl(sock, &["service", "get", "nope", "--json"])?;
    assert_eq!((c.code, c.json()?["field"].clone()), (1, json!("name")));
    let c = control::ctl(&topo.run.root.join("nowhere.sock"), &["version"])?;
    assert_eq!(c.code, 2, "{c:?}");
    assert!(c.stderr.contains("cannot reach the agent"), "{c:?}");
    let c = control::ctl(sock, &["backend", "set", "web", "10.0.0.1:1"])?;
    assert_eq!(
        c.code, 2,
        "a set with nothing to set is a usage error: {c:?}"
    );
    let c = control::ctl(sock, &["service", "create", "/nonexistent.json"])?;
    assert_eq!(c.code, 2, "{c:?}");
    Ok(())
}

#[test]
fn draining_a_backend_through_the_api_lets_open_connections_finish_and_sends_new_ones_elsewhere()
-> anyhow::Result<()> {
    if !require_root(
        "draining_a_backend_through_the_api_lets_open_connections_finish_and_sends_new_ones_elsewhere",
    ) {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let config = topo.agent_config(&web(&topo, &[0, 1], "drain_timeout = \"5m\""));
    let _agent = Agent::start(&topo, &config)?;
    let sock = topo.api_socket();
    // Long-lived connections pinging every 100 ms for 20 s; round robin puts some on backend-1.
    let mut held: Vec<_> = (0..4)
        .map(|_| topo.probe(0, &["hold", "--to", WEB, "--seconds", "20"]))
        .collect::<Result<_, _>>()?;
    for h in &mut held {
        h.wait_for("name ", Duration::from_secs(10))?;
    }
    let on_drained: Vec<usize> = (0..held.len())
        .filter(|&i| held[i].output().iter().any(|l| l == "name backend-1"))
        .collect();
    assert!(
        !on_drained.is_empty(),
        "round robin put no connection on backend-1"
    );

    let b0 = topo.backend(0, false).to_string();
    let c = control::ctl(&sock, &["backend", "drain", "web", &b0, "--json"])?;
    assert_eq!(c.code, 0, "{c:?}");
    let v = c.json()?;
    assert_eq!(
        (v["source"].clone(), v["overrides"].clone()),
        (json!("api"), json!("file")),
        "{v}"
    );
    assert!(
        v["note"].as_str().unwrap_or("").contains("/override"),
        "{v}"
    );

    // No new connection reaches the drained backend.
    let t = ask_until(&topo, WEB, 10, |t| count(t, 1) == 10)?;
    assert_eq!(count(&t, 0), 0, "{t:?}");
    // Its open connections are counted as draining ...
    let v = ok(control::request(
        &sock,
        "GET",
        "/v1/services/web/state",
        None,
    )?)?;
    let b = &v["backends"][0];
    assert_eq!(
        (b["state"].clone(), b["draining"].clone()),
        (json!("drain"), json!(true)),
        "{v}"
    );
    assert!(b["drain"]["open"].as_u64().is_some_and(|n| n >= 1), "{v}");
    // ... and run to their end, undisturbed.
    for &i in &on_drained {
        held[i].wait_exit(Duration::from_secs(60))?;
        let out = held[i].output();
        assert!(out.iter().any(|l| l.ends_with("completed")), "{out:?}");
    }
    let open = wait_for(Duration::from_secs(20), || {
        let v = ok(control::request(
            &sock,
            "GET",
            "/v1/services/web/state",
            None,
        )?)?;
        let open = v["backends"][0]["drain"]["open"].as_u64();
        Ok((open == Some(0)).then_some(v))
    })?;
    assert_eq!(
        open["backends"][0]["drain"]["closed_at_deadline"], 0,
        "{open}"
    );

    // Handing the service back to the file makes the backend ready again.
    let c = control::ctl(&sock, &["service", "release", "web"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains("source:    file"), "{c:?}");
    ask_until(&topo, WEB, 10, |t| count(t, 0) == 5 && count(t, 1) == 5)?;
    Ok(())
}

#[test]
fn a_weight_change_through_the_api_shifts_the_distribution() -> anyhow::Result<()> {
    if !require_root("a_weight_change_through_the_api_shifts_the_distribution") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let (b0, b1) = (topo.backend(0, false), topo.backend(1, false));
    let services = format!(
        "{}\n[[service]]\nname = \"kern\"\nvip = \"10.96.0.10:80\"\nbackends = [\"{b0}\", \"{b1}\"]\n",
        web(&topo, &[0, 1], "")
    );
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;
    let sock = topo.api_socket();
    for vip in [WEB, "10.96.0.10:80"] {
        let t = topo.ask(0, addr(vip), 20)?;
        assert_eq!((count(&t, 0), count(&t, 1)), (10, 10), "{vip}: {t:?}");
    }
    for name in ["web", "kern"] {
        let c = control::ctl(
            &sock,
            &["backend", "set", name, &b0.to_string(), "--weight", "3"],
        )?;
        assert_eq!(c.code, 0, "{c:?}");
    }
    // Weighted round robin, 3:1: exactly 30 and 10 of every 40 once the change is live.
    for vip in [WEB, "10.96.0.10:80"] {
        let t = ask_until(&topo, vip, 40, |t| count(t, 0) == 30)?;
        assert_eq!(count(&t, 1), 10, "{vip}: {t:?}");
    }
    Ok(())
}

#[test]
fn invalid_requests_are_refused_with_the_field_and_change_nothing() -> anyhow::Result<()> {
    if !require_root("invalid_requests_are_refused_with_the_field_and_change_nothing") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&web(&topo, &[0, 1], "")))?;
    let sock = topo.api_socket();
    let sock = sock.as_path();
    let before = ok(control::request(sock, "GET", "/v1/services", None)?)?;
    let b0 = topo.backend(0, false);
    let cases: Vec<(&str, String, String, u16, Option<&str>)> = vec![
        ("POST", "/v1/services".into(), r#"{"name": "x", "vip": "10.96.0.99"}"#.into(), 400, Some("vip")),
        ("POST", "/v1/services".into(), r#"{"name": "x", "vip": "10.96.0.99:80", "backends": ["10.0.0.1:0"]}"#.into(), 400, Some("backends[0]")),
        ("POST", "/v1/services".into(), r#"{"name": "x", "vip": "10.96.0.99:80", "backends": [{"address": "10.0.0.1:80", "weight": "heavy"}]}"#.into(), 400, Some("backends[0].weight")),
        ("POST", "/v1/services".into(), r#"{"name": "x", "vip": "10.96.0.99:80", "mode": 7}"#.into(), 400, Some("mode")),
        ("POST", "/v1/services".into(), format!(r#"{{"name": "x", "vip": "{WEB}"}}"#), 409, Some("vip")),
        ("POST", "/v1/services".into(), "not json".into(), 400, None),
        ("GET", "/v1/services/nope".into(), String::new(), 404, Some("name")),
        ("PATCH", "/v1/services/nope/backends/10.0.0.1:80".into(), r#"{"weight": 2}"#.into(), 404, Some("name")),
        ("PATCH", format!("/v1/services/web/backends/{b0}"), r#"{"weight": 900}"#.into(), 400, Some("weight")),
        ("PATCH", format!("/v1/services/web/backends/{b0}"), r#"{"state": "sleepy"}"#.into(), 400, Some("state")),
        ("PATCH", "/v1/services/web/backends/10.77.0.11".into(), r#"{"weight": 2}"#.into(), 400, Some("address")),
        ("POST", "/v1/services/web/backends".into(), r#"{"address": "[fd77::11]:8080"}"#.into(), 400, Some("address")),
        ("DELETE", "/v1/services/web".into(), String::new(), 409, Some("name")),
        ("GET", "/v1/nothing".into(), String::new(), 404, None),
    ];
    for (method, path, body, status, field) in &cases {
        let a = control::request(sock, method, path, Some(body))?;
        assert_eq!(a.status, *status, "{method} {path} {body}: {}", a.body);
        assert_eq!(a.header("content-type"), Some("application/json"));
        let v = a.json()?;
        assert_eq!(v["field"].as_str(), *field, "{method} {path} {body}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // Through ctl: refused (1), with the agent's message naming the field.
    let c = control::ctl(
        sock,
        &["backend", "set", "web", &b0.to_string(), "--weight", "900"],
    )?;
    assert_eq!(c.code, 1, "{c:?}");
    assert!(
        c.stderr.contains("out of range") && c.stderr.contains("[field: weight]"),
        "{c:?}"
    );
    let c = control::ctl(sock, &["backend", "add", "web", "10.77.0.13"])?;
    assert_eq!(c.code, 1, "{c:?}");
    assert!(c.stderr.contains("[field: address]"), "{c:?}");

    // An oversized body: refused before it is read when announced, and when it is not.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    let a = control::request(sock, "POST", "/v1/services", Some(&big))?;
    assert_eq!(a.status, 413, "{}", a.body);
    let mut chunked =
        b"POST /v1/services HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..40 {
        chunked.extend_from_slice(
            format!("{:x}\r\n{}\r\n", 64 << 10, "y".repeat(64 << 10)).as_bytes(),
        );
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let a = control::raw(sock, &chunked)?;
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(
        a.json()?["error"]
            .as_str()
            .unwrap_or("")
            .contains("larger than")
    );

    // Nothing changed: the same services, and the datapath as before.
    let after = ok(control::request(sock, "GET", "/v1/services", None)?)?;
    assert_eq!(before, after);
    let v = ok(control::request(sock, "GET", "/v1/registry", None)?)?;
    assert!(
        v["sources"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .all(|s| s["source"] != "api" || s["entries"] == 0),
        "{v}"
    );
    let t = topo.ask(0, addr(WEB), 10)?;
    assert_eq!((count(&t, 0), count(&t, 1)), (5, 5), "{t:?}");
    Ok(())
}

#[test]
fn slow_silent_and_greedy_clients_are_cut_off_without_blocking_others() -> anyhow::Result<()> {
    if !require_root("slow_silent_and_greedy_clients_are_cut_off_without_blocking_others") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&web(&topo, &[0], "")))?;
    let sock = topo.api_socket();
    // More silent connections than the API serves at once.
    let silent: Vec<_> = (0..80)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock))
        .collect::<Result<_, _>>()?;
    // The operator still gets through (once head timeouts free a place), within ctl's patience.
    let c = control::ctl(&sock, &["version"])?;
    assert_eq!(c.code, 0, "{c:?}");
    // Every silent connection is closed by the agent.
    for mut s in silent {
        use std::io::Read as _;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a silent client got {:?}", &buf[..n]);
    }
    // A head sent a byte at a time, too slowly, is cut off too.
    let trickle = {
        let sock = sock.clone();
        thread::spawn(move || -> anyhow::Result<bool> {
            use std::io::{Read as _, Write as _};
            let mut s = std::os::unix::net::UnixStream::connect(&sock)?;
            s.set_read_timeout(Some(Duration::from_millis(10)))?;
            for b in
                b"GET /v1/version HTTP/1.1\r\nHost: s\r\nX-Slow: 1111111111111111111111\r\n\r\n"
            {
                if s.write_all(&[*b]).is_err() {
                    return Ok(true);
                }
                // Closed, or answered before the head was complete: cut off either way.
                let mut buf = [0u8; 1];
                if s.read(&mut buf).is_ok() {
                    return Ok(true);
                }
                thread::sleep(Duration::from_millis(500));
            }
            Ok(false)
        })
    };
    assert!(
        trickle.join().map_err(|_| anyhow::anyhow!("panicked"))??,
        "a head trickled in over 30 s was served"
    );
    // A body that never arrives: 408.
    let a = control::raw(
        &sock,
        b"POST /v1/services HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n{\"na",
    )?;
    assert_eq!(a.status, 408, "{}", a.body);
    Ok(())
}

#[test]
fn the_socket_is_for_its_owner_by_default_and_a_configured_group_may_use_it() -> anyhow::Result<()>
{
    if !require_root("the_socket_is_for_its_owner_by_default_and_a_configured_group_may_use_it") {
        return Ok(());
    }
    const NOBODY: u32 = 65534;
    let topo = Topology::new(1, 1)?;
    let config = topo.agent_config(&web(&topo, &[0], ""));
    let sock = topo.api_socket();
    {
        let _agent = Agent::start(&topo, &config)?;
        let meta = std::fs::metadata(&sock)?;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
        // Let others reach the directory, so that only the socket's mode stands in the way.
        std::fs::set_permissions(&topo.run.root, std::fs::Permissions::from_mode(0o755))?;
        let c = control::ctl_as(&topo.run.root, &sock, NOBODY, NOBODY, &["version"])?;
        assert_eq!(c.code, 2, "{c:?}");
        assert!(c.stderr.contains("permission denied"), "{c:?}");
        assert_eq!(control::ctl(&sock, &["version"])?.code, 0);
    }
    assert!(!sock.exists(), "the agent leaves no socket behind");
    let grouped = config.replace("[api]\n", "[api]\ngroup = \"nogroup\"\n");
    let _agent = Agent::start(&topo, &grouped)?;
    let meta = std::fs::metadata(&sock)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), NOBODY);
    let c = control::ctl_as(&topo.run.root, &sock, NOBODY, NOBODY, &["services"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert!(c.stdout.contains("web"), "{c:?}");
    Ok(())
}

#[test]
fn api_changes_are_kept_across_an_agent_restart() -> anyhow::Result<()> {
    if !require_root("api_changes_are_kept_across_an_agent_restart") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let config = topo.agent_config(&web(&topo, &[0, 1], ""));
    let sock = topo.api_socket();
    let b1 = topo.backend(1, false).to_string();
    {
        let _agent = Agent::start(&topo, &config)?;
        let body = json!({"name": "made", "vip": "10.96.0.40:80", "backends": [b1]}).to_string();
        assert_eq!(
            control::request(&sock, "POST", "/v1/services", Some(&body))?.status,
            201
        );
        let c = control::ctl(
            &sock,
            &[
                "backend",
                "maint",
                "web",
                &topo.backend(0, false).to_string(),
            ],
        )?;
        assert_eq!(c.code, 0, "{c:?}");
    }
    let _agent = Agent::start(&topo, &config)?;
    let v = ok(control::request(&sock, "GET", "/v1/services/made", None)?)?;
    assert_eq!(v["source"], "api");
    let v = ok(control::request(&sock, "GET", "/v1/services/web", None)?)?;
    assert_eq!(
        (v["source"].clone(), v["overrides"].clone()),
        (json!("api"), json!("file"))
    );
    assert_eq!(v["service"]["backends"][0]["state"], "maint");
    let t = topo.ask(0, addr("10.96.0.40:80"), 2)?;
    assert_eq!(count(&t, 1), 2, "{t:?}");
    let t = topo.ask(0, addr(WEB), 4)?;
    assert_eq!(count(&t, 1), 4, "{t:?}");
    Ok(())
}

#[test]
fn a_peer_that_is_not_root_the_agent_or_in_the_group_is_refused_whatever_the_socket_mode()
-> anyhow::Result<()> {
    if !require_root(
        "a_peer_that_is_not_root_the_agent_or_in_the_group_is_refused_whatever_the_socket_mode",
    ) {
        return Ok(());
    }
    const NOBODY: u32 = 65534;
    const STRANGER: u32 = 4242;
    let topo = Topology::new(1, 1)?;
    let config = topo
        .agent_config(&web(&topo, &[0], ""))
        .replace("[api]\n", "[api]\ngroup = \"nogroup\"\n");
    let sock = topo.api_socket();
    let agent = Agent::start(&topo, &config)?;
    // Someone loosens the file's permissions behind the agent's back: the credentials still
    // decide.
    std::fs::set_permissions(&topo.run.root, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let c = control::ctl_as(&topo.run.root, &sock, STRANGER, STRANGER, &["services"])?;
    assert_ne!(c.code, 0, "a stranger was served: {c:?}");
    assert!(!c.stdout.contains("web"), "{c:?}");
    control::wait_for(Duration::from_secs(5), || {
        Ok((!agent.said(&["connection refused", "uid=4242"]).is_empty()).then_some(()))
    })?;
    // The group's members (here by primary group) and root are served.
    let c = control::ctl_as(&topo.run.root, &sock, NOBODY, NOBODY, &["services"])?;
    assert_eq!(c.code, 0, "{c:?}");
    let c = control::ctl_as(&topo.run.root, &sock, STRANGER, NOBODY, &["services"])?;
    assert_eq!(c.code, 0, "{c:?}");
    assert_eq!(control::ctl(&sock, &["version"])?.code, 0);
    Ok(())
}
