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
/// limits no higher than the session's own (raising them is not permitted here). Its
/// containers go under a cgroup parent of this test's, removed afterwards (runc cannot run
/// without cgroups, and podman's default parent would stay behind in every hierarchy).
fn podman(parent: &str) -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c.args(["run", "--cgroup-parent", parent]);
    c
}

/// Removes the test's cgroup parent from every cgroup hierarchy podman made it in.
struct CgroupParent(String);

/// Removes an empty cgroup tree, deepest first (cgroup directories hold only pseudo-files).
fn remove_tree(dir: &std::path::Path) -> std::io::Result<()> {
    for child in std::fs::read_dir(dir)?.flatten() {
        if child.path().is_dir() {
            remove_tree(&child.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || (f[2] != "cgroup" && f[2] != "cgroup2") {
                continue;
            }
            let dir = std::path::Path::new(f[1]).join(&self.0);
            // podman's monitor (in `<parent>/conmon/…`) may take a moment to exit.
            let mut tries = 0;
            while dir.exists() {
                match remove_tree(&dir) {
                    Ok(()) => break,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(e) => {
                        eprintln!("warning: rmdir {}: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }
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
    let parent = CgroupParent(unique("sy-test-image-"));
    let version = run(podman(&parent.0).args([
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
    let no_shell = run(podman(&parent.0).args([
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
