//! The test world: a node namespace with a bridge, pods and backends joined to it.
//!
//! ```text
//!   pod ns (10.77.0.2+)  ──veth──┐
//!                                ├── br0 10.77.0.1 / fd77::1 (node ns: the agent runs here)
//!   backend ns (10.77.0.11+) ────┘     backends: sy-probe serve on :8080 (tcp, udp)
//! ```
//! No namespace has a default route: service addresses are reachable only through the hooks.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use crate::{Cgroup, Netns, Process, process::Place, unique};

pub const BACKEND_PORT: u16 = 8080;
pub const FORWARDER_PORT: u16 = 15001;
/// The agent's metrics port on the node address.
pub const METRICS_PORT: u16 = 9479;
/// Each backend's slow sink (reads 1 MB/s): for backpressure tests.
pub const SINK_PORT: u16 = 9090;

/// The agent's directories for one world: `pins` (a bpffs the agent mounts) and `state` (its
/// last-known-good). On drop, `switchyard cleanup` empties and unmounts the pins, whatever state
/// the agent left them in, and the rest is removed.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn pins(&self) -> PathBuf {
        self.root.join("pins")
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.pins().exists() {
            let out = Command::new(crate::binary("SWITCHYARD_BIN", "switchyard"))
                .arg("cleanup")
                .arg("--pin-dir")
                .arg(self.pins())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!("warning: cleanup: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => eprintln!("warning: cleanup: {e}"),
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Fields drop in order: pinned programs, processes, then namespaces, then cgroups.
pub struct Topology {
    /// The agent's pin and state directories for this world, cleaned up on drop.
    pub run: RunDir,
    pub backends: Vec<Option<Process>>,
    pub pods: Vec<Netns>,
    pub backend_ns: Vec<Netns>,
    pub node: Netns,
    /// The steered processes' cgroup (the agent attaches here).
    pub pods_cgroup: PathBuf,
    /// The agent's own cgroup.
    pub agent_cgroup: PathBuf,
    pub cgroup: Cgroup,
}

/// How many times each backend (or error) answered.
pub type Tally = BTreeMap<String, usize>;

fn v4(host: u8) -> IpAddr {
    IpAddr::from([10, 77, 0, host])
}

fn v6(host: u8) -> IpAddr {
    IpAddr::from([0xfd77, 0, 0, 0, 0, 0, 0, host as u16])
}

impl Topology {
    /// `pods` client namespaces and `backends` backend namespaces, each backend serving.
    pub fn new(pods: usize, backends: usize) -> anyhow::Result<Self> {
        let mut cgroup = Cgroup::create(&unique("sy-test-"))?;
        let pods_cgroup = cgroup.child("pods")?;
        let agent_cgroup = cgroup.child("agent")?;
        let node = Netns::create(&unique("sy-node-"))?;
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"])?;
        node.ip(&["-6", "addr", "add", "fd77::1/64", "dev", "br0", "nodad"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        let mut topo = Topology {
            run: RunDir {
                root: PathBuf::from("/run/switchyard-test").join(unique("w")),
            },
            backends: Vec::new(),
            pods: Vec::new(),
            backend_ns: Vec::new(),
            node,
            pods_cgroup,
            agent_cgroup,
            cgroup,
        };
        for i in 0..pods {
            let ns = Netns::create(&unique("sy-pod-"))?;
            topo.join(&ns, &format!("p{i}"), 2 + i as u8)?;
            topo.pods.push(ns);
        }
        for i in 0..backends {
            let ns = Netns::create(&unique("sy-be-"))?;
            topo.join(&ns, &format!("b{i}"), 11 + i as u8)?;
            topo.backend_ns.push(ns);
        }
        for i in 0..backends {
            let p = topo.start_backend(i)?;
            topo.backends.push(Some(p));
        }
        Ok(topo)
    }

    fn join(&self, ns: &Netns, port: &str, host: u8) -> anyhow::Result<()> {
        let peer = ns.name();
        self.node.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", peer,
        ])?;
        self.node
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{}/24", v4(host)), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", v6(host)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn backend_name(i: usize) -> String {
        format!("backend-{}", i + 1)
    }

    fn start_backend(&self, i: usize) -> anyhow::Result<Process> {
        self.start_backend_with(i, &[])
    }

    fn start_backend_with(&self, i: usize, extra: &[&str]) -> anyhow::Result<Process> {
        let host = 11 + i as u8;
        let mut cmd = Command::new(crate::binary("SY_PROBE_BIN", "sy-probe"));
        cmd.args(["serve", "--name", &Self::backend_name(i)]);
        cmd.args(["--sink", &SocketAddr::new(v4(host), SINK_PORT).to_string()]);
        cmd.args(extra);
        for ip in [v4(host), v6(host)] {
            let a = SocketAddr::new(ip, BACKEND_PORT).to_string();
            cmd.args(["--tcp", &a, "--udp", &a]);
        }
        let mut p = Process::spawn(
            &Self::backend_name(i),
            cmd,
            Place {
                netns: Some(&self.backend_ns[i]),
                cgroup: None,
            },
        )?;
        p.wait_for("listening", Duration::from_secs(10))?;
        Ok(p)
    }

    /// Backend `i`'s address (IPv4, or IPv6 with `v6`).
    pub fn backend(&self, i: usize, ipv6: bool) -> SocketAddr {
        let host = 11 + i as u8;
        SocketAddr::new(if ipv6 { v6(host) } else { v4(host) }, BACKEND_PORT)
    }

    /// The node address the forwarder listens on.
    pub fn forwarder(&self, ipv6: bool) -> SocketAddr {
        SocketAddr::new(if ipv6 { v6(1) } else { v4(1) }, FORWARDER_PORT)
    }

    pub fn kill_backend(&mut self, i: usize) {
        if let Some(mut p) = self.backends[i].take() {
            p.kill();
        }
    }

    pub fn restart_backend(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart_backend_with(i, &[])
    }

    /// Restarts backend `i` with extra `sy-probe serve` arguments (e.g. `--delay-ms 200`).
    pub fn restart_backend_with(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.kill_backend(i);
        self.backends[i] = Some(self.start_backend_with(i, extra)?);
        Ok(())
    }

    /// Runs `sy-probe <args>` from pod `pod` inside the steered cgroup, without waiting.
    pub fn probe(&self, pod: usize, args: &[&str]) -> anyhow::Result<Process> {
        let mut cmd = Command::new(crate::binary("SY_PROBE_BIN", "sy-probe"));
        cmd.args(args);
        let place = Place {
            netns: Some(&self.pods[pod]),
            cgroup: Some(self.pods_cgroup.as_path()),
        };
        Process::spawn("sy-probe", cmd, place)
    }

    /// Runs `sy-probe <args>` from pod `pod` (steered) to completion; returns what it printed.
    pub fn probe_output(&self, pod: usize, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut p = self.probe(pod, args)?;
        let status = p.wait_exit(Duration::from_secs(120))?;
        anyhow::ensure!(
            status.success(),
            "sy-probe {args:?} failed: {}",
            p.output().join("\n")
        );
        Ok(p.output())
    }

    /// An agent config for this world: attach to the pods' cgroup, forward on the node
    /// addresses, then the given `[[service]]` tables.
    pub fn agent_config(&self, services: &str) -> String {
        let cgroup = self.cgroup.relative(&self.pods_cgroup);
        format!(
            "[datapath]\ncgroup = {:?}\nkernel_log = \"debug\"\npin_dir = {:?}\n\n\
             [registry]\nstate_dir = {:?}\n\n\
             [api]\nsocket = {:?}\n\n[metrics]\nlisten = \"{}\"\n\n\
             [forwarder]\nlisten = [\"{}\", \"{}\"]\n\n{services}",
            cgroup.display().to_string(),
            self.run.pins().display().to_string(),
            self.run.state().display().to_string(),
            self.api_socket().display().to_string(),
            self.metrics(),
            self.forwarder(false),
            self.forwarder(true),
        )
    }

    /// The agent's API socket in this world (`[api] socket`).
    pub fn api_socket(&self) -> PathBuf {
        self.run.root.join("api.sock")
    }

    /// Where the agent serves metrics (`[metrics] listen`): the node address, inside the node
    /// namespace (reach it from there: [`Netns::enter`], or a process placed there).
    pub fn metrics(&self) -> SocketAddr {
        SocketAddr::new(v4(1), METRICS_PORT)
    }

    /// Asks `count` connections of `to` from pod 0 (steered, 1 s client timeout) again and
    /// again until `want` holds; fails with the last tally after `limit`. Every test that waits
    /// for a change to reach the datapath waits this way, on the condition itself.
    pub fn wait_until(
        &self,
        to: SocketAddr,
        count: usize,
        limit: Duration,
        what: &str,
        want: impl Fn(&Tally) -> bool,
    ) -> anyhow::Result<Tally> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let tally = self.ask_with(0, to, count, true, &["--timeout-ms", "1000"])?;
            if want(&tally) {
                return Ok(tally);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{to}: not {what} within {limit:?}: {tally:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `sy-probe ask` from pod `pod`, inside the steered cgroup.
    pub fn ask(&self, pod: usize, to: SocketAddr, count: usize) -> anyhow::Result<Tally> {
        self.ask_with(pod, to, count, true, &[])
    }

    /// `sy-probe ask` from pod `pod`, outside the steered cgroup.
    pub fn ask_outside(&self, pod: usize, to: SocketAddr, count: usize) -> anyhow::Result<Tally> {
        self.ask_with(pod, to, count, false, &[])
    }

    pub fn ask_with(
        &self,
        pod: usize,
        to: SocketAddr,
        count: usize,
        steered: bool,
        extra: &[&str],
    ) -> anyhow::Result<Tally> {
        let cgroup = steered.then_some(self.pods_cgroup.as_path());
        self.ask_in(pod, cgroup, to, count, extra)
    }

    /// `sy-probe ask` from pod `pod`, in `cgroup` (none: the test's own).
    pub fn ask_in(
        &self,
        pod: usize,
        cgroup: Option<&std::path::Path>,
        to: SocketAddr,
        count: usize,
        extra: &[&str],
    ) -> anyhow::Result<Tally> {
        let mut cmd = Command::new(crate::binary("SY_PROBE_BIN", "sy-probe"));
        cmd.args([
            "ask",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
        ]);
        cmd.args(extra);
        let place = Place {
            netns: Some(&self.pods[pod]),
            cgroup,
        };
        let mut p = Process::spawn("sy-probe ask", cmd, place)?;
        let status = p.wait_exit(Duration::from_secs(120))?;
        anyhow::ensure!(
            status.success(),
            "sy-probe ask failed: {}",
            p.output().join("\n")
        );
        let mut tally = Tally::new();
        for line in p.output() {
            // `NAME COUNT` lines; anything else (`peer ADDR`) is kept whole with count 0.
            match line.rsplit_once(' ').map(|(k, v)| (k, v.parse())) {
                Some((k, Ok(n))) => tally.insert(k.to_owned(), n),
                _ => tally.insert(line, 0),
            };
        }
        Ok(tally)
    }
}
