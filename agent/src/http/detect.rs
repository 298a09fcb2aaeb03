//! `app_protocol = "auto"`: does the client speak HTTP? The first bytes are peeked, never
//! read, so a connection that is not HTTP goes on to the L4 path with every byte still in the
//! socket. Bounded in size and time as linkerd2-proxy's detection is: up to
//! [`defaults::DETECT_BYTES`], for at most [`defaults::DETECT_TIMEOUT`]; a client that says
//! nothing in that time (a server-first protocol) is relayed as bytes.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

use crate::defaults;

/// What the client's first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    /// Anything else, silence included: the L4 path.
    Opaque,
    /// The client reset its connection while we waited.
    Gone,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longer than every registered method name; a longer first word is not HTTP.
const MAX_METHOD: usize = 20;

/// Peeks at the client's first bytes until they decide, the peek is full or the time is up.
pub async fn detect(client: &TcpStream) -> Detected {
    let deadline = Instant::now() + defaults::DETECT_TIMEOUT;
    let mut buf = vec![0u8; defaults::DETECT_BYTES];
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Err(_) => return Detected::Opaque,
            Ok(Err(_)) => return Detected::Gone,
            // Closed before a byte: the L4 path passes the close on.
            Ok(Ok(0)) => return Detected::Opaque,
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Some(true) => return Detected::Http,
            Some(false) => return Detected::Opaque,
            None if n == buf.len() => return Detected::Opaque,
            // A peek returns at once while bytes wait: pause instead of spinning until more
            // come (a request line split over segments is rare).
            None => {
                let pause = Instant::now() + Duration::from_millis(5);
                if pause >= deadline {
                    return Detected::Opaque;
                }
                tokio::time::sleep_until(pause).await;
            }
        }
    }
}

/// `Some(true)`: the HTTP/2 preface or an HTTP/1 request line; `Some(false)`: neither can
/// follow; `None`: too few bytes to tell.
pub fn classify(b: &[u8]) -> Option<bool> {
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(true)
        } else {
            None
        };
    }
    // `METHOD SP request-target SP HTTP/1.x CRLF`; methods are upper-case tokens in practice.
    let end = b.iter().position(|&c| c == b'\n');
    let line = &b[..end.unwrap_or(b.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let method_len = line.iter().position(|&c| c == b' ').unwrap_or(line.len());
    if method_len > MAX_METHOD || !line[..method_len].iter().all(u8::is_ascii_uppercase) {
        return Some(false);
    }
    // No line end yet: the method so far is plausible, wait for the rest.
    end?;
    let mut parts = line.split(|&c| c == b' ');
    let (Some(m), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(false);
    };
    Some(!m.is_empty() && !target.is_empty() && version.starts_with(b"HTTP/1."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_and_the_h2_preface_are_http() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(true));
        assert_eq!(classify(b"POST /x?y=1 HTTP/1.0\n"), Some(true));
        assert_eq!(classify(H2_PREFACE), Some(true));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12"),
            Some(true)
        );
    }

    #[test]
    fn other_protocols_are_not() {
        // redis (RESP), TLS, SSH, a bare word, a request line of another protocol.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(false));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(false));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9\r\n"), Some(false));
        assert_eq!(classify(b"PING\r\n"), Some(false));
        assert_eq!(classify(b"GET / RTSP/1.0\r\n"), Some(false));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(false));
    }

    #[test]
    fn a_partial_line_waits_for_more() {
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /ind"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Some(false));
    }
}
