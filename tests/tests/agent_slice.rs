//! The agent's first slice, end to end: a process in the steered cgroup connects to a service
//! address and reaches a backend, in kernel mode and in proxy mode.

use std::{net::SocketAddr, time::Duration};

use switchyard_testkit::{Agent, Topology, require_root};

const KERNEL_VIP: &str = "10.96.0.10:80";
const PROXY_VIP: &str = "10.96.0.20:80";

fn services(topo: &Topology) -> String {
    let backends: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", topo.backend(i, false)))
        .collect();
    let backends = backends.join(", ");
    format!(
        "[[service]]\nname = \"web-kernel\"\nvip = \"{KERNEL_VIP}\"\nmode = \"kernel\"\nalgorithm = \"round_robin\"\nbackends = [{backends}]\n\n\
         [[service]]\nname = \"web-proxy\"\nvip = \"{PROXY_VIP}\"\nmode = \"proxy\"\nbackends = [{backends}]\n"
    )
}

fn vip(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn all_backends_answered(tally: &switchyard_testkit::topology::Tally, each: usize) {
    for i in 0..3 {
        let name = Topology::backend_name(i);
        assert_eq!(tally.get(&name).copied(), Some(each), "{name} in {tally:?}");
    }
}

#[test]
fn kernel_mode_reaches_every_backend_in_turn() -> anyhow::Result<()> {
    if !require_root("kernel_mode_reaches_every_backend_in_turn") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    let tally = topo.ask(0, vip(KERNEL_VIP), 30)?;
    // Round robin from one client: exactly even.
    all_backends_answered(&tally, 10);
    Ok(())
}

#[test]
fn proxy_mode_reaches_every_backend_through_the_forwarder() -> anyhow::Result<()> {
    if !require_root("proxy_mode_reaches_every_backend_through_the_forwarder") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    let tally = topo.ask(0, vip(PROXY_VIP), 30)?;
    all_backends_answered(&tally, 10);
    Ok(())
}

#[test]
fn a_process_outside_the_cgroup_is_not_redirected() -> anyhow::Result<()> {
    if !require_root("a_process_outside_the_cgroup_is_not_redirected") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    // The pod has no route to the service range: unsteered, the connect cannot succeed.
    let tally = topo.ask_with(0, vip(KERNEL_VIP), 3, false, &["--timeout-ms", "300"])?;
    assert!(
        tally.keys().all(|k| k.starts_with("error:")),
        "unsteered process reached a backend: {tally:?}"
    );
    // The same pod, steered, does.
    let tally = topo.ask(0, vip(KERNEL_VIP), 3)?;
    assert_eq!(tally.values().sum::<usize>(), 3);
    assert!(tally.keys().all(|k| k.starts_with("backend-")), "{tally:?}");
    Ok(())
}

#[test]
fn a_malformed_config_is_refused_naming_line_and_field() -> anyhow::Result<()> {
    if !require_root("a_malformed_config_is_refused_naming_line_and_field") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let config = topo
        .agent_config(&services(&topo))
        .replace("mode = \"proxy\"", "mode = \"teleport\"");
    let line = config
        .lines()
        .position(|l| l.contains("teleport"))
        .map(|i| i + 1)
        .unwrap_or_default();
    let mut agent = Agent::spawn(&topo, &config)?;
    let status = agent.process.wait_exit(Duration::from_secs(20))?;
    assert!(!status.success());
    let said = agent.process.output().join("\n");
    assert!(said.contains(&format!("line {line}")), "{said}");
    assert!(said.contains("teleport"), "{said}");
    // Nothing was attached: the kernel-mode VIP of the valid part is not steered.
    let tally = topo.ask_with(0, vip(KERNEL_VIP), 1, true, &["--timeout-ms", "300"])?;
    assert!(tally.keys().all(|k| k.starts_with("error:")), "{tally:?}");
    Ok(())
}

#[test]
fn stopping_the_agent_detaches_the_programs() -> anyhow::Result<()> {
    if !require_root("stopping_the_agent_detaches_the_programs") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let mut agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    assert_eq!(topo.ask(0, vip(KERNEL_VIP), 3)?.values().sum::<usize>(), 3);
    let status = agent.process.stop(Duration::from_secs(10))?;
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    let said = agent.process.output().join("\n");
    assert!(said.contains("SIGTERM: stopping"), "{said}");
    let tally = topo.ask_with(0, vip(KERNEL_VIP), 1, true, &["--timeout-ms", "300"])?;
    assert!(tally.keys().all(|k| k.starts_with("error:")), "{tally:?}");
    Ok(())
}
