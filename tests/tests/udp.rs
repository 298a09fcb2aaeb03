//! UDP through the hooks: per-datagram translation with replies from the service address, and
//! connected sockets unpinned from a backend that leaves.

use std::{net::SocketAddr, time::Duration};

use switchyard_testkit::{Agent, Topology, require_root};

fn udp_service(topo: &Topology, name: &str, vip: &str, backends: &[usize], v6: bool) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|&i| format!("\"{}\"", topo.backend(i, v6)))
        .collect();
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"udp\"\nalgorithm = \"round_robin\"\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

#[test]
fn udp_queries_are_balanced_and_answered_from_the_service_address() -> anyhow::Result<()> {
    if !require_root("udp_queries_are_balanced_and_answered_from_the_service_address") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let config = topo.agent_config(
        &(udp_service(&topo, "dns", "10.96.0.53:53", &[0, 1], false)
            + &udp_service(&topo, "dns6", "[fd96::53]:53", &[0, 1], true)),
    );
    let _agent = Agent::start(&topo, &config)?;
    for vip in ["10.96.0.53:53", "[fd96::53]:53"] {
        let out = topo.probe_output(0, &["udp-ask", "--to", vip, "--count", "10"])?;
        let from = vip.parse::<SocketAddr>()?;
        assert!(out.contains(&format!("from {from}")), "{vip}: {out:?}");
        // Round robin per datagram: both backends answer.
        assert!(out.contains(&"backend-1 5".to_owned()), "{vip}: {out:?}");
        assert!(out.contains(&"backend-2 5".to_owned()), "{vip}: {out:?}");
    }
    Ok(())
}

#[test]
fn a_connected_udp_client_is_unpinned_from_a_removed_backend() -> anyhow::Result<()> {
    if !require_root("a_connected_udp_client_is_unpinned_from_a_removed_backend") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let agent = Agent::start(
        &topo,
        &topo.agent_config(&udp_service(&topo, "dns", "10.96.0.53:53", &[0, 1], false)),
    )?;
    let mut client = topo.probe(
        0,
        &[
            "udp-ask",
            "--to",
            "10.96.0.53:53",
            "--connected",
            "--count",
            "60",
            "--interval-ms",
            "50",
        ],
    )?;
    // Round robin gives the client's one connect backend-1; it stays there while connected.
    client.wait_for("answer backend-1", Duration::from_secs(5))?;
    // Remove backend-1 (it keeps running: without the agent, the socket would talk to it on).
    agent.rewrite_config(&topo.agent_config(&udp_service(
        &topo,
        "dns",
        "10.96.0.53:53",
        &[1],
        false,
    )))?;
    client.wait_exit(Duration::from_secs(30))?;
    let out = client.output();
    let aborted = out.iter().position(|l| l == "aborted");
    let Some(aborted) = aborted else {
        panic!("the connected socket was never unpinned: {out:?}");
    };
    let after: Vec<&String> = out[aborted..]
        .iter()
        .filter(|l| l.starts_with("answer "))
        .collect();
    assert!(!after.is_empty(), "{out:?}");
    assert!(
        after.iter().all(|l| *l == "answer backend-2"),
        "answers after the abort: {after:?}"
    );
    assert!(!out.iter().any(|l| l.starts_with("error:")), "{out:?}");
    Ok(())
}
