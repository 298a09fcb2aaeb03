//! HTTP routes from every source: the weather example (gateway `weather-gateway` on port 80
//! for any host, a route sending every path under `/` to `weather-backend`) put through the
//! API and through Gateway API objects on the Kubernetes stand-in (written from the documented
//! wire format; not the real kube-apiserver), answered through the gateway and through the
//! VIP; a route edit in the file applied live and a bad one refused with the route and field
//! named; bad routes from the API refused with the field named and nothing half-applied; an
//! HTTPRoute updated and deleted; routes kept across a restart from last-known-good with the
//! control plane down. Real clients (curl) and real servers (sy-http).

use std::{net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use switchyard_testkit::{
    Agent, Topology,
    control::{TempFile, ctl, request, wait_for},
    http::{HTTP_PORT, HttpBackends, backends_seen, curl},
    require_root,
    servers::TempDir,
    standin::{
        KubeApi,
        kube::{Endpoint, Kind, endpoint_slice, route, service},
    },
};

const VIP: &str = "10.96.0.50:80";
const CANARY_VIP: &str = "10.96.0.51:80";
const GATEWAY: &str = "10.77.0.1:80";
const GATEWAY_TABLE: &str = "[[gateway]]\nname = \"weather-gateway\"\nlisten = \"10.77.0.1:80\"\n";
const WAIT: Duration = Duration::from_secs(30);

fn services(topo: &Topology) -> String {
    format!(
        "[[service]]\nname = \"weather-backend\"\nvip = \"{VIP}\"\nmode = \"proxy\"\n\
         app_protocol = \"http\"\nbackends = [\"{}\", \"{}\"]\n\n\
         [[service]]\nname = \"weather-canary\"\nvip = \"{CANARY_VIP}\"\nmode = \"proxy\"\n\
         app_protocol = \"http\"\nbackends = [\"{}\"]\n\n",
        HttpBackends::addr(topo, 0),
        HttpBackends::addr(topo, 1),
        HttpBackends::addr(topo, 2),
    )
}

/// What `n` GETs of `path` at `base` reached, by backend name; a failed curl counts as none.
fn seen(
    topo: &Topology,
    base: &str,
    path: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let urls: Vec<String> = (0..n).map(|_| format!("http://{base}{path}")).collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    curl(topo, &args)
        .map(|out| backends_seen(&out))
        .unwrap_or_default()
}

/// The status of one GET.
fn status(topo: &Topology, url: &str) -> String {
    curl(topo, &["-o", "/dev/null", "-w", "%{http_code}", url])
        .map(|o| o.concat())
        .unwrap_or_default()
}

fn names(seen: &std::collections::BTreeMap<String, usize>) -> Vec<String> {
    seen.keys().cloned().collect()
}

fn backend(i: usize) -> String {
    Topology::backend_name(i)
}

/// Waits until GETs at `base` reach exactly the backends `want`.
fn wait_reaching(topo: &Topology, base: &str, want: &[usize]) -> anyhow::Result<()> {
    let want: Vec<String> = want.iter().map(|&i| backend(i)).collect();
    wait_for(WAIT, || {
        let got = names(&seen(topo, base, "/today", 6));
        Ok((got == want).then_some(()))
    })
    .map_err(|e| e.context(format!("{base}: wanted {want:?}")))
}

fn weather_route() -> Value {
    json!({
        "gateway": "weather-gateway",
        "rule": [{"matches": [{"path_prefix": "/"}], "backends": [{"service": "weather-backend"}]}]
    })
}

#[test]
fn the_weather_example_from_the_api_through_the_gateway_and_the_vip_and_across_a_restart()
-> anyhow::Result<()> {
    if !require_root(
        "the_weather_example_from_the_api_through_the_gateway_and_the_vip_and_across_a_restart",
    ) {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    let config = topo.agent_config(&(services(&topo) + GATEWAY_TABLE));
    let mut agent = Agent::start(&topo, &config)?;
    let socket = topo.api_socket();

    // No route yet: the gateway serves only its routes.
    assert_eq!(status(&topo, &format!("http://{GATEWAY}/today")), "404");

    // Through ctl, from a file: the gateway's route, and a mesh route on the canary's VIP.
    let file = TempFile::new("sy-route-", &weather_route().to_string())?;
    let put = ctl(&socket, &["route", "put", "weather", file.path()])?;
    assert_eq!(put.code, 0, "{put:?}");
    let mesh = json!({
        "service": "weather-canary",
        "rule": [{"matches": [{"path_prefix": "/"}], "backends": [{"service": "weather-backend"}],
                  "response_headers": {"set": {"x-route": "mesh"}}}]
    });
    let a = request(&socket, "PUT", "/v1/routes/mesh", Some(&mesh.to_string()))?;
    assert_eq!(a.status, 201, "{}", a.body);

    // Ingress, any host, spread over weather-backend's two backends; the canary's VIP now
    // sends to weather-backend too (its route says so).
    wait_reaching(&topo, GATEWAY, &[0, 1])?;
    let hosted = curl(
        &topo,
        &[
            "-H",
            "Host: weather.example.com",
            &format!("http://{GATEWAY}/x"),
        ],
    )?;
    assert_eq!(
        backends_seen(&hosted).values().sum::<usize>(),
        1,
        "{hosted:?}"
    );
    wait_reaching(&topo, CANARY_VIP, &[0, 1])?;
    let out = curl(&topo, &["-i", &format!("http://{CANARY_VIP}/")])?;
    assert!(
        out.iter().any(|l| l.eq_ignore_ascii_case("x-route: mesh")),
        "{out:?}"
    );
    // The VIP of weather-backend itself has no route: it serves every request.
    wait_reaching(&topo, VIP, &[0, 1])?;

    // Listed, and shown by `ctl state` with parent and rules.
    let list = request(&socket, "GET", "/v1/routes", None)?.json()?;
    let listed: Vec<&str> = list["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["mesh", "weather"], "{list}");
    assert_eq!(list["routes"][1]["source"], "api");
    let state = ctl(&socket, &["state"])?;
    assert!(
        state.stdout.contains("weather  gateway weather-gateway")
            && state.stdout.contains("prefix / -> weather-backend w1"),
        "{}",
        state.stdout
    );

    // Bad routes: refused, the field named, nothing changed.
    let bad = [
        (
            json!({"gateway": "weather-gateway", "rule": [{"backends": [{"service": "nope"}]}]}),
            "rule[0].backends[0].service",
        ),
        (
            json!({"gateway": "weather-gateway", "rule": [{"matches": [{"path_regex": "("}], "backends": [{"service": "weather-backend"}]}]}),
            "rule[0].matches[0].path_regex",
        ),
        (
            json!({"gateway": "weather-gateway", "rule": [{"backends": [{"service": "weather-backend", "weight": 0}, {"service": "weather-canary", "weight": 0}]}]}),
            "rule[0].backends",
        ),
        (
            json!({"gateway": "no-such-gateway", "rule": [{"backends": [{"service": "weather-backend"}]}]}),
            "gateway",
        ),
        (
            json!({"gateway": "weather-gateway", "rule": [{"backends": [{"service": "weather-backend", "wieght": 2}]}]}),
            "rule[0].backends[0].wieght",
        ),
    ];
    for (body, field) in bad {
        let a = request(
            &socket,
            "PUT",
            "/v1/routes/weather",
            Some(&body.to_string()),
        )?;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert_eq!(a.json()?["field"], field, "{body}: {}", a.body);
    }
    let after = request(&socket, "GET", "/v1/routes/weather", None)?.json()?;
    assert_eq!(
        after["route"]["rule"][0]["backends"][0]["service"], "weather-backend",
        "{after}"
    );
    assert_eq!(
        names(&seen(&topo, GATEWAY, "/today", 6)),
        [backend(0), backend(1)]
    );

    // A destination deleted later: its share is answered 500 (Gateway API's answer), and
    // `ctl state` says it is not served.
    let canary_only = json!({"gateway": "weather-gateway",
        "rule": [{"matches": [{"path_prefix": "/c"}], "backends": [{"service": "weather-canary"}]},
                 {"matches": [{"path_prefix": "/"}], "backends": [{"service": "weather-backend"}]}]});
    let a = request(
        &socket,
        "PUT",
        "/v1/routes/weather",
        Some(&canary_only.to_string()),
    )?;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_for(WAIT, || {
        Ok((names(&seen(&topo, GATEWAY, "/c", 2)) == [backend(2)]).then_some(()))
    })?;
    agent.rewrite_config(
        &topo.agent_config(
            &(services(&topo)
                .split("[[service]]\nname = \"weather-canary\"")
                .next()
                .unwrap_or_default()
                .to_owned()
                + GATEWAY_TABLE),
        ),
    )?;
    wait_for(WAIT, || {
        Ok((status(&topo, &format!("http://{GATEWAY}/c")) == "500").then_some(()))
    })?;
    let state = ctl(&socket, &["state"])?;
    assert!(
        state.stdout.contains("weather-canary w1 (not served: 500)"),
        "{}",
        state.stdout
    );
    agent.rewrite_config(&config)?;
    wait_for(WAIT, || {
        Ok((names(&seen(&topo, GATEWAY, "/c", 2)) == [backend(2)]).then_some(()))
    })?;

    // Restarted: the API's routes come back from the last-known-good.
    agent.process.stop(Duration::from_secs(10))?;
    drop(agent);
    let agent = Agent::start(&topo, &config)?;
    wait_reaching(&topo, GATEWAY, &[0, 1])?;
    wait_for(WAIT, || {
        Ok((names(&seen(&topo, GATEWAY, "/c", 2)) == [backend(2)]).then_some(()))
    })?;
    // Deleted through ctl: the gateway has no route again.
    let del = ctl(&socket, &["route", "delete", "weather"])?;
    assert_eq!(del.code, 0, "{del:?}");
    wait_for(WAIT, || {
        Ok((status(&topo, &format!("http://{GATEWAY}/today")) == "404").then_some(()))
    })?;
    let gone = ctl(&socket, &["route", "get", "weather"])?;
    assert_eq!(gone.code, 1, "{gone:?}");
    drop(agent);
    Ok(())
}

const FILE_ROUTE: &str = r#"
[[route]]
name = "weather"
gateway = "weather-gateway"
[[route.rule]]
matches = [{ path_prefix = "/" }]
backends = [{ service = "weather-backend" }]
"#;

#[test]
fn a_route_edit_in_the_file_applies_live_and_a_bad_one_keeps_the_routes() -> anyhow::Result<()> {
    if !require_root("a_route_edit_in_the_file_applies_live_and_a_bad_one_keeps_the_routes") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    let base = services(&topo) + GATEWAY_TABLE;
    let agent = Agent::start(&topo, &topo.agent_config(&(base.clone() + FILE_ROUTE)))?;
    wait_reaching(&topo, GATEWAY, &[0, 1])?;

    // The edit: every path to the canary now.
    let edited = FILE_ROUTE.replace(
        "service = \"weather-backend\"",
        "service = \"weather-canary\"",
    );
    agent.rewrite_config(&topo.agent_config(&(base.clone() + &edited)))?;
    wait_reaching(&topo, GATEWAY, &[2])?;

    // A bad edit: the routes stay as they were, the log names the route and the field.
    let bad = edited.replace("service = \"weather-canary\"", "service = \"nope\"");
    agent.rewrite_config(&topo.agent_config(&(base.clone() + &bad)))?;
    wait_for(WAIT, || {
        Ok((!agent
            .said(&["route[0] \"weather\": rule[0].backends[0].service", "nope"])
            .is_empty())
        .then_some(()))
    })?;
    assert_eq!(names(&seen(&topo, GATEWAY, "/today", 6)), [backend(2)]);

    // A second gateway added in an edit listens at once; removed, it stops.
    let second = "[[gateway]]\nname = \"second\"\nlisten = \"10.77.0.1:8088\"\n\n[[route]]\nname = \"two\"\ngateway = \"second\"\n[[route.rule]]\nbackends = [{ service = \"weather-canary\" }]\n";
    agent.rewrite_config(&topo.agent_config(&(base.clone() + &edited + second)))?;
    wait_reaching(&topo, "10.77.0.1:8088", &[2])?;
    agent.rewrite_config(&topo.agent_config(&(base + &edited)))?;
    wait_for(WAIT, || {
        Ok(curl(&topo, &["http://10.77.0.1:8088/"])
            .is_err()
            .then_some(()))
    })?;
    Ok(())
}

const NS: &str = "weather";

fn kube_services(topo: &Topology, kube: &KubeApi) {
    let http = [
        ("switchyard.io/mode", "proxy"),
        ("switchyard.io/app-protocol", "http"),
    ];
    for (name, vip, backends, slice) in [
        ("weather-backend", VIP, vec![0, 1], "wb-a"),
        ("weather-canary", CANARY_VIP, vec![2], "wc-a"),
    ] {
        let ip = vip.parse::<SocketAddr>().unwrap().ip();
        kube.apply(
            Kind::Service,
            service(NS, name, ip, &[("http", 80, "TCP")], &http),
        );
        let endpoints: Vec<Endpoint> = backends
            .iter()
            .map(|&i| Endpoint::ready(topo.backend(i, false).ip()))
            .collect();
        kube.apply(
            Kind::EndpointSlice,
            endpoint_slice(NS, slice, name, &endpoints, "http", HTTP_PORT),
        );
    }
}

fn http_route(name: &str, parent: Value, to: &str) -> (Kind, Value) {
    route(
        Kind::HttpRoute,
        NS,
        name,
        json!({
            "parentRefs": [parent],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"name": to, "port": 80}]
            }]
        }),
    )
}

#[test]
fn httproutes_from_kubernetes_are_applied_updated_deleted_and_kept_across_a_restart()
-> anyhow::Result<()> {
    if !require_root(
        "httproutes_from_kubernetes_are_applied_updated_deleted_and_kept_across_a_restart",
    ) {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _http = HttpBackends::start(&topo)?;
    let mut kube = KubeApi::start(&topo.node, SocketAddr::from(([127, 0, 0, 1], 16444)))?;
    let dir = TempDir::new("sy-kube-routes-")?;
    kube_services(&topo, &kube);
    // Ingress: a parentRef to the Gateway `weather-gateway` (the agent's [[gateway]] of that
    // name). Mesh: a parentRef to the canary's Service, sending to weather-backend.
    let (k, o) = http_route(
        "weather",
        json!({"kind": "Gateway", "name": "weather-gateway"}),
        "weather-backend",
    );
    kube.apply(k, o);
    let (k, o) = http_route(
        "canary-mesh",
        json!({"group": "", "kind": "Service", "name": "weather-canary", "port": 80}),
        "weather-backend",
    );
    kube.apply(k, o);
    // One the agent cannot honour: logged with the object and the field, not applied.
    let (k, o) = route(
        Kind::HttpRoute,
        NS,
        "mirror",
        json!({"parentRefs": [{"name": "weather-gateway"}], "hostnames": ["mirror.example.com"],
               "rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "weather-canary", "port": 80}}}],
                          "backendRefs": [{"name": "weather-backend", "port": 80}]}]}),
    );
    kube.apply(k, o);
    // A GRPCRoute on the gateway for one gRPC service.
    let (k, o) = route(
        Kind::GrpcRoute,
        NS,
        "greeter",
        json!({"parentRefs": [{"name": "weather-gateway"}],
               "rules": [{"matches": [{"method": {"service": "helloworld.Greeter"}}],
                          "backendRefs": [{"name": "weather-canary", "port": 80}]}]}),
    );
    kube.apply(k, o);

    let config = topo.agent_config(&format!(
        "{GATEWAY_TABLE}\n[registry.kubernetes]\nkubeconfig = {:?}\n",
        kube.write_kubeconfig(dir.path())?.display().to_string()
    ));
    let agent = Agent::start(&topo, &config)?;
    let socket = topo.api_socket();

    wait_reaching(&topo, GATEWAY, &[0, 1])?;
    wait_reaching(&topo, CANARY_VIP, &[0, 1])?;
    // The GRPCRoute's path: `/helloworld.Greeter/…` goes to the canary.
    wait_for(WAIT, || {
        Ok(
            (names(&seen(&topo, GATEWAY, "/helloworld.Greeter/SayHello", 2)) == [backend(2)])
                .then_some(()),
        )
    })?;
    let listed = request(&socket, "GET", "/v1/routes", None)?.json()?;
    let names_listed: Vec<&str> = listed["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names_listed,
        [
            "grpcroute/weather/greeter",
            "httproute/weather/canary-mesh",
            "httproute/weather/weather"
        ],
        "{listed}"
    );
    assert!(
        !agent
            .said(&[
                "HTTPRoute weather/mirror",
                "spec.rules[0].filters[0].type: RequestMirror is not supported"
            ])
            .is_empty(),
        "the object and the field are named"
    );

    // Updated: the route now sends to the canary.
    let (k, o) = http_route(
        "weather",
        json!({"kind": "Gateway", "name": "weather-gateway"}),
        "weather-canary",
    );
    kube.apply(k, o);
    wait_reaching(&topo, GATEWAY, &[2])?;

    // Restarted with the control plane down: the routes come from the last-known-good.
    drop(agent);
    kube.stop();
    let agent = Agent::start(&topo, &config)?;
    wait_reaching(&topo, GATEWAY, &[2])?;
    wait_reaching(&topo, CANARY_VIP, &[0, 1])?;

    // The control plane back, the route deleted: the gateway has no route for `/today`.
    kube.start_again()?;
    kube.delete(Kind::HttpRoute, NS, "weather");
    // The source's reconnect backoff may have grown while the server was down.
    wait_for(4 * WAIT, || {
        Ok((status(&topo, &format!("http://{GATEWAY}/today")) == "404").then_some(()))
    })?;
    drop(agent);
    Ok(())
}
