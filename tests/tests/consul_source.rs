//! The Consul source against the stand-in Consul API (`switchyard_testkit::standin::consul`,
//! written from the documented wire format; not Consul itself) in the node's namespace: a
//! service's VIP (tag or meta) reaches its passing instances, a failing health check ejects an
//! instance, an ACL token is sent, a bad service is rejected alone; and the precedence of every
//! source that names one address: file, etcd, Kubernetes, Consul.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use switchyard_testkit::{
    Agent, Topology,
    expect::{LIMIT, ask, exactly, wait_until},
    require_root,
    servers::{Etcd, TempDir},
    standin::{
        ConsulApi, KubeApi,
        consul::Instance,
        kube::{Endpoint, Kind, endpoint_slice, service},
    },
    topology::BACKEND_PORT,
};

const TOKEN: &str = "8f2c0f6e-switchyard-test";

fn consul_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 18500))
}

fn section(consul: &ConsulApi) -> String {
    format!(
        "[registry.consul]\naddress = \"http://{}\"\ntoken = {TOKEN:?}\nwait = \"10s\"\n",
        consul.addr()
    )
}

#[test]
fn a_failing_consul_health_check_ejects_a_backend() -> anyhow::Result<()> {
    if !require_root("a_failing_consul_health_check_ejects_a_backend") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let consul = ConsulApi::start(&topo.node, consul_addr())?;
    consul.require_token(TOKEN);
    const WEB: &str = "10.96.0.30:80";
    for i in 0..3 {
        consul.register(
            "web",
            Instance::new(
                &format!("web-{i}"),
                topo.backend(i, false),
                &["switchyard-vip=10.96.0.30:80", "v1"],
            ),
        );
    }
    let _agent = Agent::start(&topo, &topo.agent_config(&section(&consul)))?;
    wait_until(&topo, WEB, 12, "on all three", exactly(&[0, 1, 2]))?;

    // backend-1's check goes critical: no new connections reach it.
    consul.set_passing("web", "web-0", false);
    wait_until(&topo, WEB, 12, "off the failing instance", exactly(&[1, 2]))?;
    for _ in 0..3 {
        assert!(exactly(&[1, 2])(&ask(&topo, WEB, 12)?));
    }
    // Passing again: back in.
    consul.set_passing("web", "web-0", true);
    wait_until(&topo, WEB, 12, "back on all three", exactly(&[0, 1, 2]))?;
    // Deregistered: gone.
    consul.deregister("web", "web-2");
    wait_until(&topo, WEB, 12, "down to two", exactly(&[0, 1]))?;

    // Every request carried the token, and the agent waited in blocking queries.
    assert_eq!(consul.refused(), 0);
    let asked = consul.asked();
    assert!(
        asked
            .iter()
            .any(|p| p.starts_with("/v1/health/service/web?")
                && p.contains("index=")
                && p.contains("passing")),
        "{asked:#?}"
    );
    assert!(
        asked
            .iter()
            .any(|p| p.starts_with("/v1/catalog/services") && p.contains("wait=")),
        "{asked:#?}"
    );
    Ok(())
}

#[test]
fn a_consul_service_takes_its_vip_from_meta_and_a_bad_one_is_rejected_alone() -> anyhow::Result<()>
{
    if !require_root("a_consul_service_takes_its_vip_from_meta_and_a_bad_one_is_rejected_alone") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let consul = ConsulApi::start(&topo.node, consul_addr())?;
    const API: &str = "10.96.0.31:80";
    for i in 0..2 {
        consul.register(
            "api",
            Instance::new(
                &format!("api-{i}"),
                topo.backend(i, false),
                &["switchyard-mode=proxy"],
            )
            .meta("switchyard_vip", API),
        );
    }
    consul.register(
        "broken",
        Instance::new(
            "broken-0",
            topo.backend(0, false),
            &["switchyard-vip=10.96.0.32"],
        ),
    );
    consul.register(
        "unrelated",
        Instance::new("unrelated-0", topo.backend(1, false), &["v2"]),
    );
    let agent = Agent::start(
        &topo,
        &topo.agent_config(&format!(
            "[registry.consul]\naddress = \"http://{}\"\nwait = \"10s\"\n",
            consul.addr()
        )),
    )?;
    wait_until(&topo, API, 12, "on both", exactly(&[0, 1]))?;
    let deadline = Instant::now() + LIMIT;
    while agent
        .said(&["rejected", "broken/", "tag switchyard-vip=10.96.0.32"])
        .is_empty()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "broken was not rejected:\n{}",
            agent.process.output().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        agent
            .said(&["unrelated"])
            .iter()
            .all(|l| !l.contains("rejected"))
    );
    Ok(())
}

#[test]
fn consul_is_followed_over_https_with_its_ca_file_and_a_token_file() -> anyhow::Result<()> {
    if !require_root("consul_is_followed_over_https_with_its_ca_file_and_a_token_file") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let consul = ConsulApi::start_tls(&topo.node, consul_addr())?;
    consul.require_token(TOKEN);
    const WEB: &str = "10.96.0.33:80";
    for i in 0..2 {
        consul.register(
            "web",
            Instance::new(
                &format!("web-{i}"),
                topo.backend(i, false),
                &["switchyard-vip=10.96.0.33:80"],
            ),
        );
    }
    let dir = TempDir::new("sy-consul-token-")?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let ca = consul.ca().ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let _agent = Agent::start(
        &topo,
        &topo.agent_config(&format!(
            "[registry.consul]\naddress = \"https://{}\"\nca = {:?}\ntoken_file = {:?}\n\
             wait = \"10s\"\n",
            consul.addr(),
            ca.display().to_string(),
            token_file.display().to_string(),
        )),
    )?;
    wait_until(&topo, WEB, 12, "on both", exactly(&[0, 1]))?;
    consul.set_passing("web", "web-1", false);
    wait_until(&topo, WEB, 12, "off the failing instance", exactly(&[0]))?;
    assert_eq!(consul.refused(), 0);
    Ok(())
}

/// One address named by every source at once; the backend that answers tells who won.
#[test]
fn file_etcd_kubernetes_and_consul_take_an_address_by_precedence() -> anyhow::Result<()> {
    if !require_root("file_etcd_kubernetes_and_consul_take_an_address_by_precedence") {
        return Ok(());
    }
    let topo = Topology::new(1, 4)?;
    // VIP 10.96.0.4x: x = how many sources name it (file only on .44).
    let vip = |n: u8| format!("10.96.0.4{n}:80");
    let etcd = Etcd::start(&topo.node, 1)?;
    let kube = KubeApi::start(&topo.node, SocketAddr::from(([127, 0, 0, 1], 16443)))?;
    let consul = ConsulApi::start(&topo.node, consul_addr())?;
    let dir = TempDir::new("sy-prec-")?;

    // Consul (backend-4) names all four; Kubernetes (backend-3) .42-.44; etcd (backend-2)
    // .43-.44; the file (backend-1) .44.
    for n in 1..=4 {
        consul.register(
            &format!("c{n}"),
            Instance::new(
                &format!("c{n}-0"),
                topo.backend(3, false),
                &[&format!("switchyard-vip={}", vip(n))],
            ),
        );
    }
    for n in 2..=4 {
        let name = format!("k{n}");
        kube.apply(
            Kind::Service,
            service(
                "default",
                &name,
                vip(n).parse::<SocketAddr>()?.ip(),
                &[("", 80, "TCP")],
                &[],
            ),
        );
        kube.apply(
            Kind::EndpointSlice,
            endpoint_slice(
                "default",
                &format!("{name}-a"),
                &name,
                &[Endpoint::ready(topo.backend(2, false).ip())],
                "",
                BACKEND_PORT,
            ),
        );
    }
    for n in 3..=4 {
        etcd.put(
            &format!("/sy/services/e{n}"),
            &format!(
                r#"{{"vip": "{}", "backends": ["{}"]}}"#,
                vip(n),
                topo.backend(1, false)
            ),
        )?;
    }
    let file_service = format!(
        "[[service]]\nname = \"f4\"\nvip = \"{}\"\nbackends = [\"{}\"]\n",
        vip(4),
        topo.backend(0, false)
    );
    let sources = format!(
        "{}[registry.kubernetes]\nkubeconfig = {:?}\n\n{}\n",
        etcd.agent_section("/sy/services/"),
        kube.write_kubeconfig(dir.path())?.display().to_string(),
        section(&consul),
    );
    consul.require_token(TOKEN);
    let with_file = topo.agent_config(&format!("{sources}\n{file_service}"));
    let agent = Agent::start(&topo, &with_file)?;
    wait_until(&topo, &vip(1), 12, "Consul's", exactly(&[3]))?;
    wait_until(&topo, &vip(2), 12, "Kubernetes'", exactly(&[2]))?;
    wait_until(&topo, &vip(3), 12, "etcd's", exactly(&[1]))?;
    wait_until(&topo, &vip(4), 12, "the file's", exactly(&[0]))?;

    // Each source in turn lets go of .44: the next one down takes it.
    agent.rewrite_config(&topo.agent_config(&sources))?;
    wait_until(
        &topo,
        &vip(4),
        12,
        "etcd's once the file let go",
        exactly(&[1]),
    )?;
    etcd.delete("/sy/services/e4")?;
    wait_until(
        &topo,
        &vip(4),
        12,
        "Kubernetes' once etcd let go",
        exactly(&[2]),
    )?;
    kube.delete(Kind::Service, "default", "k4");
    wait_until(
        &topo,
        &vip(4),
        12,
        "Consul's once Kubernetes let go",
        exactly(&[3]),
    )?;
    consul.deregister("c4", "c4-0");
    wait_until(&topo, &vip(4), 12, "unserved", |t| {
        t.keys().all(|k| k.starts_with("error:"))
    })?;
    Ok(())
}
