//! The workloads, the figures each yields, and how the load generators' output is read.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    Part, Path, Plan, pinning, procstat, report,
    world::{Service, World},
};

/// Concurrent connections of every client: enough to keep one core busy, few enough that
/// latency means something.
const CONNECTIONS: u32 = 32;

/// HTTP/2: a few connections with several streams each, as many requests in flight as the
/// other clients keep (`CONNECTIONS`).
const H2_CONNECTIONS: u32 = 4;
const H2_STREAMS: u32 = 8;

/// gRPC: one client connection (the case is about what happens to its calls), and as many
/// calls in flight on it as a busy client channel has.
const GRPC_STREAMS: u32 = 16;

/// The gRPC method called: the backends answer every path alike.
const GRPC_PATH: &str = "/switchyard.bench.Bench/Call";

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// wrk over kept-alive connections: the per-request cost of the path.
    KeepAlive,
    /// wrk with `Connection: close`: one new connection per request.
    Close,
    /// iperf3, one stream: bulk throughput of one connection.
    Iperf1,
    /// iperf3, four streams.
    Iperf4,
    /// redis-benchmark GET and SET: small request/response pairs over 3 backends.
    Redis,
    /// h2load, HTTP/2 with prior knowledge: several streams on each of a few connections.
    H2,
    /// gRPC-shaped calls (h2load) on one HTTP/2 connection to a service of three backends:
    /// the share each backend got.
    Grpc,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::KeepAlive,
        Workload::Close,
        Workload::Iperf1,
        Workload::Iperf4,
        Workload::Redis,
        Workload::H2,
        Workload::Grpc,
    ];

    /// The paths this workload runs over in `part` of the benchmark, in the order they run.
    /// The two wrk workloads are both L4 and HTTP cases: direct and proxy mode serve both
    /// tables from the same runs.
    pub fn paths(self, part: Part) -> Vec<Path> {
        let l4: &[Path] = match self {
            Workload::KeepAlive
            | Workload::Close
            | Workload::Iperf1
            | Workload::Iperf4
            | Workload::Redis
                if part.l4() =>
            {
                &Path::L4
            }
            _ => &[],
        };
        let http: &[Path] = match self {
            Workload::KeepAlive | Workload::Close | Workload::H2 if part.http() => &Path::HTTP,
            // Per-request balancing against the L4 path's one backend per connection.
            Workload::Grpc if part.http() => &[Path::Http, Path::Proxy],
            _ => &[],
        };
        let mut all: Vec<Path> = Vec::new();
        for p in l4.iter().chain(http) {
            if !all.contains(p) {
                all.push(*p);
            }
        }
        all
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::KeepAlive => "wrk keep-alive",
            Workload::Close => "wrk Connection: close",
            Workload::Iperf1 => "iperf3 1 stream",
            Workload::Iperf4 => "iperf3 4 streams",
            Workload::Redis => "redis-benchmark",
            Workload::H2 => "h2load HTTP/2",
            Workload::Grpc => "gRPC 1 connection",
        }
    }

    /// The figures this workload yields.
    pub fn metrics(self) -> Vec<Metric> {
        let m: &[Metric] = match self {
            Workload::KeepAlive => &[
                Metric::KeepAliveRps,
                Metric::KeepAliveP50Ms,
                Metric::KeepAliveP99Ms,
                Metric::KeepAliveCpuUs,
            ],
            Workload::Close => &[Metric::CloseCps, Metric::CloseP99Ms, Metric::CloseCpuUs],
            Workload::Iperf1 => &[Metric::Iperf1Gbps, Metric::Iperf1CpuMsPerGb],
            Workload::Iperf4 => &[Metric::Iperf4Gbps],
            Workload::Redis => &[Metric::RedisGetRps, Metric::RedisSetRps, Metric::RedisCpuUs],
            Workload::H2 => &[Metric::H2Rps, Metric::H2P99Ms, Metric::H2CpuUs],
            Workload::Grpc => &[
                Metric::GrpcRps,
                Metric::GrpcMaxShare,
                Metric::GrpcMinShare,
                Metric::GrpcOffEven,
            ],
        };
        m.to_vec()
    }

    fn service(self) -> Service {
        match self {
            Workload::KeepAlive | Workload::Close => Service::Http,
            Workload::Iperf1 | Workload::Iperf4 => Service::Iperf,
            Workload::Redis => Service::Redis,
            Workload::H2 => Service::H2,
            Workload::Grpc => Service::Grpc,
        }
    }
}

/// One figure of a case. The order is the table's.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    KeepAliveRps,
    KeepAliveP50Ms,
    KeepAliveP99Ms,
    KeepAliveCpuUs,
    CloseCps,
    CloseP99Ms,
    CloseCpuUs,
    Iperf1Gbps,
    Iperf1CpuMsPerGb,
    Iperf4Gbps,
    RedisGetRps,
    RedisSetRps,
    RedisCpuUs,
    H2Rps,
    H2P99Ms,
    H2CpuUs,
    GrpcRps,
    /// The largest and the smallest share of the calls one backend got, in percent.
    GrpcMaxShare,
    GrpcMinShare,
    /// How far the farthest backend's share was from an even one, in percent of even.
    GrpcOffEven,
    /// The largest resident size seen after any case (a maximum, not a median).
    RssMib,
}

impl Metric {
    /// The L4 cases' table, in order.
    pub const L4: [Metric; 14] = [
        Metric::KeepAliveRps,
        Metric::KeepAliveP50Ms,
        Metric::KeepAliveP99Ms,
        Metric::KeepAliveCpuUs,
        Metric::CloseCps,
        Metric::CloseP99Ms,
        Metric::CloseCpuUs,
        Metric::Iperf1Gbps,
        Metric::Iperf1CpuMsPerGb,
        Metric::Iperf4Gbps,
        Metric::RedisGetRps,
        Metric::RedisSetRps,
        Metric::RedisCpuUs,
        Metric::RssMib,
    ];

    /// The HTTP cases' table, in order.
    pub const HTTP: [Metric; 15] = [
        Metric::KeepAliveRps,
        Metric::KeepAliveP50Ms,
        Metric::KeepAliveP99Ms,
        Metric::KeepAliveCpuUs,
        Metric::CloseCps,
        Metric::CloseP99Ms,
        Metric::CloseCpuUs,
        Metric::H2Rps,
        Metric::H2P99Ms,
        Metric::H2CpuUs,
        Metric::GrpcRps,
        Metric::GrpcMaxShare,
        Metric::GrpcMinShare,
        Metric::GrpcOffEven,
        Metric::RssMib,
    ];

    /// The table's row: workload, then what is measured.
    pub fn row(self) -> (&'static str, &'static str) {
        match self {
            Metric::KeepAliveRps => ("wrk keep-alive", "req/s"),
            Metric::KeepAliveP50Ms => ("", "p50 ms"),
            Metric::KeepAliveP99Ms => ("", "p99 ms"),
            Metric::KeepAliveCpuUs => ("", "proxy CPU µs/req"),
            Metric::CloseCps => ("wrk Connection: close", "conn/s"),
            Metric::CloseP99Ms => ("", "p99 ms"),
            Metric::CloseCpuUs => ("", "proxy CPU µs/conn"),
            Metric::Iperf1Gbps => ("iperf3 1 stream", "Gbit/s"),
            Metric::Iperf1CpuMsPerGb => ("", "proxy CPU ms/GB"),
            Metric::Iperf4Gbps => ("iperf3 4 streams", "Gbit/s"),
            Metric::RedisGetRps => ("redis-benchmark", "GET req/s"),
            Metric::RedisSetRps => ("", "SET req/s"),
            Metric::RedisCpuUs => ("", "proxy CPU µs/req"),
            Metric::H2Rps => ("h2load HTTP/2", "req/s"),
            Metric::H2P99Ms => ("", "p99 ms"),
            Metric::H2CpuUs => ("", "proxy CPU µs/req"),
            Metric::GrpcRps => ("gRPC 1 connection", "calls/s"),
            Metric::GrpcMaxShare => ("", "largest backend share %"),
            Metric::GrpcMinShare => ("", "smallest backend share %"),
            Metric::GrpcOffEven => ("", "farthest off even %"),
            Metric::RssMib => ("proxy memory", "max RSS MiB"),
        }
    }

    /// Throughput is better higher; latency, CPU and memory lower.
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::KeepAliveRps
                | Metric::CloseCps
                | Metric::Iperf1Gbps
                | Metric::Iperf4Gbps
                | Metric::RedisGetRps
                | Metric::RedisSetRps
                | Metric::H2Rps
                | Metric::GrpcRps
        )
    }

    /// A share of the calls, judged on its own: a ratio of it to another path says nothing.
    pub fn is_share(self) -> bool {
        matches!(
            self,
            Metric::GrpcMaxShare | Metric::GrpcMinShare | Metric::GrpcOffEven
        )
    }

    pub fn format(self, v: f64) -> String {
        match self {
            Metric::KeepAliveRps
            | Metric::CloseCps
            | Metric::RedisGetRps
            | Metric::RedisSetRps
            | Metric::H2Rps
            | Metric::GrpcRps => {
                if v >= 10_000.0 {
                    format!("{:.1}k", v / 1000.0)
                } else {
                    format!("{v:.0}")
                }
            }
            Metric::Iperf1Gbps | Metric::Iperf4Gbps | Metric::KeepAliveP50Ms => format!("{v:.2}"),
            Metric::KeepAliveP99Ms | Metric::CloseP99Ms | Metric::H2P99Ms => format!("{v:.2}"),
            Metric::KeepAliveCpuUs | Metric::CloseCpuUs | Metric::RedisCpuUs | Metric::H2CpuUs => {
                format!("{v:.1}")
            }
            Metric::GrpcMaxShare | Metric::GrpcMinShare | Metric::GrpcOffEven => {
                format!("{v:.1}")
            }
            Metric::Iperf1CpuMsPerGb => format!("{v:.0}"),
            Metric::RssMib => format!("{v:.1}"),
        }
    }
}

/// What one run of one case gave.
#[derive(Default, Serialize)]
pub struct Outcome {
    pub metrics: BTreeMap<Metric, f64>,
    /// Anything that makes the figures suspect (socket errors, non-2xx answers, a busy
    /// machine).
    pub notes: Vec<String>,
    /// The share of the machine's CPU that went to work not ours during the case (other
    /// builds, other benchmarks): the figures of a case with much of it are not comparable.
    pub elsewhere: f64,
    /// Requests each backend served, counted by the backends (the gRPC case).
    pub backend_requests: Vec<u64>,
}

/// Above this share of the machine used elsewhere a case is noted as suspect.
pub const ELSEWHERE_NOTE: f64 = 0.05;

/// Runs `workload` once over `path`, charging the proxy's CPU to what was moved.
pub fn run(world: &World, plan: &Plan, path: Path, workload: Workload) -> anyhow::Result<Outcome> {
    let to = world.targets(path, workload.service());
    let first = *to.first().context("no address to connect to")?;
    let pid = world.proxy_pid(path);
    let cpu_before = pid.map(procstat::cpu_seconds).transpose()?;
    let elsewhere = procstat::Elsewhere::start();
    let (mut out, work) = match workload {
        Workload::KeepAlive | Workload::Close => {
            wrk(world, plan.secs, first, workload == Workload::Close)?
        }
        Workload::Iperf1 | Workload::Iperf4 => iperf3(
            world,
            plan.secs,
            first,
            if workload == Workload::Iperf1 { 1 } else { 4 },
        )?,
        Workload::Redis => redis(world, plan.redis_requests, &to)?,
        Workload::H2 => h2(world, plan.secs, first)?,
        Workload::Grpc => grpc(world, plan.grpc_requests, first)?,
    };
    if let (Some(pid), Some(before)) = (pid, cpu_before) {
        let cpu = procstat::cpu_seconds(pid)? - before;
        let per = match workload {
            Workload::KeepAlive => Some((Metric::KeepAliveCpuUs, 1e6)),
            Workload::Close => Some((Metric::CloseCpuUs, 1e6)),
            // `work` is bytes here: milliseconds per 10^9 bytes.
            Workload::Iperf1 => Some((Metric::Iperf1CpuMsPerGb, 1e12)),
            Workload::Iperf4 => None,
            Workload::Redis => Some((Metric::RedisCpuUs, 1e6)),
            Workload::H2 => Some((Metric::H2CpuUs, 1e6)),
            Workload::Grpc => None,
        };
        if let Some((metric, scale)) = per
            && work > 0.0
        {
            out.metrics.insert(metric, cpu * scale / work);
        }
        out.metrics
            .insert(Metric::RssMib, procstat::rss_kib(pid) as f64 / 1024.0);
    }
    out.elsewhere = elsewhere.share();
    if out.elsewhere > ELSEWHERE_NOTE {
        out.notes.push(format!(
            "{:.0}% of the machine's CPU went to other work",
            out.elsewhere * 100.0
        ));
    }
    Ok(out)
}

/// Runs clients side by side to completion (each killed by its guard if it overstays) and
/// returns their outputs.
fn clients(
    world: &World,
    program: &str,
    args: &[Vec<String>],
    budget: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut running = Vec::new();
    for a in args {
        let p = world.client(program, program, a)?;
        // Pinned as stated, or the case's figures mean something else.
        if let Some(note) = pinning::client_note(p.pid(), program) {
            bail!("{note}");
        }
        running.push(p);
    }
    let mut outputs = Vec::new();
    for mut p in running {
        let status = p.wait_exit(budget)?;
        let text = p.output().join("\n");
        if !status.success() {
            bail!("{program} failed ({status}): {}", tail(&text));
        }
        outputs.push(text);
    }
    Ok(outputs)
}

fn client(
    world: &World,
    program: &str,
    args: &[String],
    budget: Duration,
) -> anyhow::Result<String> {
    let mut out = clients(world, program, &[args.to_vec()], budget)?;
    out.pop().context("no output")
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The backend-kill case's paths: HTTP mode, and HAProxy `mode http` with its retries beside it.
pub const KILL_PATHS: [Path; 2] = [Path::Http, Path::HaproxyHttp];

/// The backend the case kills: the second of three (under round robin any would do).
const KILLED: usize = 1;

/// The backend-kill case, once per path: a count of failed requests, judged on its own.
#[derive(Serialize)]
pub struct BackendKill {
    pub path: Path,
    /// How long wrk ran, and when after its start the backend was killed, in seconds.
    pub seconds: u32,
    pub killed_at: f64,
    /// The backend killed, and the PID (the world's own child) the signal went to.
    pub backend: String,
    pub pid: Option<u32>,
    /// Its address refused a connection right after the kill: the socket went too.
    pub refused: bool,
    /// Requests wrk completed, whatever their answer.
    pub requests: u64,
    pub errors: WrkErrors,
    /// `errors.total()`, the figure the verdict is on.
    pub failed: u64,
    pub pass: bool,
    /// Share of the machine's CPU that other work took meanwhile.
    pub elsewhere: f64,
    /// Why the case could not run, or could not be read.
    pub error: Option<String>,
}

/// wrk keep-alive over `path` to the backend-kill service for `secs`, one of its three
/// backends killed a third of the way in, then started again whatever happened, so that the
/// next path, and any case after, finds all three. Never an `Err`: a case that could not run
/// says why in its record, and the run goes on.
pub fn backend_kill(world: &mut World, secs: u32, path: Path) -> BackendKill {
    let mut k = BackendKill {
        path,
        seconds: secs,
        killed_at: 0.0,
        backend: world.failover_backend(KILLED).to_string(),
        pid: None,
        refused: false,
        requests: 0,
        errors: WrkErrors::default(),
        failed: 0,
        pass: false,
        elsewhere: 0.0,
        error: None,
    };
    let elsewhere = procstat::Elsewhere::start();
    let ran = kill_under_load(world, &mut k);
    k.elsewhere = elsewhere.share();
    let restored = world
        .restore_failover()
        .context("starting the killed backend again");
    if let Err(e) = ran.and(restored) {
        k.error = Some(format!("{e:#}"));
    }
    k.pass = k.error.is_none() && k.requests > 0 && k.failed == 0;
    k
}

fn kill_under_load(world: &mut World, k: &mut BackendKill) -> anyhow::Result<()> {
    let to = *world
        .targets(k.path, Service::Failover)
        .first()
        .context("no address to connect to")?;
    let mut wrk = world.client("wrk", "wrk", &wrk_args(k.seconds, to, false))?;
    let started = Instant::now();
    if let Some(note) = pinning::client_note(wrk.pid(), "wrk") {
        bail!("{note}");
    }
    // A third of the way in: the pools are warm by then, and two thirds of the run are left
    // to show what the kill cost.
    let at = Duration::from_secs_f64(f64::from(k.seconds) / 3.0);
    std::thread::sleep(at.saturating_sub(started.elapsed()));
    if let Ok(status) = wrk.wait_exit(Duration::ZERO) {
        bail!(
            "wrk exited ({status}) before the kill: {}",
            tail(&wrk.output().join("\n"))
        );
    }
    k.pid = Some(world.kill_failover_backend(KILLED)?);
    k.killed_at = started.elapsed().as_secs_f64();
    k.refused = world.failover_refuses(KILLED);
    let status = wrk.wait_exit(Duration::from_secs(u64::from(k.seconds) + 30))?;
    let text = wrk.output().join("\n");
    if !status.success() {
        bail!("wrk failed ({status}): {}", tail(&text));
    }
    let w = parse_wrk(&text)?;
    k.requests = w.requests as u64;
    k.errors = w.errors;
    k.failed = w.errors.total();
    if !k.refused {
        bail!(
            "{} still accepted connections after its process was killed",
            k.backend
        );
    }
    Ok(())
}

/// wrk's arguments: one thread (one core), `CONNECTIONS` connections, for `secs`.
fn wrk_args(secs: u32, to: SocketAddr, close: bool) -> Vec<String> {
    let mut args: Vec<String> = ["-t1", "--latency", "--timeout", "5s"]
        .map(String::from)
        .to_vec();
    args.push(format!("-c{CONNECTIONS}"));
    args.push(format!("-d{secs}s"));
    if close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(format!("http://{to}/index.html"));
    args
}

/// wrk, one thread (one core), `CONNECTIONS` connections; returns the outcome and the request count.
pub fn wrk(
    world: &World,
    secs: u32,
    to: SocketAddr,
    close: bool,
) -> anyhow::Result<(Outcome, f64)> {
    let args = wrk_args(secs, to, close);
    let text = client(world, "wrk", &args, Duration::from_secs(secs as u64 + 30))?;
    let w = parse_wrk(&text)?;
    let mut out = Outcome::default();
    let (rps, p50, p99) = if close {
        (Metric::CloseCps, None, Metric::CloseP99Ms)
    } else {
        (
            Metric::KeepAliveRps,
            Some(Metric::KeepAliveP50Ms),
            Metric::KeepAliveP99Ms,
        )
    };
    out.metrics.insert(rps, w.rps);
    if let Some(p50) = p50 {
        out.metrics.insert(p50, w.p50_ms);
    }
    out.metrics.insert(p99, w.p99_ms);
    if w.errors.total() > 0 {
        out.notes.push(format!("wrk: {} errors", w.errors.total()));
    }
    Ok((out, w.requests))
}

#[derive(Debug, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub requests: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: WrkErrors,
}

/// What wrk counts as gone wrong. It prints each line only when its counts are not all zero.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WrkErrors {
    /// `Socket errors: connect N, read N, write N, timeout N`.
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// `Non-2xx or 3xx responses: N`.
    pub non_2xx: u64,
}

impl WrkErrors {
    /// Requests that did not get a 2xx or 3xx answer in time: the socket errors (a connect
    /// error leaves a request unsent, a read or write error breaks the one in flight, a
    /// timeout is one unanswered within `--timeout`) and the other answers.
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non_2xx
    }

    /// `connect 0, read 2, write 0, timeout 1`, read by name: a field this does not know, or
    /// a count that is not one, is an error rather than a zero, since a failure figure read
    /// as zero would pass.
    pub fn read_socket_errors(&mut self, fields: &str) -> anyhow::Result<()> {
        for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (name, n) = field
                .split_once(' ')
                .with_context(|| format!("wrk's socket errors: {field:?} is not \"name count\""))?;
            let n: u64 = n
                .trim()
                .parse()
                .with_context(|| format!("wrk's socket errors: {field:?}"))?;
            match name {
                "connect" => self.connect = n,
                "read" => self.read = n,
                "write" => self.write = n,
                "timeout" => self.timeout = n,
                other => bail!("wrk's socket errors: unknown field {other:?}"),
            }
        }
        Ok(())
    }
}

pub fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let mut rps = None;
    let mut requests = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = WrkErrors::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = parse_duration_ms(v.trim());
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = parse_duration_ms(v.trim());
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            errors.read_socket_errors(v)?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors.non_2xx = v
                .trim()
                .parse()
                .with_context(|| format!("wrk's non-2xx count: {:?}", v.trim()))?;
        }
    }
    Ok(Wrk {
        rps: rps.with_context(|| format!("no Requests/sec in wrk's output: {}", tail(text)))?,
        requests: requests.context("no request count in wrk's output")?,
        p50_ms: p50.context("no 50% latency in wrk's output")?,
        p99_ms: p99.context("no 99% latency in wrk's output")?,
        errors,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.50m`.
fn parse_duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(n * scale)
}

/// iperf3 client; returns the outcome and the bytes the server received.
fn iperf3(
    world: &World,
    secs: u32,
    to: SocketAddr,
    streams: u32,
) -> anyhow::Result<(Outcome, f64)> {
    let args: Vec<String> = vec![
        "-c".into(),
        to.ip().to_string(),
        "-p".into(),
        to.port().to_string(),
        "-t".into(),
        secs.to_string(),
        "-P".into(),
        streams.to_string(),
        "--json".into(),
    ];
    let text = client(
        world,
        "iperf3",
        &args,
        Duration::from_secs(secs as u64 + 30),
    )?;
    let (bps, bytes) = parse_iperf3(&text)?;
    let metric = if streams == 1 {
        Metric::Iperf1Gbps
    } else {
        Metric::Iperf4Gbps
    };
    let mut out = Outcome::default();
    out.metrics.insert(metric, bps / 1e9);
    Ok((out, bytes))
}

/// Bits per second and bytes as the receiving side counted them.
pub fn parse_iperf3(text: &str) -> anyhow::Result<(f64, f64)> {
    let (Some(start), Some(end)) = (text.find('{'), text.rfind('}')) else {
        bail!("no JSON in iperf3's output: {}", tail(text));
    };
    let v: serde_json::Value = serde_json::from_str(&text[start..=end]).context("iperf3's JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    Ok((bps, bytes))
}

/// redis-benchmark, `CONNECTIONS` connections, GET and SET of `requests` each; returns the outcome and
/// the request count. Given several addresses (the direct path to three backends), one client
/// per address with its share of connections and requests, and their rates added up.
fn redis(world: &World, requests: u32, to: &[SocketAddr]) -> anyhow::Result<(Outcome, f64)> {
    let k = to.len().max(1) as u32;
    let args: Vec<Vec<String>> = to
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let share = |total: u32| total / k + u32::from((i as u32) < total % k);
            [
                "-h",
                &a.ip().to_string(),
                "-p",
                &a.port().to_string(),
                "-c",
                &share(CONNECTIONS).to_string(),
                "-n",
                &share(requests).to_string(),
                "-t",
                "get,set",
                "--csv",
            ]
            .map(String::from)
            .to_vec()
        })
        .collect();
    let texts = clients(world, "redis-benchmark", &args, Duration::from_secs(120))?;
    let mut out = Outcome::default();
    for text in texts {
        let rows = parse_redis(&text)?;
        for (test, metric) in [("GET", Metric::RedisGetRps), ("SET", Metric::RedisSetRps)] {
            let rps = rows
                .get(test)
                .with_context(|| format!("no {test} line in redis-benchmark's output"))?;
            *out.metrics.entry(metric).or_default() += *rps;
        }
    }
    Ok((out, 2.0 * requests as f64))
}

/// `"SET","52910.05",…` lines: test name to requests per second.
pub fn parse_redis(text: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"'))
            .collect();
        if let [name, rps, ..] = fields.as_slice()
            && let Ok(rps) = rps.parse::<f64>()
        {
            rows.insert((*name).to_owned(), rps);
        }
    }
    if rows.is_empty() {
        bail!("no results in redis-benchmark's output: {}", tail(text));
    }
    Ok(rows)
}

/// h2load over HTTP/2 with prior knowledge (an `http://` URL: no upgrade, no TLS), one
/// thread, `H2_CONNECTIONS` × `H2_STREAMS` requests in flight, for `secs`; returns the outcome
/// and the requests that succeeded. h2load prints no percentiles: p99 comes from its
/// per-request log.
fn h2(world: &World, secs: u32, to: SocketAddr) -> anyhow::Result<(Outcome, f64)> {
    let log = world.scratch("h2load-latency.tsv");
    let _ = fs::remove_file(&log);
    let args: Vec<String> = vec![
        "-t1".into(),
        format!("-c{H2_CONNECTIONS}"),
        format!("-m{H2_STREAMS}"),
        "-D".into(),
        secs.to_string(),
        "--log-file".into(),
        log.display().to_string(),
        format!("http://{to}/index.html"),
    ];
    let text = client(
        world,
        "h2load",
        &args,
        Duration::from_secs(secs as u64 + 30),
    )?;
    let h = parse_h2load(&text)?;
    let log_text =
        fs::read_to_string(&log).with_context(|| format!("h2load's log {}", log.display()))?;
    let _ = fs::remove_file(&log);
    let mut out = Outcome::default();
    out.metrics.insert(Metric::H2Rps, h.rps);
    out.metrics.insert(Metric::H2P99Ms, p99_ms(&log_text)?);
    h.note(&mut out);
    Ok((out, h.succeeded as f64))
}

/// `requests` gRPC-shaped calls (POST, `content-type: application/grpc`, `te: trailers`, a
/// length-prefixed message as the body) on one HTTP/2 connection; the backends count what
/// each served. Returns the outcome and the calls that succeeded.
fn grpc(world: &World, requests: u32, to: SocketAddr) -> anyhow::Result<(Outcome, f64)> {
    let before = world.grpc_served()?;
    let args: Vec<String> = vec![
        "-t1".into(),
        "-c1".into(),
        format!("-m{GRPC_STREAMS}"),
        "-n".into(),
        requests.to_string(),
        "-H".into(),
        "content-type: application/grpc".into(),
        "-H".into(),
        "te: trailers".into(),
        "-d".into(),
        world.grpc_message().display().to_string(),
        format!("http://{to}{GRPC_PATH}"),
    ];
    let text = client(world, "h2load", &args, Duration::from_secs(120))?;
    let h = parse_h2load(&text)?;
    // The backends log a call once its response is sent: the last few may still be on the
    // way when the client is done.
    let deadline = Instant::now() + Duration::from_secs(2);
    let counts = loop {
        let after = world.grpc_served()?;
        let counts: Vec<u64> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        if counts.iter().sum::<u64>() >= h.succeeded || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(shares) = report::shares(&counts) else {
        bail!("no backend served a call: {}", tail(&text));
    };
    let even = 1.0 / shares.len() as f64;
    let max = shares.iter().copied().fold(0.0, f64::max);
    let min = shares.iter().copied().fold(1.0, f64::min);
    let mut out = Outcome::default();
    out.metrics.insert(Metric::GrpcRps, h.rps);
    out.metrics.insert(Metric::GrpcMaxShare, max * 100.0);
    out.metrics.insert(Metric::GrpcMinShare, min * 100.0);
    out.metrics.insert(
        Metric::GrpcOffEven,
        (max - even).max(even - min) / even * 100.0,
    );
    h.note(&mut out);
    let served: u64 = counts.iter().sum();
    if served != h.succeeded {
        out.notes.push(format!(
            "the backends counted {served} calls, h2load {} that succeeded",
            h.succeeded
        ));
    }
    out.backend_requests = counts;
    Ok((out, h.succeeded as f64))
}

#[derive(Debug, PartialEq)]
pub struct H2load {
    pub rps: f64,
    pub succeeded: u64,
    /// Failed, errored and timed-out requests.
    pub failed: u64,
    /// Answers other than 2xx.
    pub not_2xx: u64,
}

impl H2load {
    fn note(&self, out: &mut Outcome) {
        if self.failed > 0 || self.not_2xx > 0 {
            out.notes.push(format!(
                "h2load: {} failed, {} answers not 2xx",
                self.failed, self.not_2xx
            ));
        }
    }
}

/// h2load's summary: `finished in 5.00s, 41234.40 req/s, 9.80MB/s`, `requests: … N
/// succeeded, N failed, N errored, N timeout`, `status codes: N 2xx, N 3xx, N 4xx, N 5xx`.
pub fn parse_h2load(text: &str) -> anyhow::Result<H2load> {
    let mut rps = None;
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("finished in ") {
            rps = v
                .split(',')
                .find_map(|f| f.trim().strip_suffix(" req/s")?.parse::<f64>().ok());
        } else if let Some(v) = line
            .strip_prefix("requests:")
            .or_else(|| line.strip_prefix("status codes:"))
        {
            for f in v.split(',') {
                let mut w = f.split_whitespace();
                if let (Some(n), Some(what)) = (w.next(), w.next())
                    && let Ok(n) = n.parse()
                {
                    counts.insert(what, n);
                }
            }
        }
    }
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    Ok(H2load {
        rps: rps.with_context(|| format!("no req/s in h2load's output: {}", tail(text)))?,
        succeeded: *counts
            .get("succeeded")
            .context("no succeeded count in h2load's output")?,
        failed: get("failed") + get("errored") + get("timeout"),
        not_2xx: get("3xx") + get("4xx") + get("5xx"),
    })
}

/// The 99th percentile of h2load's `--log-file` (tab-separated: start in µs since the epoch,
/// status, µs to the end of the response), in milliseconds.
pub fn p99_ms(log: &str) -> anyhow::Result<f64> {
    let mut us: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if us.is_empty() {
        bail!("h2load's log holds no requests");
    }
    us.sort_unstable();
    let at = (us.len() * 99).div_ceil(100).saturating_sub(1);
    Ok(us[at] as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let text = "Running 5s test @ http://10.77.0.11:80/index.html
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   474.12us  101.22us   3.09ms   85.73%
    Req/Sec    66.92k     3.36k   71.38k    74.00%
  Latency Distribution
     50%  460.00us
     75%  510.00us
     90%  580.00us
     99%    1.81ms
  333000 requests in 5.00s, 80.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  66600.00
Transfer/sec:     16.00MB";
        let w = parse_wrk(text).expect("parses");
        assert_eq!(w.rps, 66600.0);
        assert_eq!(w.requests, 333000.0);
        assert!((w.p50_ms - 0.46).abs() < 1e-9);
        assert!((w.p99_ms - 1.81).abs() < 1e-9);
        assert_eq!(
            w.errors,
            WrkErrors {
                connect: 0,
                read: 2,
                write: 0,
                timeout: 1,
                non_2xx: 4
            }
        );
        assert_eq!(w.errors.total(), 7);
    }

    #[test]
    fn reads_wrk_socket_errors_by_name_and_refuses_what_it_cannot_read() {
        let mut e = WrkErrors::default();
        e.read_socket_errors(" connect 3, read 12, write 1, timeout 40")
            .expect("parses");
        assert_eq!((e.connect, e.read, e.write, e.timeout), (3, 12, 1, 40));
        // By name, whatever the order.
        let mut e = WrkErrors::default();
        e.read_socket_errors("timeout 2, connect 1")
            .expect("parses");
        assert_eq!((e.connect, e.timeout, e.total()), (1, 2, 3));
        for bad in ["connect x, read 0", "connect, read 0", "reset 1", "read -1"] {
            assert!(
                WrkErrors::default().read_socket_errors(bad).is_err(),
                "{bad:?}"
            );
        }
        // No error lines at all: wrk saw none.
        let clean = "  1000 requests in 1.00s, 1.00MB read
     50%  460.00us
     99%    1.81ms
Requests/sec:   1000.00";
        assert_eq!(parse_wrk(clean).expect("parses").errors.total(), 0);
        let garbled = format!("{clean}\n  Non-2xx or 3xx responses: many");
        assert!(parse_wrk(&garbled).is_err());
    }

    #[test]
    fn reads_redis_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"49504.95\",\"0.543\"\n\"GET\",\"51020.41\",\"0.501\"\n";
        let rows = parse_redis(text).expect("parses");
        assert_eq!(rows["SET"], 49504.95);
        assert_eq!(rows["GET"], 51020.41);
    }

    #[test]
    fn each_part_runs_its_paths_and_the_wrk_cases_serve_both() {
        let all = Workload::KeepAlive.paths(Part::All);
        assert_eq!(all.len(), Path::L4.len() + 3, "{all:?}");
        assert_eq!(&all[..Path::L4.len()], &Path::L4);
        assert_eq!(Workload::Close.paths(Part::Http), Path::HTTP);
        assert_eq!(Workload::KeepAlive.paths(Part::L4), Path::L4);
        assert!(Workload::Iperf1.paths(Part::Http).is_empty());
        assert!(Workload::H2.paths(Part::L4).is_empty());
        assert_eq!(Workload::Grpc.paths(Part::All), [Path::Http, Path::Proxy]);
        assert_eq!(Workload::H2.paths(Part::All), Path::HTTP);
    }

    #[test]
    fn reads_h2load() {
        let text = "starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Main benchmark duration is started for thread #0.
finished in 5.00s, 41234.40 req/s, 9.80MB/s
requests: 206172 total, 206204 started, 206172 done, 206170 succeeded, 1 failed, 1 errored, 0 timeout
status codes: 206170 2xx, 0 3xx, 2 4xx, 0 5xx
traffic: 49.02MB (51398240) total, 2.56MB (2681468) headers (space savings 90.12%), 25.17MB (26390016) data
                     min         max         mean         sd        +/- sd
time for request:      127us     12.96ms       741us       313us    77.12%";
        let h = parse_h2load(text).expect("parses");
        assert_eq!(
            h,
            H2load {
                rps: 41234.4,
                succeeded: 206170,
                failed: 2,
                not_2xx: 2
            }
        );
        let mut log = String::new();
        for i in 1..=200u64 {
            log.push_str(&format!("1700000000000000\t200\t{}\n", i * 10));
        }
        // 200 requests: the 198th smallest is the 99th percentile.
        assert!((p99_ms(&log).unwrap() - 1.98).abs() < 1e-9);
        assert!(p99_ms("").is_err());
    }

    #[test]
    fn reads_iperf3_json_and_errors() {
        let ok = "{\n \"end\": {\"sum_received\": {\"bytes\": 1000, \"bits_per_second\": 8e9}}\n}";
        assert_eq!(parse_iperf3(ok).expect("parses"), (8e9, 1000.0));
        let err = "{\"error\": \"unable to connect to server\"}";
        assert!(parse_iperf3(err).is_err());
    }
}
