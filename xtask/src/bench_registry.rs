//! `cargo xtask bench-registry`: how fast the registry and reconciler take a large catalog, how
//! much memory the agent holds afterwards, and how long one change takes from etcd to the first
//! new connection that uses it.
//!
//! - Load: 10,000 services × 10 backends, from the config file and then from etcd; time from
//!   the start of the catalog's apply to its end (the reconciler logs it), and the agent's RSS.
//! - Propagation: a service's backend is switched through etcd's HTTP gateway, from the node
//!   namespace; a probe in a pod connects again and again and notes the monotonic time at which
//!   its answer changes. Median and p99 of many switches.
//! - What one change costs the agent at that size: its CPU time (user + system, from
//!   `/proc/<pid>/stat`) over the switches, per switch, and the reconciler's own time per switch
//!   (the `catalog applied` lines). On a shared machine the CPU time is the steadier figure.
//!
//! `SWITCHYARD_BIN` and `SY_PROBE_BIN` both set: those binaries are measured (another branch,
//! an older build) and nothing is built.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use switchyard_testkit::{Agent, Process, Topology, servers::Etcd};

use crate::{build, setup};

const SERVICES: usize = 10_000;
const BACKENDS: usize = 10;
const PREFIX: &str = "/switchyard/services/";
const PROBE_VIP: &str = "10.96.9.9:80";

pub fn run(quick: bool) -> anyhow::Result<()> {
    setup::run(setup::Needs::Test)?;
    let given =
        std::env::var_os("SWITCHYARD_BIN").is_some() && std::env::var_os("SY_PROBE_BIN").is_some();
    if given {
        println!(
            "== measuring {} (SWITCHYARD_BIN; nothing built)",
            std::env::var("SWITCHYARD_BIN").unwrap_or_default()
        );
    } else {
        build::agent(true)?;
        // SAFETY: set before any thread of ours reads the environment.
        unsafe {
            std::env::set_var("SWITCHYARD_BIN", build::binary("switchyard", true));
            std::env::set_var("SY_PROBE_BIN", build::binary("sy-probe", true));
        }
    }
    let switches = if quick { 20 } else { 200 };
    let topo = Topology::new(1, 2)?;

    println!("== registry: {SERVICES} services × {BACKENDS} backends");
    let (file_ms, file_rss) = {
        let agent = Agent::start(&topo, &topo.agent_config(&file_services()))?;
        let ms = applied_ms(&agent, SERVICES)?;
        (ms, rss_mib(agent.process.pid())?)
    };
    println!("from the config file: applied in {file_ms} ms, agent RSS {file_rss:.1} MiB");

    let etcd = Etcd::start(&topo.node, 1)?;
    load_etcd(&etcd)?;
    let probe_entry =
        |backend: SocketAddr| format!("{{\"vip\":\"{PROBE_VIP}\",\"backends\":[\"{backend}\"]}}");
    etcd.put(
        &format!("{PREFIX}probe"),
        &probe_entry(topo.backend(0, false)),
    )?;
    let config = topo.agent_config("") + "\n" + &etcd.agent_section(PREFIX);
    // The run dir is shared with the file run: start from an empty last-known-good.
    let _ = std::fs::remove_dir_all(topo.run.state());
    let agent = Agent::start(&topo, &config)?;
    let etcd_ms = applied_ms(&agent, SERVICES + 1)?;
    let etcd_rss = rss_mib(agent.process.pid())?;
    println!("from etcd: applied in {etcd_ms} ms, agent RSS {etcd_rss:.1} MiB");

    let gateway = etcd
        .endpoints()
        .first()
        .and_then(|e| e.strip_prefix("http://"))
        .context("no etcd endpoint")?
        .parse::<SocketAddr>()?;
    let mut probe = topo.probe(
        0,
        &["flip", "--to", PROBE_VIP, "--times", &switches.to_string()],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    // Past the load: the last-known-good save of the whole catalog is done, so that the CPU
    // time below is the switches'.
    std::thread::sleep(Duration::from_millis(1500));
    let applied_before = agent.process.output().len();
    let cpu_before = cpu_ms(agent.process.pid())?;
    let mut delays = Vec::new();
    for k in 0..switches {
        let backend = topo.backend((k + 1) % 2, false);
        let value = probe_entry(backend);
        let key = format!("{PREFIX}probe");
        let sent = topo.node.enter(move || -> anyhow::Result<u128> {
            let t = monotonic_ns();
            gateway_put(gateway, &key, &value)?;
            Ok(t)
        })??;
        let flip = wait_flip(&mut probe, k + 1)?;
        delays.push((flip.saturating_sub(sent)) as f64 / 1e6);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The last switch's save, coalesced with the others (at most one a second), is part of
    // what the switches cost.
    std::thread::sleep(Duration::from_millis(1500));
    let cpu_per_switch = (cpu_ms(agent.process.pid())? - cpu_before) / switches as f64;
    delays.sort_by(f64::total_cmp);
    let median = delays[delays.len() / 2];
    let p99 = delays[(delays.len() * 99 / 100).min(delays.len() - 1)];
    println!(
        "propagation etcd put → first new connection using it, {switches} switches: median {median:.2} ms, p99 {p99:.2} ms"
    );
    let mut applies = apply_ms(&agent.process.output()[applied_before..], SERVICES + 1);
    applies.sort_by(f64::total_cmp);
    let apply_median = applies.get(applies.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "one switch at {SERVICES} services: agent CPU {cpu_per_switch:.2} ms per switch (user + system, last-known-good saves included); reconciler apply median {apply_median:.3} ms over {} applies",
        applies.len()
    );

    println!("\ngoals (reported, not asserted):");
    goal(
        "full load under 2 s (file)",
        file_ms < 2000,
        format!("{file_ms} ms"),
    );
    goal(
        "full load under 2 s (etcd)",
        etcd_ms < 2000,
        format!("{etcd_ms} ms"),
    );
    goal(
        "propagation p99 under 50 ms",
        p99 < 50.0,
        format!("{p99:.2} ms"),
    );
    let rss = file_rss.max(etcd_rss);
    // 64 MB (10^6 bytes) is 61 MiB.
    goal(
        "RSS under 64 MB",
        rss * 1.048_576 < 64.0,
        format!("{rss:.1} MiB"),
    );
    let json = format!(
        "{{\"services\":{SERVICES},\"backends_per_service\":{BACKENDS},\"file_apply_ms\":{file_ms},\"file_rss_mib\":{file_rss:.1},\"etcd_apply_ms\":{etcd_ms},\"etcd_rss_mib\":{etcd_rss:.1},\"propagation_ms\":{{\"switches\":{switches},\"median\":{median:.3},\"p99\":{p99:.3}}},\"cpu_ms_per_switch\":{cpu_per_switch:.3},\"apply_ms_median\":{apply_median:.3}}}\n"
    );
    let out = build::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("registry.json"), json)?;
    println!("written: {}", out.join("registry.json").display());
    drop(agent);
    Ok(())
}

fn goal(what: &str, pass: bool, figure: String) {
    println!("  {} {what}: {figure}", if pass { "PASS" } else { "MISS" });
}

fn backends(i: usize) -> Vec<String> {
    (0..BACKENDS)
        .map(|b| format!("10.78.{}.{}:8080", i % 250, b + 1 + (i / 250) % 20 * 10))
        .collect()
}

fn vip(i: usize) -> String {
    format!("10.100.{}.{}:80", i / 250, i % 250 + 1)
}

fn file_services() -> String {
    let mut s = String::with_capacity(SERVICES * 200);
    for i in 0..SERVICES {
        let list: Vec<String> = backends(i).iter().map(|b| format!("\"{b}\"")).collect();
        s += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"{}\"\nbackends = [{}]\n",
            vip(i),
            list.join(", ")
        );
    }
    s
}

fn load_etcd(etcd: &Etcd) -> anyhow::Result<()> {
    let started = Instant::now();
    let puts: Vec<String> = (0..SERVICES)
        .map(|i| {
            let list: Vec<String> = backends(i).iter().map(|b| format!("\"{b}\"")).collect();
            format!(
                "put {PREFIX}s{i} {{\"vip\":\"{}\",\"backends\":[{}]}}",
                vip(i),
                list.join(",")
            )
        })
        .collect();
    // etcd takes at most 128 operations per transaction by default.
    for chunk in puts.chunks(128) {
        etcd.txn(chunk)?;
    }
    println!(
        "etcd loaded with {SERVICES} keys in {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// The `elapsed_ms` of the reconciler's apply that reached `services`.
fn applied_ms(agent: &Agent, services: usize) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let needle = format!("services={services}");
    while Instant::now() < deadline {
        if let Some(ms) = agent.process.output().iter().find_map(|l| {
            if !l.contains("catalog applied") || !l.contains(&needle) {
                return None;
            }
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("elapsed_ms="))
                .and_then(|v| v.parse().ok())
        }) {
            return Ok(ms);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the agent never applied {services} services:\n{}",
        agent.process.output().join("\n")
    )
}

/// The reconciler's time for each one-service update in `lines` at `services` services:
/// `elapsed_us` where the agent logs it, else `elapsed_ms` (older agents).
fn apply_ms(lines: &[String], services: usize) -> Vec<f64> {
    let needle = format!("services={services}");
    lines
        .iter()
        .filter(|l| l.contains("catalog applied") && l.contains("updated=1") && l.contains(&needle))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            field("elapsed_us=")
                .map(|us| us / 1000.0)
                .or_else(|| field("elapsed_ms="))
        })
        .collect()
}

/// User + system CPU time of a process so far, in milliseconds.
fn cpu_ms(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat
        .rsplit_once(')')
        .context("no command in /proc/pid/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/pid/stat")?
            .parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15 (the 12th and 13th after the name).
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) * 1000.0 / hz)
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn wait_flip(probe: &mut Process, n: usize) -> anyhow::Result<u128> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flips: Vec<u128> = probe
            .output()
            .iter()
            .filter_map(|l| l.strip_prefix("flip "))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect();
        if let Some(&t) = flips.get(n - 1) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("no flip {n}: {:?}", probe.output());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn monotonic_ns() -> u128 {
    // SAFETY: clock_gettime fills the timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// `PUT` through etcd's gRPC gateway: JSON with base64 keys and values.
fn gateway_put(addr: SocketAddr, key: &str, value: &str) -> anyhow::Result<()> {
    let body = format!(
        "{{\"key\":\"{}\",\"value\":\"{}\"}}",
        base64(key.as_bytes()),
        base64(value.as_bytes())
    );
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.1 200") {
        bail!("etcd gateway: {}", reply.lines().next().unwrap_or(""));
    }
    Ok(())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_examples() {
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(super::base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(super::base64(b"foob"), "Zm9vYg==");
    }
}
