//! sy-probe: the tiny backend and client that tests and the demo run.
//!
//! `serve` answers every TCP connection with its name and a newline, then echoes what it
//! receives until the client half-closes; every UDP datagram is answered with the name.
//! `ask` connects N times to an address and prints which names answered (one `NAME COUNT` line
//! each; failures as `error:KIND COUNT`).
//! `load`, `idle` and `streams` are the fault-injection suite's clients (see `faults`).

// In a directory of its own: a file beside this one would be taken for another binary.
#[path = "sy-probe/faults.rs"]
mod faults;

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer with a name on each TCP address and UDP address given.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        #[arg(long)]
        udp: Vec<SocketAddr>,
        /// Wait this long before answering each TCP connection (a slow backend).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Also a slow sink here: sends the name, then reads at `sink_rate` bytes/s.
        #[arg(long)]
        sink: Option<SocketAddr>,
        #[arg(long, default_value_t = 1_000_000)]
        sink_rate: u64,
    },
    /// Hold one connection open; with `ping_ms`, send a line and read its echo that often.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        ping_ms: u64,
    },
    /// Send `bytes` pseudo-random bytes, half-close, and check the echo is the same bytes.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// DNS-style UDP queries: each answered with the backend's name. `connected`: one
    /// connected socket (reconnecting when the agent aborts it); else `sendto`/`recvfrom`.
    UdpAsk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long)]
        connected: bool,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Connect again and again; each time the answering backend changes, print
    /// `flip NAME MONOTONIC_NS`. Stops after `times` changes.
    Flip {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        times: usize,
    },
    /// Write as fast as the connection takes it for `seconds`; print how much it took.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// Steady paced load, each request's payload checked on its echo; prints failures with
    /// their times and a `load sent=.. ok=.. failed=.. corrupt=..` summary.
    Load {
        #[arg(long)]
        to: SocketAddr,
        /// Concurrent client loops.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long)]
        seconds: f64,
        /// Requests started per second, over all loops (each a new connection).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Largest payload; each request sends 1..=bytes.
        #[arg(long, default_value_t = 8192)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Stop early once this file exists.
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
    },
    /// Open `count` connections and hold them until `release` exists; then check each with a
    /// payload and its echo.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Stop opening after this many failures in a row (0: never).
        #[arg(long, default_value_t = 0)]
        give_up: usize,
        #[arg(long)]
        release: std::path::PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Long-lived connections that keep talking: each sends `chunk` bytes every
    /// `interval_ms` and checks their echo, for `seconds`; then ends cleanly.
    Streams {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 4)]
        count: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// One connection that ends abruptly. With `reset`: read a line from the server, send
    /// `bytes`, then close with a reset, and print `reset-sent`. Without: read to the end and
    /// print `ended eof N` or `ended reset N` (N bytes read) — or `ended timeout N`.
    Abort {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        bytes: usize,
        #[arg(long)]
        reset: bool,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Open `count` connections at the same instant (one thread each), hold every one for
    /// `hold_ms`, and print `greeted N`: how many a backend answered.
    Burst {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
    },
    /// Connect `count` times and tally who answered.
    Ask {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Bind to this source address first.
        #[arg(long)]
        bind: Option<IpAddr>,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Also print the peer address the socket reports (`peer ADDR`).
        #[arg(long)]
        peer: bool,
        /// One connection from each of these source addresses, tallied as `SRC/NAME`.
        #[arg(long, value_delimiter = ',')]
        sources: Vec<IpAddr>,
    },
}

fn main() -> io::Result<()> {
    match Cli::parse().command {
        Cmd::Serve {
            name,
            tcp,
            udp,
            delay_ms,
            sink,
            sink_rate,
        } => serve(
            name,
            tcp,
            udp,
            Duration::from_millis(delay_ms),
            sink,
            sink_rate,
        ),
        Cmd::Hold {
            to,
            seconds,
            ping_ms,
        } => hold(to, Duration::from_secs_f64(seconds), ping_ms),
        Cmd::Stream { to, bytes, seed } => stream(to, bytes, seed),
        Cmd::Flood { to, seconds } => flood(to, Duration::from_secs_f64(seconds)),
        Cmd::Flip { to, times } => flip(to, times),
        Cmd::Abort {
            to,
            bytes,
            reset,
            timeout_ms,
        } => abort(to, bytes, reset, Duration::from_millis(timeout_ms)),
        Cmd::Load {
            to,
            clients,
            seconds,
            rate,
            bytes,
            seed,
            timeout_ms,
            stop_file,
        } => faults::load(faults::LoadArgs {
            to,
            clients: clients.max(1),
            seconds: Duration::from_secs_f64(seconds),
            rate,
            bytes,
            seed,
            timeout: Duration::from_millis(timeout_ms),
            stop_file,
        }),
        Cmd::Idle {
            to,
            count,
            timeout_ms,
            give_up,
            release,
            seed,
        } => faults::idle(faults::IdleArgs {
            to,
            count,
            timeout: Duration::from_millis(timeout_ms),
            give_up,
            release,
            seed,
        }),
        Cmd::Streams {
            to,
            count,
            seconds,
            chunk,
            interval_ms,
            timeout_ms,
            seed,
        } => faults::streams(faults::StreamsArgs {
            to,
            count,
            seconds: Duration::from_secs_f64(seconds),
            chunk: chunk.max(1),
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            seed,
        }),
        Cmd::UdpAsk {
            to,
            count,
            connected,
            interval_ms,
            timeout_ms,
        } => udp_ask(
            to,
            count,
            connected,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Burst { to, count, hold_ms } => burst(to, count, Duration::from_millis(hold_ms)),
        Cmd::Ask {
            to,
            count,
            bind,
            timeout_ms,
            peer,
            sources,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            if sources.is_empty() {
                return ask(to, count, bind, timeout, peer);
            }
            for src in sources {
                let name = once(to, Some(src), timeout, false)
                    .unwrap_or_else(|e| format!("error:{}", error_kind(&e)));
                println!("{src}/{name} 1");
            }
            Ok(())
        }
    }
}

fn serve(
    name: String,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    delay: Duration,
    sink: Option<SocketAddr>,
    sink_rate: u64,
) -> io::Result<()> {
    let mut threads = Vec::new();
    for addr in tcp {
        let l = TcpListener::bind(addr)?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    answer(conn, &name)
                });
            }
        }));
    }
    if let Some(addr) = sink {
        let l = TcpListener::bind(addr)?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || slow_sink(conn, &name, sink_rate));
            }
        }));
    }
    for addr in udp {
        let s = UdpSocket::bind(addr)?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(name.as_bytes(), from);
            }
        }));
    }
    println!("listening");
    io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn answer(mut conn: TcpStream, name: &str) {
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

fn ask(
    to: SocketAddr,
    count: usize,
    bind: Option<IpAddr>,
    timeout: Duration,
    peer: bool,
) -> io::Result<()> {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..count {
        let key = match once(to, bind, timeout, peer && i == 0) {
            Ok(name) => name,
            Err(e) => format!("error:{}", error_kind(&e)),
        };
        *tally.entry(key).or_default() += 1;
    }
    for (k, v) in tally {
        println!("{k} {v}");
    }
    Ok(())
}

fn once(to: SocketAddr, bind: Option<IpAddr>, timeout: Duration, peer: bool) -> io::Result<String> {
    let stream = match bind {
        None => TcpStream::connect_timeout(&to, timeout)?,
        Some(ip) => {
            // std has no bind-then-connect; do it by hand.
            let domain = if ip.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket calls on a descriptor we own.
            let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let (sa, len) = sockaddr(SocketAddr::new(ip, 0));
            if unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let (sa, len) = sockaddr(to);
            if unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            stream
        }
    };
    if peer {
        println!("peer {}", stream.peer_addr()?);
    }
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed without a name",
        ));
    }
    Ok(line.trim().to_owned())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill the variant matching the family.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn error_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        io::ErrorKind::PermissionDenied => "denied",
        io::ErrorKind::UnexpectedEof => "eof",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        _ => "other",
    }
}

/// Reads at most `rate` bytes a second, in 10 ms steps, so the sender must slow down.
fn slow_sink(mut conn: TcpStream, name: &str, rate: u64) {
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let step = (rate / 100).max(1) as usize;
    let mut buf = vec![0u8; step];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn connect_named(to: SocketAddr) -> io::Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the newline may be taken from the stream.
    while (&stream).read(&mut byte)? == 1 && byte[0] != b'\n' {
        name.push(byte[0]);
    }
    Ok((stream, String::from_utf8_lossy(&name).into_owned()))
}

fn burst(to: SocketAddr, count: usize, hold: Duration) -> io::Result<()> {
    let start = std::sync::Arc::new(std::sync::Barrier::new(count));
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let greeted = match connect_named(to) {
                    Ok((stream, name)) if !name.is_empty() => Some(stream),
                    _ => None,
                };
                std::thread::sleep(hold);
                greeted.is_some()
            })
        })
        .collect();
    let greeted = threads
        .into_iter()
        .filter_map(|t| t.join().ok())
        .filter(|&g| g)
        .count();
    println!("greeted {greeted}");
    Ok(())
}

fn hold(to: SocketAddr, seconds: Duration, ping_ms: u64) -> io::Result<()> {
    let started = std::time::Instant::now();
    let (mut stream, name) = connect_named(to)?;
    println!("name {name}");
    io::stdout().flush()?;
    let mut line = [0u8; 5];
    let outcome = loop {
        if started.elapsed() >= seconds {
            break "completed";
        }
        if ping_ms == 0 {
            stream.set_read_timeout(Some(
                seconds
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(1)),
            ))?;
            match stream.read(&mut line) {
                Ok(0) => break "closed",
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(_) => break "closed",
            }
        }
        std::thread::sleep(Duration::from_millis(ping_ms));
        if stream.write_all(b"ping\n").is_err() || stream.read_exact(&mut line).is_err() {
            break "closed";
        }
    };
    println!("held {:.2} {outcome}", started.elapsed().as_secs_f64());
    Ok(())
}

fn abort(to: SocketAddr, bytes: usize, reset: bool, timeout: Duration) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    if reset {
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        stream.write_all(&vec![b'x'; bytes])?;
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        drop(stream);
        println!("reset-sent");
        return Ok(());
    }
    let mut buf = [0u8; 4096];
    let mut read = 0;
    let how = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break "timeout";
            }
            Err(e) => return Err(e),
        }
    };
    println!("ended {how} {read}");
    Ok(())
}

/// xorshift64*: the same bytes on both ends for a seed.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for b in buf {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        *b = (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
    }
}

fn stream(to: SocketAddr, bytes: u64, seed: u64) -> io::Result<()> {
    let (stream, name) = connect_named(to)?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let mut state = seed.max(1);
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            fill(&mut state, &mut buf[..n]);
            writer.write_all(&buf[..n])?;
            sent += n as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut reader = stream;
    let mut state = seed.max(1);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let mut first_bad: Option<u64> = None;
    loop {
        let n = reader.read(&mut got)?;
        if n == 0 {
            break;
        }
        fill(&mut state, &mut want[..n]);
        if first_bad.is_none()
            && let Some(i) = (0..n).find(|&i| got[i] != want[i])
        {
            first_bad = Some(received + i as u64);
        }
        received += n as u64;
    }
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("sender panicked"))??;
    match first_bad {
        None if received == sent => println!("stream ok {received} via {name}"),
        None => println!("stream short sent={sent} received={received} via {name}"),
        Some(at) => println!("stream corrupt at {at} sent={sent} received={received} via {name}"),
    }
    Ok(())
}

fn flood(to: SocketAddr, seconds: Duration) -> io::Result<()> {
    let (mut stream, name) = connect_named(to)?;
    stream.set_write_timeout(Some(Duration::from_millis(50)))?;
    let buf = vec![0x5au8; 64 * 1024];
    let started = std::time::Instant::now();
    let mut written = 0u64;
    while started.elapsed() < seconds {
        match stream.write(&buf) {
            Ok(n) => written += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    println!("flood wrote {written} via {name}");
    Ok(())
}

fn udp_socket(to: SocketAddr, timeout: Duration) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()
    } else {
        "[::]:0".parse()
    }
    .map_err(|_| io::Error::other("bad bind address"))?;
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// Prints `answer NAME` as each reply comes (and `aborted` when the agent disconnects the
/// socket), `from ADDR` for the first reply's source, then the tally.
fn udp_ask(
    to: SocketAddr,
    count: usize,
    connected: bool,
    interval: Duration,
    timeout: Duration,
) -> io::Result<()> {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut sock = udp_socket(to, timeout)?;
    if connected {
        sock.connect(to)?;
    }
    let mut buf = [0u8; 512];
    let mut shown_from = false;
    let mut i = 0;
    while i < count {
        let sent = if connected {
            sock.send(b"q")
        } else {
            sock.send_to(b"q", to)
        };
        let reply = sent.and_then(|_| {
            if connected {
                sock.recv(&mut buf).map(|n| (n, to))
            } else {
                sock.recv_from(&mut buf)
            }
        });
        match reply {
            Ok((n, from)) => {
                let name = String::from_utf8_lossy(&buf[..n]).into_owned();
                if !shown_from {
                    println!("from {from}");
                    shown_from = true;
                }
                println!("answer {name}");
                *tally.entry(name).or_default() += 1;
            }
            // The agent unpinned this socket: a blocked recv() sees ECONNABORTED, a later send()
            // finds it disconnected. Either way: connect again through the hook, ask again.
            Err(e)
                if connected
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EDESTADDRREQ | libc::ENOTCONN)
                    ) =>
            {
                println!("aborted");
                sock = udp_socket(to, timeout)?;
                sock.connect(to)?;
                continue;
            }
            Err(e) => {
                *tally
                    .entry(format!("error:{}", error_kind(&e)))
                    .or_default() += 1
            }
        }
        io::stdout().flush()?;
        i += 1;
        std::thread::sleep(interval);
    }
    for (k, v) in tally {
        println!("{k} {v}");
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes of one machine.
fn monotonic_ns() -> u128 {
    // SAFETY: clock_gettime fills the timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn flip(to: SocketAddr, times: usize) -> io::Result<()> {
    let mut last: Option<String> = None;
    let mut flips = 0;
    while flips < times {
        let name = match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(stream) => {
                // Close with a reset: thousands of probes must not fill the port range with
                // TIME_WAIT sockets.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid fd and option value.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&stream),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut line = String::new();
                BufReader::new(&stream)
                    .read_line(&mut line)
                    .map(|_| line.trim().to_owned())
            }
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| format!("error:{}", error_kind(&e)));
        if last.as_ref().is_some_and(|l| *l != name) {
            println!("flip {name} {}", monotonic_ns());
            io::stdout().flush()?;
            flips += 1;
        }
        last = Some(name);
    }
    Ok(())
}
