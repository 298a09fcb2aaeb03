//! The fault-injection suite's clients: `load`, a steady paced load whose every request carries
//! a pseudo-random payload checked on its echo, and `idle`, many connections held open and
//! checked the same way when released.
//!
//! Both print machine-readable lines the testkit's `fault` module reads: failures with their
//! CLOCK_MONOTONIC start and end (so a test can tell a request in flight at a fault from one
//! started after it), then one summary line.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{error_kind, fill, monotonic_ns};

/// Failure lines printed at most; the summary still counts every failure.
const FAIL_LINES: usize = 5000;

/// What became of one request.
enum Outcome {
    Ok,
    Failed(String),
    Corrupt,
}

#[derive(Default)]
struct Tallies {
    sent: u64,
    ok: u64,
    failed: u64,
    corrupt: u64,
    /// (start ns, end ns, kind) of each failure, in no particular order.
    failures: Vec<(u128, u128, String)>,
    last_ok_ns: u128,
}

/// The arguments of `sy-probe load`.
pub struct LoadArgs {
    pub to: SocketAddr,
    pub clients: usize,
    pub seconds: Duration,
    pub rate: f64,
    pub bytes: usize,
    pub seed: u64,
    pub timeout: Duration,
    pub stop_file: Option<PathBuf>,
}

/// `clients` loops for `seconds` (or until `stop_file` appears); each starts a request every
/// `clients / rate` seconds (paced on a fixed schedule, so a refused connect does not turn into
/// a spin): connect, read the backend's name line, send 1..=`bytes` pseudo-random bytes,
/// half-close, read the echo to EOF and compare.
pub fn load(args: LoadArgs) -> io::Result<()> {
    let started = Instant::now();
    let start_ns = monotonic_ns();
    let tallies = Arc::new(Mutex::new(Tallies::default()));
    let interval = Duration::from_secs_f64(args.clients as f64 / args.rate.max(0.1));
    let args = Arc::new(args);
    let loops: Vec<_> = (0..args.clients)
        .map(|client| {
            let (args, tallies) = (args.clone(), tallies.clone());
            std::thread::spawn(move || {
                // Spread the loops over one interval so they do not start in step.
                let mut next = started + interval.mul_f64(client as f64 / args.clients as f64);
                let mut seq = 0u64;
                loop {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next += interval;
                    if started.elapsed() >= args.seconds || stopped(&args.stop_file) {
                        break;
                    }
                    let seed = args.seed ^ ((client as u64) << 40) ^ seq;
                    seq += 1;
                    let begin = monotonic_ns();
                    let outcome = request(&args, seed);
                    let end = monotonic_ns();
                    let mut t = tallies.lock().unwrap_or_else(|e| e.into_inner());
                    t.sent += 1;
                    match outcome {
                        Outcome::Ok => {
                            t.ok += 1;
                            t.last_ok_ns = t.last_ok_ns.max(end);
                        }
                        Outcome::Failed(kind) => {
                            t.failed += 1;
                            t.failures.push((begin, end, kind));
                        }
                        Outcome::Corrupt => {
                            t.corrupt += 1;
                            t.failures.push((begin, end, "corrupt".into()));
                        }
                    }
                }
            })
        })
        .collect();
    for l in loops {
        let _ = l.join();
    }
    let t = tallies.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = io::stdout().lock();
    for (begin, end, kind) in t.failures.iter().take(FAIL_LINES) {
        writeln!(out, "fail start_ns={begin} end_ns={end} kind={kind}")?;
    }
    writeln!(
        out,
        "load sent={} ok={} failed={} corrupt={} start_ns={start_ns} last_ok_ns={} seconds={:.2}",
        t.sent,
        t.ok,
        t.failed,
        t.corrupt,
        t.last_ok_ns,
        started.elapsed().as_secs_f64()
    )?;
    out.flush()
}

fn stopped(stop_file: &Option<PathBuf>) -> bool {
    stop_file.as_deref().is_some_and(Path::exists)
}

/// Payload length for a seed: 1..=max, so segment boundaries vary between requests.
fn length(seed: u64, max: usize) -> usize {
    let mut s = seed.max(1);
    let mut b = [0u8; 4];
    fill(&mut s, &mut b);
    1 + (u32::from_le_bytes(b) as usize) % max.max(1)
}

fn request(args: &LoadArgs, seed: u64) -> Outcome {
    let stream = match TcpStream::connect_timeout(&args.to, args.timeout) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("connect-{}", error_kind(&e))),
    };
    match exchange(stream, args.timeout, seed, length(seed, args.bytes), true) {
        Ok(true) => Outcome::Ok,
        Ok(false) => Outcome::Corrupt,
        Err(e) => Outcome::Failed(e),
    }
}

/// Reads the backend's name line (when `named`), sends `len` seeded bytes, half-closes and
/// reads the echo to EOF. `Ok(false)`: bytes came back, but not the ones sent.
fn exchange(
    mut stream: TcpStream,
    timeout: Duration,
    seed: u64,
    len: usize,
    named: bool,
) -> Result<bool, String> {
    let kind = |what: &str, e: io::Error| format!("{what}-{}", error_kind(&e));
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| kind("setup", e))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| kind("setup", e))?;
    if named {
        read_name(&mut stream).map_err(|e| kind("name", e))?;
    }
    let mut state = seed.max(1);
    let mut sent = vec![0u8; len];
    fill(&mut state, &mut sent);
    stream.write_all(&sent).map_err(|e| kind("write", e))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| kind("shutdown", e))?;
    let mut got = Vec::with_capacity(len);
    stream.read_to_end(&mut got).map_err(|e| kind("echo", e))?;
    if got.len() < len && sent.starts_with(&got) {
        return Err(format!("short-{}-of-{len}", got.len()));
    }
    Ok(got == sent)
}

/// The name line, byte by byte so nothing past it is taken.
fn read_name(stream: &mut TcpStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the name",
                ));
            }
            _ if byte[0] == b'\n' => return Ok(()),
            _ => {}
        }
    }
}

/// The arguments of `sy-probe idle`.
pub struct IdleArgs {
    pub to: SocketAddr,
    pub count: usize,
    pub timeout: Duration,
    /// Stop opening after this many failures in a row (0: never).
    pub give_up: usize,
    pub release: PathBuf,
    pub seed: u64,
}

/// Opens `count` connections one by one (each must show the backend's name), prints
/// `idle opened=.. failed=..`, holds them until `release` exists, then sends each a payload,
/// checks its echo, prints `idle checked=.. ok=.. failed=.. corrupt=..` and closes them all.
pub fn idle(args: IdleArgs) -> io::Result<()> {
    raise_nofile();
    let mut open = Vec::with_capacity(args.count);
    let (mut failed, mut in_a_row) = (0usize, 0usize);
    let mut first_error = String::from("none");
    for _ in 0..args.count {
        match open_named(args.to, args.timeout) {
            Ok(s) => {
                open.push(s);
                in_a_row = 0;
            }
            Err(e) => {
                if failed == 0 {
                    first_error = e;
                }
                failed += 1;
                in_a_row += 1;
                if args.give_up > 0 && in_a_row >= args.give_up {
                    break;
                }
            }
        }
    }
    println!(
        "idle opened={} failed={failed} first_error={first_error}",
        open.len()
    );
    io::stdout().flush()?;
    while !args.release.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut ok, mut bad, mut corrupt) = (0usize, 0usize, 0usize);
    let mut first_error = String::from("none");
    let checked = open.len();
    for (i, stream) in open.into_iter().enumerate() {
        match exchange(stream, args.timeout, args.seed ^ i as u64, 64, false) {
            Ok(true) => ok += 1,
            Ok(false) => corrupt += 1,
            Err(e) => {
                if bad == 0 {
                    first_error = e;
                }
                bad += 1;
            }
        }
    }
    println!(
        "idle checked={checked} ok={ok} failed={bad} corrupt={corrupt} first_error={first_error}"
    );
    io::stdout().flush()
}

fn open_named(to: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)
        .map_err(|e| format!("connect-{}", error_kind(&e)))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("setup-{}", error_kind(&e)))?;
    read_name(&mut stream).map_err(|e| format!("name-{}", error_kind(&e)))?;
    Ok(stream)
}

/// Thousands of held connections need more descriptors than the usual soft limit of 1024.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The arguments of `sy-probe streams`.
pub struct StreamsArgs {
    pub to: SocketAddr,
    pub count: usize,
    pub seconds: Duration,
    pub chunk: usize,
    pub interval: Duration,
    pub timeout: Duration,
    pub seed: u64,
}

/// Long-lived connections that keep talking: opens `count` (each must show the backend's
/// name), prints `streams opened=..`, then on each sends a seeded chunk every `interval` and
/// checks its echo, for `seconds`; half-closes, reads to EOF, and prints one
/// `stream I ok|corrupt|failed-KIND bytes=N end_ns=..` line each and a `streams done=.. ok=..
/// failed=.. corrupt=..` summary.
pub fn streams(args: StreamsArgs) -> io::Result<()> {
    let mut open = Vec::with_capacity(args.count);
    let mut failed_open = 0usize;
    for _ in 0..args.count {
        match open_named(args.to, args.timeout) {
            Ok(s) => open.push(s),
            Err(_) => failed_open += 1,
        }
    }
    println!("streams opened={} failed={failed_open}", open.len());
    io::stdout().flush()?;
    let args = Arc::new(args);
    let threads: Vec<_> = open
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let args = args.clone();
            std::thread::spawn(move || talk(stream, &args, args.seed ^ ((i as u64) << 32)))
        })
        .collect();
    let (mut ok, mut failed, mut corrupt) = (0usize, failed_open, 0usize);
    let mut out = io::stdout().lock();
    for (i, t) in threads.into_iter().enumerate() {
        let (outcome, bytes) = t.join().unwrap_or((Outcome::Failed("panic".into()), 0));
        let end_ns = monotonic_ns();
        let word = match outcome {
            Outcome::Ok => {
                ok += 1;
                "ok".to_owned()
            }
            Outcome::Corrupt => {
                corrupt += 1;
                "corrupt".to_owned()
            }
            Outcome::Failed(kind) => {
                failed += 1;
                format!("failed-{kind}")
            }
        };
        writeln!(out, "stream {i} {word} bytes={bytes} end_ns={end_ns}")?;
    }
    writeln!(
        out,
        "streams done={} ok={ok} failed={failed} corrupt={corrupt}",
        ok + failed + corrupt
    )?;
    out.flush()
}

/// One stream's exchanges: (how it ended, bytes echoed intact).
fn talk(mut stream: TcpStream, args: &StreamsArgs, seed: u64) -> (Outcome, u64) {
    let kind = |what: &str, e: io::Error| format!("{what}-{}", error_kind(&e));
    if let Err(e) = stream.set_write_timeout(Some(args.timeout)) {
        return (Outcome::Failed(kind("setup", e)), 0);
    }
    let started = Instant::now();
    let mut state = seed.max(1);
    let (mut sent, mut got) = (vec![0u8; args.chunk], vec![0u8; args.chunk]);
    let mut echoed = 0u64;
    while started.elapsed() < args.seconds {
        fill(&mut state, &mut sent);
        if let Err(e) = stream.write_all(&sent) {
            return (Outcome::Failed(kind("write", e)), echoed);
        }
        if let Err(e) = stream.read_exact(&mut got) {
            return (Outcome::Failed(kind("echo", e)), echoed);
        }
        if got != sent {
            return (Outcome::Corrupt, echoed);
        }
        echoed += got.len() as u64;
        std::thread::sleep(args.interval);
    }
    if let Err(e) = stream.shutdown(Shutdown::Write) {
        return (Outcome::Failed(kind("shutdown", e)), echoed);
    }
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => (Outcome::Ok, echoed),
        Ok(_) => (Outcome::Corrupt, echoed),
        Err(e) => (Outcome::Failed(kind("eof", e)), echoed),
    }
}
