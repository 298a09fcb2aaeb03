//! `sy-http`: the HTTP backend of the HTTP-mode tests. Serves HTTP/1.1 and HTTP/2 with prior
//! knowledge (hyper-util's `auto`) on every `--listen` address. Every answer names the backend
//! (`x-backend` header and the body's first line) and the protocol it came in on; the path
//! chooses the behaviour: `/status/N` answers N, `/delay/MS` waits first, `/echo` sends the
//! request body back, `/headers` lists the request's headers, `/exit` reads the request body
//! and exits without answering (a backend dying mid-request), anything else answers 200.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

async fn answer(name: String, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let proto = format!("{:?}", req.version());
    let mut status = StatusCode::OK;
    let mut text = format!("{name}\n{proto}\n");
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if path == "/headers" {
        for (k, v) in req.headers() {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
    } else if path == "/exit" {
        let _ = req.into_body().collect().await;
        std::process::exit(3);
    } else if path == "/echo" {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        text.push_str(&String::from_utf8_lossy(&body.unwrap_or_default()));
    }
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("x-backend", name.parse().expect("a header-safe name"));
    r
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut name = String::from("http");
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--name", Some(v)) => name = v,
            ("--listen", Some(v)) => listen.push(v.parse().expect("--listen ip:port")),
            _ => panic!("usage: sy-http --name NAME --listen IP:PORT..."),
        }
    }
    let mut tasks = Vec::new();
    for addr in listen {
        let l = TcpListener::bind(addr).await?;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(answer(name, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        }));
    }
    println!("listening");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
