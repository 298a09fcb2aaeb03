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

/// The `connect` counter from the kernel counters the agent logs when it stops.
fn connects_logged(agent: &Agent) -> usize {
    agent
        .process
        .output()
        .iter()
        .find_map(|l| {
            let counters = l.split_once("kernel counters: ")?.1;
            let n = counters
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("connect="))?;
            n.parse().ok()
        })
        .unwrap_or(usize::MAX)
}

#[test]
fn kernel_mode_keeps_working_while_the_agent_is_down_and_a_restart_adopts_it() -> anyhow::Result<()>
{
    if !require_root("kernel_mode_keeps_working_while_the_agent_is_down_and_a_restart_adopts_it") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let config = topo.agent_config(&services(&topo));
    let mut agent = Agent::start(&topo, &config)?;
    assert_eq!(topo.ask(0, vip(KERNEL_VIP), 3)?.values().sum::<usize>(), 3);
    let status = agent.process.stop(Duration::from_secs(10))?;
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    assert_eq!(connects_logged(&agent), 3);
    drop(agent);

    // Agent down: kernel mode still balances (pinned programs and maps) ...
    let tally = topo.ask(0, vip(KERNEL_VIP), 3)?;
    all_backends_answered(&tally, 1);
    // ... and so does proxy mode: with no forwarder listening, the kernel balances it (the
    // fallback) instead of steering to a closed port.
    let tally = topo.ask_with(0, vip(PROXY_VIP), 3, true, &["--timeout-ms", "5000"])?;
    all_backends_answered(&tally, 1);

    // A restarted agent takes over: both modes work, and each connect runs one program (a
    // second attachment would count every connect twice in the shared, pinned counters).
    let mut agent = Agent::start(&topo, &config)?;
    all_backends_answered(&topo.ask(0, vip(KERNEL_VIP), 3)?, 1);
    all_backends_answered(&topo.ask(0, vip(PROXY_VIP), 3)?, 1);
    agent.process.stop(Duration::from_secs(10))?;
    assert_eq!(connects_logged(&agent), 3 + 6 + 6);
    Ok(())
}

#[test]
fn cleanup_detaches_and_removes_everything_pinned() -> anyhow::Result<()> {
    if !require_root("cleanup_detaches_and_removes_everything_pinned") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let mut agent = Agent::start(&topo, &topo.agent_config(&services(&topo)))?;
    assert_eq!(topo.ask(0, vip(KERNEL_VIP), 3)?.values().sum::<usize>(), 3);
    agent.process.stop(Duration::from_secs(10))?;
    let links = std::fs::read_dir(topo.run.pins().join("links"))?.count();
    assert!(links >= 5, "only {links} pinned links");
    let out =
        std::process::Command::new(switchyard_testkit::binary("SWITCHYARD_BIN", "switchyard"))
            .args(["cleanup", "--config"])
            .arg(&agent.config)
            .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("detached {links} links")), "{said}");
    assert!(
        !topo.run.pins().exists(),
        "{} still there",
        topo.run.pins().display()
    );
    let tally = topo.ask_with(0, vip(KERNEL_VIP), 1, true, &["--timeout-ms", "300"])?;
    assert!(tally.keys().all(|k| k.starts_with("error:")), "{tally:?}");
    Ok(())
}
