//! The etcd source against a real etcd in the node's namespace: changes steer new connections,
//! the watch resumes across restarts without missing a change, a cluster goes on without one
//! member, a restarted agent serves its last-known-good while etcd is away, and a bad key is
//! rejected alone; TLS with a client certificate works.

use std::{net::SocketAddr, time::Duration};

use switchyard_testkit::{
    Agent, Topology,
    expect::{LIMIT, ask, only, unserved, wait_until},
    require_root,
    servers::Etcd,
};

const PREFIX: &str = "/sy/services/";
const WEB: &str = "10.96.0.10:80";
const API: &str = "10.96.0.11:80";

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// A service entry as the etcd source reads it: a `[[service]]` table as JSON.
fn entry(vip: &str, mode: &str, backend: SocketAddr) -> String {
    format!(r#"{{"vip": "{vip}", "mode": "{mode}", "backends": ["{backend}"]}}"#)
}

fn config(topo: &Topology, etcd: &Etcd) -> String {
    topo.agent_config(&etcd.agent_section(PREFIX))
}

/// Where the agent does not look: a member restarted here takes changes behind its back.
fn elsewhere() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], 23790))
}

#[test]
fn etcd_puts_and_deletes_steer_new_connections() -> anyhow::Result<()> {
    if !require_root("etcd_puts_and_deletes_steer_new_connections") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let etcd = Etcd::start(&topo.node, 1)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    let _agent = Agent::start(&topo, &config(&topo, &etcd))?;
    wait_until(&topo, WEB, 3, "on backend-1", only(0))?;

    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(1, false)))?;
    wait_until(&topo, WEB, 3, "moved to backend-2", only(1))?;

    // A new key in proxy mode: through the forwarder.
    etcd.put(&key("api"), &entry(API, "proxy", topo.backend(0, false)))?;
    wait_until(&topo, API, 3, "on backend-1", only(0))?;

    etcd.delete(&key("web"))?;
    wait_until(&topo, WEB, 3, "gone", unserved)?;
    assert!(only(0)(&ask(&topo, API, 3)?), "deleting web touched api");
    Ok(())
}

#[test]
fn the_watch_resumes_after_an_etcd_restart_without_missing_a_change() -> anyhow::Result<()> {
    if !require_root("the_watch_resumes_after_an_etcd_restart_without_missing_a_change") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let mut etcd = Etcd::start(&topo.node, 1)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    let mut agent = Agent::start(&topo, &config(&topo, &etcd))?;
    wait_until(&topo, WEB, 3, "on backend-1", only(0))?;

    // etcd restarts where the agent cannot reach it, and a change is made meanwhile.
    etcd.restart_on(0, elsewhere())?;
    agent.process.wait_for("etcd: disconnected", LIMIT)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(1, false)))?;
    etcd.put(&key("api"), &entry(API, "kernel", topo.backend(0, false)))?;
    // Disconnected, the agent serves what it had.
    assert!(only(0)(&ask(&topo, WEB, 3)?));

    // Back where the agent looks: the watch resumes and the missed changes apply.
    etcd.restart(0)?;
    wait_until(&topo, WEB, 3, "moved to backend-2", only(1))?;
    wait_until(&topo, API, 3, "on backend-1", only(0))?;
    // Resumed from the revision it had, not read whole again.
    assert_eq!(agent.said(&["etcd: read the prefix"]).len(), 1);
    assert!(agent.said(&["etcd: watching from revision"]).len() >= 2);
    Ok(())
}

#[test]
fn a_compacted_history_is_read_whole_again() -> anyhow::Result<()> {
    if !require_root("a_compacted_history_is_read_whole_again") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let mut etcd = Etcd::start(&topo.node, 1)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    etcd.put(&key("old"), &entry(API, "kernel", topo.backend(0, false)))?;
    let mut agent = Agent::start(&topo, &config(&topo, &etcd))?;
    wait_until(&topo, API, 3, "on backend-1", only(0))?;

    etcd.restart_on(0, elsewhere())?;
    agent.process.wait_for("etcd: disconnected", LIMIT)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(1, false)))?;
    etcd.delete(&key("old"))?;
    etcd.compact(etcd.revision()?)?;
    etcd.restart(0)?;

    wait_until(&topo, WEB, 3, "moved to backend-2", only(1))?;
    wait_until(&topo, API, 3, "gone", unserved)?;
    agent
        .process
        .wait_for("reading the prefix whole again", LIMIT)?;
    Ok(())
}

#[test]
fn sync_goes_on_while_any_one_member_of_three_is_down() -> anyhow::Result<()> {
    if !require_root("sync_goes_on_while_any_one_member_of_three_is_down") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let mut etcd = Etcd::start(&topo.node, 3)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    let _agent = Agent::start(&topo, &config(&topo, &etcd))?;
    wait_until(&topo, WEB, 3, "on backend-1", only(0))?;

    // Each member in turn, so the one the agent's watch is on is killed too.
    for member in 0..3 {
        etcd.kill(member);
        let next = (member + 1) % 3;
        etcd.put(
            &key("web"),
            &entry(WEB, "kernel", topo.backend(next, false)),
        )?;
        wait_until(
            &topo,
            WEB,
            3,
            &format!("on backend-{} with member {member} down", next + 1),
            only(next),
        )?;
        etcd.restart(member)?;
    }
    Ok(())
}

#[test]
fn with_etcd_down_a_restarted_agent_serves_its_last_known_good() -> anyhow::Result<()> {
    if !require_root("with_etcd_down_a_restarted_agent_serves_its_last_known_good") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let mut etcd = Etcd::start(&topo.node, 1)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    // Proxy mode needs the running agent's forwarder table: only a catalog loaded by the new
    // agent can serve it (kernel mode would outlive the agent in the pinned maps anyway).
    etcd.put(&key("api"), &entry(API, "proxy", topo.backend(1, false)))?;
    let config = config(&topo, &etcd);
    let mut agent = Agent::start(&topo, &config)?;
    wait_until(&topo, API, 3, "on backend-2", only(1))?;
    agent.process.stop(Duration::from_secs(10))?;
    drop(agent);

    etcd.stop(0)?;
    let mut agent = Agent::start(&topo, &config)?;
    assert!(
        !agent
            .said(&["serving the last-known-good catalog"])
            .is_empty()
    );
    assert!(only(1)(&ask(&topo, API, 3)?));
    assert!(only(0)(&ask(&topo, WEB, 3)?));
    agent.process.wait_for("etcd: disconnected", LIMIT)?;
    assert!(
        only(1)(&ask(&topo, API, 3)?),
        "etcd's absence emptied the catalog"
    );
    Ok(())
}

#[test]
fn a_poisoned_key_is_rejected_alone_and_keeps_its_last_good_state() -> anyhow::Result<()> {
    if !require_root("a_poisoned_key_is_rejected_alone_and_keeps_its_last_good_state") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let etcd = Etcd::start(&topo.node, 1)?;
    let b1 = topo.backend(0, false);
    let b2 = topo.backend(1, false);
    etcd.put(&key("web"), &entry(WEB, "kernel", b1))?;
    etcd.put(
        &key("broken"),
        r#"{"vip": "10.96.0.12:80", "backends": ["10.77.0.11:0"]}"#,
    )?;
    let agent = Agent::start(&topo, &config(&topo, &etcd))?;
    // Read at start: the good key applies, the bad one is named with its field.
    wait_until(&topo, WEB, 3, "on backend-1", only(0))?;
    let lines = agent.said(&[&key("broken"), "backends[0]: port 0"]);
    assert_eq!(lines.len(), 1, "{:#?}", agent.process.output());

    // Through the watch: a good entry, then bad values for it and for other keys.
    etcd.put(&key("api"), &entry(API, "kernel", b2))?;
    wait_until(&topo, API, 3, "on backend-2", only(1))?;
    let copy = entry(WEB, "kernel", b2);
    let poison = [
        (
            "api",
            r#"{"vip": "10.96.0.11:80", "backends": ["10.77.0.12"]}"#,
            "backends[0]: ",
        ),
        (
            "api",
            r#"{"vip": "10.96.0.11:80", "mode": "proxy", "protocol": "udp"}"#,
            "mode: ",
        ),
        ("garbled", "{\"vip\": ", "not JSON"),
        ("copycat", copy.as_str(), "vip: 10.96.0.10:80"),
    ];
    for (name, value, _) in &poison {
        etcd.put(&key(name), value)?;
    }
    // The others still apply (and, applied in order, after every rejection above).
    etcd.put(&key("web"), &entry(WEB, "kernel", b2))?;
    wait_until(&topo, WEB, 3, "moved to backend-2", only(1))?;
    for (name, _, field) in &poison {
        let k = key(name);
        assert!(
            !agent.said(&["entry rejected", &k, field]).is_empty(),
            "no rejection naming {k} and {field:?}:\n{}",
            agent.process.output().join("\n")
        );
    }
    // The poisoned key kept its last good state; the copycat took nothing.
    assert!(only(1)(&ask(&topo, API, 3)?));
    assert!(only(1)(&ask(&topo, WEB, 3)?));
    Ok(())
}

#[test]
fn etcd_over_tls_with_a_client_certificate() -> anyhow::Result<()> {
    if !require_root("etcd_over_tls_with_a_client_certificate") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let etcd = Etcd::start_tls(&topo.node, 1)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    let _agent = Agent::start(&topo, &config(&topo, &etcd))?;
    wait_until(&topo, WEB, 3, "on backend-1", only(0))?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(1, false)))?;
    wait_until(&topo, WEB, 3, "moved to backend-2", only(1))?;
    Ok(())
}

#[test]
fn an_address_moved_between_keys_in_one_transaction_stays_served() -> anyhow::Result<()> {
    if !require_root("an_address_moved_between_keys_in_one_transaction_stays_served") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let etcd = Etcd::start(&topo.node, 1)?;
    etcd.put(&key("web"), &entry(WEB, "kernel", topo.backend(0, false)))?;
    let agent = Agent::start(&topo, &config(&topo, &etcd))?;
    wait_until(&topo, WEB, 3, "on backend-1", only(0))?;

    // The new key first, then the old one's delete: applied one by one, the new key would
    // clash with the old and be rejected, and the delete would then leave the address unserved.
    let moved = entry(WEB, "kernel", topo.backend(1, false)).replace(' ', "");
    etcd.txn(&[
        format!("put {} {moved}", key("web-v2")),
        format!("del {}", key("web")),
    ])?;
    wait_until(&topo, WEB, 3, "moved to backend-2", only(1))?;
    assert!(
        agent.said(&["entry rejected"]).is_empty(),
        "{:#?}",
        agent.process.output()
    );
    Ok(())
}
