//! Reaching a running agent's local API and metrics: HTTP by hand on its Unix socket (so a test
//! can send any bytes, slowly or too many), `switchyard ctl` as a process, and requests to the
//! metrics address from inside the node namespace (where the agent listens).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Netns;

/// An HTTP answer as it came.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.body))
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn parse(raw: &[u8]) -> anyhow::Result<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no complete HTTP answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// How long a test waits for any one answer.
const ANSWER: Duration = Duration::from_secs(60);

fn exchange(mut stream: impl Read + Write, request: &[u8]) -> anyhow::Result<Answer> {
    // The server may answer (413) and close before taking all of a large body.
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse(&raw)
}

fn request_bytes(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let body = body.unwrap_or("");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: switchyard\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One request on the API socket; `body` is sent as JSON.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<Answer> {
    raw(socket, &request_bytes(method, path, body))
}

/// Writes `bytes` on the API socket and reads until the agent closes the connection.
pub fn raw(socket: &Path, bytes: &[u8]) -> anyhow::Result<Answer> {
    let stream =
        UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(ANSWER))?;
    stream.set_write_timeout(Some(ANSWER))?;
    exchange(stream, bytes)
}

/// What `switchyard ctl` did.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("ctl said: {self:?}"))
    }
}

fn ctl_command(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(crate::binary("SWITCHYARD_BIN", "switchyard"));
    cmd.arg("ctl").arg("--socket").arg(socket).args(args);
    cmd
}

fn run_ctl(mut cmd: Command) -> anyhow::Result<Ctl> {
    run_ctl_once(&mut cmd).context("run switchyard ctl")
}

fn run_ctl_once(cmd: &mut Command) -> std::io::Result<Ctl> {
    let out = cmd.output()?;
    Ok(Ctl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `switchyard ctl --socket SOCKET ARGS…` to completion.
pub fn ctl(socket: &Path, args: &[&str]) -> anyhow::Result<Ctl> {
    run_ctl(ctl_command(socket, args))
}

/// The same, as another user and group (for the socket's permissions). That user may not reach
/// the binary where cargo built it (a checkout under a private home or a `mktemp -d` folder), so
/// a copy in `dir`, a directory of the test's own, is run; every directory on the way to it
/// must let others through.
pub fn ctl_as(dir: &Path, socket: &Path, uid: u32, gid: u32, args: &[&str]) -> anyhow::Result<Ctl> {
    let binary = reachable_copy(dir)?;
    let mut cmd = Command::new(&binary);
    cmd.arg("ctl").arg("--socket").arg(socket).args(args);
    // std drops root's supplementary groups when it changes the uid.
    cmd.uid(uid).gid(gid);
    // Just after the copy, a child another test thread forked may still hold the copy's
    // write descriptor until its own exec closes it, and exec then fails with ETXTBSY:
    // wait for that exec, a few milliseconds at most.
    let mut busy = 0;
    loop {
        match run_ctl_once(&mut cmd) {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && busy < 100 => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.context("run switchyard ctl"),
        }
    }
}

/// A copy of the agent binary in `dir` (made once), readable and runnable by every user.
fn reachable_copy(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let copy = dir.join("switchyard");
    if !copy.exists() {
        let built = crate::binary("SWITCHYARD_BIN", "switchyard");
        std::fs::create_dir_all(dir)?;
        std::fs::copy(&built, &copy)
            .with_context(|| format!("copy {} to {}", built.display(), copy.display()))?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    }
    for d in copy.ancestors().skip(1) {
        let mode = std::fs::metadata(d)?.permissions().mode();
        anyhow::ensure!(
            mode & 0o001 != 0,
            "{} (mode {:o}) does not let other users through to {}",
            d.display(),
            mode & 0o7777,
            copy.display()
        );
    }
    Ok(copy)
}

/// One request to `addr` from inside `netns` (the agent's metrics live in the node's).
pub fn get_in(
    netns: &Netns,
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> anyhow::Result<Answer> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(a) = accept {
        request += &format!("Accept: {a}\r\n");
    }
    request += "\r\n";
    netns.enter(move || -> anyhow::Result<Answer> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_read_timeout(Some(ANSWER))?;
        exchange(stream, request.as_bytes())
    })?
}

/// Asks `f` until it gives an answer, for up to `limit`; the last error says why not.
pub fn wait_for<T>(
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match f() {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() > deadline {
            match last {
                Some(e) => return Err(e.context(format!("still failing after {limit:?}"))),
                None => bail!("condition not met within {limit:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A file of the test's own, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(crate::unique(name));
        std::fs::write(&path, contents)?;
        Ok(TempFile(path))
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The value of one sample in a Prometheus exposition (`name{labels}`, exactly as written).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
