//! The fault-injection suite's harness: a steady load with checked payloads ([`Load`]), many
//! held connections ([`Idle`]), what a scenario counted and the rule it is judged by
//! ([`Report`]), and the few `/proc` readings the scenarios need.
//!
//! Every scenario prints one line (`fault NAME: sent … failed … corrupt … | rule: … | PASS`)
//! and, when `SY_FAULT_REPORT` names a file, appends the same as a JSON line there (`cargo
//! xtask soak` reads it back for its table).

use std::{fs, io::Write as _, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{Process, Topology, unique};

/// Seconds of steady load per scenario: `SY_FAULT_SECONDS`, default 3 (the fast part).
pub fn load_seconds() -> f64 {
    env_number("SY_FAULT_SECONDS", 3.0).max(1.0)
}

/// Idle connections the concurrency scenario holds: `SY_IDLE_CONNECTIONS`, default 2,000
/// (the soak holds 10,000).
pub fn idle_connections() -> usize {
    env_number("SY_IDLE_CONNECTIONS", 2000.0).max(1.0) as usize
}

fn env_number(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `sy-probe` stamps its failures with.
pub fn monotonic_ns() -> u128 {
    // SAFETY: clock_gettime fills the timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// One failed request of a load, as `sy-probe load` printed it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub start_ns: u128,
    pub end_ns: u128,
    pub kind: String,
}

/// What a finished load counted.
#[derive(Debug, Clone, Default)]
pub struct LoadCounts {
    pub sent: u64,
    pub ok: u64,
    /// Requests that failed or came back short (data lost), corrupt ones not included.
    pub failed: u64,
    /// Requests whose echo differed from what was sent.
    pub corrupt: u64,
    pub failures: Vec<Failure>,
    /// When the last successful request ended (0: none did).
    pub last_ok_ns: u128,
}

impl LoadCounts {
    /// Failures of requests started after `ns`.
    pub fn failed_after(&self, ns: u128) -> u64 {
        self.failures
            .iter()
            .filter(|f| f.start_ns > ns && f.kind != "corrupt")
            .count() as u64
    }

    /// The first few failure kinds, for a report.
    pub fn first_errors(&self) -> String {
        let mut kinds: Vec<&str> = Vec::new();
        for f in &self.failures {
            if !kinds.contains(&f.kind.as_str()) {
                kinds.push(&f.kind);
            }
        }
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.into_iter().take(4).collect::<Vec<_>>().join(",")
        }
    }

    fn parse(lines: &[String]) -> anyhow::Result<Self> {
        let mut counts = LoadCounts::default();
        let mut summary = false;
        for line in lines {
            if let Some(rest) = line.strip_prefix("fail ") {
                let f = fields(rest);
                counts.failures.push(Failure {
                    start_ns: number(&f, "start_ns")?,
                    end_ns: number(&f, "end_ns")?,
                    kind: f
                        .iter()
                        .find(|(k, _)| *k == "kind")
                        .map_or("?", |(_, v)| v)
                        .to_owned(),
                });
            } else if let Some(rest) = line.strip_prefix("load ") {
                let f = fields(rest);
                counts.sent = number(&f, "sent")?;
                counts.ok = number(&f, "ok")?;
                counts.failed = number(&f, "failed")?;
                counts.corrupt = number(&f, "corrupt")?;
                counts.last_ok_ns = number(&f, "last_ok_ns")?;
                summary = true;
            }
        }
        anyhow::ensure!(summary, "no load summary in {lines:?}");
        Ok(counts)
    }
}

fn fields(s: &str) -> Vec<(&str, &str)> {
    s.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

fn number<T: std::str::FromStr>(f: &[(&str, &str)], key: &str) -> anyhow::Result<T> {
    f.iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no number {key} in {f:?}"))
}

/// A file whose appearance tells a probe to stop (or release); removed on drop.
struct Signal(PathBuf);

impl Signal {
    fn new(what: &str) -> Self {
        Signal(std::env::temp_dir().join(unique(&format!("sy-{what}-"))))
    }

    fn raise(&self) -> anyhow::Result<()> {
        fs::write(&self.0, b"").with_context(|| format!("write {}", self.0.display()))
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A running `sy-probe load` from a pod (steered).
pub struct Load {
    process: Process,
    stop: Signal,
    seconds: f64,
}

impl Load {
    /// Starts a load on `to` that runs for `seconds` unless stopped earlier; `extra` are more
    /// `sy-probe load` arguments (`--rate`, `--clients`, …).
    pub fn start(
        topo: &Topology,
        pod: usize,
        to: SocketAddr,
        seconds: f64,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let stop = Signal::new("stop");
        let (to, secs, file) = (
            to.to_string(),
            format!("{seconds}"),
            stop.0.display().to_string(),
        );
        let mut args = vec![
            "load",
            "--to",
            &to,
            "--seconds",
            &secs,
            "--stop-file",
            &file,
        ];
        args.extend_from_slice(extra);
        let process = topo.probe(pod, &args)?;
        Ok(Load {
            process,
            stop,
            seconds,
        })
    }

    /// Stops the load now (each loop ends after its request in flight).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.stop.raise()
    }

    /// Waits for the load to end and reads its counts.
    pub fn finish(mut self) -> anyhow::Result<LoadCounts> {
        let limit = Duration::from_secs_f64(self.seconds) + Duration::from_secs(60);
        let status = self.process.wait_exit(limit)?;
        let out = self.process.output();
        anyhow::ensure!(status.success(), "sy-probe load failed: {}", out.join("\n"));
        LoadCounts::parse(&out)
    }

    /// Stops the load and reads its counts.
    pub fn stop_and_finish(self) -> anyhow::Result<LoadCounts> {
        self.stop()?;
        self.finish()
    }
}

/// What `sy-probe idle` counted, at opening and at the check.
#[derive(Debug, Clone, Default)]
pub struct IdleCounts {
    pub opened: u64,
    pub failed: u64,
    pub first_error: String,
}

/// `sy-probe idle` from a pod: connections held open until [`Idle::release`].
pub struct Idle {
    process: Process,
    release: Signal,
    pub opening: IdleCounts,
}

impl Idle {
    /// Opens up to `count` connections to `to` and waits until the probe says how many it
    /// holds. `extra`: more `sy-probe idle` arguments (`--give-up`, `--timeout-ms`).
    pub fn open(
        topo: &Topology,
        pod: usize,
        to: SocketAddr,
        count: usize,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let release = Signal::new("release");
        let (to, n, file) = (
            to.to_string(),
            count.to_string(),
            release.0.display().to_string(),
        );
        let mut args = vec!["idle", "--to", &to, "--count", &n, "--release", &file];
        args.extend_from_slice(extra);
        let mut process = topo.probe(pod, &args)?;
        // Generous: opening is sequential, and failures may each wait out a timeout.
        let limit = Duration::from_secs(120) + Duration::from_millis(20 * count as u64);
        process.wait_for("idle opened=", limit)?;
        let opening = idle_line(&process.output(), "idle opened=")?;
        Ok(Idle {
            process,
            release,
            opening,
        })
    }

    /// Releases the connections: each is checked with a payload and its echo, then closed.
    /// Returns (checked, ok, failed, corrupt) as counts.
    pub fn release(mut self) -> anyhow::Result<IdleCheck> {
        self.release.raise()?;
        let limit = Duration::from_secs(120) + Duration::from_millis(5 * self.opening.opened);
        let status = self.process.wait_exit(limit)?;
        let out = self.process.output();
        anyhow::ensure!(status.success(), "sy-probe idle failed: {}", out.join("\n"));
        let line = out
            .iter()
            .find_map(|l| l.strip_prefix("idle checked="))
            .with_context(|| format!("no idle check in {out:?}"))?;
        let f = fields(line);
        let checked = line
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("idle checked")?;
        Ok(IdleCheck {
            checked,
            ok: number(&f, "ok")?,
            failed: number(&f, "failed")?,
            corrupt: number(&f, "corrupt")?,
            first_error: f
                .iter()
                .find(|(k, _)| *k == "first_error")
                .map_or("?", |(_, v)| v)
                .to_owned(),
        })
    }
}

/// The check of held connections on release.
#[derive(Debug, Clone, Default)]
pub struct IdleCheck {
    pub checked: u64,
    pub ok: u64,
    pub failed: u64,
    pub corrupt: u64,
    pub first_error: String,
}

fn idle_line(out: &[String], prefix: &str) -> anyhow::Result<IdleCounts> {
    let line = out
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .with_context(|| format!("no {prefix:?} in {out:?}"))?;
    let f = fields(line);
    Ok(IdleCounts {
        opened: line
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("idle opened")?,
        failed: number(&f, "failed")?,
        first_error: f
            .iter()
            .find(|(k, _)| *k == "first_error")
            .map_or("?", |(_, v)| v)
            .to_owned(),
    })
}

/// `sy-probe streams` from a pod: long-lived connections that keep exchanging checked chunks.
pub struct Streams {
    process: Process,
    seconds: f64,
    pub opened: u64,
}

/// What the streams came to.
#[derive(Debug, Clone, Default)]
pub struct StreamCounts {
    pub opened: u64,
    /// Streams asked for: opened or failed to open.
    pub started: u64,
    pub ok: u64,
    pub failed: u64,
    pub corrupt: u64,
    /// How each failed stream ended (`failed-echo-reset`, …).
    pub failures: Vec<String>,
}

impl Streams {
    /// Opens `count` streams to `to` that talk for `seconds`; returns once they are open.
    pub fn open(
        topo: &Topology,
        pod: usize,
        to: SocketAddr,
        count: usize,
        seconds: f64,
    ) -> anyhow::Result<Self> {
        let (to, n, secs) = (to.to_string(), count.to_string(), format!("{seconds}"));
        let args = ["streams", "--to", &to, "--count", &n, "--seconds", &secs];
        let mut process = topo.probe(pod, &args)?;
        process.wait_for("streams opened=", Duration::from_secs(60))?;
        let line = process
            .output()
            .iter()
            .find_map(|l| l.strip_prefix("streams opened=").map(str::to_owned))
            .context("streams opened")?;
        let opened = line
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("streams opened")?;
        Ok(Streams {
            process,
            seconds,
            opened,
        })
    }

    /// Waits for every stream to end and reads how each did.
    pub fn finish(mut self) -> anyhow::Result<StreamCounts> {
        let limit = Duration::from_secs_f64(self.seconds) + Duration::from_secs(60);
        let status = self.process.wait_exit(limit)?;
        let out = self.process.output();
        anyhow::ensure!(
            status.success(),
            "sy-probe streams failed: {}",
            out.join("\n")
        );
        let line = out
            .iter()
            .find_map(|l| l.strip_prefix("streams done="))
            .with_context(|| format!("no streams summary in {out:?}"))?;
        let f = fields(line);
        Ok(StreamCounts {
            opened: self.opened,
            started: line
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .context("streams done")?,
            ok: number(&f, "ok")?,
            failed: number(&f, "failed")?,
            corrupt: number(&f, "corrupt")?,
            failures: out
                .iter()
                .filter_map(|l| l.strip_prefix("stream "))
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|w| w.starts_with("failed"))
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// One scenario's result: what it counted, the rule it is judged by, and the verdict.
pub struct Report {
    scenario: String,
    sent: u64,
    failed: u64,
    corrupt: u64,
    /// Scenario-specific numbers, in the order added.
    extra: Vec<(String, Value)>,
    rule: String,
    /// The parts of the rule that did not hold.
    broken: Vec<String>,
}

impl Report {
    /// A report for `scenario`, judged by `rule` (written out, as it will be printed).
    pub fn new(scenario: &str, rule: &str) -> Self {
        Report {
            scenario: scenario.to_owned(),
            sent: 0,
            failed: 0,
            corrupt: 0,
            extra: Vec::new(),
            rule: rule.to_owned(),
            broken: Vec::new(),
        }
    }

    /// Adds a load's requests to the report's totals.
    pub fn add_load(&mut self, load: &LoadCounts) {
        self.sent += load.sent;
        self.failed += load.failed;
        self.corrupt += load.corrupt;
    }

    /// Adds held connections to the totals (each counts as a request, sent and checked).
    pub fn add_idle(&mut self, check: &IdleCheck) {
        self.sent += check.checked;
        self.failed += check.failed;
        self.corrupt += check.corrupt;
    }

    /// Adds long-lived streams to the totals (each counts as a request).
    pub fn add_streams(&mut self, streams: &StreamCounts) {
        self.sent += streams.started;
        self.failed += streams.failed;
        self.corrupt += streams.corrupt;
    }

    /// Records a scenario-specific number or fact.
    pub fn note(&mut self, key: &str, value: impl Into<Value>) {
        self.extra.push((key.to_owned(), value.into()));
    }

    /// One part of the rule: `holds`, or `what` is recorded as broken.
    pub fn check(&mut self, holds: bool, what: impl Into<String>) {
        if !holds {
            self.broken.push(what.into());
        }
    }

    pub fn corrupt(&self) -> u64 {
        self.corrupt
    }

    pub fn passed(&self) -> bool {
        self.broken.is_empty()
    }

    /// The one printed line.
    pub fn line(&self) -> String {
        let extra: Vec<String> = self
            .extra
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k} {s}"),
                v => format!("{k} {v}"),
            })
            .collect();
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(" ({})", extra.join(", "))
        };
        let verdict = if self.passed() {
            "PASS".to_owned()
        } else {
            format!("FAIL: {}", self.broken.join("; "))
        };
        format!(
            "fault {}: sent {} failed {} corrupt {}{extra} | rule: {} | {verdict}",
            self.scenario, self.sent, self.failed, self.corrupt, self.rule
        )
    }

    fn json(&self) -> Value {
        let extra: serde_json::Map<String, Value> = self.extra.iter().cloned().collect();
        json!({
            "scenario": self.scenario,
            "sent": self.sent,
            "failed": self.failed,
            "corrupt": self.corrupt,
            "extra": extra,
            "rule": self.rule,
            "pass": self.passed(),
            "broken": self.broken,
        })
    }

    /// Prints the line, appends the JSON line to `SY_FAULT_REPORT` if set, and fails when the
    /// rule did not hold.
    pub fn finish(self) -> anyhow::Result<()> {
        let line = self.line();
        println!("{line}");
        eprintln!("{line}");
        if let Some(path) = std::env::var_os("SY_FAULT_REPORT") {
            let path = PathBuf::from(path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            writeln!(file, "{}", self.json())?;
        }
        if !self.passed() {
            bail!("{line}");
        }
        Ok(())
    }
}

/// The process's CPU time so far (user + system), from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ) in stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let sticks: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks + sticks) as f64 / hz)
}

/// How many descriptors the process has open.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Whether the process is still there and not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Sets a running process's RLIMIT_NOFILE (soft and hard) with util-linux `prlimit`.
pub fn set_nofile(pid: u32, limit: u64) -> anyhow::Result<()> {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .context("run prlimit (util-linux)")?;
    anyhow::ensure!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Raises this process's RLIMIT_NOFILE toward `want`, so that what it starts (agent, backends,
/// probes) inherit room for thousands of connections: the hard limit too where allowed
/// (CAP_SYS_RESOURCE), else the soft limit up to the hard one. Returns the soft limit reached.
pub fn raise_own_nofile(want: u64) -> anyhow::Result<u64> {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let wider = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wider) } == 0 {
        return Ok(want);
    }
    // No privilege over the hard limit (a container without CAP_SYS_RESOURCE): up to it.
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        bail!(
            "setrlimit RLIMIT_NOFILE to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(lim.rlim_max)
}
