//! `cargo xtask demo`: Switchyard's main job on an embedded default, small enough to watch.
//!
//! One pod, three backends that answer with their own name, two service addresses (one
//! balanced by the kernel, one by the agent's forwarder), a few dozen connections to each, a
//! tally, and everything torn down again — on Ctrl-C or failure too (drop guards).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use switchyard_testkit::{Agent, Topology, topology::Tally};

use crate::{build, setup};

const KERNEL_VIP: &str = "10.96.0.10:80";
const PROXY_VIP: &str = "10.96.0.20:80";
const REQUESTS: usize = 30;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C sets a flag; the demo stops at its next step and its guards clean up.
fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    setup::run(setup::Needs::Demo)?;
    build::agent(false)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo loads eBPF programs and makes network namespaces: run it as root");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // SAFETY: setting an environment variable before any thread of ours reads it.
    unsafe {
        std::env::set_var("SWITCHYARD_BIN", build::binary("switchyard", false));
        std::env::set_var("SY_PROBE_BIN", build::binary("sy-probe", false));
    }

    let started = Instant::now();
    println!("\n== Switchyard demo");
    println!(
        "making a world: a child cgroup v2, a node namespace, 1 pod, 3 backends (backend-1..3)"
    );
    let topo = Topology::new(1, 3)?;
    check_interrupt()?;
    let backends: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", topo.backend(i, false)))
        .collect();
    let backends = backends.join(", ");
    let config = topo.agent_config(&format!(
        "[[service]]\nname = \"web-kernel\"\nvip = \"{KERNEL_VIP}\"\nmode = \"kernel\"\nalgorithm = \"round_robin\"\nbackends = [{backends}]\n\n\
         [[service]]\nname = \"web-proxy\"\nvip = \"{PROXY_VIP}\"\nmode = \"proxy\"\nalgorithm = \"round_robin\"\nbackends = [{backends}]\n"
    ));
    println!(
        "starting the agent: programs attach to {}",
        topo.pods_cgroup.display()
    );
    let agent = Agent::start(&topo, &config)?;
    check_interrupt()?;

    println!("\n{REQUESTS} connections from the pod to each service address:\n");
    println!("  {:<16} {:<24} tally", "service", "how");
    for (vip, how) in [
        (KERNEL_VIP, "kernel mode (in connect)"),
        (PROXY_VIP, "proxy mode (forwarder)"),
    ] {
        let vip: SocketAddr = vip.parse()?;
        let tally = topo.ask(0, vip, REQUESTS)?;
        println!("  {:<16} {:<24} {}", vip.to_string(), how, show(&tally));
        check_interrupt()?;
    }
    let vip: SocketAddr = KERNEL_VIP.parse()?;
    let outside = topo.ask_with(0, vip, 1, false, &["--timeout-ms", "300"])?;
    println!(
        "  {:<16} {:<24} {}",
        vip.to_string(),
        "same pod, outside cgroup",
        show(&outside)
    );
    let counters = counters_line(&agent);
    drop(agent);
    if let Some(line) = counters {
        println!("\nkernel counters: {line}");
    }
    drop(topo);
    println!(
        "\ntorn down (agent, backends, namespaces, cgroup) after {:.1?}",
        started.elapsed()
    );
    Ok(())
}

fn show(tally: &Tally) -> String {
    tally
        .iter()
        .map(|(k, v)| match k.strip_prefix("error:") {
            Some(kind) => format!("{v}× {kind} (not steered: no route)"),
            None => format!("{k}: {v}"),
        })
        .collect::<Vec<_>>()
        .join("  ")
}

/// Stops the agent and returns the kernel counters it logs on the way out.
fn counters_line(agent: &Agent) -> Option<String> {
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(agent.process.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(l) = agent
            .process
            .output()
            .iter()
            .find_map(|l| l.split_once("kernel counters: ").map(|(_, c)| c.to_owned()))
        {
            return Some(l);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
