//! Health verdicts as both modes use them: panic mode is one rule for the kernel and the
//! forwarder, and a verdict does not outlive the check that gave it.

use std::{net::SocketAddr, time::Duration};

use switchyard_testkit::{Agent, Topology, require_root, topology::Tally};

const KERNEL_VIP: &str = "10.96.0.10:80";
const PROXY_VIP: &str = "10.96.0.20:80";

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

fn count(t: &Tally, i: usize) -> usize {
    t.get(&Topology::backend_name(i)).copied().unwrap_or(0)
}

#[test]
fn with_every_backend_held_down_both_modes_balance_over_all_of_them() -> anyhow::Result<()> {
    if !require_root("with_every_backend_held_down_both_modes_balance_over_all_of_them") {
        return Ok(());
    }
    let topo = Topology::new(1, 2)?;
    let backends = [topo.backend(0, false), topo.backend(1, false)];
    // The backends speak no HTTP: this check fails on both while they serve TCP.
    let check = "health = { kind = \"http\", path = \"/\", status = 200, interval = \"200ms\", \
                 timeout = \"100ms\", rise = 1, fall = 1 }";
    let config = topo.agent_config(
        &(service("k", KERNEL_VIP, check, &backends)
            + &service(
                "p",
                PROXY_VIP,
                &format!("mode = \"proxy\"\n{check}"),
                &backends,
            )),
    );
    let agent = Agent::start(&topo, &config)?;
    let downs = || agent.said(&["health check: down"]).len();
    switchyard_testkit::control::wait_for(Duration::from_secs(10), || {
        Ok((downs() >= 4).then_some(()))
    })?;
    for vip in [KERNEL_VIP, PROXY_VIP] {
        let t = topo.ask_with(0, addr(vip), 20, true, &["--timeout-ms", "5000"])?;
        assert_eq!(count(&t, 0) + count(&t, 1), 20, "{vip}: {t:?}");
        assert!(count(&t, 0) > 0 && count(&t, 1) > 0, "{vip}: {t:?}");
    }
    assert_eq!(
        agent.said(&["too few healthy backends"]).len(),
        2,
        "one warning per service"
    );
    Ok(())
}

#[test]
fn a_backend_whose_check_is_removed_is_no_longer_held_down() -> anyhow::Result<()> {
    if !require_root("a_backend_whose_check_is_removed_is_no_longer_held_down") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 3)?;
    let backends: Vec<SocketAddr> = (0..3).map(|i| topo.backend(i, false)).collect();
    let check = "health = { kind = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 2, \
                 fall = 2 }";
    let mut agent = Agent::start(
        &topo,
        &topo.agent_config(&service("k", KERNEL_VIP, check, &backends)),
    )?;
    topo.kill_backend(2);
    agent
        .process
        .wait_for("health check: down", Duration::from_secs(10))?;
    // The check goes; the backend comes back. Nothing says it is down any more.
    agent.rewrite_config(&topo.agent_config(&service("k", KERNEL_VIP, "", &backends)))?;
    topo.restart_backend(2)?;
    topo.wait_until(
        addr(KERNEL_VIP),
        30,
        Duration::from_secs(10),
        "reaching backend-3 again",
        |t| count(t, 2) > 0,
    )?;
    Ok(())
}
