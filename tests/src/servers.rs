//! The servers the registry sources follow, run for real inside a namespace (the node's: where
//! the agent runs) as [`Process`] guards: etcd, one member or a cluster, and dnsmasq. Their
//! data lives in a temporary directory removed on drop.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Netns, Process, process::Place, unique};

/// How long a server may take to start answering.
const START: Duration = Duration::from_secs(30);

/// A directory of its own under the system's temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique(prefix));
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An etcd cluster of one or more members on loopback inside `netns`. Member `i` takes
/// clients on `127.0.0.1:23790+10i` and its peers on `:23791+10i`.
pub struct Etcd<'a> {
    netns: &'a Netns,
    members: Vec<Option<Process>>,
    /// Where each member takes clients now (see [`Etcd::restart_on`]).
    clients: Vec<SocketAddr>,
    /// Clients speak TLS and show a certificate (see [`Etcd::start_tls`]).
    tls: bool,
    // Last, so the members are stopped before their data goes.
    dir: TempDir,
}

impl<'a> Etcd<'a> {
    /// Starts `members` members and waits until the cluster answers.
    pub fn start(netns: &'a Netns, members: usize) -> anyhow::Result<Self> {
        Self::start_with(netns, members, false)
    }

    /// Like [`Etcd::start`], but clients must speak TLS and show a certificate signed by a CA
    /// made for the occasion (files `ca.pem`, `server.pem`, `client.pem` and their `.key`s).
    pub fn start_tls(netns: &'a Netns, members: usize) -> anyhow::Result<Self> {
        Self::start_with(netns, members, true)
    }

    fn start_with(netns: &'a Netns, members: usize, tls: bool) -> anyhow::Result<Self> {
        let mut etcd = Etcd {
            netns,
            members: (0..members).map(|_| None).collect(),
            clients: (0..members).map(Self::client_addr).collect(),
            tls,
            dir: TempDir::new("sy-etcd-")?,
        };
        if tls {
            make_certificates(etcd.dir.path())?;
        }
        // Members of a new cluster wait for each other: start all, then wait for each.
        for i in 0..members {
            etcd.members[i] = Some(etcd.spawn(i)?);
        }
        for i in 0..members {
            etcd.wait_ready(i)?;
        }
        Ok(etcd)
    }

    fn client_addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 23790 + 10 * i as u16))
    }

    fn peer_url(i: usize) -> String {
        format!("http://127.0.0.1:{}", 23791 + 10 * i as u16)
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// A file of the TLS set (`ca.pem`, `client.key`, …).
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every member's usual client URL, as the agent's `endpoints` list.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| format!("{}://{}", self.scheme(), Self::client_addr(i)))
            .collect()
    }

    /// `[registry.etcd]` for an agent config: all members, the given key prefix (and the CA
    /// and client certificate, for TLS).
    pub fn agent_section(&self, prefix: &str) -> String {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let mut section = format!(
            "[registry.etcd]\nendpoints = [{}]\nprefix = {prefix:?}\nconnect_timeout = \"1s\"\n",
            endpoints.join(", ")
        );
        if self.tls {
            for (field, file) in [
                ("ca", "ca.pem"),
                ("cert", "client.pem"),
                ("key", "client.key"),
            ] {
                section += &format!(
                    "{field} = {:?}\n",
                    self.tls_file(file).display().to_string()
                );
            }
        }
        section
    }

    fn spawn(&self, i: usize) -> anyhow::Result<Process> {
        let cluster: Vec<String> = (0..self.members.len())
            .map(|m| format!("m{m}={}", Self::peer_url(m)))
            .collect();
        let client = format!("{}://{}", self.scheme(), self.clients[i]);
        let mut cmd = Command::new("etcd");
        if self.tls {
            cmd.arg("--cert-file")
                .arg(self.tls_file("server.pem"))
                .arg("--key-file")
                .arg(self.tls_file("server.key"))
                .arg("--trusted-ca-file")
                .arg(self.tls_file("ca.pem"))
                .arg("--client-cert-auth");
        }
        cmd.arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &Self::peer_url(i)])
            .args(["--initial-advertise-peer-urls", &Self::peer_url(i)])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "switchyard-test"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        Process::spawn(
            &format!("etcd m{i}"),
            cmd,
            Place {
                netns: Some(self.netns),
                cgroup: None,
            },
        )
    }

    fn wait_ready(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(p) = self.members[i].as_mut() else {
            bail!("etcd member {i} is not running");
        };
        p.wait_for("serving client traffic", START)?;
        // Serving is not yet having a leader: ask until a proposal commits.
        let deadline = Instant::now() + START;
        let endpoint = self.clients[i].to_string();
        loop {
            match self.ctl_at(&[endpoint.as_str()], &["endpoint", "health"], None) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// SIGKILL to member `i`: gone at once, as in a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].take() {
            p.kill();
        }
    }

    /// SIGTERM to member `i`, waiting for it to go.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut p) = self.members[i].take() {
            p.stop(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Starts member `i` again on its data, taking clients on `client` (say `127.0.0.2:…`, where
    /// the agent does not look, so that a test can change keys behind the agent's back).
    pub fn restart_on(&mut self, i: usize, client: SocketAddr) -> anyhow::Result<()> {
        self.stop(i)?;
        self.clients[i] = client;
        self.members[i] = Some(self.spawn(i)?);
        self.wait_ready(i)
    }

    /// Starts member `i` again on its data, at its usual address.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart_on(i, Self::client_addr(i))
    }

    /// `etcdctl` against every running member; its stdout. Tried again on failure for a
    /// while: a request made while the members elect a new leader can time out.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let live: Vec<String> = (0..self.members.len())
            .filter(|&i| self.members[i].is_some())
            .map(|i| self.clients[i].to_string())
            .collect();
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let deadline = Instant::now() + START;
        loop {
            match self.ctl_at(&live, args, None) {
                Err(e) if Instant::now() < deadline => {
                    eprintln!("etcdctl failed, trying again: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                done => return done,
            }
        }
    }

    /// `etcdctl` at `endpoints`, reading `stdin` if given.
    fn ctl_at(
        &self,
        endpoints: &[&str],
        args: &[&str],
        stdin: Option<&Path>,
    ) -> anyhow::Result<String> {
        let mut cmd = match stdin {
            Some(input) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "exec etcdctl \"$@\" < \"$SY_STDIN\"", "etcdctl"])
                    .env("SY_STDIN", input);
                sh
            }
            None => Command::new("etcdctl"),
        };
        if self.tls {
            cmd.arg("--cacert")
                .arg(self.tls_file("ca.pem"))
                .arg("--cert")
                .arg(self.tls_file("client.pem"))
                .arg("--key")
                .arg(self.tls_file("client.key"));
        }
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{}://{e}", self.scheme()))
            .collect();
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", urls.join(",")))
            .args(["--command-timeout=5s", "--dial-timeout=2s"])
            .args(args);
        let mut p = Process::spawn(
            "etcdctl",
            cmd,
            Place {
                netns: Some(self.netns),
                cgroup: None,
            },
        )?;
        let status = p.wait_exit(Duration::from_secs(30))?;
        let out = p.output().join("\n");
        if !status.success() {
            bail!("etcdctl {}: {status}: {out}", args.join(" "));
        }
        Ok(out)
    }

    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.ctl(&["put", key, value]).map(drop)
    }

    pub fn delete(&self, key: &str) -> anyhow::Result<()> {
        self.ctl(&["del", key]).map(drop)
    }

    /// One transaction of `requests` (`put KEY VALUE`, `del KEY`; no spaces inside a value):
    /// all of them at one revision.
    pub fn txn(&self, requests: &[String]) -> anyhow::Result<()> {
        let input = self.dir.path().join(unique("txn-"));
        // etcdctl's interactive form: compares, a blank line, requests, a blank line, the
        // requests on failure, a blank line.
        fs::write(&input, format!("\n{}\n\n\n", requests.join("\n")))?;
        let live: Vec<String> = (0..self.members.len())
            .filter(|&i| self.members[i].is_some())
            .map(|i| self.clients[i].to_string())
            .collect();
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        let out = self.ctl_at(&live, &["txn"], Some(&input))?;
        anyhow::ensure!(out.contains("SUCCESS"), "etcdctl txn: {out}");
        Ok(())
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.ctl(&["get", "--write-out=json", "--limit=1", "/"])?;
        let at = out
            .find("\"revision\":")
            .context("no revision in etcdctl's answer")?;
        let digits: String = out[at + "\"revision\":".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .parse()
            .with_context(|| format!("revision in {out:?}"))
    }

    /// Discards the history before `revision`.
    pub fn compact(&self, revision: i64) -> anyhow::Result<()> {
        self.ctl(&["compact", &revision.to_string()]).map(drop)
    }
}

/// A CA, a server certificate for the loopback addresses the members use, and a client
/// certificate, with `openssl` (P-256 keys: quick to make, and rustls takes them).
pub(crate) fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    // Each command's arguments, split on spaces (none has one).
    let openssl = |command: &str| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(command.split(' '))
            .current_dir(dir)
            .output()
            .context("cannot run openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {command}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(&format!(
        "req -x509 {key} -keyout ca.key -out ca.pem -days 1 -subj /CN=sy-test-ca"
    ))?;
    for (name, usage, san) in [
        (
            "server",
            "serverAuth,clientAuth",
            "IP:127.0.0.1,IP:127.0.0.2",
        ),
        ("client", "clientAuth", "DNS:switchyard"),
    ] {
        fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName={san}\nextendedKeyUsage={usage}\n"),
        )?;
        openssl(&format!(
            "req {key} -keyout {name}.key -out {name}.csr -subj /CN={name}"
        ))?;
        openssl(&format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
             -extfile {name}.ext -out {name}.pem"
        ))?;
    }
    Ok(())
}

impl Drop for Etcd<'_> {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.take() {
                let _ = p.stop(Duration::from_secs(5));
            }
        }
    }
}

/// dnsmasq answering for `example.test` from a hosts file (and `--srv-host` records) on
/// `127.0.0.1:5353` inside `netns`, with a TTL of `ttl` seconds on every answer.
pub struct Dnsmasq<'a> {
    netns: &'a Netns,
    process: Option<Process>,
    hosts: PathBuf,
    cmd: Vec<String>,
    // Last, so the server is stopped before its files go.
    _dir: TempDir,
}

impl<'a> Dnsmasq<'a> {
    pub const ADDR: &'static str = "127.0.0.1:5353";

    /// Starts dnsmasq with `hosts` as its hosts file; `extra` are more options
    /// (`--srv-host=…`).
    pub fn start(netns: &'a Netns, ttl: u32, hosts: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let dir = TempDir::new("sy-dns-")?;
        let file = dir.path().join("hosts");
        fs::write(&file, hosts)?;
        let mut cmd: Vec<String> = [
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            // Authoritative for the test domain: a name not in the hosts file is NXDOMAIN.
            "--local=/example.test/",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=5353",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cmd.push(format!("--local-ttl={ttl}"));
        cmd.push(format!("--addn-hosts={}", file.display()));
        cmd.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Dnsmasq {
            netns,
            process: None,
            hosts: file,
            cmd,
            _dir: dir,
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("dnsmasq");
        cmd.args(&self.cmd);
        let mut p = Process::spawn(
            "dnsmasq",
            cmd,
            Place {
                netns: Some(self.netns),
                cgroup: None,
            },
        )?;
        p.wait_for("started, version", START)?;
        self.process = Some(p);
        Ok(())
    }

    /// Replaces the hosts file and tells dnsmasq to read it again (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) -> anyhow::Result<()> {
        let tmp = self.hosts.with_extension("tmp");
        fs::write(&tmp, hosts)?;
        fs::rename(&tmp, &self.hosts)?;
        let Some(p) = &self.process else {
            bail!("dnsmasq is not running");
        };
        // SAFETY: signalling our own child by its PID.
        if unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) } != 0 {
            bail!("SIGHUP dnsmasq: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Starts it again, with the same options and hosts file.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }
}
