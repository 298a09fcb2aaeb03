//! `cargo xtask soak`: the fault-injection suite (`tests/tests/faults.rs`) longer and larger
//! than in `cargo xtask test`: 30 s of load per scenario and 10,000 idle connections by
//! default, the whole run bounded by `--minutes`. Each scenario appends its report to
//! `target/soak/report.jsonl`; the summary table is read back from there. Then every fuzz
//! target runs for a minute (`cargo xtask fuzz`).

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    build::{self, cargo, run_filtered},
    setup,
};

/// The scenarios the suite has; a missing report counts as a failure.
const SCENARIOS: usize = 6;
/// Fixed costs of the whole suite beyond its loads (worlds, agent starts, etcd, opening
/// thousands of connections), measured at about a minute on 2 cores: budgeted generously.
const OVERHEAD: f64 = 120.0;
/// How long each fuzz target runs after the fault scenarios.
const FUZZ_SECONDS: u64 = 60;
/// Past the bound, this much more before the run is cut off.
const GRACE: Duration = Duration::from_secs(300);

pub fn run(minutes: f64, idle: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run(setup::Needs::Test)?;
    build::agent(false)?;
    run_filtered(
        cargo(&[
            "test",
            "-p",
            "switchyard-testkit",
            "--test",
            "faults",
            "--no-run",
        ]),
        "cargo test --no-run (faults)",
    )?;

    // Six scenarios share what the bound leaves after the fixed costs; 30 s each at most.
    let seconds = ((minutes * 60.0 - OVERHEAD) / SCENARIOS as f64).clamp(3.0, 30.0);
    let report = build::target_dir().join("soak").join("report.jsonl");
    if let Some(dir) = report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&report);
    println!(
        "== soak: {SCENARIOS} fault scenarios, {seconds:.0} s of load each, {idle} idle \
         connections, bound {minutes} min; reports in {}",
        report.display()
    );

    let mut cmd = build::cargo_test(&[
        "test",
        "-p",
        "switchyard-testkit",
        "--test",
        "faults",
        "--",
        "--test-threads=1",
    ]);
    cmd.env("SY_FAULT_SECONDS", format!("{seconds}"))
        .env("SY_IDLE_CONNECTIONS", idle.to_string())
        .env("SY_FAULT_REPORT", &report)
        // A group of its own: on overrun it is ended as a whole, and only it.
        .process_group(0);
    let bound = Duration::from_secs_f64(minutes * 60.0);
    let child = cmd.spawn().context("run the faults tests")?;
    let ok = wait_bounded(child, bound + GRACE)?;
    let took = started.elapsed();

    let (rows, all_passed) = summary(&report)?;
    println!("\n{rows}");
    println!("xtask soak: {:.0?} in all (bound {minutes} min)", took);

    // The fuzz targets, a minute each (not part of the bound: it is the fault suite's).
    let fuzzed = crate::fuzz::run(FUZZ_SECONDS, None);
    if let Err(e) = &fuzzed {
        eprintln!("soak: {e:#}");
    }
    if !ok || !all_passed {
        bail!("soak failed (see the table and the test output above)");
    }
    if took > bound {
        bail!("soak passed but took {took:.0?}, over its bound of {minutes} min");
    }
    fuzzed
}

/// Waits for the tests; past `limit` the process group is killed (its namespaces and cgroups
/// may then be left behind: `switchyard cleanup` and `ip netns` remove them).
fn wait_bounded(mut child: Child, limit: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            eprintln!("soak: still running after {limit:.0?}: ending its process group");
            // SAFETY: signalling the process group we created for our own child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The table of scenario reports, and whether every expected scenario passed.
fn summary(path: &Path) -> anyhow::Result<(String, bool)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let reports: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut out = format!(
        "{:<18} {:>8} {:>7} {:>8}  {:<6} rule\n",
        "scenario", "sent", "failed", "corrupt", "result"
    );
    let mut passed = 0;
    for r in &reports {
        let pass = r["pass"].as_bool().unwrap_or(false);
        passed += usize::from(pass);
        out += &format!(
            "{:<18} {:>8} {:>7} {:>8}  {:<6} {}\n",
            r["scenario"].as_str().unwrap_or("?"),
            r["sent"],
            r["failed"],
            r["corrupt"],
            if pass { "PASS" } else { "FAIL" },
            r["rule"].as_str().unwrap_or("")
        );
        if let Some(extra) = r["extra"].as_object() {
            let shown: Vec<String> = extra
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k} {s}"),
                    v => format!("{k} {v}"),
                })
                .collect();
            out += &format!("{:<18} {}\n", "", shown.join(", "));
        }
        if let Some(broken) = r["broken"].as_array().filter(|b| !b.is_empty()) {
            out += &format!("{:<18} broken: {broken:?}\n", "");
        }
    }
    if reports.len() < SCENARIOS {
        out += &format!(
            "{} of {SCENARIOS} scenarios reported (the others failed before reporting)\n",
            reports.len()
        );
    }
    Ok((out, passed == SCENARIOS && reports.len() == SCENARIOS))
}
