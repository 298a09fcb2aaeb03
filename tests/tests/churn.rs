//! Churn and restarts: backend ids are reused once a backend goes, and a service may be deleted
//! while no agent runs. Nothing misroutes (a sticky client stays within its own service's
//! current backends) and nothing is left behind (a restarted agent holds exactly its first
//! catalog in the kernel, and the maps do not grow from one restart to the next).

use std::{net::SocketAddr, path::Path, time::Duration};

use switchyard_common::maps::{Backend, BackendId, MemberKey};
use switchyard_testkit::{Agent, Topology, require_root, topology::Tally};

const A: &str = "10.96.0.10:80";
const B: &str = "10.96.0.11:80";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn service(name: &str, vip: &str, extra: &str, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\n{extra}\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

fn answered(t: &Tally) -> Vec<&str> {
    t.keys()
        .filter(|k| !k.starts_with("error:"))
        .map(String::as_str)
        .collect()
}

/// Entries in one of the agent's pinned hash maps.
fn pinned_len<K: aya::Pod, V: aya::Pod>(pins: &Path, name: &str) -> anyhow::Result<usize> {
    let data = aya::maps::MapData::from_pin(pins.join("maps").join(name))?;
    let map: aya::maps::HashMap<_, K, V> = aya::maps::Map::HashMap(data).try_into()?;
    Ok(map.keys().count())
}

#[test]
fn a_sticky_client_never_reaches_another_services_backend_after_ids_are_reused()
-> anyhow::Result<()> {
    if !require_root("a_sticky_client_never_reaches_another_services_backend_after_ids_are_reused")
    {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let sticky = "affinity_timeout = \"60s\"";
    let agent = Agent::start(
        &topo,
        &topo.agent_config(&service("a", A, sticky, &[topo.backend(0, false)])),
    )?;
    let t = topo.ask(0, addr(A), 3)?;
    assert_eq!(t.get("backend-1"), Some(&3), "{t:?}");

    // A's backend goes (its id is freed), A gets another, and a new service B takes the freed
    // id for its own backend: A's sticky client must not follow the id to B's backend.
    agent.rewrite_config(&topo.agent_config(
        &(service("a", A, sticky, &[topo.backend(2, false)])
            + &service("b", B, "", &[topo.backend(1, false)])),
    ))?;
    topo.wait_until(addr(B), 1, Duration::from_secs(10), "served by B", |t| {
        t.get("backend-2") == Some(&1)
    })?;
    let t = topo.ask(0, addr(A), 10)?;
    assert_eq!(answered(&t), vec!["backend-3"], "A's client: {t:?}");
    Ok(())
}

#[test]
fn a_restarted_agent_holds_exactly_its_first_catalog_and_leaks_no_backends() -> anyhow::Result<()> {
    if !require_root("a_restarted_agent_holds_exactly_its_first_catalog_and_leaks_no_backends") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let pins = topo.run.pins();
    let a = service(
        "a",
        A,
        "",
        &[topo.backend(0, false), topo.backend(1, false)],
    );
    let both = a.clone() + &service("b", B, "", &[topo.backend(2, false)]);
    {
        let _agent = Agent::start(&topo, &topo.agent_config(&both))?;
        assert_eq!(answered(&topo.ask(0, addr(B), 3)?), vec!["backend-3"]);
    }
    assert_eq!(pinned_len::<BackendId, Backend>(&pins, "BACKENDS")?, 3);

    // B is deleted while no agent runs; each restart starts from the file without it.
    for restart in 0..3 {
        let _agent = Agent::start(&topo, &topo.agent_config(&a))?;
        let t = topo.ask_with(0, addr(B), 3, true, &["--timeout-ms", "1000"])?;
        assert!(
            answered(&t).is_empty(),
            "restart {restart}: B is still steered: {t:?}"
        );
        let t = topo.ask(0, addr(A), 6)?;
        assert_eq!(answered(&t), vec!["backend-1", "backend-2"], "{t:?}");
        assert_eq!(
            pinned_len::<BackendId, Backend>(&pins, "BACKENDS")?,
            2,
            "restart {restart}: BACKENDS holds more than A's two backends"
        );
        assert_eq!(pinned_len::<MemberKey, u8>(&pins, "MEMBERS")?, 2);
    }
    Ok(())
}

#[test]
fn a_sticky_client_keeps_its_backend_across_an_agent_restart() -> anyhow::Result<()> {
    if !require_root("a_sticky_client_keeps_its_backend_across_an_agent_restart") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let all: Vec<SocketAddr> = (0..3).map(|i| topo.backend(i, false)).collect();
    let config = topo.agent_config(&service(
        "a",
        A,
        "algorithm = \"round_robin\"\naffinity_timeout = \"60s\"",
        &all,
    ));
    let before = {
        let _agent = Agent::start(&topo, &config)?;
        topo.ask(0, addr(A), 5)?
    };
    assert_eq!(answered(&before).len(), 1, "{before:?}");
    // The restarted agent keeps each backend's id, so the pinned affinity entries still hold
    // (round robin alone would move on to the next backend).
    let _agent = Agent::start(&topo, &config)?;
    let after = topo.ask(0, addr(A), 5)?;
    assert_eq!(after, before);
    Ok(())
}
