//! `cargo xtask bench`: Switchyard against the physical reference and its peers, side by side
//! in one run, judged against the goals of docs/benchmarks.md ("The goals").
//!
//! One world (the testkit's topology), one set of backends, several ways for the same client
//! to reach them: direct, kernel mode, proxy mode, HAProxy `mode tcp`, nginx `stream` (the L4
//! cases), and for HTTP also the agent's HTTP mode, HAProxy `mode http` and nginx `proxy_pass`
//! (the HTTP cases). Each case runs for a fixed time, the paths of one workload back to back so
//! that they share the machine's mood, the whole round repeated (each round starting one path
//! further on, every other one backwards) and the median of the round-by-round ratios kept.
//! Goals are
//! judged, never asserted: a benchmark reports; tests assert. How to read the output:
//! docs/benchmarks.md.

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
    /// A proxy-mode service with `app_protocol = "http"` (`"grpc"` for the gRPC case): the
    /// forwarder serves HTTP and balances each request over its pool of upstream connections.
    Http,
    /// HAProxy `mode http` with `http-reuse always`.
    HaproxyHttp,
    /// nginx `proxy_pass` to an upstream `keepalive` pool, `proxy_http_version 1.1`.
    NginxHttp,
}

impl Path {
    /// The paths of the L4 cases, in their table's order.
    pub const L4: [Path; 8] = [
        Path::Direct,
        Path::Kernel,
        Path::KernelLeastConn,
        Path::KernelPeakEwma,
        Path::Proxy,
        Path::ProxyCopy,
        Path::Haproxy,
        Path::Nginx,
    ];

    /// The paths of the HTTP cases, in their table's order: the reference, the three HTTP
    /// proxies, then the agent's L4 path for what per-request balancing changes.
    pub const HTTP: [Path; 5] = [
        Path::Direct,
        Path::Http,
        Path::HaproxyHttp,
        Path::NginxHttp,
        Path::Proxy,
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
            Path::Http => "HTTP mode",
            Path::HaproxyHttp => "HAProxy http",
            Path::NginxHttp => "nginx http",
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
            Path::Http => "HTTP",
            Path::HaproxyHttp => "HAProxy http",
            Path::NginxHttp => "nginx http",
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
            Path::Http => "#0b4f8a",
            Path::HaproxyHttp => "#8c1a1a",
            Path::NginxHttp => "#b35900",
        }
    }
}

/// Which cases a run makes. Only a run of all of them may rewrite the README.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    All,
    /// wrk, iperf3 and redis-benchmark over direct, kernel mode, proxy mode and the L4 peers.
    L4,
    /// wrk, h2load and gRPC over direct, HTTP mode, the HTTP peers and proxy mode.
    Http,
}

impl Part {
    fn parse(only: Option<&str>) -> anyhow::Result<Part> {
        match only {
            None => Ok(Part::All),
            Some("l4") => Ok(Part::L4),
            Some("http") => Ok(Part::Http),
            Some(other) => bail!("--only {other}: l4 or http"),
        }
    }

    pub fn l4(self) -> bool {
        self != Part::Http
    }

    pub fn http(self) -> bool {
        self != Part::L4
    }

    fn flag(self) -> &'static str {
        match self {
            Part::All => "",
            Part::L4 => " --only l4",
            Part::Http => " --only http",
        }
    }
}

/// Durations and repetitions: the full run fits in about 12 minutes (8 for the L4 cases, 4 for
/// the HTTP ones), `--quick` in about one and a half.
#[derive(Serialize, Clone, Copy)]
pub struct Plan {
    pub quick: bool,
    pub part: Part,
    pub repetitions: usize,
    /// Rounds at most for a workload whose ratios spread beyond [`report::NOISE`].
    pub max_repetitions: usize,
    /// Seconds per wrk, h2load and iperf3 case.
    pub secs: u32,
    /// redis-benchmark requests per test (GET, then SET): it counts requests, not time.
    pub redis_requests: u32,
    /// gRPC calls per case: the shares are counted, so a count rather than a time.
    pub grpc_requests: u32,
    /// Seconds of wrk in the backend-kill case, which runs once per path and run.
    pub kill_secs: u32,
    /// How long in all the run may wait for other work on the machine to finish, or spend
    /// repeating cases that other work disturbed.
    #[serde(skip)]
    pub patience: Duration,
}

impl Plan {
    fn new(quick: bool, part: Part) -> Plan {
        if quick {
            Plan {
                quick,
                part,
                repetitions: 1,
                max_repetitions: 1,
                secs: 1,
                redis_requests: 20_000,
                grpc_requests: 6_000,
                kill_secs: 5,
                patience: Duration::from_secs(15),
            }
        } else {
            Plan {
                quick,
                part,
                repetitions: 5,
                max_repetitions: 6,
                secs: 3,
                redis_requests: 60_000,
                grpc_requests: 20_000,
                kill_secs: 10,
                patience: Duration::from_secs(90),
            }
        }
    }

    fn command(&self) -> String {
        format!(
            "cargo xtask bench{}{}",
            if self.quick { " --quick" } else { "" },
            self.part.flag()
        )
    }

    /// The workloads this run makes, each with its paths in the order they run.
    fn workloads(&self) -> Vec<(Workload, Vec<Path>)> {
        Workload::ALL
            .into_iter()
            .map(|w| (w, w.paths(self.part)))
            .filter(|(_, paths)| !paths.is_empty())
            .collect()
    }

    /// Every path of the run, once, in table order.
    fn paths(&self) -> Vec<Path> {
        let mut all: Vec<Path> = Vec::new();
        let l4: &[Path] = if self.part.l4() { &Path::L4 } else { &[] };
        let http: &[Path] = if self.part.http() { &Path::HTTP } else { &[] };
        for p in l4.iter().chain(http) {
            if !all.contains(p) {
                all.push(*p);
            }
        }
        all
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
    /// Requests each backend served, in the service's order (the gRPC case).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backend_requests: Vec<u64>,
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
    /// The backend-kill case (HTTP part), once per path: counts, not medians.
    backend_kill: &'a [cases::BackendKill],
}

const NOISE_LEGEND: &str = "\nratios are the median of the ratios within each round; (lo–hi): \
                            the smallest and largest of the runs (for ratios: of the ratios \
                            within each round); ≈: the rounds fell on both sides of 1.00×, a \
                            tie inside the noise";

const PINNING: &str = "clients on core 0; HAProxy, nginx (both modes each), the agent and the \
                       backends on core 1";

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

/// What a run makes instead of the tables, if anything: `--profile` or `--pairs`.
pub enum Instead {
    Tables,
    Profile(Workload),
    Pairs(Workload),
}

impl Instead {
    pub fn of(profile: Option<&str>, pairs: Option<&str>) -> anyhow::Result<Instead> {
        let workload = |flag: &str, w: &str| match w {
            "new-connections" => Ok(Workload::Close),
            "keep-alive" => Ok(Workload::KeepAlive),
            other => Err(anyhow::anyhow!(
                "--{flag} {other}: new-connections or keep-alive"
            )),
        };
        Ok(match (profile, pairs) {
            (Some(w), _) => Instead::Profile(workload("profile", w)?),
            (None, Some(w)) => Instead::Pairs(workload("pairs", w)?),
            (None, None) => Instead::Tables,
        })
    }
}

pub fn run(quick: bool, instead: Instead, only: Option<&str>) -> anyhow::Result<()> {
    let part = Part::parse(only)?;
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
    match instead {
        Instead::Profile(workload) => return profile::run(workload, part == Part::Http),
        Instead::Pairs(workload) => return profile::pairs(workload, part == Part::Http),
        Instead::Tables => {}
    }
    let plan = Plan::new(quick, part);
    let machine = machine(given);
    let started = Instant::now();
    let workloads = plan.workloads();
    let cases: usize = workloads.iter().map(|(_, p)| p.len()).sum::<usize>() * plan.repetitions;
    println!(
        "\n== Switchyard benchmark ({}{}: {} × {} s per case{}, {cases} cases{})",
        if quick { "quick" } else { "full" },
        match part {
            Part::All => "",
            Part::L4 => ", L4 cases only",
            Part::Http => ", HTTP cases only",
        },
        plan.repetitions,
        plan.secs,
        if plan.repetitions > 1 {
            ", each round in another order, median kept"
        } else {
            ""
        },
        if part.http() {
            ", then a backend killed under load, once"
        } else {
            ""
        },
    );
    println!(
        "{}, {} cores, Linux {}",
        machine.cpu, machine.cores, machine.kernel
    );
    println!("pinning: {PINNING}");
    println!(
        "starting: namespaces, backends (nginx HTTP/1.1 and h2c, 3× nginx gRPC, iperf3, 3× \
         redis, 3× nginx for the backend-kill case), agent, HAProxy (tcp, http), nginx (stream, \
         http)"
    );
    let mut world = World::start()?;
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
    for path in plan.paths() {
        if let Err(e) = cases::run(&world, &warm, path, Workload::KeepAlive) {
            println!("  warning: {} does not answer: {e:#}", path.label());
        }
        check_interrupt()?;
    }

    let warm_each = Plan {
        redis_requests: 5_000,
        grpc_requests: 2_000,
        ..warm
    };
    let mut runs = Vec::new();
    let mut n = 0;
    let mut patience = plan.patience;
    let mut round =
        |repetition: usize, workloads: &[(Workload, Vec<Path>)], runs: &mut Vec<Run>| {
            for (workload, paths) in workloads {
                let workload = *workload;
                // Not measured: so the round's first path does not pay for a cold backend and
                // the others not.
                let order = rotated(paths, repetition);
                if let Some(first) = order.first() {
                    let _ = cases::run(&world, &warm_each, *first, workload);
                }
                check_interrupt()?;
                for path in order {
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
                                "  [{n:>3}/{cases}] {:<22} {:<12} again: {:.0}% of the CPU went \
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
                        "  [{n:>3}/{cases}] {:<22} {:<12} {}",
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
        round(repetition, &workloads, &mut runs)?;
    }
    // One more round of each workload whose verdicts moved by more than the noise between
    // rounds, up to the plan's limit: the median of five is steadier than that of three.
    for repetition in plan.repetitions + 1..=plan.max_repetitions {
        let summary = report::Summary::of(&runs);
        let again: Vec<(Workload, Vec<Path>)> = workloads
            .iter()
            .filter(|(w, _)| {
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
            .cloned()
            .collect();
        if again.is_empty() {
            break;
        }
        round(repetition, &again, &mut runs)?;
    }
    // Once, after every round: it kills a backend, and a count of failures needs no median.
    let mut kills = Vec::new();
    if part.http() {
        println!(
            "  once: wrk keep-alive for {} s over a service of 3 backends, one killed a third of \
             the way in",
            plan.kill_secs
        );
        for path in cases::KILL_PATHS {
            quiet(&mut patience)?;
            let k = cases::backend_kill(&mut world, plan.kill_secs, path);
            check_interrupt()?;
            println!(
                "  [once] {:<22} {:<12} {}",
                "backend killed",
                path.label(),
                match &k.error {
                    Some(e) => format!("FAILED: {}", e.lines().next().unwrap_or_default()),
                    None => format!(
                        "{} requests, {} failed: {}",
                        k.requests,
                        k.failed,
                        if k.pass { "PASS" } else { "MISS" }
                    ),
                }
            );
            kills.push(k);
        }
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
    let mut goals = Vec::new();
    let mut tables = Vec::new();
    if part.l4() {
        goals.extend(report::goals(&summary));
        tables.push((
            "L4",
            report::values(&summary, &Path::L4, &Metric::L4),
            report::ratios(&summary, &report::RATIOS, &Metric::L4),
        ));
    }
    if part.http() {
        goals.extend(report::http_goals(&summary));
        goals.push(report::kill_goal(&kills));
        tables.push((
            "HTTP",
            report::values(&summary, &Path::HTTP, &Metric::HTTP),
            report::ratios(&summary, &report::HTTP_RATIOS, &Metric::HTTP),
        ));
    }
    for (what, values, ratios) in &tables {
        println!(
            "\n{what} cases, medians of {} (↑ higher is better, ↓ lower), (lo–hi) the runs' \
             range:\n",
            rounds_text(&runs)
        );
        print!("{}", values.terminal());
        println!("\n{what} ratios:\n");
        print!("{}", ratios.terminal());
    }
    println!("{NOISE_LEGEND}");
    if part.http() {
        print!("{}", report::grpc_text(&runs));
        print!("{}", report::kill_text(&kills));
    }
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
    let command = plan.command();
    let result = ResultFile {
        command: &command,
        date: date.clone(),
        seconds,
        plan,
        machine: &machine,
        pinning: PINNING,
        summary: &summary,
        goals: &goals,
        runs: &runs,
        backend_kill: &kills,
    };
    // A smoke run, or a part, must not overwrite the last full run's figures.
    let suffix = format!(
        "{}{}",
        if quick { "-quick" } else { "" },
        match part {
            Part::All => "",
            Part::L4 => "-l4",
            Part::Http => "-http",
        }
    );
    let json = out_dir.join(format!("result{suffix}.json"));
    fs::write(&json, serde_json::to_string_pretty(&result)?)
        .with_context(|| format!("write {}", json.display()))?;
    let busy = runs
        .iter()
        .filter(|r| r.elsewhere > cases::ELSEWHERE_NOTE)
        .count();
    let mut subtitle = format!(
        "{command} · {date} · {}, {} cores · median of {} × {} s",
        machine.cpu, machine.cores, plan.repetitions, plan.secs
    );
    if busy > 0 {
        subtitle.push_str(&format!(
            " · {busy} of {cases} cases disturbed by other work"
        ));
    }
    let mut charts = Vec::new();
    if part.l4() {
        charts.push(("", report::svg(&summary, &Path::L4, &Metric::L4, &subtitle)));
    }
    if part.http() {
        charts.push((
            "-http",
            report::svg(&summary, &Path::HTTP, &Metric::HTTP, &subtitle),
        ));
    }
    // chart.svg and chart-http.svg from a full run; `-quick`, and `-only` for a part, beside.
    let chart_suffix = format!(
        "{}{}",
        if quick { "-quick" } else { "" },
        if part == Part::All { "" } else { "-only" }
    );
    for (name, chart) in &charts {
        let svg = out_dir.join(format!("chart{name}{chart_suffix}.svg"));
        fs::write(&svg, chart).with_context(|| format!("write {}", svg.display()))?;
        println!("wrote {}", svg.display());
    }
    println!("wrote {}", json.display());
    if quick {
        println!("--quick: README.md left alone (one short run is too rough to publish)");
    } else if part != Part::All {
        println!("--only: README.md left alone (its tables come from a run of every case)");
    } else {
        let caveat = match busy {
            0 => String::new(),
            n => format!(
                " {n} of {cases} cases ran with more than {:.0} % of the CPU busy elsewhere \
                 (`elsewhere` in the result file): their figures are skewed.",
                cases::ELSEWHERE_NOTE * 100.0
            ),
        };
        publish(&readme_section(&result, &tables, &caveat), &charts)?;
    }
    println!("done in {:.0?}", Duration::from_secs_f64(seconds));
    Ok(())
}

/// `paths` in the order round `repetition` runs them: each round starts one path further on,
/// and every other round goes backwards, so no path always runs first, or always right after
/// the same other path. A drift of the machine within a round, or what the previous case left
/// behind, does not fall on the same paths every round.
fn rotated(paths: &[Path], repetition: usize) -> Vec<Path> {
    let mut order = paths.to_vec();
    if !order.is_empty() {
        let by = repetition.saturating_sub(1) % order.len();
        order.rotate_left(by);
        if repetition.is_multiple_of(2) {
            order.reverse();
        }
    }
    order
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
            backend_requests: o.backend_requests,
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
            backend_requests: Vec::new(),
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
    // Only the workloads the run made (`--only` leaves some out).
    let per: Vec<usize> = Workload::ALL
        .iter()
        .filter_map(|w| {
            runs.iter()
                .filter(|r| r.workload == *w)
                .map(|r| r.repetition)
                .max()
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
    let shares = match report::shares(&run.backend_requests) {
        Some(s) => format!("  shares {}", report::shares_text(&s)),
        None => String::new(),
    };
    format!("{main}{cpu}{shares}{busy}")
}

/// Tables of one part of the run: its name, the medians, the ratios.
type Tables = [(&'static str, report::Table, report::Table)];

/// The README's benchmark section: what made it, the charts, the tables, the goals.
fn readme_section(result: &ResultFile, tables: &Tables, caveat: &str) -> String {
    let (plan, machine) = (&result.plan, result.machine);
    let mut out = format!(
        "Made with `{}` on {} (commit {}): {}, {} cores, Linux {}; {} of {} s per case \
         (redis-benchmark: {} requests per test; gRPC: {} calls), each round in another order, \
         median shown with the runs' range (lo–hi; a ratio is the median of the ratios within \
         each round, its range theirs; ≈ marks a ratio whose rounds \
         fell on both sides of 1.00×, a tie), more rounds where a ratio spread beyond {:.0} %; \
         {PINNING}, checked. What each case is and how to read the ratios: \
         [docs/benchmarks.md](docs/benchmarks.md).{caveat}\n\n",
        plan.command(),
        result.date,
        machine.commit,
        machine.cpu,
        machine.cores,
        machine.kernel,
        rounds_text(result.runs),
        plan.secs,
        plan.redis_requests,
        plan.grpc_requests,
        report::NOISE * 100.0,
    );
    for (what, values, ratios) in tables {
        let chart = if *what == "HTTP" {
            CHART_HTTP
        } else {
            CHART_L4
        };
        out.push_str(&format!(
            "**{what} cases**\n\n![{what} throughput relative to direct]({chart})\n\n{}\n{}\n",
            values.markdown(),
            ratios.markdown()
        ));
    }
    out.push_str(&report::grpc_text(result.runs));
    out.push_str(&report::kill_text(result.backend_kill));
    out.push_str(&format!(
        "\nGoals:\n\n{}",
        report::goals_text(result.goals, true)
    ));
    out
}

/// Writes the section between the README's markers and the charts beside the docs.
fn publish(section: &str, charts: &[(&str, String)]) -> anyhow::Result<()> {
    let root = build::workspace_root();
    let docs = root.join("docs");
    fs::create_dir_all(&docs)?;
    for (name, chart) in charts {
        let file = format!("benchmark{name}.svg");
        fs::write(docs.join(&file), chart).with_context(|| format!("write docs/{file}"))?;
    }
    let path: PathBuf = root.join("README.md");
    let readme = fs::read_to_string(&path).context("read README.md")?;
    fs::write(&path, report::splice_readme(&readme, section)).context("write README.md")?;
    println!("updated README.md (between the bench markers) and the charts in docs/");
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
        ("h2load", &["--version"]),
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

/// The charts a run writes, beside the README's table.
const CHART_L4: &str = "docs/benchmark.svg";
const CHART_HTTP: &str = "docs/benchmark-http.svg";

/// The checked-out commit, and whether the tree differs from it: read-only git plumbing
/// (`git status` may rewrite the index, and others may share this tree). What a run itself
/// writes (the README's table, the charts) does not count: a second run in a row measures
/// the same code as the first.
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
    let changed = git(&[
        "diff-index",
        "--quiet",
        "HEAD",
        "--",
        ".",
        ":(exclude)README.md",
        &format!(":(exclude){CHART_L4}"),
        &format!(":(exclude){CHART_HTTP}"),
    ])
    .is_some_and(|o| o.status.code() == Some(1));
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
    fn each_round_starts_one_path_further_on() {
        let paths = [Path::Direct, Path::Proxy, Path::Haproxy, Path::Nginx];
        assert_eq!(rotated(&paths, 1), paths);
        // Rotated by one and reversed: HAProxy runs before the agent, after nginx.
        assert_eq!(
            rotated(&paths, 2),
            [Path::Direct, Path::Nginx, Path::Haproxy, Path::Proxy]
        );
        assert_eq!(
            rotated(&paths, 3),
            [Path::Haproxy, Path::Nginx, Path::Direct, Path::Proxy]
        );
        assert_eq!(rotated(&paths, 5), paths);
        assert!(rotated(&[], 3).is_empty());
    }

    #[test]
    fn today_is_a_date() {
        let t = today();
        assert_eq!(t.len(), 10);
        assert!(t.starts_with("20"));
    }
}
