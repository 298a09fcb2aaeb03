//! sy-probe: the tiny backend and client that tests and the demo run.
//!
//! `serve` answers every TCP connection with its name and a newline, then echoes what it
//! receives until the client half-closes; every UDP datagram is answered with the name.
//! `ask` connects N times to an address and prints which names answered (one `NAME COUNT` line
//! each; failures as `error:KIND COUNT`).

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
        Cmd::Serve { name, tcp, udp } => serve(name, tcp, udp),
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

fn serve(name: String, tcp: Vec<SocketAddr>, udp: Vec<SocketAddr>) -> io::Result<()> {
    let mut threads = Vec::new();
    for addr in tcp {
        let l = TcpListener::bind(addr)?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || answer(conn, &name));
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
