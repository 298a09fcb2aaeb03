//! Proxy mode's admission: session affinity by client address (as a Kubernetes Service's
//! `sessionAffinity: ClientIP` asks), and `max_connections` as a hard limit under a burst.

use std::{net::SocketAddr, time::Duration};

use switchyard_testkit::{Agent, Topology, require_root, topology::Tally};

const VIP: &str = "10.96.0.20:80";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

fn service(topo: &Topology, which: &[usize], extra: &str) -> String {
    let list: Vec<String> = which
        .iter()
        .map(|&i| format!("\"{}\"", topo.backend(i, false)))
        .collect();
    format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nmode = \"proxy\"\n{extra}\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

fn answered(t: &Tally) -> Vec<&str> {
    t.keys()
        .filter(|k| !k.starts_with("error:"))
        .map(String::as_str)
        .collect()
}

#[test]
fn proxy_mode_affinity_keeps_a_client_on_its_backend_within_the_current_set() -> anyhow::Result<()>
{
    if !require_root("proxy_mode_affinity_keeps_a_client_on_its_backend_within_the_current_set") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let sticky = "algorithm = \"round_robin\"\naffinity_timeout = \"1s\"";
    let agent = Agent::start(
        &topo,
        &topo.agent_config(&service(&topo, &[0, 1, 2], sticky)),
    )?;
    // Round robin alone would spread these over all three.
    let first = topo.ask(0, vip(), 12)?;
    assert_eq!(
        answered(&first).len(),
        1,
        "one client, one backend: {first:?}"
    );
    let name = answered(&first)[0].to_owned();
    let index: usize = name.trim_start_matches("backend-").parse::<usize>()? - 1;

    // Its backend leaves the service: the client moves, and sticks to its new backend.
    let others: Vec<usize> = (0..3).filter(|&i| i != index).collect();
    agent.rewrite_config(&topo.agent_config(&service(&topo, &others, sticky)))?;
    let moved = topo.wait_until(vip(), 6, Duration::from_secs(10), "moved", |t| {
        !t.contains_key(&name)
    })?;
    assert_eq!(answered(&moved).len(), 1, "{moved:?}");
    let second = answered(&moved)[0].to_owned();

    // Past the timeout, round robin moves on.
    std::thread::sleep(Duration::from_millis(1500));
    let third = topo.ask(0, vip(), 6)?;
    assert_eq!(answered(&third).len(), 1, "{third:?}");
    assert_ne!(answered(&third)[0], second, "{moved:?} then {third:?}");
    Ok(())
}

#[test]
fn max_connections_holds_under_a_burst_of_concurrent_connects() -> anyhow::Result<()> {
    if !require_root("max_connections_holds_under_a_burst_of_concurrent_connects") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let _agent = Agent::start(
        &topo,
        &topo.agent_config(&service(&topo, &[0], "max_connections = 5")),
    )?;
    for _ in 0..3 {
        let out = topo.probe_output(
            0,
            &["burst", "--to", VIP, "--count", "60", "--hold-ms", "1500"],
        )?;
        let greeted: usize = out
            .iter()
            .find_map(|l| l.strip_prefix("greeted "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        assert!(
            (1..=5).contains(&greeted),
            "60 at once under max_connections = 5: {greeted} reached the backend"
        );
    }
    Ok(())
}
