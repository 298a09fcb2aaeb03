//! Bodies the proxy passes on: one boxed type for whatever goes out, a request body that keeps
//! a copy for a retry (bounded), and a response body that holds its backend until it ends.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::{
    HeaderMap,
    body::{Body as _, Frame, Incoming, SizeHint},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends, to a client or to a backend.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// What a request body sent so far was, kept for a replay on another backend while it stays
/// within `max` bytes.
#[derive(Default)]
struct Record {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    /// More than `max` went by: the copy was dropped.
    overflow: bool,
    /// The end of the body went by: the copy is whole.
    complete: bool,
}

/// The copy of a request body, shared by the attempts of one request. A request without a
/// body (most GETs) records nothing: no shared record, no wrapper.
#[derive(Clone)]
pub struct Replay(Option<Recording>);

#[derive(Clone)]
struct Recording {
    record: Arc<Mutex<Record>>,
    max: usize,
}

impl Replay {
    /// Wraps the client's body for the first attempt. An empty body is whole from the start.
    pub fn first(body: Incoming, max: usize) -> (Replay, Body) {
        if body.is_end_stream() {
            return (Replay(None), empty());
        }
        let replay = Recording {
            record: Arc::new(Mutex::new(Record::default())),
            max,
        };
        let tee = Tee {
            inner: body,
            replay: replay.clone(),
        };
        (Replay(Some(replay)), tee.boxed_unsync())
    }

    /// The body again for another attempt, if all of it went by and was kept.
    pub fn again(&self) -> Option<Body> {
        let Some(recording) = &self.0 else {
            return Some(empty());
        };
        let r = recording.lock();
        if r.overflow || !r.complete {
            return None;
        }
        let frames: VecDeque<Frame<Bytes>> = r
            .data
            .iter()
            .cloned()
            .map(Frame::data)
            .chain(r.trailers.clone().map(Frame::trailers))
            .collect();
        Some(Recorded(frames).boxed_unsync())
    }

    /// Whether any of the body has been sent (an attempt that failed after this may not be
    /// replayed unless [`Replay::again`] has it whole).
    pub fn started(&self) -> bool {
        self.0.as_ref().is_some_and(|recording| {
            let r = recording.lock();
            r.size > 0 || r.overflow || r.trailers.is_some()
        })
    }
}

impl Recording {
    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The client's body, recorded as it goes by.
struct Tee {
    inner: Incoming,
    replay: Recording,
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let max = self.replay.max;
        // The sender asks `is_end_stream` after each frame and stops polling once it is true
        // (hyper does, for HTTP/1.1 and HTTP/2): the last data frame may be the end.
        let ended = self.inner.is_end_stream();
        let mut r = self.replay.lock();
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    r.size += d.len();
                    if r.size > max {
                        r.overflow = true;
                        r.data = Vec::new();
                    } else if !r.overflow {
                        r.data.push(d.clone());
                    }
                    r.complete |= ended;
                } else if let Some(t) = frame.trailers_ref() {
                    r.trailers = Some(t.clone());
                    r.complete = true;
                }
            }
            Poll::Ready(None) => r.complete = true,
            _ => {}
        }
        drop(r);
        polled.map(|o| o.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A recorded body, played back.
struct Recorded(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let n: usize = self
            .0
            .iter()
            .filter_map(|f| f.data_ref().map(Bytes::len))
            .sum();
        SizeHint::with_exact(n as u64)
    }
}

/// What a response body holds until it ends: it sees the trailers go by, and is told once how
/// the body ended (whole, or broken or dropped by a client that left).
pub trait Guard: Send + Unpin + 'static {
    fn trailers(&mut self, _trailers: &HeaderMap) {}
    fn end(self, whole: bool);
}

/// A backend's response body, with what must happen when it ends (the request stops counting
/// on its backend, a pooled connection goes back, the request is recorded) whether it ends
/// whole, broken, or dropped by a client that left.
pub struct Held<G: Guard> {
    inner: Incoming,
    guard: Option<G>,
}

impl<G: Guard> Held<G> {
    pub fn new(inner: Incoming, guard: G) -> Self {
        Held {
            inner,
            guard: Some(guard),
        }
    }

    fn end(&mut self, whole: bool) {
        if let Some(g) = self.guard.take() {
            g.end(whole);
        }
    }
}

impl<G: Guard> hyper::body::Body for Held<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(t), Some(g)) = (f.trailers_ref(), self.guard.as_mut()) {
                    g.trailers(t);
                }
                if self.inner.is_end_stream() {
                    self.end(true);
                }
            }
            Poll::Ready(None) => self.end(true),
            Poll::Ready(Some(Err(_))) => self.end(false),
            _ => {}
        }
        polled.map(|o| o.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<G: Guard> Drop for Held<G> {
    fn drop(&mut self) {
        let whole = self.inner.is_end_stream();
        self.end(whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_last_frame_that_ends_the_body_completes_the_copy() {
        // What hyper's senders do: a frame, then `is_end_stream`, and no further poll.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut tx, rx) = tokio::io::duplex(4096);
            let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
            let addr_tx = Arc::new(Mutex::new(Some(addr_tx)));
            let server = tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let addr_tx = addr_tx.clone();
                    async move {
                        let (replay, mut body) = Replay::first(req.into_body(), 1024);
                        while !body.is_end_stream() {
                            match body.frame().await {
                                Some(Ok(_)) => {}
                                _ => break,
                            }
                        }
                        let again = replay.again().is_some();
                        if let Some(t) = addr_tx.lock().unwrap().take() {
                            let _ = t.send(again);
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(empty()))
                    }
                });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(rx), svc)
                    .await
            });
            use tokio::io::AsyncWriteExt;
            tx.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
            assert!(
                addr_rx.await.unwrap(),
                "the whole body was kept for a replay"
            );
            drop(tx);
            let _ = server.await;
        });
    }
}
