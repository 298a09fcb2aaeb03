//! The agent's container image: `deploy/image.sh` stages the binary and the libraries it links
//! and builds `Containerfile` (FROM scratch) with podman; the image then runs the binary.
//!
//! The binary packaged is the one the tests run (`SWITCHYARD_BIN`, a debug build), not a
//! release build: what is checked is that the image has everything the binary needs to start
//! (loader, libraries) and nothing else. Without podman, or where podman cannot build here,
//! the test says SKIPPED loudly; under `CI=true` it fails instead.

use std::process::Command;

use switchyard_testkit::{binary, unique};

/// Runs a command; its stdout, or why not.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn skip(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}, and CI must build the image");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// podman as these machines need it: runc (crun refuses hybrid cgroup hosts), cgroupfs, and
/// limits no higher than the session's own (raising them is not permitted here).
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

#[test]
fn the_image_builds_from_scratch_and_runs_the_agent() {
    let test = "the_image_builds_from_scratch_and_runs_the_agent";
    if let Err(e) = run(Command::new("podman").arg("--version")) {
        return skip(test, &format!("podman cannot run ({e})"));
    }
    let bin = binary("SWITCHYARD_BIN", "switchyard");
    assert!(bin.exists(), "no agent binary at {}", bin.display());
    let tag = format!("localhost/{}:test", unique("switchyard-image-"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/image.sh");
    let built = run(Command::new("sh")
        .arg(script)
        .arg(&tag)
        .env("SWITCHYARD_IMAGE_BIN", &bin)
        .env("CONTAINER_TOOL", "podman"));
    let built = match built {
        Ok(out) => out,
        Err(e) if e.contains("permission denied") || e.contains("not permitted") => {
            return skip(test, &format!("podman cannot build here: {e}"));
        }
        Err(e) => panic!("image build failed: {e}"),
    };
    assert!(built.contains(&format!("built {tag}")), "{built}");

    // The image holds the binary, its libraries, and nothing else a shell would need.
    let version = run(podman().args([
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &tag,
        "--version",
    ]));
    let no_shell = run(podman().args([
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "true",
    ]));
    let _ = run(Command::new("podman").args(["rmi", "-f", &tag]));
    let version = version.unwrap_or_else(|e| panic!("the image does not run the agent: {e}"));
    assert!(version.starts_with("switchyard "), "{version}");
    assert!(no_shell.is_err(), "the image has a shell");
}
