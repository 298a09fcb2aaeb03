//! HTTP routes and the ingress gateway: the weather example end to end (a gateway on port 80
//! for any host, a route sending every path under `/` to `weather-backend`; and the same
//! service through its VIP from a steered pod), rule order and match kinds, a weighted split,
//! header changes, a prefix rewrite, a redirect, the proxy's 404, and bad routes refused with
//! the field named. Real clients (curl) and real servers (sy-http).

use std::process::Command;

use switchyard_testkit::{
    Agent, Topology,
    http::{HttpBackends, backends_seen, curl},
    require_root,
};

const VIP: &str = "10.96.0.50:80";
const GATEWAY: &str = "10.77.0.1:80";

fn services(topo: &Topology) -> String {
    format!(
        "[[service]]\nname = \"weather-backend\"\nvip = \"{VIP}\"\nmode = \"proxy\"\n\
         app_protocol = \"http\"\nbackends = [\"{}\", \"{}\"]\n\n\
         [[service]]\nname = \"weather-canary\"\nvip = \"10.96.0.51:80\"\nmode = \"proxy\"\n\
         app_protocol = \"http\"\nbackends = [\"{}\"]\n\n\
         [[service]]\nname = \"shop\"\nvip = \"10.96.0.52:80\"\nmode = \"proxy\"\n\
         app_protocol = \"http\"\nbackends = [\"{}\"]\n\n",
        HttpBackends::addr(topo, 0),
        HttpBackends::addr(topo, 1),
        HttpBackends::addr(topo, 2),
        HttpBackends::addr(topo, 2),
    )
}

/// The issue's example as written, and more rules on the same gateway.
const WEATHER: &str = r#"
[[gateway]]
name = "weather-gateway"
listen = "10.77.0.1:80"

[[route]]
name = "weather"
gateway = "weather-gateway"
[[route.rule]]
matches = [{ path_prefix = "/" }]
backends = [{ service = "weather-backend" }]

[[route]]
name = "extras"
gateway = "weather-gateway"
[[route.rule]]
matches = [{ path_prefix = "/old" }]
redirect = { path = "/new", status = 301 }
[[route.rule]]
matches = [{ path_prefix = "/v1" }]
rewrite_prefix = "/headers"
backends = [{ service = "weather-backend" }]
request_headers = { set = { x-route = "extras" }, remove = ["user-agent"] }
response_headers = { set = { x-served-by = "switchyard" } }
[[route.rule]]
matches = [{ path_prefix = "/canary" }]
backends = [{ service = "weather-backend", weight = 90 }, { service = "weather-canary", weight = 10 }]
[[route.rule]]
matches = [{ path_prefix = "/", headers = { x-canary = "always" } }]
backends = [{ service = "weather-canary" }]

[[route]]
name = "shop-api"
service = "shop"
[[route.rule]]
matches = [{ path_prefix = "/api", method = "GET" }]
backends = [{ service = "weather-backend" }]
"#;

fn urls(base: &str, path: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| format!("http://{base}{path}")).collect()
}

fn curl_many(topo: &Topology, extra: &[&str], urls: &[String]) -> Vec<String> {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(urls.iter().map(String::as_str));
    curl(topo, &args).expect("curl")
}

#[test]
fn the_weather_example_through_the_gateway_and_the_vip() -> anyhow::Result<()> {
    if !require_root("the_weather_example_through_the_gateway_and_the_vip") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    let config = topo.agent_config(&(services(&topo) + WEATHER));
    let _agent = Agent::start(&topo, &config)?;

    // Ingress: any host, every path under `/`, spread over weather-backend's two backends.
    let out = curl_many(&topo, &[], &urls(GATEWAY, "/today", 10));
    assert_eq!(
        backends_seen(&out).values().copied().collect::<Vec<_>>(),
        [5, 5],
        "{out:?}"
    );
    let out = curl_many(
        &topo,
        &["-H", "Host: weather.example.com"],
        &urls(GATEWAY, "/x", 2),
    );
    assert_eq!(backends_seen(&out).values().sum::<usize>(), 2, "{out:?}");
    // Mesh: the same service through its VIP from a steered pod.
    let out = curl_many(&topo, &[], &urls(VIP, "/today", 10));
    assert_eq!(backends_seen(&out).len(), 2, "{out:?}");
    Ok(())
}

#[test]
fn rules_rewrite_redirect_split_and_refuse_what_matches_nothing() -> anyhow::Result<()> {
    if !require_root("rules_rewrite_redirect_split_and_refuse_what_matches_nothing") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    let config = topo.agent_config(&(services(&topo) + WEATHER));
    let _agent = Agent::start(&topo, &config)?;

    // Redirect.
    let out = curl(
        &topo,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &format!("http://{GATEWAY}/old/page?x=1"),
        ],
    )?;
    assert_eq!(out, ["301 http://10.77.0.1/new?x=1"], "{out:?}");

    // Prefix rewrite and header changes both ways: the backend lists what it got.
    let out = curl(&topo, &["-i", &format!("http://{GATEWAY}/v1")])?;
    assert!(
        out.iter()
            .any(|l| l.eq_ignore_ascii_case("x-served-by: switchyard")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l == "x-route: extras"), "{out:?}");
    assert!(!out.iter().any(|l| l.starts_with("user-agent")), "{out:?}");
    assert!(
        out.iter().any(|l| l.starts_with("backend-")),
        "rewritten to /headers: {out:?}"
    );
    assert!(out.iter().any(|l| l.starts_with("host: ")), "{out:?}");

    // A header match beats a plain prefix written before it.
    let out = curl_many(&topo, &["-H", "x-canary: always"], &urls(GATEWAY, "/", 4));
    assert_eq!(backends_seen(&out).get("backend-3"), Some(&4), "{out:?}");

    // 90/10: of 400 requests, about 40 to the canary (backend-3).
    let out = curl_many(&topo, &[], &urls(GATEWAY, "/canary", 400));
    let seen = backends_seen(&out);
    let canary = seen.get("backend-3").copied().unwrap_or(0);
    assert_eq!(seen.values().sum::<usize>(), 400, "{seen:?}");
    assert!(
        (20..=65).contains(&canary),
        "canary got {canary} of 400: {seen:?}"
    );

    // Mesh routes on `shop`: GET /api goes to weather-backend; anything else is the proxy's 404.
    let out = curl_many(&topo, &[], &urls("10.96.0.52", "/api/items", 2));
    assert!(!backends_seen(&out).contains_key("backend-3"), "{out:?}");
    let out = curl(
        &topo,
        &["-w", "\n%{http_code}", "http://10.96.0.52/elsewhere"],
    )?;
    assert_eq!(out.last().map(String::as_str), Some("404"), "{out:?}");
    assert!(
        out[0].contains("switchyard: no route matches GET 10.96.0.52/elsewhere"),
        "{out:?}"
    );
    let out = curl(
        &topo,
        &[
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "http://10.96.0.52/api/x",
        ],
    )?;
    assert_eq!(
        out.last().map(String::as_str),
        Some("404"),
        "the method is part of the match"
    );
    Ok(())
}

#[test]
fn bad_routes_are_refused_with_the_field_named() -> anyhow::Result<()> {
    // Reads files only: no root needed.
    let topo_free = |rest: &str| {
        format!(
            "[datapath]\ncgroup = \"pods\"\n[forwarder]\nlisten = [\"10.77.0.1:15001\"]\n\
             [[service]]\nname = \"weather-backend\"\nvip = \"10.96.0.50:80\"\nmode = \"proxy\"\n\
             app_protocol = \"http\"\nbackends = [\"10.77.0.11:8081\"]\n\
             [[gateway]]\nname = \"gw\"\nlisten = \"10.77.0.1:80\"\n{rest}"
        )
    };
    let cases = [
        (
            "[[route]]\nname = \"r\"\ngateway = \"gw\"\n[[route.rule]]\nbackends = [{ service = \"weather\" }]\n",
            "route[0] \"r\": rule[0].backends[0].service: `weather` is not a proxy-mode service",
        ),
        (
            "[[route]]\nname = \"r\"\ngateway = \"gw\"\n[[route.rule]]\nmatches = [{ path_regex = \"/a(\" }]\nbackends = [{ service = \"weather-backend\" }]\n",
            "route[0] \"r\": rule[0].matches[0].path_regex:",
        ),
        (
            "[[route]]\nname = \"r\"\ngateway = \"gw\"\n[[route.rule]]\nbackends = [{ service = \"weather-backend\", weight = 0 }]\n",
            "route[0] \"r\": rule[0].backends: the weights sum to 0",
        ),
        (
            "[[route]]\nname = \"r\"\ngateway = \"elsewhere\"\n[[route.rule]]\nbackends = [{ service = \"weather-backend\" }]\n",
            "route[0] \"r\": gateway: `elsewhere` is not a gateway",
        ),
        (
            "[[route]]\nname = \"r\"\ngateway = \"gw\"\n[[route.rule]]\nretry_codes = [500, 700]\nbackends = [{ service = \"weather-backend\" }]\n",
            "route[0] \"r\": rule[0].retry_codes: 700 is not a status from 400 to 599",
        ),
        (
            "[[route]]\nname = \"r\"\ngateway = \"gw\"\n[[route.rule]]\nretry_backoff = \"20s\"\nbackends = [{ service = \"weather-backend\" }]\n",
            "route[0] \"r\": rule[0].retry_backoff: 20s is above 10s",
        ),
    ];
    let dir = std::env::temp_dir().join(switchyard_testkit::unique("sy-routes-"));
    std::fs::create_dir_all(&dir)?;
    for (i, (rest, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("{i}.toml"));
        std::fs::write(&path, topo_free(rest))?;
        let out = Command::new(switchyard_testkit::binary("SWITCHYARD_BIN", "switchyard"))
            .arg("check-config")
            .arg(&path)
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{rest}: accepted");
        assert!(said.contains(want), "{rest}: {said}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
