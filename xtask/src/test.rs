//! `cargo xtask test`: the whole suite, as CI runs it.

use std::time::Instant;

use anyhow::bail;

use crate::{
    build::{self, cargo, run_filtered},
    setup,
};

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run(setup::Needs::Test)?;

    step("rustfmt");
    let ok = cargo(&["fmt", "--all", "--", "--check"])
        .status()?
        .success();
    if !ok {
        bail!("cargo fmt --check: run `cargo fmt --all`");
    }

    step("clippy (host crates)");
    run_filtered(
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]),
        "cargo clippy",
    )?;
    step("clippy (eBPF crate, BPF target)");
    // As aya-template does: the eBPF crate is linted for its own target with nightly, in a
    // target directory of its own so the two toolchains do not rebuild each other's artifacts.
    let ebpf_target = build::target_dir().join("ebpf-clippy");
    let ebpf_target = ebpf_target.to_string_lossy();
    run_filtered(
        cargo(&[
            "+nightly",
            "clippy",
            "-p",
            "switchyard-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            &ebpf_target,
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy (eBPF)",
    )?;

    step("build");
    build::agent(false)?;

    step("tests");
    let args = test_args(extra);
    let ok = build::cargo_test(&args).status()?.success();
    println!("xtask test: {:.0?} in all", started.elapsed());
    if !ok {
        bail!("tests failed");
    }
    Ok(())
}

/// `cargo test` with the caller's arguments, going on past a failing test binary: one failure
/// must not hide the others (cargo still prints each binary's `test result:` line and exits
/// non-zero when any failed).
fn test_args(extra: &[String]) -> Vec<&str> {
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(
        extra
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "--no-fail-fast"),
    );
    args
}

fn step(what: &str) {
    println!("== {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_binary_runs_even_when_one_fails() {
        assert_eq!(test_args(&[]), ["test", "--no-fail-fast"]);
        let extra = [
            "--test".to_owned(),
            "api".to_owned(),
            "--no-fail-fast".to_owned(),
        ];
        assert_eq!(
            test_args(&extra),
            ["test", "--no-fail-fast", "--test", "api"]
        );
    }
}
