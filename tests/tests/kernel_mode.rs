//! Kernel mode: the kernel picks the backend inside `connect()`.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use switchyard_testkit::{Agent, Topology, entries::service, expect::count, require_root};

fn three(topo: &Topology, v6: bool) -> Vec<String> {
    (0..3).map(|i| topo.backend(i, v6).to_string()).collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn ipv6_and_v4_mapped_service_addresses_are_balanced() -> anyhow::Result<()> {
    if !require_root("ipv6_and_v4_mapped_service_addresses_are_balanced") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(
        &(service("v4", "10.96.0.10:80", "", &three(&topo, false))
            + &service("v6", "[fd96::10]:80", "", &three(&topo, true))),
    );
    let _agent = Agent::start(&topo, &config)?;
    for to in ["[fd96::10]:80", "[::ffff:10.96.0.10]:80"] {
        let tally = topo.ask(0, addr(to), 9)?;
        for b in 0..3 {
            assert_eq!(count(&tally, b), 3, "{to}: {tally:?}");
        }
    }
    Ok(())
}

#[test]
fn weighted_random_follows_weights() -> anyhow::Result<()> {
    if !require_root("weighted_random_follows_weights") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let backends = format!(
        "[{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 3 }}]",
        topo.backend(0, false),
        topo.backend(1, false)
    );
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"w\"\nvip = \"10.96.0.10:80\"\nalgorithm = \"weighted_random\"\nbackends = {backends}\n"
    ));
    let _agent = Agent::start(&topo, &config)?;
    let tally = topo.ask(0, addr("10.96.0.10:80"), 800)?;
    let heavy = count(&tally, 1);
    // Expected 600 of 800; binomial sd is about 12, so this band is over 6 sd wide.
    assert!((520..=680).contains(&heavy), "{tally:?}");
    assert_eq!(heavy + count(&tally, 0), 800, "{tally:?}");
    Ok(())
}

#[test]
fn random_reaches_every_backend() -> anyhow::Result<()> {
    if !require_root("random_reaches_every_backend") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(&service(
        "r",
        "10.96.0.10:80",
        "algorithm = \"random\"",
        &three(&topo, false),
    ));
    let _agent = Agent::start(&topo, &config)?;
    let tally = topo.ask(0, addr("10.96.0.10:80"), 300)?;
    for b in 0..3 {
        // Expected 100 each.
        assert!((60..=140).contains(&count(&tally, b)), "{tally:?}");
    }
    Ok(())
}

#[test]
fn a_drained_or_maintained_backend_gets_no_new_connections() -> anyhow::Result<()> {
    if !require_root("a_drained_or_maintained_backend_gets_no_new_connections") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let backends = format!(
        "[\"{}\", {{ address = \"{}\", state = \"drain\" }}, {{ address = \"{}\", state = \"maint\" }}]",
        topo.backend(0, false),
        topo.backend(1, false),
        topo.backend(2, false)
    );
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"d\"\nvip = \"10.96.0.10:80\"\nbackends = {backends}\n"
    ));
    let _agent = Agent::start(&topo, &config)?;
    let tally = topo.ask(0, addr("10.96.0.10:80"), 20)?;
    assert_eq!(count(&tally, 0), 20, "{tally:?}");
    Ok(())
}

#[test]
fn a_service_with_no_usable_backend_fails_fast() -> anyhow::Result<()> {
    if !require_root("a_service_with_no_usable_backend_fails_fast") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let backends = format!(
        "[{{ address = \"{}\", state = \"maint\" }}]",
        topo.backend(0, false)
    );
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"empty\"\nvip = \"10.96.0.10:80\"\nbackends = {backends}\n\n\
         [[service]]\nname = \"none\"\nvip = \"[fd96::10]:80\"\n"
    ));
    let mut agent = Agent::start(&topo, &config)?;
    // A long client timeout: only an immediate refusal (ECONNREFUSED), not a timeout, passes.
    for to in ["10.96.0.10:80", "[fd96::10]:80"] {
        let tally = topo.ask_with(0, addr(to), 3, true, &["--timeout-ms", "10000"])?;
        assert_eq!(tally.get("error:refused"), Some(&3), "{to}: {tally:?}");
    }
    // The refusal is logged by the kernel program (kernel_log = "debug" in the test config).
    agent
        .process
        .wait_for("has no usable backend", Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn session_affinity_holds_then_expires() -> anyhow::Result<()> {
    if !require_root("session_affinity_holds_then_expires") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(&service(
        "sticky",
        "10.96.0.10:80",
        "algorithm = \"round_robin\"\naffinity_timeout = \"1s\"",
        &three(&topo, false),
    ));
    let _agent = Agent::start(&topo, &config)?;
    let first = topo.ask(0, addr("10.96.0.10:80"), 10)?;
    assert_eq!(first.len(), 1, "one client, one backend: {first:?}");
    std::thread::sleep(Duration::from_millis(1500));
    // Expired: round robin moves on to the next backend, which then sticks.
    let second = topo.ask(0, addr("10.96.0.10:80"), 10)?;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(
        first.keys().next(),
        second.keys().next(),
        "{first:?} then {second:?}"
    );
    Ok(())
}

/// Which backend each of 60 client addresses lands on.
fn maglev_map(topo: &Topology, sources: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let tally = topo.ask_with(0, addr("10.96.0.10:80"), 1, true, &["--sources", sources])?;
    Ok(tally
        .keys()
        .filter_map(|k| k.split_once('/'))
        .map(|(src, name)| (src.to_owned(), name.to_owned()))
        .collect())
}

#[test]
fn maglev_keeps_clients_when_a_backend_goes() -> anyhow::Result<()> {
    if !require_root("maglev_keeps_clients_when_a_backend_goes") {
        return Ok(());
    }
    let topo = Topology::new(1, 5)?;
    let sources: Vec<String> = (100..160).map(|h| format!("10.77.0.{h}")).collect();
    for s in &sources {
        topo.pods[0].ip(&["addr", "add", &format!("{s}/32"), "dev", "eth0"])?;
    }
    let sources = sources.join(",");
    let all: Vec<String> = (0..5).map(|i| topo.backend(i, false).to_string()).collect();
    let before = {
        let config = topo.agent_config(&service(
            "m",
            "10.96.0.10:80",
            "algorithm = \"maglev\"",
            &all,
        ));
        let _agent = Agent::start(&topo, &config)?;
        let first = maglev_map(&topo, &sources)?;
        // Same client, same backend, every time.
        assert_eq!(first, maglev_map(&topo, &sources)?);
        first
    };
    assert_eq!(before.len(), 60);
    let used: std::collections::BTreeSet<&String> = before.values().collect();
    assert!(
        used.len() >= 4,
        "60 clients should spread over the backends: {before:?}"
    );
    // Remove backend-3 (index 2).
    let config = topo.agent_config(&service(
        "m",
        "10.96.0.10:80",
        "algorithm = \"maglev\"",
        &[
            all[0].clone(),
            all[1].clone(),
            all[3].clone(),
            all[4].clone(),
        ],
    ));
    let _agent = Agent::start(&topo, &config)?;
    let after = maglev_map(&topo, &sources)?;
    let removed = Topology::backend_name(2);
    let stayed_put = before
        .iter()
        .filter(|(src, b)| **b != removed && after.get(*src) == Some(*b))
        .count();
    let survivors = before.values().filter(|b| **b != removed).count();
    // Clients of the surviving backends keep them (Maglev moves a few; allow 10 %).
    assert!(
        stayed_put * 10 >= survivors * 9,
        "{stayed_put} of {survivors} kept their backend"
    );
    assert!(after.values().all(|b| *b != removed));
    Ok(())
}
