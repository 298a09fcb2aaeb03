//! The config file is watched: an edit applies without a restart; a broken edit changes nothing.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use switchyard_testkit::{Agent, Topology, require_root, topology::Tally};

const VIP: &str = "10.96.0.10:80";

fn config(topo: &Topology, backend: usize) -> String {
    topo.agent_config(&format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nbackends = [\"{}\"]\n",
        topo.backend(backend, false)
    ))
}

/// Asks until `want` holds, up to `limit`; returns the last tally.
fn until(topo: &Topology, limit: Duration, want: impl Fn(&Tally) -> bool) -> anyhow::Result<Tally> {
    let deadline = Instant::now() + limit;
    loop {
        let tally = topo.ask(0, VIP.parse::<SocketAddr>()?, 3)?;
        if want(&tally) || Instant::now() > deadline {
            return Ok(tally);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_edited_config_file_applies_without_restart() -> anyhow::Result<()> {
    if !require_root("an_edited_config_file_applies_without_restart") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let mut agent = Agent::start(&topo, &config(&topo, 0))?;
    assert_eq!(topo.ask(0, VIP.parse()?, 3)?.get("backend-1"), Some(&3));

    agent.rewrite_config(&config(&topo, 1))?;
    let tally = until(&topo, Duration::from_secs(5), |t| {
        t.get("backend-2") == Some(&3)
    })?;
    assert_eq!(tally.get("backend-2"), Some(&3), "{tally:?}");

    // A broken edit is reported and changes nothing.
    agent.rewrite_config(&config(&topo, 0).replace("vip =", "vip = 12 #"))?;
    agent
        .process
        .wait_for("nothing applied", Duration::from_secs(5))?;
    assert_eq!(topo.ask(0, VIP.parse()?, 3)?.get("backend-2"), Some(&3));
    Ok(())
}

#[test]
fn edits_to_other_sections_apply_live_or_say_they_need_a_restart() -> anyhow::Result<()> {
    if !require_root("edits_to_other_sections_apply_live_or_say_they_need_a_restart") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let mut agent = Agent::start(&topo, &config(&topo, 0))?;
    assert_eq!(topo.ask(0, VIP.parse()?, 3)?.get("backend-1"), Some(&3));

    // `exclude_ports` applies live: port 80 is no longer steered (nothing answers there).
    let excluded = config(&topo, 0).replace("[datapath]\n", "[datapath]\nexclude_ports = [80]\n");
    agent.rewrite_config(&excluded)?;
    agent
        .process
        .wait_for("exclude_ports applied", Duration::from_secs(5))?;
    let t = topo.ask_with(0, VIP.parse()?, 3, true, &["--timeout-ms", "1000"])?;
    assert!(t.keys().all(|k| k.starts_with("error:")), "{t:?}");

    // `[metrics]` needs a restart: said, naming the section, and the metrics stay where they were.
    agent.rewrite_config(&excluded.replace(
        &format!("listen = \"{}\"", topo.metrics()),
        "listen = \"10.77.0.1:9999\"",
    ))?;
    agent.process.wait_for(
        "[metrics] takes effect only when the agent restarts",
        Duration::from_secs(5),
    )?;
    let answer = switchyard_testkit::control::get_in(&topo.node, topo.metrics(), "/healthz", None)?;
    assert_eq!(answer.status, 200, "{answer:?}");

    // Back to no exclusions: steered again.
    agent.rewrite_config(&config(&topo, 0))?;
    let t = until(&topo, Duration::from_secs(5), |t| {
        t.get("backend-1") == Some(&3)
    })?;
    assert_eq!(t.get("backend-1"), Some(&3), "{t:?}");
    Ok(())
}
