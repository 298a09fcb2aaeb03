//! The Kubernetes source against the stand-in API server (`switchyard_testkit::standin::kube`,
//! written from the documented wire format; not the real kube-apiserver) in the node's
//! namespace: a Service's ClusterIP reaches its EndpointSlice endpoints in both modes, scaling
//! and terminating endpoints steer new connections, the watch survives a server restart, a
//! `410 Gone` (as an event and as an HTTP answer) and honours bookmarks, and a bad object is
//! rejected alone.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use switchyard_testkit::{
    Agent, Topology,
    expect::{LIMIT, ask, exactly, wait_until},
    require_root,
    servers::TempDir,
    standin::{
        KubeApi,
        kube::{Endpoint, Kind, Port, endpoint_slice, service},
    },
    topology::BACKEND_PORT,
};

const WEB: &str = "10.96.0.10:80";
const API: &str = "10.96.0.20:80";
const NS: &str = "shop";

fn ip(vip: &str) -> IpAddr {
    vip.parse::<SocketAddr>().map(|a| a.ip()).unwrap()
}

fn api_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 16443))
}

/// The agent's config: the file names no service; Kubernetes through the stand-in's kubeconfig.
fn config(topo: &Topology, kubeconfig: &std::path::Path) -> String {
    topo.agent_config(&format!(
        "[registry.kubernetes]\nkubeconfig = {:?}\n",
        kubeconfig.display().to_string()
    ))
}

fn endpoints(topo: &Topology, which: &[usize]) -> Vec<Endpoint> {
    which
        .iter()
        .map(|&i| Endpoint::ready(topo.backend(i, false).ip()))
        .collect()
}

fn slice(topo: &Topology, name: &str, svc: &str, which: &[usize]) -> serde_json::Value {
    endpoint_slice(NS, name, svc, &endpoints(topo, which), "", BACKEND_PORT)
}

/// Stops the agent and returns its kernel counter `name` (from the line it prints on exit).
fn kernel_counter(agent: &mut Agent, name: &str) -> anyhow::Result<u64> {
    agent.process.stop(Duration::from_secs(10))?;
    let line = agent
        .said(&["kernel counters:"])
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no kernel counters line"))?;
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .ok_or_else(|| anyhow::anyhow!("no {name} in {line:?}"))?;
    Ok(value.parse()?)
}

#[test]
fn a_service_with_three_endpoints_is_reachable_through_its_cluster_ip_in_both_modes()
-> anyhow::Result<()> {
    if !require_root(
        "a_service_with_three_endpoints_is_reachable_through_its_cluster_ip_in_both_modes",
    ) {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let kube = KubeApi::start(&topo.node, api_addr())?;
    let dir = TempDir::new("sy-kube-")?;
    kube.apply(
        Kind::Service,
        service(NS, "web", ip(WEB), &[("", 80, "TCP")], &[]),
    );
    kube.apply(
        Kind::Service,
        service(
            NS,
            "api",
            ip(API),
            &[("", 80, "TCP")],
            &[("switchyard.io/mode", "proxy")],
        ),
    );
    kube.apply(
        Kind::EndpointSlice,
        slice(&topo, "web-a", "web", &[0, 1, 2]),
    );
    kube.apply(
        Kind::EndpointSlice,
        slice(&topo, "api-a", "api", &[0, 1, 2]),
    );
    let mut agent = Agent::start(&topo, &config(&topo, &kube.write_kubeconfig(dir.path())?))?;

    wait_until(&topo, WEB, 12, "on all three", exactly(&[0, 1, 2]))?;
    wait_until(&topo, API, 12, "on all three", exactly(&[0, 1, 2]))?;
    // Round robin over the three, in the kernel and in the forwarder.
    for vip in [WEB, API] {
        let tally = ask(&topo, vip, 30)?;
        for i in 0..3 {
            assert_eq!(
                tally.get(&Topology::backend_name(i)),
                Some(&10),
                "{vip}: {tally:?}"
            );
        }
    }
    // The annotation chose the mode: the web connections were translated in the kernel, the
    // api ones redirected to the forwarder.
    assert!(kernel_counter(&mut agent, "translated")? > 0);
    assert!(kernel_counter(&mut agent, "redirected")? > 0);
    Ok(())
}

#[test]
fn scaled_and_terminating_endpoints_steer_new_connections() -> anyhow::Result<()> {
    if !require_root("scaled_and_terminating_endpoints_steer_new_connections") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let kube = KubeApi::start(&topo.node, api_addr())?;
    let dir = TempDir::new("sy-kube-")?;
    kube.apply(
        Kind::Service,
        service(NS, "web", ip(WEB), &[("", 80, "TCP")], &[]),
    );
    kube.apply(
        Kind::Service,
        service(
            NS,
            "api",
            ip(API),
            &[("", 80, "TCP")],
            &[("switchyard.io/mode", "proxy")],
        ),
    );
    // Each service's endpoints in two slices, as the controller splits large sets.
    for svc in ["web", "api"] {
        kube.apply(
            Kind::EndpointSlice,
            slice(&topo, &format!("{svc}-a"), svc, &[0, 1]),
        );
        kube.apply(
            Kind::EndpointSlice,
            slice(&topo, &format!("{svc}-b"), svc, &[2]),
        );
    }
    let _agent = Agent::start(&topo, &config(&topo, &kube.write_kubeconfig(dir.path())?))?;
    for (svc, vip) in [("web", WEB), ("api", API)] {
        wait_until(&topo, vip, 12, "on all three", exactly(&[0, 1, 2]))?;

        // Scaled down: the second slice goes.
        kube.delete(Kind::EndpointSlice, NS, &format!("{svc}-b"));
        wait_until(&topo, vip, 12, "scaled down to two", exactly(&[0, 1]))?;

        // Scaled up again.
        kube.apply(
            Kind::EndpointSlice,
            slice(&topo, &format!("{svc}-b"), svc, &[2]),
        );
        wait_until(&topo, vip, 12, "scaled up to three", exactly(&[0, 1, 2]))?;

        // backend-1's pod terminates: it takes no new connections (drain).
        let mut eps = endpoints(&topo, &[0, 1]);
        eps[0] = Endpoint::terminating(eps[0].ip);
        kube.apply(
            Kind::EndpointSlice,
            endpoint_slice(NS, &format!("{svc}-a"), svc, &eps, "", BACKEND_PORT),
        );
        wait_until(
            &topo,
            vip,
            12,
            "off the terminating endpoint",
            exactly(&[1, 2]),
        )?;
        for _ in 0..3 {
            assert!(
                exactly(&[1, 2])(&ask(&topo, vip, 12)?),
                "{vip} went back to it"
            );
        }
    }
    Ok(())
}

#[test]
fn the_watch_survives_a_restart_and_a_410_and_honours_bookmarks() -> anyhow::Result<()> {
    if !require_root("the_watch_survives_a_restart_and_a_410_and_honours_bookmarks") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let mut kube = KubeApi::start(&topo.node, api_addr())?;
    let dir = TempDir::new("sy-kube-")?;
    kube.apply(
        Kind::Service,
        service(NS, "web", ip(WEB), &[("", 80, "TCP")], &[]),
    );
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[0]));
    let agent = Agent::start(&topo, &config(&topo, &kube.write_kubeconfig(dir.path())?))?;
    wait_until(&topo, WEB, 12, "on backend-1", exactly(&[0]))?;
    assert_eq!(kube.lists(Kind::EndpointSlice), 1);

    // A restart with the history kept: the watch resumes where it was, no list.
    kube.stop();
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[1]));
    // Meanwhile the agent serves what it had.
    assert!(exactly(&[0])(&ask(&topo, WEB, 6)?));
    kube.start_again()?;
    wait_until(&topo, WEB, 12, "moved to backend-2", exactly(&[1]))?;
    assert_eq!(kube.lists(Kind::EndpointSlice), 1, "resumed by listing");
    assert_eq!(kube.lists(Kind::Service), 1, "resumed by listing");

    // History lost while away: the watch is answered 410 (an ERROR event) and lists again.
    kube.stop();
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[2]));
    kube.compact();
    kube.start_again()?;
    wait_until(&topo, WEB, 12, "moved to backend-3", exactly(&[2]))?;
    assert!(kube.gone(Kind::EndpointSlice) >= 1);
    assert_eq!(kube.lists(Kind::EndpointSlice), 2);

    // The same with the 410 as the answer to the watch request itself.
    kube.gone_as_http(true);
    kube.stop();
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[0]));
    kube.compact();
    kube.start_again()?;
    wait_until(&topo, WEB, 12, "back on backend-1", exactly(&[0]))?;
    assert_eq!(kube.lists(Kind::EndpointSlice), 3);
    assert!(!agent.said(&["410"]).is_empty());

    // Bookmarks: slices change, Services do not, so the Services watch has seen no object
    // since. A bookmark moves it to the current version; the history before that version is
    // then dropped. A watch that honoured the bookmark resumes without a 410 or a list.
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[1]));
    wait_until(&topo, WEB, 12, "moved to backend-2", exactly(&[1]))?;
    // (Asked again until one is written: the Services watch may be between two requests.)
    let marked = kube.bookmarks_sent(Kind::Service);
    let deadline = Instant::now() + LIMIT;
    while kube.bookmarks_sent(Kind::Service) == marked {
        anyhow::ensure!(Instant::now() < deadline, "no bookmark was sent");
        kube.bookmark();
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = kube.gone(Kind::Service);
    let service_lists = kube.lists(Kind::Service);
    kube.stop();
    kube.compact();
    kube.start_again()?;
    kube.apply(
        Kind::Service,
        service(
            NS,
            "web",
            ip(WEB),
            &[("", 80, "TCP")],
            &[("switchyard.io/algorithm", "random")],
        ),
    );
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[2]));
    wait_until(&topo, WEB, 12, "moved to backend-3", exactly(&[2]))?;
    assert_eq!(
        kube.gone(Kind::Service),
        gone,
        "resumed from before the bookmark"
    );
    assert_eq!(kube.lists(Kind::Service), service_lists);
    Ok(())
}

#[test]
fn a_bad_service_is_rejected_alone_and_keeps_its_last_good_state() -> anyhow::Result<()> {
    if !require_root("a_bad_service_is_rejected_alone_and_keeps_its_last_good_state") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let kube = KubeApi::start(&topo.node, api_addr())?;
    let dir = TempDir::new("sy-kube-")?;
    let ports = [("", 80, "TCP")];
    kube.apply(Kind::Service, service(NS, "web", ip(WEB), &ports, &[]));
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[0]));
    // name, cluster IP, ports, annotations, what the rejection names.
    type Bad<'a> = (
        &'a str,
        &'a str,
        Vec<Port<'a>>,
        Vec<(&'a str, &'a str)>,
        &'a str,
    );
    let bad: [Bad; 3] = [
        (
            "teleport",
            "10.96.0.31",
            ports.to_vec(),
            vec![("switchyard.io/mode", "teleport")],
            "mode: unknown variant",
        ),
        (
            "typo",
            "10.96.0.32",
            ports.to_vec(),
            vec![("switchyard.io/mdoe", "proxy")],
            "switchyard.io/mdoe: not a setting",
        ),
        (
            "sctp",
            "10.96.0.33",
            vec![("", 80, "SCTP")],
            vec![],
            "protocol SCTP",
        ),
    ];
    for (name, vip, ports, annotations, _) in &bad {
        kube.apply(
            Kind::Service,
            service(NS, name, vip.parse()?, ports, annotations),
        );
        kube.apply(
            Kind::EndpointSlice,
            slice(&topo, &format!("{name}-a"), name, &[1]),
        );
    }
    let agent = Agent::start(&topo, &config(&topo, &kube.write_kubeconfig(dir.path())?))?;
    wait_until(&topo, WEB, 12, "on backend-1", exactly(&[0]))?;
    for (name, _, _, _, reason) in &bad {
        let key = format!("{NS}/{name}");
        assert!(
            !agent.said(&["rejected", &key, reason]).is_empty(),
            "no rejection of {key} naming {reason:?}:\n{}",
            agent.process.output().join("\n")
        );
    }

    // A bad change to a good Service: rejected, the last good state stays, also when its
    // slices change meanwhile (the Service is still bad); a good change then applies.
    kube.apply(
        Kind::Service,
        service(
            NS,
            "web",
            ip(WEB),
            &ports,
            &[("switchyard.io/retries", "many")],
        ),
    );
    let rejections = || {
        agent
            .said(&["rejected", "shop/web:80/tcp", "retries"])
            .len()
    };
    let wait_rejections = |n: usize| -> anyhow::Result<()> {
        let deadline = Instant::now() + LIMIT;
        while rejections() < n {
            anyhow::ensure!(Instant::now() < deadline, "the bad change was not rejected");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    wait_rejections(1)?;
    assert!(
        exactly(&[0])(&ask(&topo, WEB, 6)?),
        "the last good state went"
    );
    kube.apply(Kind::EndpointSlice, slice(&topo, "web-a", "web", &[0, 1]));
    wait_rejections(2)?;
    assert!(
        exactly(&[0])(&ask(&topo, WEB, 6)?),
        "the last good state went"
    );
    kube.apply(Kind::Service, service(NS, "web", ip(WEB), &ports, &[]));
    wait_until(&topo, WEB, 12, "on both", exactly(&[0, 1]))?;
    Ok(())
}
