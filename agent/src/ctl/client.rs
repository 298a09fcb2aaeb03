//! One HTTP/1.1 request to the agent's Unix socket, bounded in time.

use std::{io, path::Path};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use tokio::{net::UnixStream, time::timeout};

use crate::defaults;

/// Why there is no answer at all.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    #[error("cannot reach the agent at {path}: {reason}")]
    Connect { path: String, reason: String },
    #[error("the agent at {0} did not answer within {1}s")]
    Timeout(String, u64),
    #[error("the agent at {path} answered badly: {reason}")]
    Protocol { path: String, reason: String },
}

pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Sends one request; the body, if any, is JSON.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Answer, Unreachable> {
    let shown = socket.display().to_string();
    let limit = defaults::CTL_TIMEOUT;
    timeout(limit, exchange(socket, method, path, body))
        .await
        .map_err(|_| Unreachable::Timeout(shown.clone(), limit.as_secs()))?
}

async fn exchange(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Answer, Unreachable> {
    let shown = socket.display().to_string();
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| Unreachable::Connect {
            path: shown.clone(),
            reason: connect_reason(&e),
        })?;
    let protocol = |e: &dyn std::fmt::Display| Unreachable::Protocol {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(&e))?;
    let driver = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "switchyard")
        .header(
            header::USER_AGENT,
            concat!("switchyard-ctl/", env!("CARGO_PKG_VERSION")),
        );
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| protocol(&e))?;
    let response = sender.send_request(req).await.map_err(|e| protocol(&e))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| protocol(&e))?
        .to_bytes();
    driver.abort();
    Ok(Answer { status, body })
}

fn connect_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => {
            "no such socket (is the agent running, with this [api] socket?)".into()
        }
        io::ErrorKind::ConnectionRefused => "nothing listens there (agent stopped?)".into(),
        io::ErrorKind::PermissionDenied => {
            "permission denied (the socket is for its owner, or its group: see [api] mode, group)"
                .into()
        }
        _ => e.to_string(),
    }
}

/// `%XX`-encodes a path segment (a service name, a backend address).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_encoded() {
        assert_eq!(super::segment("[fd00::1]:80"), "%5Bfd00%3A%3A1%5D%3A80");
        assert_eq!(super::segment("web-1.a_b"), "web-1.a_b");
        assert_eq!(super::segment("a/b"), "a%2Fb");
    }
}
