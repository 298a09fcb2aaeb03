//! Checking that each process runs where the run says it does: the cores every thread of a
//! process may run on, as the kernel has them (`Cpus_allowed_list` in `/proc/PID/task/*/status`).

use std::{fs, time::Duration};

use anyhow::bail;

use super::{
    Path,
    world::{CLIENT_CPU, PROXY_CPU, World},
};

/// The cores each thread of `pid` may run on, deduplicated (`["1"]` for a process pinned to
/// core 1), or `None` if it has exited.
pub fn cores(pid: u32) -> Option<Vec<String>> {
    let mut all: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .collect();
    all.sort();
    all.dedup();
    Some(all)
}

/// Checks every proxy (all its threads) against the stated core; one line per proxy, or an
/// error naming the first that is not where it should be.
pub fn check(world: &World) -> anyhow::Result<Vec<String>> {
    let want = PROXY_CPU.to_string();
    let mut lines = Vec::new();
    for path in [
        Path::Proxy,
        Path::Haproxy,
        Path::Nginx,
        Path::HaproxyHttp,
        Path::NginxHttp,
    ] {
        let Some(pid) = world.proxy_pid(path) else {
            continue;
        };
        let got = cores(pid).unwrap_or_default();
        if got != [want.clone()] {
            bail!(
                "{} (pid {pid}) may run on cores {got:?}, not only on core {want} as stated",
                path.label()
            );
        }
        lines.push(format!(
            "pinned: {} (pid {pid}, every thread) on core {want}",
            path.label()
        ));
    }
    Ok(lines)
}

/// Whether a client started under `taskset -c CLIENT_CPU` runs there: read once `taskset` has
/// made way for the program (its name changes), within a moment. A note if not.
pub fn client_note(pid: u32, program: &str) -> Option<String> {
    let name = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    for _ in 0..50 {
        match name(pid) {
            None => return None, // already done: nothing to check
            Some(n) if n == "taskset" => std::thread::sleep(Duration::from_millis(2)),
            Some(_) => break,
        }
    }
    let got = cores(pid)?;
    (got != [CLIENT_CPU]).then(|| format!("{program} ran on cores {got:?}, not on {CLIENT_CPU}"))
}
