//! `cargo xtask bench --profile WORKLOAD`: one workload of the benchmark's world, each proxy
//! under `perf stat` (system calls, its own and the backend's), `strace` (the calls in order)
//! and `perf record`, side by side. Wall-clock figures move with the
//! machine's load; system calls per connection (or per request) do not, so this is the tool for
//! cutting a proxy's cost on a shared machine. What it prints: docs/benchmarks.md ("Profiling").

use std::{collections::BTreeMap, fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use switchyard_testkit::{Process, process::Place};

use super::{
    Path, cases,
    cases::Workload,
    procstat,
    world::{CLIENT_CPU, PROXY_CPU, Service, World},
};
use crate::build;

/// The proxies compared: the agent on its default byte path, and HAProxy; with `--only http`,
/// the agent's HTTP mode and HAProxy `mode http`.
const PATHS: [Path; 2] = [Path::Proxy, Path::Haproxy];
const HTTP_PATHS: [Path; 2] = [Path::Http, Path::HaproxyHttp];

/// Seconds of load per profiler and path: the counts are per connection, so a short run is as
/// good as a long one once it has made some thousands.
const SECS: u32 = 4;

/// Turns per path in `--pairs`, and seconds per turn: enough pairs for a steady median, turns
/// short enough that both paths of a pair share the machine's state.
const PAIRS: usize = 16;
const TURN_SECS: u32 = 2;

/// `cargo xtask bench --pairs WORKLOAD`: the agent and HAProxy in turns, the order alternating
/// from pair to pair, each turn's CPU split into user and system time. The full run's rounds
/// put seconds between the two paths of a ratio, and the machine's speed moves within them;
/// here a pair is 4 s. What it prints: docs/benchmarks.md ("Pairs").
pub fn pairs(workload: Workload, http: bool) -> anyhow::Result<()> {
    let [ours, theirs] = if http { HTTP_PATHS } else { PATHS };
    let close = closes(workload, "--pairs")?;
    let what = if close { "conn" } else { "req" };
    let world = world()?;
    for path in [ours, theirs] {
        wrk(&world, path, 1, close)?;
    }
    println!(
        "{PAIRS} pairs of {TURN_SECS} s turns, {} and {}, the order alternating:",
        ours.label(),
        theirs.label()
    );
    let mut rate = Vec::new();
    let mut cpu = Vec::new();
    let mut user = Vec::new();
    let mut system = Vec::new();
    let mut counters: BTreeMap<Path, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for i in 0..PAIRS {
        let order = if i % 2 == 0 {
            [ours, theirs]
        } else {
            [theirs, ours]
        };
        let mut turn = BTreeMap::new();
        for path in order {
            super::check_interrupt()?;
            let pid = world.proxy_pid(path).context("no proxy process")?;
            let net0 = procstat::net_counters(pid);
            let sw0 = procstat::switches(pid);
            let backend0 = procstat::cpu_seconds(world.http_backend_pid())?;
            let core0 = procstat::core_seconds(PROXY_CPU);
            let client0 = procstat::core_seconds(CLIENT_CPU.parse().unwrap_or(0));
            let (u0, s0) = procstat::cpu_split(pid)?;
            let n = wrk(&world, path, TURN_SECS, close)?;
            let (u1, s1) = procstat::cpu_split(pid)?;
            let sw1 = procstat::switches(pid);
            let core1 = procstat::core_seconds(PROXY_CPU);
            let client1 = procstat::core_seconds(CLIENT_CPU.parse().unwrap_or(0));
            let backend1 = procstat::cpu_seconds(world.http_backend_pid())?;
            let net1 = procstat::net_counters(pid);
            if n <= 0.0 {
                bail!("{}: no {what}s in {TURN_SECS} s", path.label());
            }
            let mine = counters.entry(path).or_default();
            for (name, v1) in &net1 {
                let v0 = net0.get(name).copied().unwrap_or(0);
                mine.entry(name.clone())
                    .or_default()
                    .push(v1.saturating_sub(v0) as f64 / n);
            }
            let (u, s) = ((u1 - u0) * 1e6 / n, (s1 - s0) * 1e6 / n);
            let (waited, preempted) = ((sw1.0 - sw0.0) as f64 / n, (sw1.1 - sw0.1) as f64 / n);
            let backend = (backend1 - backend0) * 1e6 / n;
            let (busy, idle) = ((core1.0 - core0.0) * 1e6 / n, (core1.1 - core0.1) * 1e6 / n);
            let (cbusy, cidle) = (
                (client1.0 - client0.0) * 1e6 / n,
                (client1.1 - client0.1) * 1e6 / n,
            );
            println!(
                "  {i:>2} {:<12} {:>7.0} {what}/s  CPU {:>6.1} µs/{what} (user {u:.1}, system {s:.1})  \
                 backend {backend:.1}  core {PROXY_CPU} busy {busy:.1} idle {idle:.1}  \
                 core {CLIENT_CPU} busy {cbusy:.1} idle {cidle:.1}  \
                 switches {waited:.2} waited, {preempted:.2} preempted",
                path.label(),
                n / f64::from(TURN_SECS),
                u + s
            );
            turn.insert(path, (n, u, s));
        }
        let (a, b) = (turn[&ours], turn[&theirs]);
        rate.push(a.0 / b.0);
        cpu.push((a.1 + a.2) / (b.1 + b.2));
        user.push(a.1 - b.1);
        system.push(a.2 - b.2);
    }
    let line = |name: &str, v: &mut Vec<f64>, unit: &str| {
        v.sort_by(f64::total_cmp);
        let m = super::report::median(v);
        println!(
            "  {name:<34} {m:>7.2}{unit} ({:.2}–{:.2})",
            v[0],
            v[v.len() - 1]
        );
    };
    println!(
        "\n{} against {}, median of the {PAIRS} pairs (range):",
        ours.label(),
        theirs.label()
    );
    line(&format!("{what}/s"), &mut rate, "×");
    line(&format!("CPU per {what}"), &mut cpu, "×");
    line(
        &format!("user CPU per {what}, difference"),
        &mut user,
        " µs",
    );
    line(
        &format!("system CPU per {what}, difference"),
        &mut system,
        " µs",
    );
    print!("{}", counters_table(&counters, [ours, theirs], what));
    Ok(())
}

/// The network counters whose per-connection (or per-request) medians differ between the two
/// paths by a twentieth or more: segments and TCP events one proxy causes and the other not.
fn counters_table(
    counters: &BTreeMap<Path, BTreeMap<String, Vec<f64>>>,
    paths: [Path; 2],
    what: &str,
) -> String {
    let median = |path: Path, name: &str| {
        let mut v = counters
            .get(&path)
            .and_then(|c| c.get(name))
            .cloned()
            .unwrap_or_default();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        super::report::median(&v)
    };
    let names: Vec<&String> = counters.values().flat_map(|c| c.keys()).collect();
    let mut out = format!(
        "\nnetwork counters of the proxies' namespace per {what}, median of the turns \
         (those that differ):\n  {:<34} {:>10} {:>10}\n",
        "",
        paths[0].label(),
        paths[1].label()
    );
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            continue;
        }
        let (a, b) = (median(paths[0], name), median(paths[1], name));
        if (a - b).abs() >= 0.05 {
            let _ = writeln!(out, "  {name:<34} {a:>10.2} {b:>10.2}");
        }
    }
    out
}

/// The threads of `pid` (itself if it has gone).
fn threads(pid: u32) -> Vec<u32> {
    let mut tids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|t| t.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    if tids.is_empty() {
        tids.push(pid);
    }
    tids
}

/// [`threads`], comma-separated, for `perf report --tid`.
fn thread_list(pid: u32) -> String {
    let tids: Vec<String> = threads(pid).iter().map(u32::to_string).collect();
    tids.join(",")
}

/// Whether `workload` opens a connection per request; `flag` names the option in the error.
fn closes(workload: Workload, flag: &str) -> anyhow::Result<bool> {
    match workload {
        Workload::Close => Ok(true),
        Workload::KeepAlive => Ok(false),
        _ => bail!("{flag} takes new-connections or keep-alive"),
    }
}

/// The benchmark's world, started and its pinning checked.
fn world() -> anyhow::Result<World> {
    println!("starting the benchmark's world (see docs/benchmarks.md)");
    let world = World::start()?;
    super::pinning::check(&world)?
        .iter()
        .for_each(|l| println!("{l}"));
    Ok(world)
}

/// One path's system calls: per name, calls and errors.
#[derive(Default)]
struct Calls {
    by_name: BTreeMap<String, (u64, u64)>,
    /// Connections (or requests) the client completed meanwhile.
    work: f64,
}

pub fn run(workload: Workload, http: bool) -> anyhow::Result<()> {
    let paths = if http { HTTP_PATHS } else { PATHS };
    for tool in ["strace", "perf"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: apt-get install strace linux-perf");
        }
    }
    let close = closes(workload, "--profile")?;
    let what = if close { "connection" } else { "request" };
    let world = world()?;
    let out_dir = build::target_dir().join("bench");
    fs::create_dir_all(&out_dir)?;
    // Warm both paths (and the agent's first connections) before counting.
    for path in paths {
        wrk(&world, path, 1, close)?;
    }

    // Counted by the kernel's system-call tracepoints (`perf stat`), not by strace: strace
    // stops a process at every call, which changes the order of events between the proxy, the
    // backend and the client (HAProxy made a `shutdown` for 1 connection in 9 under strace, and
    // for nearly every one without it). The backend is counted beside the proxy: what a proxy
    // makes it do is part of the proxy's cost on a shared core.
    let mut calls: Vec<(String, Calls)> = Vec::new();
    let backend = world.http_backend_pid();
    for path in paths {
        let pid = world.proxy_pid(path).context("no proxy process")?;
        let proxy: Vec<u32> = threads(pid);
        let backend: Vec<u32> = procstat::tree(backend)
            .into_iter()
            .flat_map(threads)
            .collect();
        let file = out_dir.join(format!("calls-{}.csv", path.short().replace(' ', "-")));
        let pids: Vec<String> = proxy.iter().chain(&backend).map(u32::to_string).collect();
        let mut perf = Command::new("perf");
        perf.args([
            "stat",
            "--per-thread",
            "-x",
            ",",
            "-e",
            &COUNTED.join(","),
            "-o",
        ])
        .arg(&file)
        .args(["-t", &pids.join(",")]);
        let mut counter = Process::spawn("perf stat", perf, Place::default())?;
        std::thread::sleep(Duration::from_millis(500));
        let work = wrk(&world, path, SECS, close)?;
        // perf stat writes its counts on SIGINT only.
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(counter.pid() as i32, libc::SIGINT) };
        counter.wait_exit(Duration::from_secs(10))?;
        let text = fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for (label, tids) in [
            (path.label().to_owned(), &proxy),
            (format!("backend ({})", path.short()), &backend),
        ] {
            let mut c = parse_perf_stat(&text, tids);
            if c.by_name.is_empty() {
                bail!(
                    "perf stat counted nothing for {label} ({}): {}",
                    file.display(),
                    counter.output().join("\n")
                );
            }
            c.work = work;
            println!(
                "  counted {label:<20} {work:.0} {what}s: {:.1} system calls per {what}",
                c.total() as f64 / work
            );
            calls.push((label, c));
        }
    }

    // The calls in order, for reading one connection's story (not parsed here).
    for path in paths {
        let pid = world.proxy_pid(path).context("no proxy process")?;
        let file = out_dir.join(format!(
            "strace-{}-sequence.txt",
            path.short().replace(' ', "-")
        ));
        let mut strace = Command::new("strace");
        strace
            .args(["-f", "-qq", "-o"])
            .arg(&file)
            .args(["-p", &pid.to_string()]);
        let mut tracer = Process::spawn("strace", strace, Place::default())?;
        std::thread::sleep(Duration::from_millis(500));
        wrk(&world, path, 1, close)?;
        tracer.stop(Duration::from_secs(10))?;
    }

    let mut perf_text = String::new();
    for path in paths {
        let pid = world.proxy_pid(path).context("no proxy process")?;
        let data = out_dir.join(format!("perf-{}.data", path.short().replace(' ', "-")));
        let mut perf = Command::new("perf");
        // Release builds keep no frame pointers: `SY_PERF_CALL_GRAPH=dwarf` gives callers of
        // the agent's own code (and files some hundred MB); the default walks frame pointers.
        let graph = std::env::var("SY_PERF_CALL_GRAPH").unwrap_or_else(|_| "fp".into());
        perf.args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "2000",
            "--call-graph",
        ])
        .arg(&graph)
        .arg("-o")
        .arg(&data);
        // The whole of the proxies' core, not the proxy's tasks: a per-task recording
        // switches its counters at every context switch and charges that to the task, and on a
        // core shared with the backend that showed as a fifth of the proxy's samples. The
        // report below is the proxy's process alone (`--pid`); the file holds the backend and
        // the packets' softirq work beside it.
        perf.args(["-a", "-C", &PROXY_CPU.to_string()]);
        let mut rec = Process::spawn("perf record", perf, Place::default())?;
        std::thread::sleep(Duration::from_millis(500));
        let work = wrk(&world, path, SECS, close)?;
        // perf record writes its file on SIGINT or SIGTERM.
        rec.stop(Duration::from_secs(20))?;
        let report = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none"])
            .args(["--sort", "dso,sym", "--percent-limit", "1.5"])
            // By thread: a whole-core recording may file a thread as a process of its own.
            .args(["--tid", &thread_list(pid), "-i"])
            .arg(&data)
            .output()
            .context("perf report")?;
        let _ = writeln!(
            perf_text,
            "\n{} ({work:.0} {what}s), self time by symbol, shares of the samples:",
            path.label()
        );
        for l in String::from_utf8_lossy(&report.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(25)
        {
            let _ = writeln!(perf_text, "  {}", l.trim_end());
        }
    }
    drop(world);

    let table = calls_table(&calls, what);
    print!(
        "\nsystem calls per {what} (the kernel's tracepoints, `perf stat`, on each process):\n\n{table}"
    );
    print!("{perf_text}");
    let name = match (http, close) {
        (false, true) => "new-connections",
        (false, false) => "keep-alive",
        (true, true) => "http-new-connections",
        (true, false) => "http-keep-alive",
    };
    let txt = out_dir.join(format!("profile-{name}.txt"));
    fs::write(&txt, format!("{table}{perf_text}"))?;
    println!(
        "\nwrote {} (and the raw strace-*.txt, perf-*.data beside it)",
        txt.display()
    );
    Ok(())
}

/// wrk over `path` for `secs`; returns the requests it completed (one connection each with
/// `close`).
fn wrk(world: &World, path: Path, secs: u32, close: bool) -> anyhow::Result<f64> {
    let to = *world
        .targets(path, Service::Http)
        .first()
        .context("no address")?;
    let (_, n) = cases::wrk(world, secs, to, close)?;
    Ok(n)
}

impl Calls {
    fn total(&self) -> u64 {
        self.by_name
            .iter()
            .filter(|(n, _)| *n != SWITCHES)
            .map(|(_, (c, _))| c)
            .sum()
    }
}

/// The system calls a proxy or a backend makes on these workloads, and the context switches
/// away from its threads (`sched_switch`, counted as `switched away`).
const COUNTED: &[&str] = &[
    "syscalls:sys_enter_accept4",
    "syscalls:sys_enter_socket",
    "syscalls:sys_enter_connect",
    "syscalls:sys_enter_setsockopt",
    "syscalls:sys_enter_getsockopt",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_recvmsg",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_readv",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_sendfile64",
    "syscalls:sys_enter_splice",
    "syscalls:sys_enter_shutdown",
    "syscalls:sys_enter_close",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_epoll_ctl",
    "syscalls:sys_enter_io_uring_enter",
    "syscalls:sys_enter_fcntl",
    "syscalls:sys_enter_ioctl",
    "syscalls:sys_enter_clock_gettime",
    "syscalls:sys_enter_openat",
    "syscalls:sys_enter_newfstatat",
    "syscalls:sys_enter_newfstat",
    "syscalls:sys_enter_pread64",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_bpf",
    "sched:sched_switch",
];

/// `perf stat --per-thread -x ,` output, `nginx-576,1234,,syscalls:sys_enter_close,...`,
/// summed over the threads `tids`.
fn parse_perf_stat(text: &str, tids: &[u32]) -> Calls {
    let mut c = Calls::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(thread), Some(count), Some(event)) = (f.first(), f.get(1), f.get(3)) else {
            continue;
        };
        let tid = thread
            .rsplit_once('-')
            .and_then(|(_, t)| t.parse::<u32>().ok());
        if !tid.is_some_and(|t| tids.contains(&t)) {
            continue;
        }
        let Ok(count) = count.trim().parse::<u64>() else {
            continue;
        };
        let name = match event.strip_prefix("syscalls:sys_enter_") {
            Some(call) => call.to_owned(),
            None if *event == "sched:sched_switch" => SWITCHES.to_owned(),
            None => continue,
        };
        c.by_name.entry(name).or_default().0 += count;
    }
    c
}

/// The row of context switches in the calls table (not a system call: left out of the sum).
const SWITCHES: &str = "(switched away)";

/// Calls per unit of work, one column per path, the busiest first; errors in brackets.
fn calls_table(calls: &[(String, Calls)], what: &str) -> String {
    let mut names: Vec<&String> = calls.iter().flat_map(|(_, c)| c.by_name.keys()).collect();
    names.sort();
    names.dedup();
    let per = |c: &Calls, n: &str| {
        c.by_name.get(n).map_or((0.0, 0.0), |(k, e)| {
            (*k as f64 / c.work, *e as f64 / c.work)
        })
    };
    names.sort_by(|a, b| {
        let sum = |n: &str| calls.iter().map(|(_, c)| per(c, n).0).sum::<f64>();
        sum(b).total_cmp(&sum(a))
    });
    let mut out = format!("  {:<20}", "system call");
    for (p, _) in calls {
        let _ = write!(out, " {:>18}", p);
    }
    out.push('\n');
    for n in names {
        if calls.iter().all(|(_, c)| per(c, n).0 < 0.01) {
            continue;
        }
        let _ = write!(out, "  {n:<20}");
        for (_, c) in calls {
            let (k, e) = per(c, n);
            let cell = if e >= 0.01 {
                format!("{k:.2} ({e:.2} err)")
            } else {
                format!("{k:.2}")
            };
            let _ = write!(out, " {cell:>18}");
        }
        out.push('\n');
    }
    let _ = write!(out, "  {:<20}", format!("all, per {what}"));
    for (_, c) in calls {
        let _ = write!(out, " {:>18}", format!("{:.2}", c.total() as f64 / c.work));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_perf_stat_counts() {
        let text = "# started on Thu Dec  3 15:00:00 2026\n\n\
                    sy-forward-0-7,2000,,syscalls:sys_enter_recvfrom,4000000,100.00,,\n\
                    sy-forward-0-7,1000,,syscalls:sys_enter_close,4000000,100.00,,\n\
                    tokio-rt-worker-8,5,,syscalls:sys_enter_close,4000000,100.00,,\n\
                    nginx-9,700,,syscalls:sys_enter_close,4000000,100.00,,\n\
                    sy-forward-0-7,<not counted>,,syscalls:sys_enter_splice,0,0.00,,\n\
                    sy-forward-0-7,900,,sched:sched_switch,4000000,100.00,,\n";
        let mut c = parse_perf_stat(text, &[7, 8]);
        c.work = 1000.0;
        assert_eq!(c.by_name["recvfrom"], (2000, 0));
        assert_eq!(
            c.by_name["close"],
            (1005, 0),
            "summed over the threads, nginx's left out"
        );
        assert!(!c.by_name.contains_key("splice"));
        assert_eq!(c.total(), 3005, "context switches are not system calls");
        let t = calls_table(&[("proxy mode".into(), c)], "connection");
        assert!(t.contains("2.00"), "{t}");
        assert!(t.contains("0.90"), "{t}");
        assert!(t.contains("3.00"), "{t}");
    }
}
