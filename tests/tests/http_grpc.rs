//! gRPC through HTTP mode (`app_protocol = "grpc"`), with tonic on both sides (`sy-grpc`): one
//! client channel (one HTTP/2 connection) reaching every backend, statuses, messages and
//! trailing metadata intact, `UNAVAILABLE` and a killed backend retried on another, the
//! client's `grpc-timeout` honoured as the request's deadline and passed on as what is left.

use std::collections::BTreeMap;

use switchyard_testkit::{
    Agent, Topology,
    http::{GrpcBackends, GrpcFlags, grpc_call},
    require_root,
};

const VIP: &str = "10.96.0.50:80";

fn service(topo: &Topology, which: &[usize], extra: &str) -> String {
    let list: Vec<String> = which
        .iter()
        .map(|&i| format!("\"{}\"", GrpcBackends::addr(topo, i)))
        .collect();
    format!(
        "[[service]]\nname = \"echo\"\nvip = \"{VIP}\"\nmode = \"proxy\"\napp_protocol = \"grpc\"\n\
         {extra}\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

/// Backends named in `ok BACKEND …` lines.
fn answered(lines: &[String]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("ok ") {
            let b = rest.split(' ').next().unwrap_or("").to_owned();
            *seen.entry(b).or_default() += 1;
        }
    }
    seen
}

#[test]
fn one_grpc_channel_reaches_every_backend_with_statuses_and_trailers_intact() -> anyhow::Result<()>
{
    if !require_root("one_grpc_channel_reaches_every_backend_with_statuses_and_trailers_intact") {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    let _grpc = GrpcBackends::start(&topo, &[])?;
    let _agent = Agent::start(&topo, &topo.agent_config(&service(&topo, &[0, 1, 2], "")))?;

    // 30 unary calls on one channel: round robin per call, 10 each.
    let out = grpc_call(&topo, VIP, &["--calls", "30", "who"])?;
    let seen = answered(&out);
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{out:?}"
    );

    // A non-OK status in a trailers-only answer: code, message (spaces, percent-encoded
    // characters) and custom metadata, text and binary.
    let out = grpc_call(&topo, VIP, &["fail", "9", "not now: 50% done, café"])?;
    assert_eq!(
        out[0], "status FailedPrecondition not now: 50% done, café",
        "{out:?}"
    );
    assert!(
        out.contains(&"meta x-answer=forty two".to_owned()),
        "{out:?}"
    );
    assert!(
        out.contains(&"meta x-raw-bin=[0, 1, 2, 255]".to_owned()),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|l| l.starts_with("meta x-served-by=backend-")),
        "{out:?}"
    );

    // A stream: replies, then the status in real trailers after the data.
    let out = grpc_call(&topo, VIP, &["stream", "8", "quota spent", "3"])?;
    assert_eq!(
        out.iter().filter(|l| l.starts_with("msg backend-")).count(),
        3,
        "{out:?}"
    );
    assert!(
        out.contains(&"status ResourceExhausted quota spent".to_owned()),
        "{out:?}"
    );
    assert!(
        out.contains(&"meta x-answer=forty two".to_owned()),
        "{out:?}"
    );
    assert!(
        out.contains(&"meta x-raw-bin=[0, 1, 2, 255]".to_owned()),
        "{out:?}"
    );
    // An OK stream ends with grpc-status 0 in its trailers.
    let out = grpc_call(&topo, VIP, &["stream", "0", "", "2"])?;
    assert!(out.contains(&"status Ok ".to_owned()), "{out:?}");
    Ok(())
}

#[test]
fn unavailable_and_killed_backends_are_retried_and_grpc_timeout_is_the_deadline()
-> anyhow::Result<()> {
    if !require_root("unavailable_and_killed_backends_are_retried_and_grpc_timeout_is_the_deadline")
    {
        return Ok(());
    }
    let topo = Topology::new(1, 3)?;
    // backend-1 answers UNAVAILABLE to every call; backend-3 ignores deadlines.
    let flags = [
        GrpcFlags {
            unavailable: true,
            ..Default::default()
        },
        GrpcFlags::default(),
        GrpcFlags {
            no_deadline: true,
            ..Default::default()
        },
    ];
    let mut grpc = GrpcBackends::start(&topo, &flags)?;
    let config = topo.agent_config(&service(
        &topo,
        &[0, 1, 2],
        "retries = 2\nrequest_timeout = \"10s\"",
    ));
    let _agent = Agent::start(&topo, &config)?;

    // UNAVAILABLE from backend-1 is retried on another backend: every call succeeds.
    let out = grpc_call(&topo, VIP, &["--calls", "30", "who"])?;
    let seen = answered(&out);
    assert_eq!(seen.values().sum::<usize>(), 30, "{out:?}");
    assert!(!seen.contains_key("backend-1"), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Each attempt tells the backend what is left of the request's deadline: the tighter of
    // the client's and the service's (10 s): the service's, with no client deadline or a
    // longer one, the client's when it is shorter.
    for (client, want) in [
        (None, 9000..=10_000),
        (Some("20000"), 9000..=10_000),
        (Some("3000"), 2000..=3000),
    ] {
        let mut args = vec!["--calls", "4", "who"];
        if let Some(t) = client {
            args.splice(0..0, ["--timeout-ms", t]);
        }
        let out = grpc_call(&topo, VIP, &args)?;
        assert_eq!(answered(&out).values().sum::<usize>(), 4, "{out:?}");
        for l in out.iter().filter(|l| l.starts_with("ok ")) {
            let t = l.split("timeout=").nth(1).unwrap_or("");
            let ms = switchyard_testkit::http::grpc_timeout_ms(t)
                .unwrap_or_else(|| panic!("no grpc-timeout passed on: {l}"));
            assert!(want.contains(&ms), "client {client:?}: {l}");
        }
    }

    // The client's grpc-timeout is the request's deadline: backend-3 takes 5 s and does not
    // enforce deadlines itself, nor does this client; the proxy answers DEADLINE_EXCEEDED
    // after about 300 ms, not after the service's 10 s.
    let out = grpc_call(
        &topo,
        VIP,
        &[
            "--raw",
            "--timeout-ms",
            "300",
            "--calls",
            "3",
            "who",
            "5000",
            "backend-3",
        ],
    )?;
    // Each call's outcome, with how long it took.
    let mut calls: Vec<(&String, u64)> = Vec::new();
    let mut outcome = None;
    for l in &out {
        if l.starts_with("ok ") || l.starts_with("status ") {
            outcome = Some(l);
        } else if let Some(ms) = l.strip_prefix("took_ms ")
            && let Some(o) = outcome.take()
        {
            calls.push((o, ms.parse()?));
        }
    }
    assert_eq!(calls.len(), 3, "{out:?}");
    let late: Vec<_> = calls
        .iter()
        .filter(|(l, _)| l.starts_with("status DeadlineExceeded switchyard:"))
        .collect();
    assert!(!late.is_empty(), "backend-3 got a call: {out:?}");
    for (l, ms) in &calls {
        if l.starts_with("ok ") {
            continue;
        }
        assert!(
            l.starts_with("status DeadlineExceeded switchyard:"),
            "{out:?}"
        );
        assert!((250..2000).contains(ms), "{ms} ms: {out:?}");
    }

    // A killed backend: its connection breaks and connects are refused; calls go elsewhere.
    grpc.kill(1);
    let out = grpc_call(&topo, VIP, &["--calls", "20", "who"])?;
    let seen = answered(&out);
    assert_eq!(seen.values().sum::<usize>(), 20, "{out:?}");
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["backend-3"], "{seen:?}");
    Ok(())
}
