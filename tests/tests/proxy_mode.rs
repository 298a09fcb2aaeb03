//! Proxy mode: the forwarder learns the original service address of each connection.

use std::{net::SocketAddr, thread};

use switchyard_testkit::{Agent, Topology, require_root};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn ipv6_proxy_mode_recovers_the_original_destination() -> anyhow::Result<()> {
    if !require_root("ipv6_proxy_mode_recovers_the_original_destination") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let backends: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", topo.backend(i, true)))
        .collect();
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"p6\"\nvip = \"[fd96::20]:80\"\nmode = \"proxy\"\nbackends = [{}]\n",
        backends.join(", ")
    ));
    let _agent = Agent::start(&topo, &config)?;
    let tally = topo.ask(0, addr("[fd96::20]:80"), 9)?;
    for i in 0..3 {
        assert_eq!(tally.get(&Topology::backend_name(i)), Some(&3), "{tally:?}");
    }
    Ok(())
}

#[test]
fn many_concurrent_connects_each_reach_their_own_service() -> anyhow::Result<()> {
    if !require_root("many_concurrent_connects_each_reach_their_own_service") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    // Three proxy services, one backend each: a mixed-up original destination shows at once.
    let mut services = String::new();
    for i in 0..3 {
        services += &format!(
            "[[service]]\nname = \"p{i}\"\nvip = \"10.96.1.{i}:80\"\nmode = \"proxy\"\nbackends = [\"{}\"]\n\n",
            topo.backend(i, false)
        );
    }
    let _agent = Agent::start(&topo, &topo.agent_config(&services))?;
    let topo = &topo;
    thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..6)
            .map(|w| {
                s.spawn(move || {
                    let i = w % 3;
                    let tally = topo.ask(0, addr(&format!("10.96.1.{i}:80")), 100)?;
                    anyhow::Ok((i, tally))
                })
            })
            .collect();
        for w in workers {
            let (i, tally) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
            assert_eq!(
                tally.get(&Topology::backend_name(i)),
                Some(&100),
                "{tally:?}"
            );
            assert_eq!(tally.len(), 1, "{tally:?}");
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn getpeername_shows_the_service_address_in_both_modes() -> anyhow::Result<()> {
    if !require_root("getpeername_shows_the_service_address_in_both_modes") {
        return Ok(());
    }
    let topo = Topology::new(1, 1)?;
    let b4 = topo.backend(0, false);
    let b6 = topo.backend(0, true);
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"k\"\nvip = \"10.96.0.10:80\"\nbackends = [\"{b4}\"]\n\n\
         [[service]]\nname = \"p\"\nvip = \"10.96.0.20:80\"\nmode = \"proxy\"\nbackends = [\"{b4}\"]\n\n\
         [[service]]\nname = \"k6\"\nvip = \"[fd96::10]:80\"\nbackends = [\"{b6}\"]\n"
    ));
    let _agent = Agent::start(&topo, &config)?;
    for vip in ["10.96.0.10:80", "10.96.0.20:80", "[fd96::10]:80"] {
        let tally = topo.ask_with(0, addr(vip), 1, true, &["--peer"])?;
        assert!(
            tally.contains_key(&format!("peer {vip}")),
            "{vip}: {tally:?}"
        );
    }
    Ok(())
}
