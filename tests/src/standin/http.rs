//! A small HTTP/1.1 server for the stand-ins: one thread per connection, one request per
//! connection (`Connection: close`, which every client takes), bodies whole
//! (`Content-Length`) or streamed (`Transfer-Encoding: chunked`, as the Kubernetes API streams
//! its watches). Its listening socket is made inside a network namespace; [`Server::stop`]
//! closes it and every open connection, as a server going away does, and [`Server::start`]
//! listens again on the same address.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::Netns;

/// One request: the parts the stand-ins look at.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Query parameters, percent-decoded; a key without a value maps to "".
    pub query: BTreeMap<String, String>,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
}

/// What a handler writes its answer with.
pub struct Response<'a> {
    stream: &'a mut dyn Write,
    /// Set when the server is stopping: long answers (watches) end.
    pub stopping: Arc<AtomicBool>,
}

impl Response<'_> {
    /// A whole answer with a body.
    pub fn send(&mut self, status: u16, headers: &[(&str, String)], body: &str) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n",
            reason(status),
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes())?;
        self.stream.write_all(body.as_bytes())?;
        self.stream.flush()
    }

    /// Starts a streamed answer; follow with [`Response::chunk`] and [`Response::finish`].
    pub fn start_chunked(&mut self, status: u16) -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            reason(status)
        );
        self.stream.write_all(head.as_bytes())?;
        self.stream.flush()
    }

    pub fn chunk(&mut self, data: &str) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.stream, "{:x}\r\n{data}\r\n", data.len())?;
        self.stream.flush()
    }

    pub fn finish(&mut self) -> io::Result<()> {
        self.stream.write_all(b"0\r\n\r\n")?;
        self.stream.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Status",
    }
}

pub type Handler = Arc<dyn Fn(&Request, &mut Response) -> io::Result<()> + Send + Sync>;

/// A listener in a namespace, served until stopped.
pub struct Server<'a> {
    netns: &'a Netns,
    pub addr: SocketAddr,
    handler: Handler,
    /// Serve TLS with this configuration (`None`: plain HTTP).
    tls: Option<Arc<rustls::ServerConfig>>,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl<'a> Server<'a> {
    /// Listens on `addr` inside `netns` and serves with `handler`.
    pub fn start_in(netns: &'a Netns, addr: SocketAddr, handler: Handler) -> anyhow::Result<Self> {
        Self::start_tls_in(netns, addr, handler, None)
    }

    /// The same, serving TLS with `tls` when given.
    pub fn start_tls_in(
        netns: &'a Netns,
        addr: SocketAddr,
        handler: Handler,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Self> {
        let mut s = Server {
            netns,
            addr,
            handler,
            tls,
            running: None,
        };
        s.start()?;
        Ok(s)
    }

    /// Listens again (after [`Server::stop`]).
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let addr = self.addr;
        let listener = self
            .netns
            .enter(move || listen(addr))?
            .with_context(|| format!("stand-in cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (s, c, h, t) = (
            stop.clone(),
            conns.clone(),
            self.handler.clone(),
            self.tls.clone(),
        );
        let accept = std::thread::spawn(move || accept_loop(listener, s, c, h, t));
        self.running = Some(Running {
            stop,
            conns,
            accept: Some(accept),
        });
        Ok(())
    }

    /// Stops listening and closes every open connection (streams end mid-way).
    pub fn stop(&mut self) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        r.stop.store(true, Ordering::SeqCst);
        if let Some(t) = r.accept.take() {
            let _ = t.join();
        }
        for c in r.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listener that can take its address again at once after a stop: the connections the
/// stop cut leave TIME-WAIT sockets on it, which `SO_REUSEADDR` alone does not get past when
/// the server closed first; `SO_REUSEPORT` does.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    let (family, storage, len) = sockaddr(addr);
    // SAFETY: plain socket calls on a descriptor we own; `storage` holds a valid sockaddr of
    // `len` bytes; the descriptor is handed to `TcpListener` only once it listens.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            let size = std::mem::size_of_val(&one) as libc::socklen_t;
            if libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&raw const one).cast(), size) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::bind(fd, (&raw const storage).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::listen(fd, 128) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(listener)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            (libc::AF_INET, storage, len)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            let len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            (libc::AF_INET6, storage, len)
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    handler: Handler,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if let Ok(clone) = stream.try_clone() {
                    let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
                    list.retain(|c| c.peer_addr().is_ok());
                    list.push(clone);
                }
                let (h, s, t) = (handler.clone(), stop.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, h, s, t);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(
    stream: TcpStream,
    handler: Handler,
    stop: Arc<AtomicBool>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let tcp = stream.try_clone()?;
    match tls {
        None => {
            let mut plain = stream;
            exchange(&mut plain, &handler, stop)?;
        }
        Some(config) => {
            let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
            let mut secure = rustls::StreamOwned::new(conn, stream);
            exchange(&mut secure, &handler, stop)?;
            secure.conn.send_close_notify();
            secure.flush()?;
        }
    }
    tcp.shutdown(std::net::Shutdown::Write)
}

/// Reads one request head from `stream` and answers it with `handler`.
fn exchange<S: Read + Write>(
    stream: &mut S,
    handler: &Handler,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    // The head, byte by byte (requests here have no body): no reader keeps the stream borrowed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let headers = lines
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let request = Request {
        method: method.to_owned(),
        path: decode(path),
        query,
        headers,
    };
    let mut response = Response {
        stream,
        stopping: stop,
    };
    handler(&request, &mut response)
}

/// Percent-decoding (and `+` as space, as forms write it).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_queries() {
        assert_eq!(decode("a%2Fb+c"), "a/b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    /// A restart must not wait for the cut connections' TIME-WAIT to pass.
    #[test]
    fn listens_again_after_a_stop_with_connections_open() {
        if !crate::require_root("listens_again_after_a_stop_with_connections_open") {
            return;
        }
        let ns = Netns::create(&crate::unique("sy-http-")).unwrap();
        let handler: Handler = Arc::new(|_, r| {
            r.start_chunked(200)?;
            std::thread::sleep(Duration::from_secs(2));
            r.finish()
        });
        let addr: SocketAddr = "127.0.0.1:16443".parse().unwrap();
        let mut s = Server::start_in(&ns, addr, handler).unwrap();
        let c = ns
            .enter(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
                c
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s.stop();
        s.start().unwrap();
        drop(c);
    }
}
