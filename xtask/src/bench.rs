//! `cargo xtask bench`: Switchyard against the physical reference and its peers, side by side
//! in one run, judged against the goals of docs/benchmarks.md ("The goals").
//!
//! One world (the testkit's topology), one set of backends, five ways for the same client to
//! reach them: direct, kernel mode, proxy mode, HAProxy `mode tcp`, nginx `stream`. Each case
//! runs for a fixed time, the paths of one workload back to back so that they share the
//! machine's mood, the whole round repeated and the median kept. Goals are judged, never
//! asserted: a benchmark reports; tests assert. How to read the output: docs/benchmarks.md.

mod cases;
mod pinning;
mod procstat;
mod profile;
mod report;
mod world;

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{build, setup};
use cases::{Metric, Workload};
use world::World;

/// How a client reaches the backends.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// Straight to the backend's address: the physical reference.
    Direct,
    /// A kernel-mode service address: rewritten in `connect()` (round robin).
    Kernel,
    /// A kernel-mode `least_connections` service: the programs' own counts, in `connect()`.
    KernelLeastConn,
    /// A kernel-mode `peak_ewma` service.
    KernelPeakEwma,
    /// A proxy-mode service address: through the agent's forwarder, on its default byte path
    /// (`splice`: the copy, then `splice(2)` for bulk).
    Proxy,
    /// The same forwarder with `byte_path = "copy"`: every byte through userspace.
    ProxyCopy,
    Haproxy,
    Nginx,
}

impl Path {
    pub const ALL: [Path; 8] = [
        Path::Direct,
        Path::Kernel,
        Path::KernelLeastConn,
        Path::KernelPeakEwma,
        Path::Proxy,
        Path::ProxyCopy,
        Path::Haproxy,
        Path::Nginx,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Kernel => "kernel mode",
            Path::KernelLeastConn => "kernel least-conn",
            Path::KernelPeakEwma => "kernel peak-EWMA",
            Path::Proxy => "proxy mode",
            Path::ProxyCopy => "proxy copy",
            Path::Haproxy => "HAProxy",
            Path::Nginx => "nginx",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Kernel => "kernel",
            Path::KernelLeastConn => "kernel LC",
            Path::KernelPeakEwma => "kernel EWMA",
            Path::Proxy => "proxy",
            Path::ProxyCopy => "copy",
            Path::Haproxy => "HAProxy",
            Path::Nginx => "nginx",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Path::Direct => "#8c8c8c",
            Path::Kernel => "#2ca02c",
            Path::KernelLeastConn => "#17becf",
            Path::KernelPeakEwma => "#bcbd22",
            Path::Proxy => "#1f77b4",
            Path::ProxyCopy => "#9467bd",
            Path::Haproxy => "#d62728",
            Path::Nginx => "#ff7f0e",
        }
    }
}

/// Durations and repetitions: the full run fits in about 8 minutes, `--quick` in about one.
#[derive(Serialize, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
    pub repetitions: usize,
    /// Rounds at most for a workload whose ratios spread beyond [`report::NOISE`].
    pub max_repetitions: usize,
    /// Seconds per wrk and iperf3 case.
    pub secs: u32,
    /// redis-benchmark requests per test (GET, then SET): it counts requests, not time.
    pub redis_requests: u32,
    /// How long in all the run may wait for other work on the machine to finish, or spend
    /// repeating cases that other work disturbed.
    #[serde(skip)]
    pub patience: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                repetitions: 1,
                max_repetitions: 1,
                secs: 1,
                redis_requests: 20_000,
                patience: Duration::from_secs(15),
            }
        } else {
            Plan {
                quick,
                repetitions: 3,
                max_repetitions: 5,
                secs: 5,
                redis_requests: 100_000,
                patience: Duration::from_secs(90),
            }
        }
    }

    fn command(&self) -> &'static str {
        if self.quick {
            "cargo xtask bench --quick"
        } else {
            "cargo xtask bench"
        }
    }
}

/// One run of one case.
#[derive(Serialize)]
pub struct Run {
    pub repetition: usize,
    pub workload: Workload,
    pub path: Path,
    pub seconds: f64,
    pub error: Option<String>,
    pub metrics: BTreeMap<Metric, f64>,
    pub notes: Vec<String>,
    /// Share of the machine's CPU that other work took meanwhile.
    pub elsewhere: f64,
}

#[derive(Serialize)]
struct Machine {
    /// One-minute load average before the run: anything well above zero is other work.
    load: f64,
    kernel: String,
    cpu: String,
    cores: usize,
    commit: String,
    tools: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct ResultFile<'a> {
    command: &'a str,
    date: String,
    seconds: f64,
    plan: Plan,
    machine: &'a Machine,
    /// Where each process ran: see docs/benchmarks.md.
    pinning: &'static str,
    summary: &'a report::Summary,
    goals: &'a [report::Goal],
    runs: &'a [Run],
}

const NOISE_LEGEND: &str = "\n(lo–hi): the smallest and largest of the runs (for ratios: the \
                            ratio within each round); ≈: the rounds fell on both sides of 1.00×, \
                            a tie inside the noise";

const PINNING: &str = "clients on core 0; HAProxy, nginx stream, the agent and the backends on \
                       core 1";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

pub fn run(quick: bool, profile: Option<&str>) -> anyhow::Result<()> {
    let profile = profile
        .map(|w| match w {
            "new-connections" => Ok(Workload::Close),
            "keep-alive" => Ok(Workload::KeepAlive),
            other => Err(anyhow::anyhow!(
                "--profile {other}: new-connections or keep-alive"
            )),
        })
        .transpose()?;
    setup::run(setup::Needs::Bench)?;
    // Both set: measure those binaries (another build, an older release) as they are.
    let given = given_binaries();
    if given {
        println!("bench: SWITCHYARD_BIN and SY_PROBE_BIN are set: measuring them, not building");
    } else {
        build::agent(true)?;
        // SAFETY: setting environment variables before any thread of ours reads them.
        unsafe {
            std::env::set_var("SWITCHYARD_BIN", build::binary("switchyard", true));
            std::env::set_var("SY_PROBE_BIN", build::binary("sy-probe", true));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and makes network namespaces: run it as root");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Some(workload) = profile {
        return profile::run(workload);
    }
    let plan = Plan::new(quick);
    let machine = machine(given);
    let started = Instant::now();
    let cases = Workload::ALL.len() * Path::ALL.len() * plan.repetitions;
    println!(
        "\n== Switchyard benchmark ({}: {} × {} s per case{}, {cases} cases)",
        if quick { "quick" } else { "full" },
        plan.repetitions,
        plan.secs,
        if plan.repetitions > 1 {
            ", median kept"
        } else {
            ""
        },
    );
    println!(
        "{}, {} cores, Linux {}",
        machine.cpu, machine.cores, machine.kernel
    );
    println!("pinning: {PINNING}");
    println!("starting: namespaces, backends (nginx, iperf3, 3× redis), agent, HAProxy, nginx");
    let world = World::start()?;
    for line in pinning::check(&world)? {
        println!("{line}");
    }
    println!(
        "pinned: every client is checked on core {} as it starts",
        world::CLIENT_CPU
    );
    check_interrupt()?;

    // One short keep-alive round per path: warms caches and says early if a path is broken.
    let warm = Plan { secs: 1, ..plan };
    for path in Path::ALL {
        if let Err(e) = cases::run(&world, &warm, path, Workload::KeepAlive) {
            println!("  warning: {} does not answer: {e:#}", path.label());
        }
        check_interrupt()?;
    }

    let warm_each = Plan {
        redis_requests: 5_000,
        ..warm
    };
    let mut runs = Vec::new();
    let mut n = 0;
    let mut patience = plan.patience;
    let mut round = |repetition: usize, workloads: &[Workload], runs: &mut Vec<Run>| {
        for &workload in workloads {
            // Not measured: so the first path of a workload (direct) does not pay for a cold
            // backend and the others not.
            let _ = cases::run(&world, &warm_each, Path::Direct, workload);
            check_interrupt()?;
            for path in Path::ALL {
                n += 1;
                let run = loop {
                    quiet(&mut patience)?;
                    let run = measure(&world, &plan, repetition, path, workload);
                    check_interrupt()?;
                    // Other work took the machine during the case: once quiet again, run it
                    // again, paying for the lost case out of the same patience.
                    let spent = Duration::from_secs_f64(run.seconds);
                    if run.elsewhere > cases::ELSEWHERE_NOTE && patience > spent {
                        patience -= spent;
                        println!(
                            "  [{n:>2}/{cases}] {:<22} {:<12} again: {:.0}% of the CPU went \
                             elsewhere",
                            workload.label(),
                            path.label(),
                            run.elsewhere * 100.0
                        );
                        continue;
                    }
                    break run;
                };
                println!(
                    "  [{n:>2}/{cases}] {:<22} {:<12} {}",
                    workload.label(),
                    path.label(),
                    progress(&run)
                );
                runs.push(run);
            }
        }
        anyhow::Ok(())
    };
    for repetition in 1..=plan.repetitions {
        round(repetition, &Workload::ALL, &mut runs)?;
    }
    // One more round of each workload whose verdicts moved by more than the noise between
    // rounds, up to the plan's limit: the median of five is steadier than that of three.
    for repetition in plan.repetitions + 1..=plan.max_repetitions {
        let summary = report::Summary::of(&runs);
        let again: Vec<Workload> = Workload::ALL
            .into_iter()
            .filter(|w| {
                let worst = summary.worst_spread(&w.metrics());
                if let Some((spread, what)) = worst.as_ref().filter(|(s, _)| *s > report::NOISE) {
                    println!(
                        "  round {repetition} of {}: {what} spread {:.1} % over the rounds",
                        w.label(),
                        spread * 100.0
                    );
                    return true;
                }
                false
            })
            .collect();
        if again.is_empty() {
            break;
        }
        round(repetition, &again, &mut runs)?;
    }
    for line in pinning::check(&world)? {
        println!("  still {line}");
    }
    let torn = Instant::now();
    drop(world);
    println!(
        "torn down (proxies, agent, backends, namespaces, cgroup) in {:.1?}",
        torn.elapsed()
    );

    let summary = report::Summary::of(&runs);
    let goals = report::goals(&summary);
    let values = report::values(&summary);
    let ratios = report::ratios(&summary);
    println!(
        "\nmedians of {} (↑ higher is better, ↓ lower), (lo–hi) the runs' range:\n",
        rounds_text(&runs)
    );
    print!("{}", values.terminal());
    println!("\nratios:\n");
    print!("{}", ratios.terminal());
    println!("{NOISE_LEGEND}");
    println!("\ngoals:\n");
    print!("{}", report::goals_text(&goals, false));
    let failed: Vec<&Run> = runs.iter().filter(|r| r.error.is_some()).collect();
    let noted: Vec<&Run> = runs.iter().filter(|r| !r.notes.is_empty()).collect();
    if !failed.is_empty() || !noted.is_empty() {
        println!("\nsuspect cases:");
        for r in failed {
            println!(
                "  {} / {} (run {}): {}",
                r.workload.label(),
                r.path.label(),
                r.repetition,
                r.error.as_deref().unwrap_or_default()
            );
        }
        for r in noted {
            println!(
                "  {} / {} (run {}): {}",
                r.workload.label(),
                r.path.label(),
                r.repetition,
                r.notes.join("; ")
            );
        }
    }

    let seconds = started.elapsed().as_secs_f64();
    let date = today();
    let out_dir = build::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("mkdir {}", out_dir.display()))?;
    let result = ResultFile {
        command: plan.command(),
        date: date.clone(),
        seconds,
        plan,
        machine: &machine,
        pinning: PINNING,
        summary: &summary,
        goals: &goals,
        runs: &runs,
    };
    // A smoke run must not overwrite the last full run's figures.
    let suffix = if quick { "-quick" } else { "" };
    let json = out_dir.join(format!("result{suffix}.json"));
    fs::write(&json, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("write {}", json.display()))?;
    let busy = runs
        .iter()
        .filter(|r| r.elsewhere > cases::ELSEWHERE_NOTE)
        .count();
    let mut subtitle = format!(
        "{} · {date} · {}, {} cores · median of {} × {} s",
        plan.command(),
        machine.cpu,
        machine.cores,
        plan.repetitions,
        plan.secs
    );
    if busy > 0 {
        subtitle.push_str(&format!(
            " · {busy} of {cases} cases disturbed by other work"
        ));
    }
    let chart = report::svg(&summary, &subtitle);
    let svg = out_dir.join(format!("chart{suffix}.svg"));
    fs::write(&svg, &chart).with_context(|| format!("write {}", svg.display()))?;
    println!("\nwrote {} and {}", json.display(), svg.display());
    if quick {
        println!("--quick: README.md left alone (one short run is too rough to publish)");
    } else {
        let caveat = match busy {
            0 => String::new(),
            n => format!(
                " {n} of {cases} cases ran with more than {:.0} % of the CPU busy elsewhere \
                 (`elsewhere` in the result file): their figures are skewed.",
                cases::ELSEWHERE_NOTE * 100.0
            ),
        };
        publish(&readme_section(&result, &values, &ratios, &caveat), &chart)?;
    }
    println!("done in {:.0?}", Duration::from_secs_f64(seconds));
    Ok(())
}

/// Runs one case once and records it, failed or not.
fn measure(world: &World, plan: &Plan, repetition: usize, path: Path, workload: Workload) -> Run {
    let t = Instant::now();
    let result = cases::run(world, plan, path, workload);
    let seconds = t.elapsed().as_secs_f64();
    match result {
        Ok(o) => Run {
            repetition,
            workload,
            path,
            seconds,
            error: None,
            metrics: o.metrics,
            notes: o.notes,
            elsewhere: o.elsewhere,
        },
        Err(e) => Run {
            repetition,
            workload,
            path,
            seconds,
            error: Some(format!("{e:#}")),
            metrics: BTreeMap::new(),
            notes: Vec::new(),
            elsewhere: 0.0,
        },
    }
}

/// Waits while other work takes more than a little of the machine (a build, another run),
/// within the run's `patience`; past it, cases go on and say how busy the machine was.
fn quiet(patience: &mut Duration) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        let sample = procstat::Elsewhere::start();
        std::thread::sleep(Duration::from_millis(300));
        let share = sample.share();
        if share <= cases::ELSEWHERE_NOTE || patience.is_zero() {
            return Ok(());
        }
        if !said {
            println!(
                "  (waiting: {:.0}% of the CPU is busy elsewhere; {:.0?} of patience left)",
                share * 100.0,
                patience
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(700));
        *patience = patience.saturating_sub(Duration::from_secs(1));
        check_interrupt()?;
    }
}

/// "3 runs", or "3 to 5 runs" where some workloads needed more rounds.
fn rounds_text(runs: &[Run]) -> String {
    let per: Vec<usize> = Workload::ALL
        .iter()
        .map(|w| {
            runs.iter()
                .filter(|r| r.workload == *w)
                .map(|r| r.repetition)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let (lo, hi) = (
        per.iter().copied().min().unwrap_or(0),
        per.iter().copied().max().unwrap_or(0),
    );
    match (lo, hi) {
        (1, 1) => "1 run".into(),
        (lo, hi) if lo == hi => format!("{lo} runs"),
        (lo, hi) => format!("{lo} to {hi} runs (more where the rounds disagreed)"),
    }
}

fn progress(run: &Run) -> String {
    if let Some(e) = &run.error {
        let first = e.lines().next().unwrap_or_default();
        return format!("FAILED: {}", first.chars().take(100).collect::<String>());
    }
    let main = run
        .metrics
        .iter()
        .find(|(m, _)| m.higher_is_better())
        .map(|(m, v)| format!("{} {}", m.format(*v), m.row().1))
        .unwrap_or_default();
    let cpu = run
        .metrics
        .iter()
        .find(|(m, _)| m.row().1.starts_with("proxy CPU"))
        .map(|(m, v)| format!("  ({} {})", m.format(*v), m.row().1))
        .unwrap_or_default();
    let busy = if run.elsewhere > 0.05 {
        format!("  [{:.0}% of the CPU elsewhere]", run.elsewhere * 100.0)
    } else {
        String::new()
    };
    format!("{main}{cpu}{busy}")
}

/// The README's benchmark section: what made it, the chart, the tables, the goals.
fn readme_section(
    result: &ResultFile,
    values: &report::Table,
    ratios: &report::Table,
    caveat: &str,
) -> String {
    let (plan, machine) = (&result.plan, result.machine);
    format!(
        "Made with `{}` on {} (commit {}): {}, {} cores, Linux {}; {} of {} s per case \
         (redis-benchmark: {} requests per test), median shown with the runs' range (lo–hi; \
         for ratios, the ratio within each round; ≈ marks a ratio whose rounds fell on both \
         sides of 1.00×, a tie), more rounds where a ratio spread beyond {:.0} %; {PINNING}, \
         checked. What each case is and how to read the ratios: \
         [docs/benchmarks.md](docs/benchmarks.md).{caveat}\n\n\
         ![throughput relative to direct](docs/benchmark.svg)\n\n{}\n{}\nGoals:\n\n{}",
        plan.command(),
        result.date,
        machine.commit,
        machine.cpu,
        machine.cores,
        machine.kernel,
        rounds_text(result.runs),
        plan.secs,
        plan.redis_requests,
        report::NOISE * 100.0,
        values.markdown(),
        ratios.markdown(),
        report::goals_text(result.goals, true),
    )
}

/// Writes the section between the README's markers and the chart beside the docs.
fn publish(section: &str, chart: &str) -> anyhow::Result<()> {
    let root = build::workspace_root();
    let docs = root.join("docs");
    fs::create_dir_all(&docs)?;
    fs::write(docs.join("benchmark.svg"), chart).context("write docs/benchmark.svg")?;
    let path: PathBuf = root.join("README.md");
    let readme = fs::read_to_string(&path).context("read README.md")?;
    fs::write(&path, report::splice_readme(&readme, section)).context("write README.md")?;
    println!("updated README.md (between the bench markers) and docs/benchmark.svg");
    Ok(())
}

/// Both binaries named by the caller: measure them as they are.
fn given_binaries() -> bool {
    ["SWITCHYARD_BIN", "SY_PROBE_BIN"]
        .iter()
        .all(|v| std::env::var_os(v).is_some())
}

fn machine(given: bool) -> Machine {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut tools = BTreeMap::new();
    for (name, args) in [
        ("haproxy", &["-v"][..]),
        ("nginx", &["-v"]),
        ("wrk", &["-v"]),
        ("iperf3", &["--version"]),
        ("redis-server", &["--version"]),
    ] {
        tools.insert(name, first_line(name, args));
    }
    let mut commit = commit();
    if let Some(bin) = std::env::var_os("SWITCHYARD_BIN").filter(|_| given) {
        commit.push_str(&format!("; agent binary {}", PathBuf::from(bin).display()));
    }
    let load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        load,
        kernel,
        cpu,
        cores,
        commit,
        tools,
    }
}

/// The checked-out commit, and whether the tree differs from it: read-only git plumbing
/// (`git status` may rewrite the index, and others may share this tree).
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(build::workspace_root())
            .output()
            .ok()
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]).filter(|o| o.status.success()) else {
        return "unknown".into();
    };
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    let changed =
        git(&["diff-index", "--quiet", "HEAD", "--"]).is_some_and(|o| o.status.code() == Some(1));
    if changed {
        format!("{head} with uncommitted changes")
    } else {
        head
    }
}

/// The first line a program prints (some print versions on stderr, some exit non-zero).
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(build::workspace_root())
        .output()
        .ok()
        .and_then(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_default()
}

/// Today (UTC) as YYYY-MM-DD, from the days since 1970 (Howard Hinnant's civil_from_days).
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn today_is_a_date() {
        let t = today();
        assert_eq!(t.len(), 10);
        assert!(t.starts_with("20"));
    }
}
