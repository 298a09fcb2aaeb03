//! `switchyard ctl`: the local API's client. Each command is one request; the answer is shown
//! as a table (or as the agent's JSON with `--json`), and the exit status says what happened:
//! 0 done, 1 the agent refused (its message, naming the field, is printed), 2 the agent cannot
//! be reached or the command line or an input file is wrong.

mod client;
mod table;

use std::{io::Read as _, path::Path};

use hyper::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use self::client::segment;
use crate::{
    api::view::{
        ErrorBody, RegistryView, RouteList, RouteState, RouteView, ServiceList, ServiceState,
        ServiceView, StateList, VersionView,
    },
    cli::{
        BackendCommand, BackendRef, CtlArgs, CtlCommand, RouteCommand, ServiceCommand, StateArg,
    },
};

/// Exit statuses.
pub const OK: i32 = 0;
pub const REFUSED: i32 = 1;
pub const UNREACHABLE: i32 = 2;

/// What went wrong, and which exit status says so.
enum Failure {
    /// The agent answered with a refusal.
    Refused { status: u16, body: bytes::Bytes },
    /// No usable answer, or a local mistake (unreadable file).
    Usage(String),
}

/// How a successful answer is shown.
enum Show {
    Services,
    Service,
    Routes,
    Route,
    Deleted,
    State,
    StateOne,
    Registry,
    Version,
}

/// Runs one command; returns the exit status.
pub fn run(args: CtlArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard ctl: cannot start: {e}");
            return UNREACHABLE;
        }
    };
    match runtime.block_on(execute(&args)) {
        Ok(()) => OK,
        Err(Failure::Usage(message)) => {
            eprintln!("switchyard ctl: {message}");
            UNREACHABLE
        }
        Err(Failure::Refused { status, body }) => {
            if args.json {
                println!("{}", String::from_utf8_lossy(&body).trim_end());
            }
            match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => match e.field {
                    Some(field) => {
                        eprintln!(
                            "switchyard ctl: refused ({status}): {} [field: {field}]",
                            e.error
                        )
                    }
                    None => eprintln!("switchyard ctl: refused ({status}): {}", e.error),
                },
                Err(_) => eprintln!(
                    "switchyard ctl: refused ({status}): {}",
                    String::from_utf8_lossy(&body).trim()
                ),
            }
            REFUSED
        }
    }
}

async fn execute(args: &CtlArgs) -> Result<(), Failure> {
    let (method, path, body, show) = request_for(&args.command)?;
    let answer = client::request(&args.socket, method, &path, body)
        .await
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if !(200..300).contains(&answer.status) {
        return Err(Failure::Refused {
            status: answer.status,
            body: answer.body,
        });
    }
    if args.json {
        println!("{}", String::from_utf8_lossy(&answer.body).trim_end());
        return Ok(());
    }
    print!("{}", render(&show, &answer.body)?);
    Ok(())
}

/// The request a command makes: method, path, JSON body, and how to show the answer.
type Call = (Method, String, Option<Vec<u8>>, Show);

/// The request a command makes.
fn request_for(command: &CtlCommand) -> Result<Call, Failure> {
    let service = |name: &str| format!("/v1/services/{}", segment(name));
    let backend = |name: &str, addr: &str| {
        format!("/v1/services/{}/backends/{}", segment(name), segment(addr))
    };
    let patch = |weight: Option<u32>, state: Option<StateArg>| {
        let mut m = serde_json::Map::new();
        if let Some(w) = weight {
            m.insert("weight".into(), json!(w));
        }
        if let Some(s) = state {
            m.insert("state".into(), json!(s.name()));
        }
        Some(Value::Object(m).to_string().into_bytes())
    };
    Ok(match command {
        CtlCommand::Services => (Method::GET, "/v1/services".into(), None, Show::Services),
        CtlCommand::Service(c) => match c {
            ServiceCommand::Get { name } => (Method::GET, service(name), None, Show::Service),
            ServiceCommand::Create { file } => (
                Method::POST,
                "/v1/services".into(),
                Some(read_entry(file)?),
                Show::Service,
            ),
            ServiceCommand::Replace { name, file } => (
                Method::PUT,
                service(name),
                Some(read_entry(file)?),
                Show::Service,
            ),
            ServiceCommand::Delete { name } => (Method::DELETE, service(name), None, Show::Deleted),
            ServiceCommand::Release { name } => (
                Method::DELETE,
                format!("{}/override", service(name)),
                None,
                Show::Service,
            ),
        },
        CtlCommand::Backend(c) => {
            let to = |b: &BackendRef| backend(&b.service, &b.address);
            match c {
                BackendCommand::Add {
                    backend: b,
                    weight,
                    state,
                } => {
                    let mut body = serde_json::Map::new();
                    body.insert("address".into(), json!(b.address));
                    if let Some(w) = weight {
                        body.insert("weight".into(), json!(w));
                    }
                    if let Some(s) = state {
                        body.insert("state".into(), json!(s.name()));
                    }
                    (
                        Method::POST,
                        format!("{}/backends", service(&b.service)),
                        Some(Value::Object(body).to_string().into_bytes()),
                        Show::Service,
                    )
                }
                BackendCommand::Remove { backend: b } => {
                    (Method::DELETE, to(b), None, Show::Service)
                }
                BackendCommand::Set {
                    backend: b,
                    weight,
                    state,
                } => (Method::PATCH, to(b), patch(*weight, *state), Show::Service),
                BackendCommand::Drain { backend: b } => (
                    Method::PATCH,
                    to(b),
                    patch(None, Some(StateArg::Drain)),
                    Show::Service,
                ),
                BackendCommand::Maint { backend: b } => (
                    Method::PATCH,
                    to(b),
                    patch(None, Some(StateArg::Maint)),
                    Show::Service,
                ),
                BackendCommand::Ready { backend: b } => (
                    Method::PATCH,
                    to(b),
                    patch(None, Some(StateArg::Ready)),
                    Show::Service,
                ),
            }
        }
        CtlCommand::Route(c) => {
            let route = |name: &str| format!("/v1/routes/{}", segment(name));
            match c {
                RouteCommand::List => (Method::GET, "/v1/routes".into(), None, Show::Routes),
                RouteCommand::Get { name } => (Method::GET, route(name), None, Show::Route),
                RouteCommand::Put { name, file } => (
                    Method::PUT,
                    route(name),
                    Some(read_table(file, "route")?),
                    Show::Route,
                ),
                RouteCommand::Delete { name } => (Method::DELETE, route(name), None, Show::Deleted),
            }
        }
        CtlCommand::State { service: None } => (Method::GET, "/v1/state".into(), None, Show::State),
        CtlCommand::State {
            service: Some(name),
        } => (
            Method::GET,
            format!("{}/state", service(name)),
            None,
            Show::StateOne,
        ),
        CtlCommand::Registry => (Method::GET, "/v1/registry".into(), None, Show::Registry),
        CtlCommand::Version => (Method::GET, "/v1/version".into(), None, Show::Version),
    })
}

/// A service entry from a file (`-`: standard input): JSON, or TOML with the fields of a
/// `[[service]]` table (a file with one `[[service]]` table is taken too). Sent as JSON; the
/// agent checks it.
fn read_entry(file: &Path) -> Result<Vec<u8>, Failure> {
    read_table(file, "service")
}

/// An entry of `[[table]]` from a file, as [`read_entry`] reads a service.
fn read_table(file: &Path, table_name: &str) -> Result<Vec<u8>, Failure> {
    let shown = file.display();
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::read_to_string(file).map(|t| text = t)
    };
    read.map_err(|e| Failure::Usage(format!("cannot read {shown}: {e}")))?;
    if text.trim_start().starts_with('{') {
        serde_json::from_str::<Value>(&text)
            .map_err(|e| Failure::Usage(format!("{shown} is not JSON: {e}")))?;
        return Ok(text.into_bytes());
    }
    let doc: toml::Table = toml::from_str(&text).map_err(|e| {
        Failure::Usage(format!(
            "{shown} is neither JSON nor TOML: {}",
            e.to_string().trim_end()
        ))
    })?;
    let table = match doc.get(table_name) {
        Some(toml::Value::Array(list)) if doc.len() == 1 => match list.as_slice() {
            [toml::Value::Table(t)] => t.clone(),
            _ => {
                return Err(Failure::Usage(format!(
                    "{shown}: give exactly one [[{table_name}]] table"
                )));
            }
        },
        _ => doc,
    };
    serde_json::to_vec(&table).map_err(|e| Failure::Usage(format!("{shown}: {e}")))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        Failure::Usage(format!(
            "the agent's answer is not what this ctl expects: {e}"
        ))
    })
}

fn render(show: &Show, body: &[u8]) -> Result<String, Failure> {
    Ok(match show {
        Show::Services => services(&parse::<ServiceList>(body)?),
        Show::Service => service(&parse::<ServiceView>(body)?),
        Show::Deleted => {
            let v: Value = parse(body)?;
            let name = v.get("deleted").and_then(Value::as_str).unwrap_or("?");
            format!("deleted {name}\n")
        }
        Show::Routes => routes(&parse::<RouteList>(body)?),
        Show::Route => {
            let v = parse::<RouteView>(body)?;
            let mut out = format!("name:   {}\nsource: {}\n", v.name, v.source.name());
            if let Some(note) = &v.note {
                out += &format!("note:   {note}\n");
            }
            out += &serde_json::to_string_pretty(&v.route).unwrap_or_default();
            out.push('\n');
            out
        }
        Show::State => {
            let list = parse::<StateList>(body)?;
            let mut out = list
                .services
                .iter()
                .map(state)
                .collect::<Vec<_>>()
                .join("\n");
            if !list.routes.is_empty() {
                out += "\nroutes\n";
                for r in &list.routes {
                    out += &route_state(r);
                }
            }
            out
        }
        Show::StateOne => state(&parse::<ServiceState>(body)?),
        Show::Registry => registry(&parse::<RegistryView>(body)?),
        Show::Version => version(&parse::<VersionView>(body)?),
    })
}

fn routes(list: &RouteList) -> String {
    if list.routes.is_empty() {
        return "no routes\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .routes
        .iter()
        .map(|v| {
            let parent = match (v.route.get("service"), v.route.get("gateway")) {
                (Some(s), _) => format!("service {}", s.as_str().unwrap_or("?")),
                (None, Some(g)) => format!("gateway {}", g.as_str().unwrap_or("?")),
                _ => "-".into(),
            };
            let hosts = v
                .route
                .get("hostnames")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "*".into());
            let rules = v
                .route
                .get("rule")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![
                v.name.clone(),
                parent,
                hosts,
                rules.to_string(),
                v.source.name().to_owned(),
            ]
        })
        .collect();
    table::render(&["NAME", "PARENT", "HOSTS", "RULES", "SOURCE"], &rows)
}

/// One route in `ctl state`: its parent, then a line per rule (matches → destinations), then
/// its request counters when the agent counts them.
fn route_state(r: &RouteState) -> String {
    let hosts = if r.hostnames.is_empty() {
        "*".to_owned()
    } else {
        r.hostnames.join(",")
    };
    let mut out = format!(
        "  {}  {}  hosts {}  source {}\n",
        r.name,
        r.parent,
        hosts,
        r.source.name()
    );
    for (i, u) in r.rules.iter().enumerate() {
        let matches = if u.matches.is_empty() {
            "any".to_owned()
        } else {
            u.matches.join(" | ")
        };
        let to = match &u.redirect {
            Some(redirect) => format!("redirect {redirect}"),
            None => u
                .backends
                .iter()
                .map(|b| {
                    let gone = if b.resolved { "" } else { " (not served: 500)" };
                    format!("{} w{}{gone}", b.service, b.weight)
                })
                .collect::<Vec<_>>()
                .join(", "),
        };
        out += &format!("    rule[{i}] {matches} -> {to}\n");
    }
    if let Some(requests) = &r.requests {
        out += &format!("    requests {requests}\n");
    }
    out
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn source(v: &ServiceView) -> String {
    let s = v.source.map_or("-", |s| s.name());
    match v.overrides {
        Some(o) => format!("{s} (overrides {})", o.name()),
        None => s.to_owned(),
    }
}

fn backends(entry: &Value) -> Vec<&Value> {
    entry
        .get("backends")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn services(list: &ServiceList) -> String {
    if list.services.is_empty() {
        return "no services\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .services
        .iter()
        .map(|v| {
            let e = &v.service;
            let all = backends(e);
            let ready = all
                .iter()
                .filter(|b| b.get("state").and_then(Value::as_str) == Some("ready"))
                .count();
            vec![
                v.name.clone(),
                text(e, "vip"),
                text(e, "protocol"),
                text(e, "mode"),
                text(e, "algorithm"),
                format!("{} ({ready} ready)", all.len()),
                source(v),
            ]
        })
        .collect();
    table::render(
        &[
            "NAME",
            "VIP",
            "PROTO",
            "MODE",
            "ALGORITHM",
            "BACKENDS",
            "SOURCE",
        ],
        &rows,
    )
}

fn service(v: &ServiceView) -> String {
    let e = &v.service;
    let mut out = String::new();
    out += &format!("name:      {}\n", v.name);
    out += &format!("source:    {}\n", source(v));
    out += &format!("vip:       {}/{}\n", text(e, "vip"), text(e, "protocol"));
    out += &format!("mode:      {}\n", text(e, "mode"));
    out += &format!("algorithm: {}\n", text(e, "algorithm"));
    if let Some(fields) = e.as_object() {
        for (k, val) in fields {
            if matches!(
                k.as_str(),
                "name" | "vip" | "protocol" | "mode" | "algorithm" | "backends"
            ) {
                continue;
            }
            let shown = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out += &format!("{:<10} {shown}\n", format!("{k}:"));
        }
    }
    if let Some(note) = &v.note {
        out += &format!("note:      {note}\n");
    }
    let rows: Vec<Vec<String>> = backends(e)
        .iter()
        .map(|b| vec![text(b, "address"), text(b, "weight"), text(b, "state")])
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out += "no backends: connects fail at once\n";
    } else {
        out += &table::render(&["BACKEND", "WEIGHT", "STATE"], &rows);
    }
    out
}

fn state(s: &ServiceState) -> String {
    let mut out = format!(
        "{}  {}/{}  {} mode  source {}",
        s.name,
        s.vip,
        s.protocol,
        serde_json::to_value(s.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        s.source.map_or("-", |s| s.name()),
    );
    if let Some(f) = &s.forwarder {
        out += &format!(
            "  active {}  retries {}  refused: limit {}, no backend {}",
            f.active, f.retries, f.refused_limit, f.refused_no_backend
        );
    }
    out.push('\n');
    if let Some(h) = &s.http {
        out += &http_requests(h);
    }
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = s
        .backends
        .iter()
        .map(|b| {
            let c = b.counters.as_ref();
            let n = |f: fn(&crate::api::view::CountersView) -> u64| {
                c.map_or_else(dash, |c| f(c).to_string())
            };
            vec![
                b.address.to_string(),
                b.weight.to_string(),
                json_name(&b.state),
                json_name(&b.health),
                b.ejected_for_seconds
                    .map_or_else(dash, |t| format!("for {}", table::seconds(t))),
                b.drain.as_ref().map_or_else(dash, |d| {
                    format!("{} open, {} cut", d.open, d.closed_at_deadline)
                }),
                n(|c| c.active),
                n(|c| c.opened),
                n(|c| c.closed),
                n(|c| c.connect_failures),
                n(|c| c.connect_timeouts),
                n(|c| c.resets),
                c.map_or_else(dash, |c| table::bytes(c.bytes_out)),
                c.map_or_else(dash, |c| table::bytes(c.bytes_in)),
            ]
        })
        .collect();
    if rows.is_empty() {
        out += "no backends\n";
    } else {
        out += &table::render(
            &[
                "BACKEND", "WEIGHT", "STATE", "HEALTH", "EJECTED", "DRAINING", "ACTIVE", "OPENED",
                "CLOSED", "FAILED", "TIMEOUTS", "RESETS", "SENT", "RECEIVED",
            ],
            &rows,
        );
    }
    out
}

/// An HTTP service's request counts, then one line per route that sent it requests.
fn http_requests(h: &crate::api::view::HttpState) -> String {
    let line = |c: &crate::api::view::RequestCounts| {
        let classes: Vec<String> = c.by_class.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let classes = if classes.is_empty() {
            "none".to_owned()
        } else {
            classes.join(", ")
        };
        format!(
            "{classes} (by the proxy {})  retries {}  in flight {}",
            c.by_proxy, c.retries, c.in_flight
        )
    };
    let mut out = format!("  requests: {}\n", line(&h.requests));
    for r in &h.routes {
        out += &format!("  route {}: {}\n", r.route, line(&r.requests));
    }
    out
}

/// An enum as its JSON name (`ready`, `up`).
fn json_name(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn registry(r: &RegistryView) -> String {
    let rows: Vec<Vec<String>> = r
        .sources
        .iter()
        .map(|s| {
            vec![
                s.source.name().to_owned(),
                s.entries.to_string(),
                if s.live { "yes" } else { "no" }.into(),
                s.last_sync.clone().unwrap_or_else(|| "never".into()),
                s.staleness_seconds
                    .map_or_else(|| "-".into(), table::seconds),
                s.rejected_total.to_string(),
                s.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    format!(
        "{} services served\n\n{}",
        r.services,
        table::render(
            &[
                "SOURCE",
                "ENTRIES",
                "LIVE",
                "LAST SYNC",
                "STALENESS",
                "REJECTED",
                "LAST ERROR"
            ],
            &rows,
        )
    )
}

fn version(v: &VersionView) -> String {
    format!(
        "agent:  switchyard {} ({}, {}, rust {}), pid {}, up {}\nclient: switchyard {}\n",
        v.version,
        v.build.profile,
        v.build.target,
        v.build.rust_version,
        v.pid,
        table::seconds(v.uptime_seconds),
        env!("CARGO_PKG_VERSION"),
    )
}
