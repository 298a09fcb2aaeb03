//! A catalog of 10,000 services: the agent applies it whole, and a change to one service
//! afterwards is looked at alone. The reconciler logs how many services it compared
//! (`compared=`): one, not the catalog, since catalog versions share their map and are diffed
//! by what differs. Timings are `cargo xtask bench-registry`'s, not asserted here.

use std::{net::SocketAddr, time::Duration};

use switchyard_testkit::{Agent, control, require_root};

const SERVICES: usize = 10_000;
const PROBE: &str = "10.96.9.9:80";

/// 10,000 kernel-mode services of 10 backends each. The backends are map entries only: no
/// traffic goes to them.
fn many() -> String {
    let mut s = String::with_capacity(SERVICES * 220);
    for i in 0..SERVICES {
        let backends: Vec<String> = (0..10)
            .map(|b| format!("\"10.78.{}.{}:8080\"", i % 250, b + 1 + (i / 250) % 20 * 10))
            .collect();
        s += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.100.{}.{}:80\"\nbackends = [{}]\n\n",
            i / 250,
            i % 250 + 1,
            backends.join(", ")
        );
    }
    s
}

#[test]
fn ten_thousand_services_apply_and_one_change_compares_one() -> anyhow::Result<()> {
    if !require_root("ten_thousand_services_apply_and_one_change_compares_one") {
        return Ok(());
    }
    let topo = switchyard_testkit::Topology::new(1, 2)?;
    let probe = format!(
        "[[service]]\nname = \"probe\"\nvip = \"{PROBE}\"\nbackends = [\"{}\"]\n",
        topo.backend(0, false)
    );
    let mut agent = Agent::spawn(&topo, &topo.agent_config(&(many() + &probe)))?;
    // A debug build on a shared machine: far more than the load takes in release.
    agent
        .process
        .wait_for("switchyard agent ready", Duration::from_secs(180))?;
    let total = format!("services={}", SERVICES + 1);
    assert!(
        !agent.said(&["catalog applied", &total]).is_empty(),
        "the whole catalog applied: {:?}",
        agent.said(&["catalog applied"])
    );
    let vip: SocketAddr = PROBE.parse()?;
    let t = topo.ask(0, vip, 3)?;
    assert_eq!(t.get("backend-1"), Some(&3), "{t:?}");

    // One change through the API: the reconciler compares that one service.
    let body = format!(
        "{{\"vip\":\"{PROBE}\",\"backends\":[\"{}\"]}}",
        topo.backend(1, false)
    );
    let sock = topo.api_socket();
    let answer =
        control::request(&sock, "PUT", "/v1/services/probe", Some(&body)).map_err(|e| {
            anyhow::anyhow!(
                "{e}; the agent said:\n{}",
                agent.process.output().join("\n")
            )
        })?;
    assert!(answer.status < 300, "{answer:?}");
    agent
        .process
        .wait_for("updated=1", Duration::from_secs(20))?;
    let updates = agent.said(&["catalog applied", "updated=1", &total]);
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert!(updates[0].contains("compared=1 "), "{}", updates[0]);
    let t = topo.ask(0, vip, 3)?;
    assert_eq!(t.get("backend-2"), Some(&3), "{t:?}");

    // The file's entry back: again one service compared.
    let answer =
        control::request(&sock, "DELETE", "/v1/services/probe/override", None).map_err(|e| {
            anyhow::anyhow!(
                "{e}; the agent said:\n{}",
                agent.process.output().join("\n")
            )
        })?;
    assert!(answer.status < 300, "{answer:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent.said(&["catalog applied", "updated=1", &total]).len() < 2 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no second update");
        std::thread::sleep(Duration::from_millis(50));
    }
    let updates = agent.said(&["catalog applied", "updated=1", &total]);
    assert!(updates[1].contains("compared=1 "), "{}", updates[1]);
    let t = topo.ask(0, vip, 3)?;
    assert_eq!(t.get("backend-1"), Some(&3), "{t:?}");
    Ok(())
}
