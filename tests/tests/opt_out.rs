//! Opting out: a sidecar mesh's cgroup and ports are left to the mesh, and the agent's own
//! connections are never steered.

use std::net::SocketAddr;

use switchyard_testkit::{Agent, Topology, require_root};

#[test]
fn an_opted_out_cgroup_or_port_is_left_alone() -> anyhow::Result<()> {
    if !require_root("an_opted_out_cgroup_or_port_is_left_alone") {
        return Ok(());
    }
    let mut topo = Topology::new(1, 1)?;
    let mesh = topo.cgroup.child("pods/mesh")?;
    let mesh_rel = topo.cgroup.relative(&mesh);
    let b = topo.backend(0, false);
    let config = topo
        .agent_config(&format!(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nbackends = [\"{b}\"]\n\n\
             [[service]]\nname = \"mesh-port\"\nvip = \"10.96.0.10:8443\"\nbackends = [\"{b}\"]\n"
        ))
        .replacen(
            "\n[registry]",
            &format!(
                "exclude_cgroups = [{:?}]\nexclude_ports = [8443]\n\n[registry]",
                mesh_rel.display().to_string()
            ),
            1,
        );
    let _agent = Agent::start(&topo, &config)?;
    let web: SocketAddr = "10.96.0.10:80".parse()?;
    let short = ["--timeout-ms", "300"];
    // Steered cgroup: reaches the backend.
    let t = topo.ask_in(0, Some(&topo.pods_cgroup), web, 2, &short)?;
    assert_eq!(t.get("backend-1"), Some(&2), "{t:?}");
    // Its opted-out child (a sidecar's cgroup): left alone, so no route to the service range.
    let t = topo.ask_in(0, Some(&mesh), web, 2, &short)?;
    assert!(
        t.keys().all(|k| k.starts_with("error:")),
        "mesh cgroup was steered: {t:?}"
    );
    // An opted-out port, from the steered cgroup: left alone too.
    let t = topo.ask_in(
        0,
        Some(&topo.pods_cgroup),
        "10.96.0.10:8443".parse()?,
        2,
        &short,
    )?;
    assert!(
        t.keys().all(|k| k.starts_with("error:")),
        "opted-out port was steered: {t:?}"
    );
    Ok(())
}
