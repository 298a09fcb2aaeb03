//! HTTP/1.1 on a listener, bounded, for the API (Unix socket) and the metrics (TCP).
//!
//! Every way a client could hold the agent's attention is cut off: the request head must arrive
//! within a few seconds (also between keep-alive requests), the body within its own deadline
//! and under a size limit (413 before reading when the length is announced), a connection is
//! closed after a minute (once its request in flight is answered), and only so many are served
//! at once; the rest wait in the backlog.

use std::{convert::Infallible, future::Future, io, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::Semaphore,
    time::timeout,
};
use tracing::debug;

use super::AcceptFailures;
use crate::defaults;

/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 16 * 1024;

/// Every refusal: what is wrong, and with which field (`None` when no field is at fault, e.g.
/// an unknown path or a body that is not JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub field: Option<String>,
}

/// How much of the agent one listener's clients may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: defaults::API_MAX_BODY,
            header_timeout: defaults::API_HEADER_TIMEOUT,
            body_timeout: defaults::API_BODY_TIMEOUT,
            max_connections: defaults::API_MAX_CONNECTIONS,
            lifetime: defaults::API_CONNECTION_LIFETIME,
        }
    }
}

/// A request with its whole body read.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The path, still percent-encoded, without the query.
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    /// Who asked (`uid 0` on the Unix socket, the address on TCP), for the log.
    pub peer: Arc<str>,
}

/// An answer, independent of hyper so handlers can be tested and fuzzed on their own.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    /// The methods a path takes, for 405 answers.
    pub allow: Option<&'static str>,
}

impl Reply {
    pub fn json(status: StatusCode, body: &impl Serialize) -> Reply {
        let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|e| {
            format!("{{\"error\": \"cannot encode the answer: {e}\", \"field\": null}}").into()
        });
        text.push(b'\n');
        Reply {
            status,
            content_type: "application/json",
            body: text.into(),
            allow: None,
        }
    }

    pub fn error(status: StatusCode, error: impl Into<String>, field: Option<String>) -> Reply {
        Reply::json(
            status,
            &ErrorBody {
                error: error.into(),
                field,
            },
        )
    }

    pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            content_type,
            body: body.into(),
            allow: None,
        }
    }
}

/// Something connections come from.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Arc<str>)>> + Send;
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<(Self::Io, Arc<str>)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let peer = match stream.peer_cred() {
            Ok(c) => format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)),
            Err(_) => "unknown peer".into(),
        };
        Ok((stream, peer.into()))
    }
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<(Self::Io, Arc<str>)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        Ok((stream, peer.to_string().into()))
    }
}

/// Serves `listener` until the task is dropped, answering each request with `handler`.
pub async fn serve<L, H, F>(listener: L, limits: Limits, handler: H)
where
    L: Listener,
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = AcceptFailures::default();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (io, peer) = match listener.accept().await {
            Ok(accepted) => {
                failures.accepted("api/metrics listener");
                accepted
            }
            Err(e) => {
                // Out of descriptors and the like: back off briefly rather than spin.
                failures.failed("api/metrics listener", &e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let handler = handler.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(respond(req, peer, limits, &*handler).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let ended = match timeout(limits.lifetime, conn.as_mut()).await {
                Ok(ended) => ended,
                Err(_) => {
                    // Past its lifetime: finish the request in flight (a scrape, say), if any,
                    // within one more request's time, then close.
                    conn.as_mut().graceful_shutdown();
                    let grace = limits.header_timeout + limits.body_timeout;
                    timeout(grace, conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = ended {
                debug!("connection ended: {e}");
            }
        });
    }
}

async fn respond<H, F>(
    req: hyper::Request<Incoming>,
    peer: Arc<str>,
    limits: Limits,
    handler: &H,
) -> Response<Full<Bytes>>
where
    H: Fn(Request) -> F,
    F: Future<Output = Reply>,
{
    let (parts, body) = req.into_parts();
    let announced = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {} bytes", limits.max_body),
            None,
        )
    };
    if announced.is_some_and(|n| n > limits.max_body as u64) {
        return into_response(too_large());
    }
    let read = timeout(
        limits.body_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await;
    let body = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return into_response(too_large());
        }
        Ok(Err(e)) => {
            return into_response(Reply::error(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
                None,
            ));
        }
        Err(_) => {
            return into_response(Reply::error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}s",
                    limits.body_timeout.as_secs()
                ),
                None,
            ));
        }
    };
    let reply = handler(Request {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
        peer,
    })
    .await;
    into_response(reply)
}

fn into_response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(reply.content_type),
    );
    if let Some(allow) = reply.allow {
        headers.insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{UnixListener, UnixStream},
    };

    use super::*;

    async fn start(limits: Limits) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "sy-server-test-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(serve(listener, limits, |req: Request| {
            std::future::ready(Reply::json(StatusCode::OK, &req.body.len()))
        }));
        (path, task)
    }

    async fn read_all(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_by_the_head_timeout() {
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            lifetime: Duration::from_secs(3600),
            ..Limits::default()
        };
        let (path, task) = start(limits).await;
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // One answer, then the server closes the idle connection itself (well before the
        // hour-long lifetime, or read_all's own limit).
        let text = read_all(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
        task.abort();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn bodies_are_bounded_in_size_and_time() {
        let limits = Limits {
            max_body: 16,
            body_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (path, task) = start(limits).await;
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n")
            .await
            .unwrap();
        assert!(read_all(&mut s).await.starts_with("HTTP/1.1 413"));
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
            .await
            .unwrap();
        assert!(read_all(&mut s).await.starts_with("HTTP/1.1 408"));
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
        let text = read_all(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("2\n"),
            "{text}"
        );
        task.abort();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
