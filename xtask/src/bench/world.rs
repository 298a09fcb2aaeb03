//! The benchmark's world: the testkit's topology, real backends in it, the agent, and the two
//! peers it is measured against, all listening on addresses inside namespaces the run made.
//!
//! ```text
//!   pod ns 10.77.0.2 (clients, core 0, in the steered cgroup)
//!     │  direct ─────────────────────────────────────────────► backend ns 10.77.0.11..13
//!     │  kernel-mode VIP 10.96.0.1x/4x/5x ─ connect() rewritten ►  nginx :80 (backend 1)
//!     │  proxy-mode VIP 10.96.0.2x ──► agent 10.77.0.1:15001 ─►   iperf3 -s :5201 (backend 1)
//!     │  HAProxy 10.77.0.1:18xxx ─────────────────────────────►   redis-server :6379 (all three)
//!     └  nginx stream 10.77.0.1:18xxx ────────────────────────►
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
    Http,
    Iperf,
    Redis,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Http, Service::Iperf, Service::Redis];

    fn name(self) -> &'static str {
        match self {
            Service::Http => "http",
            Service::Iperf => "iperf",
            Service::Redis => "redis",
        }
    }

    fn backend_port(self) -> u16 {
        match self {
            Service::Http => 80,
            Service::Iperf => 5201,
            Service::Redis => 6379,
        }
    }

    /// iperf3 serves one test at a time and a test's control and data connections must all
    /// reach the same server, so it gets one backend; HTTP gets one so that the direct case
    /// talks to exactly the server the proxies do; redis shows balancing over three.
    fn backends(self) -> usize {
        match self {
            Service::Http | Service::Iperf => 1,
            Service::Redis => 3,
        }
    }

    fn index(self) -> u8 {
        match self {
            Service::Http => 0,
            Service::Iperf => 1,
            Service::Redis => 2,
        }
    }

    /// The service address of one of the agent's paths.
    fn vip(self, path: Path) -> SocketAddr {
        let base: u8 = match path {
            Path::Kernel => 10,
            Path::ProxyCopy => 30,
            Path::KernelLeastConn => 40,
            Path::KernelPeakEwma => 50,
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
            (Service::Http, _) => 18080,
            (Service::Iperf, _) => 18201,
            (Service::Redis, _) => 18379,
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
    pub agent: Agent,
    /// Backends, held for their guards.
    _servers: Vec<Process>,
    pub topo: Topology,
    /// Configs, pid files and logs, held for its guard.
    _dir: TempDir,
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
        let agent = start_agent(&topo)?;
        let haproxy = haproxy(&topo, &dir)?;
        let nginx = nginx_stream(&topo, &dir)?;
        Ok(World {
            haproxy,
            nginx,
            agent,
            _servers: servers,
            topo,
            _dir: dir,
        })
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
            | Path::ProxyCopy => vec![service.vip(path)],
            Path::Haproxy | Path::Nginx => vec![service.peer(path)],
        }
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
            | Path::ProxyCopy => Some(self.agent.process.pid()),
            Path::Haproxy => Some(self.haproxy.pid()),
            Path::Nginx => Some(self.nginx.pid()),
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

/// nginx serving one small static file, the HTTP backend of every path. One process
/// (`master_process off`) so that its guard's PID is all there is to end.
fn backend_nginx(topo: &Topology, dir: &TempDir) -> anyhow::Result<Process> {
    let addr = backend(topo, 0, Service::Http);
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
             \x20 keepalive_requests 1000000000;\n  keepalive_timeout 120s;\n\
             \x20 client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n\
             \x20 fastcgi_temp_path {d}/tmp-fastcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n\
             \x20 scgi_temp_path {d}/tmp-scgi;\n\
             \x20 server {{ listen {addr} backlog=4096; root {root}; }}\n}}\n",
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
    Ok(p)
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

/// The agent with a kernel-mode and two proxy-mode service addresses (the default byte path,
/// and `copy`) for each service, over the same backends as the peers. Started with this thread pinned to the proxy core, so the agent
/// inherits it (as under `taskset`) and its runtime sizes itself to that one core.
fn start_agent(topo: &Topology) -> anyhow::Result<Agent> {
    let mut services = String::new();
    for s in Service::ALL {
        let list: Vec<String> = backends(topo, s)
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        for (path, name, mode, byte_path) in [
            (Path::Kernel, "kernel", "kernel", ""),
            (
                Path::KernelLeastConn,
                "kernel-lc",
                "kernel",
                "algorithm = \"least_connections\"\n",
            ),
            (
                Path::KernelPeakEwma,
                "kernel-ewma",
                "kernel",
                "algorithm = \"peak_ewma\"\n",
            ),
            (Path::Proxy, "proxy", "proxy", ""),
            (Path::ProxyCopy, "copy", "proxy", "byte_path = \"copy\"\n"),
        ] {
            let _ = write!(
                services,
                "[[service]]\nname = \"{}-{name}\"\nvip = \"{}\"\nmode = \"{mode}\"\n\
                 {byte_path}backends = [{}]\n\n",
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
    for s in Service::ALL {
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
    let conf = dir.write("haproxy.cfg", &conf)?;
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
    let mut p = Process::spawn("haproxy", cmd, in_ns(&topo.node))?;
    wait_listening(&topo.node, Service::Http.peer(Path::Haproxy), &mut p).context("haproxy")?;
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
    for s in Service::ALL {
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
