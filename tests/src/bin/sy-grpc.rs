//! `sy-grpc`: the gRPC backend and client of the HTTP-mode tests, both tonic.
//!
//! `sy-grpc serve --name N --listen IP:PORT [--unavailable] [--no-deadline]` serves the `Echo`
//! service of `proto/echo.proto` with tonic's server. `--unavailable` answers every `Who` with
//! `UNAVAILABLE`; `--no-deadline` serves the same tonic service through hyper without tonic's
//! server (so nothing here enforces the client's `grpc-timeout`: what a slow backend that
//! ignores deadlines looks like).
//!
//! `sy-grpc call --target http://VIP [--calls N] [--timeout-ms T] [--raw] KIND [ARGS]` makes N
//! calls over ONE channel (one HTTP/2 connection; `--raw`: hyper's client under tonic's, which
//! does not enforce the deadline itself) and prints one line per outcome, then `took_ms MS`:
//! `who [DELAY_MS [SLOW_BACKEND]]` → `ok BACKEND timeout=T` or `status CODE MESSAGE`; `fail CODE MESSAGE` and
//! `stream CODE MESSAGE MESSAGES` → `msg BACKEND` per reply, then `status CODE MESSAGE` and a
//! `meta KEY=VALUE` line per custom metadata entry of the trailers.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use futures::Stream;
use tonic::{
    Code, Request, Response, Status,
    metadata::{MetadataMap, MetadataValue},
    transport::{Channel, Server, server::TcpIncoming},
};

pub mod echo {
    tonic::include_proto!("switchyard.test");
}

use echo::{
    FailRequest, WhoReply, WhoRequest,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

struct Backend {
    name: String,
    unavailable: bool,
}

fn trailing(name: &str) -> MetadataMap {
    let mut m = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(name) {
        m.insert("x-served-by", v);
    }
    m.insert("x-answer", MetadataValue::from_static("forty two"));
    m.insert_bin("x-raw-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
    m
}

type Replies = Pin<Box<dyn Stream<Item = Result<WhoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Backend {
    async fn who(&self, req: Request<WhoRequest>) -> Result<Response<WhoReply>, Status> {
        if self.unavailable {
            return Err(Status::unavailable(format!("{} is unavailable", self.name)));
        }
        let grpc_timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let (delay, slow) = (req.get_ref().delay_ms, &req.get_ref().slow_backend);
        if delay > 0 && (slow.is_empty() || *slow == self.name) {
            tokio::time::sleep(Duration::from_millis(delay.into())).await;
        }
        Ok(Response::new(WhoReply {
            backend: self.name.clone(),
            grpc_timeout,
        }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<WhoReply>, Status> {
        let r = req.into_inner();
        Err(Status::with_metadata(
            Code::from(r.code),
            r.message,
            trailing(&self.name),
        ))
    }

    type StreamStream = Replies;

    async fn stream(&self, req: Request<FailRequest>) -> Result<Response<Replies>, Status> {
        let r = req.into_inner();
        let name = self.name.clone();
        let replies = (0..r.messages).map(move |_| {
            Ok(WhoReply {
                backend: name.clone(),
                grpc_timeout: String::new(),
            })
        });
        // The status after the data: tonic sends it in real trailers.
        let end = Status::with_metadata(Code::from(r.code), r.message, trailing(&self.name));
        let end = (end.code() != Code::Ok).then_some(Err(end));
        let all = futures::stream::iter(replies.chain(end));
        Ok(Response::new(Box::pin(all)))
    }
}

async fn serve(name: String, listen: SocketAddr, unavailable: bool, no_deadline: bool) {
    let svc = EchoServer::new(Backend { name, unavailable });
    if no_deadline {
        let l = tokio::net::TcpListener::bind(listen).await.expect("bind");
        println!("listening");
        let routes = tonic::service::Routes::new(svc);
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let svc = hyper_util::service::TowerToHyperService::new(routes.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .http2_only()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    }
    let incoming = TcpIncoming::bind(listen).expect("bind");
    println!("listening");
    Server::builder()
        .add_service(svc)
        .serve_with_incoming(incoming)
        .await
        .expect("serve");
}

fn show_status(s: &Status) {
    println!("status {:?} {}", s.code(), s.message());
    let mut meta: Vec<String> = s
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-") => {
                Some(format!("meta {k}={}", v.to_str().unwrap_or("?")))
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-") => Some(
                format!("meta {k}={:?}", v.to_bytes().unwrap_or_default().as_ref()),
            ),
            _ => None,
        })
        .collect();
    meta.sort();
    for m in meta {
        println!("{m}");
    }
}

/// The generated client over a tonic `Channel` (one HTTP/2 connection), or with `raw` over
/// hyper's client (one HTTP/2 connection too), which sends `grpc-timeout` without enforcing it
/// itself, as tonic's channel does: what is left to enforce it is the proxy.
#[derive(Clone)]
enum Client {
    Channel(EchoClient<Channel>),
    Raw(Box<EchoClient<RawTransport>>),
}

type RawTransport = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

macro_rules! on {
    ($c:expr, $m:ident, $req:expr) => {
        match $c {
            Client::Channel(c) => c.$m($req).await,
            Client::Raw(c) => c.$m($req).await,
        }
    };
}

async fn call(
    target: String,
    calls: usize,
    timeout: Option<Duration>,
    raw: bool,
    kind: Vec<String>,
) {
    let client = if raw {
        let hyper =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let origin = target.parse().expect("target");
        Client::Raw(Box::new(EchoClient::with_origin(hyper, origin)))
    } else {
        // One channel: one HTTP/2 connection that every call shares.
        let channel = Channel::from_shared(target)
            .expect("target")
            .connect()
            .await
            .expect("connect");
        Client::Channel(EchoClient::new(channel))
    };
    let arg = |i: usize| kind.get(i).cloned().unwrap_or_default();
    for _ in 0..calls {
        let mut c = client.clone();
        let started = std::time::Instant::now();
        match kind.first().map(String::as_str) {
            Some("who") => {
                let mut req = Request::new(WhoRequest {
                    delay_ms: arg(1).parse().unwrap_or(0),
                    slow_backend: arg(2),
                });
                if let Some(t) = timeout {
                    req.set_timeout(t);
                }
                match on!(&mut c, who, req) {
                    Ok(r) => {
                        let r = r.into_inner();
                        println!("ok {} timeout={}", r.backend, r.grpc_timeout);
                    }
                    Err(s) => show_status(&s),
                }
            }
            Some("fail") => {
                let req = Request::new(FailRequest {
                    code: arg(1).parse().unwrap_or(2),
                    message: arg(2),
                    messages: 0,
                });
                match on!(&mut c, fail, req) {
                    Ok(_) => println!("ok"),
                    Err(s) => show_status(&s),
                }
            }
            Some("stream") => {
                let req = Request::new(FailRequest {
                    code: arg(1).parse().unwrap_or(0),
                    message: arg(2),
                    messages: arg(3).parse().unwrap_or(2),
                });
                match on!(&mut c, stream, req) {
                    Ok(r) => {
                        let mut s = r.into_inner();
                        loop {
                            match s.message().await {
                                Ok(Some(m)) => println!("msg {}", m.backend),
                                Ok(None) => {
                                    let t = s.trailers().await.ok().flatten().unwrap_or_default();
                                    show_status(&Status::with_metadata(Code::Ok, "", t));
                                    break;
                                }
                                Err(st) => {
                                    show_status(&st);
                                    break;
                                }
                            }
                        }
                    }
                    Err(s) => show_status(&s),
                }
            }
            _ => panic!("call KIND: who [DELAY_MS] | fail CODE MESSAGE | stream CODE MESSAGE N"),
        }
        println!("took_ms {}", started.elapsed().as_millis());
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let (mut name, mut listen, mut target) = (String::from("grpc"), None, String::new());
    let (mut unavailable, mut no_deadline, mut calls, mut timeout) = (false, false, 1, None);
    let mut raw = false;
    let mut rest = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next().expect("--name NAME"),
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()),
            "--target" => target = args.next().expect("--target URL"),
            "--calls" => calls = args.next().and_then(|v| v.parse().ok()).expect("--calls N"),
            "--timeout-ms" => {
                timeout = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
            }
            "--unavailable" => unavailable = true,
            "--no-deadline" => no_deadline = true,
            "--raw" => raw = true,
            _ => rest.push(a),
        }
    }
    match mode.as_str() {
        "serve" => {
            let listen = listen.expect("serve --listen IP:PORT");
            serve(name, listen, unavailable, no_deadline).await
        }
        "call" => call(target, calls, timeout, raw, rest).await,
        _ => panic!("usage: sy-grpc serve … | sy-grpc call …"),
    }
}
