//! The DNS source against a real dnsmasq in the node's namespace: a record change is followed
//! once its TTL runs out, SRV answers give ports and weights, and a failed lookup keeps the
//! last good backends.

use std::time::{Duration, Instant};

use switchyard_testkit::{
    Agent, Topology,
    expect::{LIMIT, ask, only, wait_until},
    require_root,
    servers::Dnsmasq,
};

const WEB: &str = "10.96.0.30:80";
/// dnsmasq's TTL on every answer, in seconds: the agent looks again this often.
const TTL: u32 = 1;

/// A `[[registry.dns]]` entry for `WEB` asking dnsmasq for `query`.
fn dns_entry(record: &str, query: &str, port: Option<u16>) -> String {
    let port = port.map(|p| format!("port = {p}\n")).unwrap_or_default();
    format!(
        "[[registry.dns]]\nname = \"web\"\nvip = \"{WEB}\"\nquery = \"{query}\"\n\
         type = \"{record}\"\n{port}nameserver = \"{}\"\n",
        Dnsmasq::ADDR
    )
}

fn hosts(topo: &Topology, entries: &[(usize, &str)]) -> String {
    entries
        .iter()
        .map(|(i, name)| format!("{} {name}\n", topo.backend(*i, false).ip()))
        .collect()
}

#[test]
fn a_dns_record_change_is_followed_after_its_ttl() -> anyhow::Result<()> {
    if !require_root("a_dns_record_change_is_followed_after_its_ttl") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let dns = Dnsmasq::start(
        &topo.node,
        TTL,
        &hosts(&topo, &[(0, "web.example.test")]),
        &[],
    )?;
    let config = topo.agent_config(&dns_entry("A", "web.example.test", Some(8080)));
    let _agent = Agent::start(&topo, &config)?;
    wait_until(&topo, WEB, 4, "on backend-1", only(0))?;

    dns.set_hosts(&hosts(&topo, &[(1, "web.example.test")]))?;
    wait_until(&topo, WEB, 4, "moved to backend-2", only(1))?;

    // Two addresses: both backends, in turn.
    dns.set_hosts(&hosts(
        &topo,
        &[(0, "web.example.test"), (1, "web.example.test")],
    ))?;
    wait_until(&topo, WEB, 4, "on both backends", |t| {
        t.get("backend-1") == Some(&2) && t.get("backend-2") == Some(&2)
    })?;
    Ok(())
}

#[test]
fn srv_records_give_each_target_its_port_and_weight() -> anyhow::Result<()> {
    if !require_root("srv_records_give_each_target_its_port_and_weight") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let names = hosts(&topo, &[(0, "b1.example.test"), (1, "b2.example.test")]);
    // Priority 0: b1 (weight 1) and b2 (weight 2); priority 1: a fallback that is not used.
    let srv = "--srv-host=_web._tcp.example.test";
    let records = [
        format!("{srv},b1.example.test,8080,0,1"),
        format!("{srv},b2.example.test,8080,0,2"),
        format!("{srv},b1.example.test,9999,1,1"),
    ];
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let _dns = Dnsmasq::start(&topo.node, TTL, &names, &records)?;
    let config = topo.agent_config(&dns_entry("SRV", "_web._tcp.example.test", None));
    let _agent = Agent::start(&topo, &config)?;
    wait_until(&topo, WEB, 4, "on both backends", |t| {
        t.contains_key("backend-1") && t.contains_key("backend-2")
    })?;
    // Weighted round robin from one client: exactly in proportion, nothing on the fallback.
    let tally = ask(&topo, WEB, 30)?;
    assert_eq!(tally.get("backend-1"), Some(&10), "{tally:?}");
    assert_eq!(tally.get("backend-2"), Some(&20), "{tally:?}");
    Ok(())
}

#[test]
fn a_failed_lookup_keeps_the_last_good_backends() -> anyhow::Result<()> {
    if !require_root("a_failed_lookup_keeps_the_last_good_backends") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let mut dns = Dnsmasq::start(
        &topo.node,
        TTL,
        &hosts(&topo, &[(0, "web.example.test")]),
        &[],
    )?;
    let config = topo.agent_config(&dns_entry("A", "web.example.test", Some(8080)));
    let mut agent = Agent::start(&topo, &config)?;
    wait_until(&topo, WEB, 4, "on backend-1", only(0))?;

    dns.stop()?;
    agent
        .process
        .wait_for("keeping the last good backends", LIMIT)?;
    assert!(
        only(0)(&ask(&topo, WEB, 4)?),
        "a failed lookup changed the backends"
    );

    // The name vanishing (NXDOMAIN) is a failed lookup too, not an empty service.
    dns.restart()?;
    dns.set_hosts("")?;
    let nxdomain = |a: &Agent| {
        a.process
            .output()
            .iter()
            .any(|l| l.contains("no records found") && l.contains("keeping the last good"))
    };
    let deadline = Instant::now() + LIMIT;
    while !nxdomain(&agent) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no failed lookup for a vanished name"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        only(0)(&ask(&topo, WEB, 4)?),
        "an empty answer emptied the service"
    );

    dns.set_hosts(&hosts(&topo, &[(1, "web.example.test")]))?;
    wait_until(&topo, WEB, 4, "moved to backend-2", only(1))?;
    Ok(())
}
