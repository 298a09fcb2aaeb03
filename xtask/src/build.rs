//! Running cargo for the workspace, with aya-build's chatter filtered out.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::setup::path_with_cargo_bin;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A cargo command in the workspace, with bpf-linker on PATH.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args)
        .current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin());
    cmd
}

/// Runs cargo, dropping aya-build's forwarded lines (`warning: switchyard@…: …`, about 50 a
/// build) so that real warnings stay visible; on failure everything is shown.
pub fn run_filtered(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut dropped = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.starts_with("warning: switchyard@") {
            dropped.push(line);
        } else {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        for line in dropped {
            eprintln!("{line}");
        }
        bail!("{what} failed");
    }
    Ok(())
}

/// Builds the agent (eBPF included) and the probe the tests and demo use.
pub fn agent(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "-p", "switchyard", "-p", "switchyard-testkit"];
    if release {
        args.push("--release");
    }
    run_filtered(cargo(&args), "cargo build")
}

/// `cargo test …` with the debug agent and probe the integration tests run (built by
/// [`agent`]): the tests take them from these variables.
pub fn cargo_test(args: &[&str]) -> Command {
    let mut cmd = cargo(args);
    cmd.env("SWITCHYARD_BIN", binary("switchyard", false))
        .env("SY_PROBE_BIN", binary("sy-probe", false))
        .env("SY_HTTP_BIN", binary("sy-http", false))
        .env("SY_GRPC_BIN", binary("sy-grpc", false));
    cmd
}

pub fn binary(name: &str, release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join(name)
}
