//! The benchmark's world: the testkit's topology, real backends in it, the agent, and the two
//! peers it is measured against (each once in TCP mode and once in HTTP mode), all listening on
//! addresses inside namespaces the run made.
//!
//! ```text
//!   pod ns 10.77.0.2 (clients, core 0, in the steered cgroup)
//!     │  direct ─────────────────────────────────────────────► backend ns 10.77.0.11..13
//!     │  kernel-mode VIP 10.96.0.1x/4x/5x ─ connect() rewritten ►  nginx :80, h2c :81 (backend 1)
//!     │  proxy-mode VIP 10.96.0.2x ──► agent 10.77.0.1:15001 ─►   iperf3 -s :5201 (backend 1)
//!     │  HTTP-mode VIP 10.96.0.6x ───► (the same forwarder) ──►   redis-server :6379 (all three)
//!     │  HAProxy tcp, http 10.77.0.1:180xx ───────────────────►   nginx gRPC h2c :50051 (all three)
//!     └  nginx stream, http 10.77.0.1:180xx ──────────────────►   nginx :82 (all three, killed once)
//!                        node ns (proxies on core 1)      (backends on core 1 too)
//! ```
//!
//! Every process is a testkit `Process` (or `Agent`) guard, so it is ended by its PID, and the
//! fields drop in order: proxies, agent, backends, then namespaces and cgroups, then the
//! config directory.

use std::{
    fmt::Write as _,
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path as FsPath, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use switchyard_testkit::{Agent, Netns, Process, Topology, process::Place, unique};

use super::Path;

/// Cores on a 2-core machine: the load generator gets one to itself, the proxy under test the
/// other; backends are left to the scheduler (see docs/benchmarks.md).
pub const CLIENT_CPU: &str = "0";
pub const PROXY_CPU: usize = 1;

const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// How long a server may take to start listening.
const START: Duration = Duration::from_secs(15);

/// What a client talks to; each has its own backends, service addresses and peer ports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Service {
    /// HTTP/1.1 (nginx).
    Http,
    Iperf,
    Redis,
    /// HTTP/2 with prior knowledge (the same nginx on a cleartext `http2` listener).
    H2,
    /// gRPC-shaped calls over HTTP/2 (three nginx, one per backend, counting what they serve).
    Grpc,
    /// HTTP/1.1 to three nginx of its own, one of which the backend-kill case kills: no other
    /// case's backend is ever touched.
    Failover,
}

impl Service {
    /// The services of the L4 cases: TCP-mode peers and every agent path serve them.
    pub const L4: [Service; 3] = [Service::Http, Service::Iperf, Service::Redis];
    pub const ALL: [Service; 6] = [
        Service::Http,
        Service::Iperf,
        Service::Redis,
        Service::H2,
        Service::Grpc,
        Service::Failover,
    ];

    fn name(self) -> &'static str {
        match self {
            Service::Http => "http",
            Service::Iperf => "iperf",
            Service::Redis => "redis",
            Service::H2 => "h2",
            Service::Grpc => "grpc",
            Service::Failover => "failover",
        }
    }

    fn backend_port(self) -> u16 {
        match self {
            Service::Http => 80,
            Service::Iperf => 5201,
            Service::Redis => 6379,
            Service::H2 => 81,
            Service::Grpc => 50051,
            Service::Failover => 82,
        }
    }

    /// iperf3 serves one test at a time and a test's control and data connections must all
    /// reach the same server, so it gets one backend; HTTP (both versions) gets one so that
    /// the direct case talks to exactly the server the proxies do; redis shows balancing over
    /// three, gRPC the share of one connection's calls each of three got; the backend-kill case
    /// needs two left standing when one dies.
    fn backends(self) -> usize {
        match self {
            Service::Http | Service::Iperf | Service::H2 => 1,
            Service::Redis | Service::Grpc | Service::Failover => 3,
        }
    }

    fn index(self) -> u8 {
        match self {
            Service::Http => 0,
            Service::Iperf => 1,
            Service::Redis => 2,
            Service::H2 => 3,
            Service::Grpc => 4,
            Service::Failover => 5,
        }
    }

    /// The agent's paths to this service: every L4 one for the L4 services, HTTP mode for
    /// the HTTP ones (and the L4 proxy path beside it).
    fn agent_paths(self) -> &'static [Path] {
        match self {
            Service::Http => &[
                Path::Kernel,
                Path::KernelLeastConn,
                Path::KernelPeakEwma,
                Path::Proxy,
                Path::ProxyCopy,
                Path::Http,
            ],
            Service::Iperf | Service::Redis => &[
                Path::Kernel,
                Path::KernelLeastConn,
                Path::KernelPeakEwma,
                Path::Proxy,
                Path::ProxyCopy,
            ],
            Service::H2 | Service::Grpc => &[Path::Proxy, Path::Http],
            Service::Failover => &[Path::Http],
        }
    }

    /// The service address of one of the agent's paths.
    fn vip(self, path: Path) -> SocketAddr {
        let base: u8 = match path {
            Path::Kernel => 10,
            Path::ProxyCopy => 30,
            Path::KernelLeastConn => 40,
            Path::KernelPeakEwma => 50,
            Path::Http => 60,
            _ => 20,
        };
        SocketAddr::from(([10, 96, 0, base + self.index()], self.backend_port()))
    }

    /// HAProxy and nginx listen on the node address, like the forwarder.
    fn peer(self, path: Path) -> SocketAddr {
        let port = match (self, path) {
            (Service::Http, Path::Nginx) => 18081,
            (Service::Iperf, Path::Nginx) => 18202,
            (Service::Redis, Path::Nginx) => 18380,
            (Service::Http, Path::HaproxyHttp) => 18090,
            (Service::H2, Path::HaproxyHttp) => 18091,
            (Service::Failover, Path::HaproxyHttp) => 18092,
            (Service::Http, Path::NginxHttp) => 18093,
            (Service::H2, Path::NginxHttp) => 18094,
            (Service::Http, _) => 18080,
            (Service::Iperf, _) => 18201,
            (Service::Redis, _) => 18379,
            // No peer serves these (the gRPC case runs over the agent only, the backend-kill case
            // over the agent and HAProxy http): nothing listens.
            (Service::H2 | Service::Grpc | Service::Failover, _) => 18099,
        };
        SocketAddr::from(([10, 77, 0, 1], port))
    }
}

/// A directory for config files, pid files and logs, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(unique("sy-bench-"));
        fs::create_dir_all(&p).with_context(|| format!("mkdir {}", p.display()))?;
        Ok(TempDir(p))
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.0.join(name);
        fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Fields drop top to bottom: see the module doc.
pub struct World {
    pub haproxy: Process,
    pub nginx: Process,
    /// HAProxy `mode http` and nginx `http`: processes of their own, with their own configs.
    pub haproxy_http: Process,
    pub nginx_http: Process,
    pub agent: Agent,
    /// Backends, held for their guards.
    _servers: Vec<Process>,
    /// The backend-kill case's backends; `None` while one is killed.
    failover: Vec<Option<Process>>,
    /// Each gRPC backend's log, one line per call served.
    grpc_logs: Vec<PathBuf>,
    /// The body of every gRPC call: one length-prefixed message.
    grpc_message: PathBuf,
    pub topo: Topology,
    /// Configs, pid files and logs, held for its guard.
    dir: TempDir,
}

impl World {
    pub fn start() -> anyhow::Result<World> {
        let dir = TempDir::new()?;
        let topo = Topology::new(1, 3)?;
        for ns in [&topo.node, &topo.pods[0]] {
            tune(ns)?;
        }
        let mut servers = Vec::new();
        servers.push(backend_nginx(&topo, &dir)?);
        servers.push(iperf3_server(&topo)?);
        for i in 0..Service::Redis.backends() {
            servers.push(redis_server(&topo, &dir, i)?);
        }
        let mut grpc_logs = Vec::new();
        for i in 0..Service::Grpc.backends() {
            let (p, log) = grpc_backend(&topo, &dir, i)?;
            servers.push(p);
            grpc_logs.push(log);
        }
        let mut failover = Vec::new();
        for i in 0..Service::Failover.backends() {
            failover.push(Some(failover_backend(&topo, &dir, i)?));
        }
        // Field 1 (bytes) of 14 bytes, behind gRPC's prefix: not compressed, 16 bytes long.
        let mut message = vec![0u8, 0, 0, 0, 16, 0x0a, 14];
        message.extend_from_slice(b"switchyard-rpc");
        let grpc_message = dir.0.join("grpc-message.bin");
        fs::write(&grpc_message, &message)
            .with_context(|| format!("write {}", grpc_message.display()))?;
        let agent = start_agent(&topo)?;
        let haproxy = haproxy(&topo, &dir)?;
        let nginx = nginx_stream(&topo, &dir)?;
        let haproxy_http = haproxy_http(&topo, &dir)?;
        let nginx_http = nginx_http(&topo, &dir)?;
        Ok(World {
            haproxy,
            nginx,
            haproxy_http,
            nginx_http,
            agent,
            _servers: servers,
            failover,
            grpc_logs,
            grpc_message,
            topo,
            dir,
        })
    }

    /// A file in the run's own directory, for a client's output (removed with the run).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// The body every gRPC call sends.
    pub fn grpc_message(&self) -> &FsPath {
        &self.grpc_message
    }

    /// Calls each gRPC backend has served since it started, in the service's order.
    pub fn grpc_served(&self) -> anyhow::Result<Vec<u64>> {
        self.grpc_logs
            .iter()
            .map(|p| {
                let text = fs::read(p).with_context(|| format!("read {}", p.display()))?;
                Ok(text.iter().filter(|b| **b == b'\n').count() as u64)
            })
            .collect()
    }

    /// Backend `i` of the backend-kill case's service.
    pub fn failover_backend(&self, i: usize) -> SocketAddr {
        backend(&self.topo, i, Service::Failover)
    }

    /// Kills backend `i` of the backend-kill case with SIGKILL, by the PID this world started
    /// it under (and reaps it), so its listening socket goes with it; returns that PID.
    pub fn kill_failover_backend(&mut self, i: usize) -> anyhow::Result<u32> {
        let mut p = self
            .failover
            .get_mut(i)
            .and_then(Option::take)
            .with_context(|| format!("backend-kill case: no running backend {}", i + 1))?;
        let pid = p.pid();
        p.kill();
        Ok(pid)
    }

    /// Whether backend `i`'s address refuses a connection now (from its own namespace): the
    /// kill took the listening socket, not only the process.
    pub fn failover_refuses(&self, i: usize) -> bool {
        let addr = self.failover_backend(i);
        self.topo.backend_ns[i]
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .is_ok_and(|r| r.is_err())
    }

    /// Starts again every backend-kill backend that was killed, and waits until it listens.
    pub fn restore_failover(&mut self) -> anyhow::Result<()> {
        for i in 0..self.failover.len() {
            if self.failover[i].is_none() {
                self.failover[i] = Some(failover_backend(&self.topo, &self.dir, i)?);
            }
        }
        Ok(())
    }

    /// Where a client on `path` connects for `service`: one address, but every backend's for
    /// the direct path (the client then spreads its connections over them, as a balancer would).
    pub fn targets(&self, path: Path, service: Service) -> Vec<SocketAddr> {
        match path {
            Path::Direct => backends(&self.topo, service),
            Path::Kernel
            | Path::KernelLeastConn
            | Path::KernelPeakEwma
            | Path::Proxy
            | Path::ProxyCopy
            | Path::Http => vec![service.vip(path)],
            Path::Haproxy | Path::Nginx | Path::HaproxyHttp | Path::NginxHttp => {
                vec![service.peer(path)]
            }
        }
    }

    /// The HTTP backend every wrk case reaches (nginx, backend 1).
    pub fn http_backend_pid(&self) -> u32 {
        self._servers[0].pid()
    }

    /// The process that carries `path`'s bytes, if any: its CPU and memory are the cost.
    /// Kernel mode names the agent, to show that it does no work per connection.
    pub fn proxy_pid(&self, path: Path) -> Option<u32> {
        match path {
            Path::Direct => None,
            Path::Kernel
            | Path::KernelLeastConn
            | Path::KernelPeakEwma
            | Path::Proxy
            | Path::ProxyCopy
            | Path::Http => Some(self.agent.process.pid()),
            Path::Haproxy => Some(self.haproxy.pid()),
            Path::Nginx => Some(self.nginx.pid()),
            Path::HaproxyHttp => Some(self.haproxy_http.pid()),
            Path::NginxHttp => Some(self.nginx_http.pid()),
        }
    }

    /// Starts a client in the pod, inside the steered cgroup (non-VIP destinations pass the
    /// hooks untouched, so every path pays the same hook cost), pinned to the client core.
    pub fn client(&self, name: &str, program: &str, args: &[String]) -> anyhow::Result<Process> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", CLIENT_CPU, program]).args(args);
        Process::spawn(
            name,
            cmd,
            Place {
                netns: Some(&self.topo.pods[0]),
                cgroup: Some(&self.topo.pods_cgroup),
            },
        )
    }
}

fn backend(topo: &Topology, i: usize, service: Service) -> SocketAddr {
    SocketAddr::new(topo.backend(i, false).ip(), service.backend_port())
}

fn backends(topo: &Topology, service: Service) -> Vec<SocketAddr> {
    (0..service.backends())
        .map(|i| backend(topo, i, service))
        .collect()
}

/// Room for tens of thousands of short connections a second: a wide ephemeral range, and
/// reuse of ports whose last connection is in TIME_WAIT. Only in the run's own namespaces.
fn tune(ns: &Netns) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sysctl", "-q", "-w"])
        .args([
            "net.ipv4.ip_local_port_range=20000 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ])
        .output()
        .context("cannot run sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits until `addr` accepts a TCP connection from `ns`; fails early if `p` exits.
fn wait_listening(ns: &Netns, addr: SocketAddr, p: &mut Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + START;
    loop {
        let up = ns.enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)))?;
        if up.is_ok() {
            return Ok(());
        }
        if let Ok(status) = p.wait_exit(Duration::ZERO) {
            bail!("exited ({status}): {}", p.output().join("\n"));
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr} after {START:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `program` under `taskset` on the proxy core. The backends live there for every path, so
/// direct and kernel mode differ only in the address the client connects to; left to the
/// scheduler, a backend could share the client's core in one case and not in the next (kernel
/// mode came out up to 1.43× direct on iperf3, see docs/benchmarks.md).
fn on_proxy_core(program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", &PROXY_CPU.to_string(), program]);
    c
}

fn in_ns(ns: &Netns) -> Place<'_> {
    Place {
        netns: Some(ns),
        cgroup: None,
    }
}

/// nginx serving one small static file, the HTTP backend of every path: HTTP/1.1 on port 80,
/// HTTP/2 with prior knowledge on 81 (nginx 1.22 speaks only HTTP/2 on a cleartext `listen
/// … http2`, with no upgrade from HTTP/1.1, which is h2c as h2load and the proxies send it).
/// One process (`master_process off`) so that its guard's PID is all there is to end.
fn backend_nginx(topo: &Topology, dir: &TempDir) -> anyhow::Result<Process> {
    let addr = backend(topo, 0, Service::Http);
    let h2 = backend(topo, 0, Service::H2);
    let root = dir.0.join("www");
    fs::create_dir_all(&root)?;
    // 128 bytes: a small response, so the figures are about connections and requests.
    let body = format!("{:<127}\n", "switchyard bench backend");
    fs::write(root.join("index.html"), body)?;
    let d = dir.0.display();
    let conf = dir.write(
        "nginx-backend.conf",
        &format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {d}/nginx-backend.pid;\nerror_log {d}/nginx-backend.log warn;\n\
             events {{ worker_connections {MAX_CONNECTIONS}; }}\n\
             http {{\n  access_log off;\n  default_type text/plain;\n\
             \x20 keepalive_requests 1000000000;\n  keepalive_timeout 120s;\n{}\
             \x20 server {{ listen {addr} backlog=4096; root {root}; }}\n\
             \x20 server {{ listen {h2} http2 backlog=4096; root {root}; }}\n}}\n",
            temp_paths(dir, "backend"),
            root = root.display()
        ),
    )?;
    let mut p = nginx(
        &conf,
        dir,
        "nginx-backend",
        Some(PROXY_CPU),
        &topo.backend_ns[0],
    )?;
    wait_listening(&topo.backend_ns[0], addr, &mut p).context("backend nginx")?;
    wait_listening(&topo.backend_ns[0], h2, &mut p).context("backend nginx h2c")?;
    Ok(p)
}

/// nginx's temporary directories for one instance, in the run's directory (the defaults are
/// the system's, shared with any nginx the host runs).
fn temp_paths(dir: &TempDir, name: &str) -> String {
    let d = dir.0.join(format!("tmp-{name}"));
    let d = d.display();
    format!(
        "  client_body_temp_path {d}-body;\n  proxy_temp_path {d}-proxy;\n\
         \x20 fastcgi_temp_path {d}-fastcgi;\n  uwsgi_temp_path {d}-uwsgi;\n\
         \x20 scgi_temp_path {d}-scgi;\n"
    )
}

/// Backend `i` of the backend-kill case: nginx serving the HTTP backend's file on a port of
/// its own (the HTTP backend's `www`, made first), one process so that its PID is the one to
/// kill and its listening socket dies with it.
fn failover_backend(topo: &Topology, dir: &TempDir, i: usize) -> anyhow::Result<Process> {
    let addr = backend(topo, i, Service::Failover);
    let name = format!("nginx-failover-{}", i + 1);
    let root = dir.0.join("www");
    let d = dir.0.display();
    let conf = dir.write(
        &format!("{name}.conf"),
        &format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {d}/{name}.pid;\nerror_log {d}/{name}.log warn;\n\
             events {{ worker_connections {MAX_CONNECTIONS}; }}\n\
             http {{\n  access_log off;\n  default_type text/plain;\n\
             \x20 keepalive_requests 1000000000;\n  keepalive_timeout 120s;\n{}\
             \x20 server {{ listen {addr} backlog=4096; root {}; }}\n}}\n",
            temp_paths(dir, &name),
            root.display()
        ),
    )?;
    let mut p = nginx(&conf, dir, &name, Some(PROXY_CPU), &topo.backend_ns[i])?;
    wait_listening(&topo.backend_ns[i], addr, &mut p).with_context(|| name.clone())?;
    Ok(p)
}

/// gRPC backend `i`: nginx on a cleartext HTTP/2 listener answering every call with `200`,
/// `content-type: application/grpc` and a `grpc-status: 0` trailer, and logging one line
/// per call (the share each backend got is counted here, where the calls land, the same way
/// for every path). The answer's body is a short text, not a decodable message: nothing on
/// the path decodes it.
fn grpc_backend(topo: &Topology, dir: &TempDir, i: usize) -> anyhow::Result<(Process, PathBuf)> {
    let addr = backend(topo, i, Service::Grpc);
    let name = format!("nginx-grpc-{}", i + 1);
    let calls = dir.0.join(format!("{name}-calls.log"));
    let d = dir.0.display();
    let conf = dir.write(
        &format!("{name}.conf"),
        &format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {d}/{name}.pid;\nerror_log {d}/{name}.log warn;\n\
             events {{ worker_connections {MAX_CONNECTIONS}; }}\n\
             http {{\n  log_format calls '$status';\n  access_log {} calls;\n\
             \x20 keepalive_requests 1000000000;\n  keepalive_timeout 120s;\n{}\
             \x20 server {{\n    listen {addr} http2 backlog=4096;\n\
             \x20   location / {{\n      default_type application/grpc;\n\
             \x20     add_trailer grpc-status 0;\n      return 200 \"switchyard\";\n    }}\n  }}\n}}\n",
            calls.display(),
            temp_paths(dir, &name),
        ),
    )?;
    let mut p = nginx(&conf, dir, &name, Some(PROXY_CPU), &topo.backend_ns[i])?;
    wait_listening(&topo.backend_ns[i], addr, &mut p).with_context(|| name.clone())?;
    Ok((p, calls))
}

/// Checks the config with `nginx -t`, then runs it in the foreground in `ns`.
fn nginx(
    conf: &FsPath,
    dir: &TempDir,
    name: &str,
    cpu: Option<usize>,
    ns: &Netns,
) -> anyhow::Result<Process> {
    let log = dir.0.join(format!("{name}.log"));
    let args = |cmd: &mut Command| {
        cmd.arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(&log)
            .arg("-c")
            .arg(conf);
    };
    // In the namespace: `nginx -t` binds the listen addresses, which exist only there.
    let mut check = Command::new("nginx");
    check.arg("-q").arg("-t");
    args(&mut check);
    let mut p = Process::spawn("nginx -t", check, in_ns(ns))?;
    let status = p.wait_exit(START)?;
    if !status.success() {
        bail!("nginx -t {}: {}", conf.display(), p.output().join("\n"));
    }
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), "nginx"]);
            c
        }
        None => Command::new("nginx"),
    };
    args(&mut cmd);
    Process::spawn(name, cmd, in_ns(ns))
}

fn iperf3_server(topo: &Topology) -> anyhow::Result<Process> {
    let addr = backend(topo, 0, Service::Iperf);
    let mut cmd = on_proxy_core("iperf3");
    cmd.args(["-s", "--forceflush", "-B"])
        .arg(addr.ip().to_string())
        .args(["-p", &addr.port().to_string()]);
    // Not probed with a bare connect: iperf3 would take it for a test.
    let mut p = Process::spawn("iperf3 -s", cmd, in_ns(&topo.backend_ns[0]))?;
    p.wait_for("Server listening", START)
        .context("iperf3 server")?;
    Ok(p)
}

fn redis_server(topo: &Topology, dir: &TempDir, i: usize) -> anyhow::Result<Process> {
    let addr = backend(topo, i, Service::Redis);
    let data = dir.0.join(format!("redis-{i}"));
    fs::create_dir_all(&data)?;
    let mut cmd = on_proxy_core("redis-server");
    cmd.args(["--bind", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(["--daemonize", "no", "--dir"])
        .arg(&data);
    let mut p = Process::spawn(
        &format!("redis-server {}", i + 1),
        cmd,
        in_ns(&topo.backend_ns[i]),
    )?;
    p.wait_for("Ready to accept connections", START)
        .context("redis-server")?;
    Ok(p)
}

/// The agent with, for each L4 service, a kernel-mode address for each kernel algorithm and two
/// proxy-mode ones (the default byte path, and `copy`), and for each HTTP service an L4
/// proxy-mode address and an HTTP-mode one (`app_protocol`), over the same backends as the
/// peers. Started with this thread pinned to the proxy core, so the agent inherits it (as
/// under `taskset`) and its runtime sizes itself to that one core.
fn start_agent(topo: &Topology) -> anyhow::Result<Agent> {
    let mut services = String::new();
    for s in Service::ALL {
        let list: Vec<String> = backends(topo, s)
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        for &path in s.agent_paths() {
            let (name, mode, extra) = match path {
                Path::Kernel => ("kernel", "kernel", ""),
                Path::KernelLeastConn => {
                    ("kernel-lc", "kernel", "algorithm = \"least_connections\"\n")
                }
                Path::KernelPeakEwma => ("kernel-ewma", "kernel", "algorithm = \"peak_ewma\"\n"),
                Path::ProxyCopy => ("copy", "proxy", "byte_path = \"copy\"\n"),
                Path::Http if s == Service::Grpc => {
                    ("httpmode", "proxy", "app_protocol = \"grpc\"\n")
                }
                Path::Http => ("httpmode", "proxy", "app_protocol = \"http\"\n"),
                _ => ("proxy", "proxy", ""),
            };
            let _ = write!(
                services,
                "[[service]]\nname = \"{}-{name}\"\nvip = \"{}\"\nmode = \"{mode}\"\n\
                 {extra}backends = [{}]\n\n",
                s.name(),
                s.vip(path),
                list.join(", ")
            );
        }
    }
    // The testkit logs every kernel decision at debug for assertions; a benchmark wants none.
    let config = topo
        .agent_config(&services)
        .replace("kernel_log = \"debug\"", "kernel_log = \"warn\"");
    let _pinned = Pinned::to(PROXY_CPU)?;
    Agent::start(topo, &config)
}

/// This thread's CPU affinity narrowed to one core until dropped; children started meanwhile
/// keep it.
struct Pinned(libc::cpu_set_t);

impl Pinned {
    fn to(cpu: usize) -> anyhow::Result<Pinned> {
        // SAFETY: cpu_set_t is plain data; the calls get valid pointers and its true size.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            let size = size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut old) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
            }
            Ok(Pinned(old))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restoring the mask read in `to`.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// Connection limits of the peers: two descriptors each must fit under the usual 20000-file
/// hard limit (HAProxy refuses to start otherwise); the clients keep 32 open.
const MAX_CONNECTIONS: u32 = 8000;

/// HAProxy in TCP mode, one thread on the proxy core, in the foreground (`-db`) so that its
/// guard owns it. Defaults otherwise, as most deployments run it (no splicing).
fn haproxy(topo: &Topology, dir: &TempDir) -> anyhow::Result<Process> {
    let mut conf = format!(
        "global\n    nbthread 1\n    maxconn {MAX_CONNECTIONS}\n    pidfile {}/haproxy.pid\n\n\
         defaults\n    mode tcp\n    maxconn {MAX_CONNECTIONS}\n    timeout connect 1s\n\
         \x20   timeout client 2m\n    timeout server 2m\n\n",
        dir.0.display()
    );
    for s in Service::L4 {
        let _ = writeln!(
            conf,
            "listen {}\n    bind {}\n    balance roundrobin",
            s.name(),
            s.peer(Path::Haproxy)
        );
        for (i, b) in backends(topo, s).iter().enumerate() {
            let _ = writeln!(conf, "    server b{} {b}", i + 1);
        }
        conf.push('\n');
    }
    start_haproxy(
        topo,
        dir,
        "haproxy",
        &conf,
        Service::Http.peer(Path::Haproxy),
    )
}

/// HAProxy `mode http`, a process of its own beside the TCP one, likewise one thread on the
/// proxy core. `http-reuse always`: an idle server connection serves any request, the first
/// of a client connection included (the default, `safe`, sends each client connection's first
/// request on a connection of its own, so with one request per client connection it would
/// reuse nothing). HTTP/2 from the client (`proto h2`: prior knowledge) goes to the backend's
/// HTTP/2 listener as HTTP/2 (`proto h2` on the server).
///
/// The backend-kill case has a `listen` of its own with HAProxy's retries (`retries 3`,
/// `option redispatch`, `retry-on all-retryable-errors`): there, and not on the `http` and
/// `h2` listeners, so the other cases measure HAProxy as they did before it had one.
fn haproxy_http(topo: &Topology, dir: &TempDir) -> anyhow::Result<Process> {
    let b1 = backend(topo, 0, Service::Http);
    let b1_h2 = backend(topo, 0, Service::H2);
    let mut conf = format!(
        "global\n    nbthread 1\n    maxconn {MAX_CONNECTIONS}\n    pidfile {}/haproxy-http.pid\n\n\
         defaults\n    mode http\n    maxconn {MAX_CONNECTIONS}\n    timeout connect 1s\n\
         \x20   timeout client 2m\n    timeout server 2m\n    http-reuse always\n\n\
         listen http\n    bind {}\n    balance roundrobin\n    server b1 {b1}\n\n\
         listen h2\n    bind {} proto h2\n    balance roundrobin\n    server b1 {b1_h2} proto h2\n\n\
         listen {}\n    bind {}\n    balance roundrobin\n",
        dir.0.display(),
        Service::Http.peer(Path::HaproxyHttp),
        Service::H2.peer(Path::HaproxyHttp),
        Service::Failover.name(),
        Service::Failover.peer(Path::HaproxyHttp),
    );
    for directive in HAPROXY_RETRIES {
        let _ = writeln!(conf, "    {directive}");
    }
    for (i, b) in backends(topo, Service::Failover).iter().enumerate() {
        let _ = writeln!(conf, "    server b{} {b}", i + 1);
    }
    start_haproxy(
        topo,
        dir,
        "haproxy-http",
        &conf,
        Service::Http.peer(Path::HaproxyHttp),
    )
}

/// HAProxy's retries on the backend-kill case's `listen` (named in the case's output too).
pub const HAPROXY_RETRIES: [&str; 3] = [
    "retries 3",
    "option redispatch",
    "retry-on all-retryable-errors",
];

/// Checks `conf` with `haproxy -c`, then runs it in the foreground on the proxy core.
fn start_haproxy(
    topo: &Topology,
    dir: &TempDir,
    name: &str,
    conf: &str,
    probe: SocketAddr,
) -> anyhow::Result<Process> {
    let conf = dir.write(&format!("{name}.cfg"), conf)?;
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(&conf)
        .output()
        .context("cannot run haproxy (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "haproxy -c -f {}: {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &PROXY_CPU.to_string(), "haproxy", "-db", "-f"])
        .arg(&conf);
    let mut p = Process::spawn(name, cmd, in_ns(&topo.node))?;
    wait_listening(&topo.node, probe, &mut p).context(name.to_owned())?;
    Ok(p)
}

/// nginx `http` as a reverse proxy, one process on the proxy core: `proxy_pass` to an
/// upstream with a `keepalive` pool of 64 idle connections (the agent's bound per backend),
/// HTTP/1.1 upstream with the client's `Connection` header dropped, as nginx's documentation
/// asks for keep-alive. HTTP/2 from the client (a cleartext `http2` listener: prior knowledge)
/// goes upstream as HTTP/1.1 too: `proxy_pass` speaks nothing else.
fn nginx_http(topo: &Topology, dir: &TempDir) -> anyhow::Result<Process> {
    let d = dir.0.display();
    let b1 = backend(topo, 0, Service::Http);
    let conf = dir.write(
        "nginx-http.conf",
        &format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {d}/nginx-http.pid;\nerror_log {d}/nginx-http.log warn;\n\
             events {{ worker_connections {MAX_CONNECTIONS}; }}\n\
             http {{\n  access_log off;\n\
             \x20 keepalive_requests 1000000000;\n  keepalive_timeout 120s;\n{}\
             \x20 upstream backend {{\n    server {b1};\n    keepalive 64;\n\
             \x20   keepalive_requests 1000000000;\n    keepalive_timeout 120s;\n  }}\n\
             \x20 server {{\n    listen {} backlog=4096;\n    listen {} http2 backlog=4096;\n\
             \x20   location / {{\n      proxy_pass http://backend;\n\
             \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
             \x20     proxy_connect_timeout 1s;\n    }}\n  }}\n}}\n",
            temp_paths(dir, "http"),
            Service::Http.peer(Path::NginxHttp),
            Service::H2.peer(Path::NginxHttp),
        ),
    )?;
    let mut p = nginx(&conf, dir, "nginx-http", Some(PROXY_CPU), &topo.node)?;
    wait_listening(&topo.node, Service::Http.peer(Path::NginxHttp), &mut p)
        .context("nginx http")?;
    Ok(p)
}

/// nginx `stream`, one process on the proxy core, defaults otherwise.
fn nginx_stream(topo: &Topology, dir: &TempDir) -> anyhow::Result<Process> {
    if !FsPath::new(NGINX_STREAM_MODULE).exists() {
        bail!("{NGINX_STREAM_MODULE} is missing: install libnginx-mod-stream");
    }
    let d = dir.0.display();
    let mut conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\n\
         pid {d}/nginx-stream.pid;\nerror_log {d}/nginx-stream.log warn;\n\
         load_module {NGINX_STREAM_MODULE};\n\
         events {{ worker_connections {MAX_CONNECTIONS}; }}\nstream {{\n"
    );
    for s in Service::L4 {
        let _ = writeln!(conf, "  upstream {} {{", s.name());
        for b in backends(topo, s) {
            let _ = writeln!(conf, "    server {b};");
        }
        let _ = writeln!(
            conf,
            "  }}\n  server {{ listen {} backlog=4096; proxy_pass {}; proxy_connect_timeout 1s; }}",
            s.peer(Path::Nginx),
            s.name()
        );
    }
    conf.push_str("}\n");
    let conf = dir.write("nginx-stream.conf", &conf)?;
    let mut p = nginx(&conf, dir, "nginx-stream", Some(PROXY_CPU), &topo.node)?;
    wait_listening(&topo.node, Service::Http.peer(Path::Nginx), &mut p).context("nginx stream")?;
    Ok(p)
}
