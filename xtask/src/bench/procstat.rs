//! What a proxy costs the node: CPU seconds and resident memory of its process tree, read from
//! `/proc` before and after each case.
//!
//! The whole tree is counted, not one PID, so that a proxy which forks workers (nginx with a
//! master process) is charged for all of them. Network processing done in softirq context is
//! charged to whichever task the CPU was running, so these figures are the proxy's own work
//! plus some share of the kernel's: good for comparing proxies, not for absolute accounting.

use std::{collections::BTreeMap, fs, time::Instant};

use anyhow::Context as _;

/// `pid` and every process below it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse().ok())) {
                parents.push((p, ppid));
            }
        }
    }
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses), so index 0 is the state, 1 the parent, 11 utime, 12 stime, 13 cutime and
/// 14 cstime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU seconds of the tree so far (exited threads included, reaped children
/// not: a proxy's workers stay up for the whole run).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (user, system) = cpu_split(pid)?;
    Ok(user + system)
}

/// [`cpu_seconds`] as user and system time: where a proxy's cost is, in its own code and
/// libraries or in the kernel's work for it (its system calls, and the softirq work that ran
/// while it was on the core).
pub fn cpu_split(pid: u32) -> anyhow::Result<(f64, f64)> {
    let mut ticks = [0u64; 2];
    for p in tree(pid) {
        let Some(f) = stat_fields(p) else {
            continue; // exited meanwhile
        };
        for (n, i) in [11, 12].into_iter().enumerate() {
            ticks[n] += f
                .get(i)
                .and_then(|s| s.parse::<u64>().ok())
                .with_context(|| format!("/proc/{p}/stat: no field {}", i + 3))?;
        }
    }
    let hz = ticks_per_second();
    Ok((ticks[0] as f64 / hz, ticks[1] as f64 / hz))
}

/// Context switches of every thread of the tree so far, voluntary (it waited) and not (it
/// was preempted): on a core shared with the backend, each is a switch to and from it.
pub fn switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    for p in tree(pid) {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(text) = fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            for line in text.lines() {
                let field = |name: &str| {
                    line.strip_prefix(name)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                };
                if let Some(v) = field("voluntary_ctxt_switches:") {
                    total.0 += v;
                } else if let Some(v) = field("nonvoluntary_ctxt_switches:") {
                    total.1 += v;
                }
            }
        }
    }
    total
}

/// One core's time so far from `/proc/stat`: busy (user, nice, system, irq, softirq, steal)
/// and idle (idle, iowait), in seconds. On the proxies' core, busy per connection is the
/// proxy's cost plus the backend's plus the packets': what the rate is bound by.
pub fn core_seconds(core: usize) -> (f64, f64) {
    let Ok(text) = fs::read_to_string("/proc/stat") else {
        return (0.0, 0.0);
    };
    let name = format!("cpu{core} ");
    let Some(line) = text.lines().find(|l| l.starts_with(&name)) else {
        return (0.0, 0.0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let sum = |i: &[usize]| i.iter().filter_map(|&i| f.get(i)).sum::<u64>() as f64;
    let hz = ticks_per_second();
    (sum(&[0, 1, 2, 5, 6, 7]) / hz, sum(&[3, 4]) / hz)
}

/// CPU seconds the whole machine spent on tasks (user, nice, system, steal) so far. Interrupt
/// and softirq time is left out: it is mostly our own packets, and kernels that account it
/// apart from tasks show it only there.
fn machine_busy_seconds() -> f64 {
    let Ok(text) = fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 7].iter().filter_map(|&i| f.get(i)).sum();
    busy as f64 / ticks_per_second()
}

/// CPU seconds of this process, everything below it, and its children already reaped.
fn own_seconds() -> f64 {
    let me = std::process::id();
    let reaped = stat_fields(me).map_or(0, |f| {
        [13, 14]
            .iter()
            .filter_map(|&i| f.get(i).and_then(|s| s.parse::<u64>().ok()))
            .sum()
    });
    cpu_seconds(me).unwrap_or(0.0) + reaped as f64 / ticks_per_second()
}

/// CPU seconds of the kernel's threads (children of kthreadd): under network load
/// (ksoftirqd, kworkers) they mostly carry our own packets.
fn kernel_threads_seconds() -> f64 {
    cpu_seconds(2).unwrap_or(0.0)
}

/// A reading to compare with a later one: how much of the machine went to work not ours
/// (other builds, other benchmarks).
pub struct Elsewhere {
    busy: f64,
    ours: f64,
    at: Instant,
}

impl Elsewhere {
    pub fn start() -> Elsewhere {
        Elsewhere {
            busy: machine_busy_seconds(),
            ours: own_seconds() + kernel_threads_seconds(),
            at: Instant::now(),
        }
    }

    /// The share (0 to 1) of all cores that other processes used since `start`.
    pub fn share(&self) -> f64 {
        let foreign = (machine_busy_seconds() - self.busy)
            - (own_seconds() + kernel_threads_seconds() - self.ours);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        (foreign / (wall * cores)).clamp(0.0, 1.0)
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Resident memory of the tree now (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// The network namespace's protocol counters as `pid` sees them (`/proc/PID/net/snmp` and
/// `netstat`), named `Tcp.OutSegs`, `TcpExt.DelayedACKs` and so on. Read around one proxy's
/// turn, they say how many segments and which TCP events a connection through it costs: work
/// the kernel charges as system time to whichever task is on the core.
pub fn net_counters(pid: u32) -> BTreeMap<String, u64> {
    let mut all = BTreeMap::new();
    for file in ["snmp", "netstat"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((proto, names)), Some((_, values))) =
                (names.split_once(": "), values.split_once(": "))
            else {
                continue;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = v.parse::<u64>() {
                    all.insert(format!("{proto}.{n}"), v);
                }
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_ok());
        assert!(rss_kib(me) > 0);
        assert_eq!(tree(me)[0], me);
        assert!(net_counters(me).contains_key("Tcp.OutSegs"));
        let e = Elsewhere::start();
        assert!((0.0..=1.0).contains(&e.share()));
    }
}
