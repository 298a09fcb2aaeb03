//! `cargo xtask fuzz`: each fuzz target of `fuzz/` under libFuzzer (cargo-fuzz, nightly) for a
//! while, starting from its committed seeds (`fuzz/seeds/<target>/`). Inputs it finds go to
//! `target/fuzz/corpus/<target>/` (so the committed seeds stay small), crashes and timeouts to
//! `target/fuzz/artifacts/<target>/`; a crash becomes a seed (and a fix) by hand.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{
    build::{self, workspace_root},
    setup,
};

/// The targets: the files of `fuzz/fuzz_targets/`.
pub fn targets() -> anyhow::Result<Vec<String>> {
    let dir = workspace_root().join("fuzz").join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `cargo +nightly fuzz …` for this workspace's fuzz crate, in a target directory of its own
/// (the instrumented build shares nothing with the test build). The agent's eBPF programs are
/// not built for it (`AYA_BUILD_SKIP`): the targets only call parsers.
fn cargo_fuzz(args: &[&str]) -> Command {
    let target_dir = fuzz_dir().join("build");
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"])
        .args(args)
        .arg("--fuzz-dir")
        .arg(workspace_root().join("fuzz"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin())
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn fuzz_dir() -> PathBuf {
    build::target_dir().join("fuzz")
}

/// Runs every target (or `only`) for `seconds` each; fails if any crashed.
pub fn run(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    setup::cargo_fuzz()?;
    let all = targets()?;
    let chosen: Vec<&String> = match only {
        Some(t) => {
            let found: Vec<&String> = all.iter().filter(|n| *n == t).collect();
            if found.is_empty() {
                bail!("no fuzz target {t:?}; there are: {}", all.join(", "));
            }
            found
        }
        None => all.iter().collect(),
    };
    println!(
        "== fuzz: building {} targets (nightly, libFuzzer, address sanitizer)",
        chosen.len()
    );
    let ok = cargo_fuzz(&["build"])
        .status()
        .context("cargo fuzz build")?
        .success();
    if !ok {
        bail!("cargo fuzz build failed");
    }
    let mut crashed = Vec::new();
    for name in chosen {
        let corpus = fuzz_dir().join("corpus").join(name);
        let artifacts = fuzz_dir().join("artifacts").join(name);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = workspace_root().join("fuzz").join("seeds").join(name);
        println!("== fuzz {name}: {seconds} s");
        let started = Instant::now();
        let status = cargo_fuzz(&["run", name])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes seconds is a bug here (unbounded work), as is one that takes
            // a gigabyte.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=1024")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .status()
            .with_context(|| format!("cargo fuzz run {name}"))?;
        println!(
            "fuzz {name}: {} after {:.0?}",
            if status.success() { "clean" } else { "FAILED" },
            started.elapsed()
        );
        if !status.success() {
            crashed.push(format!("{name} (see {})", artifacts.display()));
        }
    }
    // The instrumented build is several GB of its own: say where, so it can go when done.
    let build = fuzz_dir().join("build");
    if let Ok(out) = Command::new("du").arg("-sh").arg(&build).output() {
        let size = String::from_utf8_lossy(&out.stdout);
        let size = size.split_whitespace().next().unwrap_or("?");
        println!(
            "fuzz: the instrumented build is {} ({size}); `rm -rf` it when done, the next run \
             builds it again",
            build.display()
        );
    }
    if !crashed.is_empty() {
        bail!("fuzz targets failed: {}", crashed.join(", "));
    }
    Ok(())
}
