//! HTTP-mode test pieces: `sy-http` backends beside each backend's `sy-probe` (HTTP/1.1 and
//! h2c on [`HTTP_PORT`]), and curl run from a pod inside the steered cgroup.

use std::{collections::BTreeMap, net::SocketAddr, process::Command, time::Duration};

use crate::{Process, Topology, process::Place};

pub const HTTP_PORT: u16 = 8081;

/// One `sy-http` per backend namespace of a topology, named as the topology names them.
pub struct HttpBackends(pub Vec<Option<Process>>);

impl HttpBackends {
    pub fn start(topo: &Topology) -> anyhow::Result<Self> {
        let mut all = Vec::new();
        for i in 0..topo.backend_ns.len() {
            all.push(Some(start(topo, i)?));
        }
        Ok(HttpBackends(all))
    }

    /// Backend `i`'s HTTP address.
    pub fn addr(topo: &Topology, i: usize) -> SocketAddr {
        SocketAddr::new(topo.backend(i, false).ip(), HTTP_PORT)
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.0[i].take() {
            p.kill();
        }
    }

    /// Whether backend `i` is still running.
    pub fn running(&mut self, i: usize) -> bool {
        self.0[i]
            .as_mut()
            .is_some_and(|p| p.wait_exit(Duration::from_millis(1)).is_err())
    }
}

fn start(topo: &Topology, i: usize) -> anyhow::Result<Process> {
    let mut cmd = Command::new(crate::binary("SY_HTTP_BIN", "sy-http"));
    cmd.args(["--name", &Topology::backend_name(i)]);
    cmd.args(["--listen", &HttpBackends::addr(topo, i).to_string()]);
    let mut p = Process::spawn(
        &format!("sy-http {i}"),
        cmd,
        Place {
            netns: Some(&topo.backend_ns[i]),
            cgroup: None,
        },
    )?;
    p.wait_for("listening", Duration::from_secs(10))?;
    Ok(p)
}

/// Runs a command from pod `pod`, steered, to its end: its exit success and what it printed.
pub fn run_in_pod(
    topo: &Topology,
    pod: usize,
    program: &str,
    args: &[&str],
) -> anyhow::Result<(bool, Vec<String>)> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let place = Place {
        netns: Some(&topo.pods[pod]),
        cgroup: Some(topo.pods_cgroup.as_path()),
    };
    let mut p = Process::spawn(program, cmd, place)?;
    let status = p.wait_exit(Duration::from_secs(60))?;
    Ok((status.success(), p.output()))
}

/// `curl -s` from pod 0, steered; fails unless curl succeeds.
pub fn curl(topo: &Topology, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    let (ok, out) = run_in_pod(topo, 0, "curl", &all)?;
    anyhow::ensure!(ok, "curl {args:?} failed: {}", out.join("\n"));
    Ok(out)
}

/// How often each backend name appears among `lines` (the first line of every sy-http body).
pub fn backends_seen(lines: &[String]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for l in lines.iter().filter(|l| l.starts_with("backend-")) {
        *seen.entry(l.clone()).or_default() += 1;
    }
    seen
}

/// The port `sy-grpc serve` listens on in each backend namespace.
pub const GRPC_PORT: u16 = 50051;

/// How one `sy-grpc` backend behaves.
#[derive(Clone, Copy, Default)]
pub struct GrpcFlags {
    /// Answers every `Who` with `UNAVAILABLE`.
    pub unavailable: bool,
    /// Served through hyper without tonic's server: the client's deadline is not enforced here.
    pub no_deadline: bool,
}

/// One `sy-grpc serve` per backend namespace (tonic's server), named as the topology names them.
pub struct GrpcBackends(pub Vec<Option<Process>>);

impl GrpcBackends {
    pub fn start(topo: &Topology, flags: &[GrpcFlags]) -> anyhow::Result<Self> {
        let mut all = Vec::new();
        for i in 0..topo.backend_ns.len() {
            let f = flags.get(i).copied().unwrap_or_default();
            let mut cmd = Command::new(crate::binary("SY_GRPC_BIN", "sy-grpc"));
            cmd.args(["serve", "--name", &Topology::backend_name(i)]);
            cmd.args(["--listen", &Self::addr(topo, i).to_string()]);
            if f.unavailable {
                cmd.arg("--unavailable");
            }
            if f.no_deadline {
                cmd.arg("--no-deadline");
            }
            let mut p = Process::spawn(
                &format!("sy-grpc {i}"),
                cmd,
                Place {
                    netns: Some(&topo.backend_ns[i]),
                    cgroup: None,
                },
            )?;
            p.wait_for("listening", Duration::from_secs(10))?;
            all.push(Some(p));
        }
        Ok(GrpcBackends(all))
    }

    /// Backend `i`'s gRPC address.
    pub fn addr(topo: &Topology, i: usize) -> SocketAddr {
        SocketAddr::new(topo.backend(i, false).ip(), GRPC_PORT)
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.0[i].take() {
            p.kill();
        }
    }
}

/// `sy-grpc call --target http://VIP ARGS…` from pod 0, steered: the tonic client's lines.
pub fn grpc_call(topo: &Topology, vip: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let target = format!("http://{vip}");
    let mut all = vec!["call", "--target", &target];
    all.extend_from_slice(args);
    let bin = crate::binary("SY_GRPC_BIN", "sy-grpc");
    let (ok, out) = run_in_pod(topo, 0, &bin.to_string_lossy(), &all)?;
    anyhow::ensure!(ok, "sy-grpc call {args:?} failed: {}", out.join("\n"));
    Ok(out)
}

/// A `grpc-timeout` value (`digits` then `H M S m u n`) in whole milliseconds.
pub fn grpc_timeout_ms(v: &str) -> Option<u64> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => n * 3_600_000,
        "M" => n * 60_000,
        "S" => n * 1000,
        "m" => n,
        "u" => n / 1000,
        "n" => n / 1_000_000,
        _ => return None,
    })
}
