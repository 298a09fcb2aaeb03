//! The DNS source: services whose backends are what a name resolves to (A, AAAA or SRV),
//! looked up again when the answer's TTL runs out (within `defaults::DNS_MIN_REFRESH` and
//! `DNS_MAX_REFRESH`).
//!
//! A failed lookup (no answer, SERVFAIL, no records) keeps the last good backends and is retried
//! with backoff: a DNS hiccup must not empty a service. SRV answers give each target's port
//! and weight; only the lowest priority present is used (the others are the fallbacks SRV
//! describes, for when those are gone from DNS). Backends are kept sorted so that a server
//! rotating its answers is not seen as a change.

use std::{net::IpAddr, net::SocketAddr, time::Duration};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{NameServerConfig, ResolveHosts, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::{Name, RData, Record, RecordType},
};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{Registry, Rejected, Source, retry::Backoff};
use crate::{
    catalog::{Backend, BackendState},
    config::{DnsConfig, DnsRecord},
    defaults,
};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no resolver: {0}")]
    Resolver(NetError),
    #[error("{query} {record}: {source}")]
    Lookup {
        query: String,
        record: RecordType,
        source: NetError,
    },
    #[error("{query} {record}: no usable records")]
    Empty { query: String, record: RecordType },
}

/// What one resolution gave: the backends, and how long they may be trusted.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub backends: Vec<Backend>,
    pub ttl: Duration,
}

/// Follows every entry until the task is dropped. Entries saved by an earlier run whose names
/// are no longer configured are dropped first.
pub async fn run(registry: Registry, entries: Vec<DnsConfig>) {
    for key in registry.keys(Source::Dns, "") {
        if !entries.iter().any(|e| e.service.name == key) {
            registry.put(Source::Dns, &key, None);
        }
    }
    let mut tasks = JoinSet::new();
    for entry in entries {
        tasks.spawn(follow(registry.clone(), entry));
    }
    while tasks.join_next().await.is_some() {}
}

async fn follow(registry: Registry, entry: DnsConfig) {
    let name = entry.service.name.clone();
    let mut retry = Backoff::default();
    refresh_saved(&registry, &entry);
    let resolver = loop {
        match resolver(entry.nameserver) {
            Ok(r) => break r,
            Err(e) => {
                let wait = retry.next();
                warn!(service = %name, "dns: {e}; retrying in {wait:?}");
                registry.set_live(Source::Dns, false, Some(format!("{name}: {e}")));
                tokio::time::sleep(wait).await;
            }
        }
    };
    let mut applied: Option<Vec<Backend>> = None;
    loop {
        let wait = match resolve(&resolver, &entry).await {
            Ok(answer) => {
                retry.reset();
                let mut service = entry.service.clone();
                service.backends = answer.backends;
                if let Err(e) = service.validate() {
                    let reason = e.to_string();
                    registry.reject(
                        Source::Dns,
                        &Rejected {
                            key: name.clone(),
                            reason,
                        },
                    );
                } else if applied.as_ref() != Some(&service.backends) {
                    let addrs: Vec<String> = service
                        .backends
                        .iter()
                        .map(|b| b.addr.to_string())
                        .collect();
                    info!(
                        service = %name,
                        query = %entry.query,
                        ttl = ?answer.ttl,
                        "dns: backends {}",
                        addrs.join(" ")
                    );
                    applied = Some(service.backends.clone());
                    registry.put(Source::Dns, &name, Some(service));
                } else {
                    registry.set_live(Source::Dns, true, None);
                }
                answer
                    .ttl
                    .clamp(defaults::DNS_MIN_REFRESH, defaults::DNS_MAX_REFRESH)
            }
            Err(e) => {
                let wait = retry.next();
                warn!(
                    service = %name,
                    "dns: {e}; keeping the last good backends, retrying in {wait:?}"
                );
                registry.set_live(Source::Dns, false, Some(format!("{name}: {e}")));
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// A saved entry (last-known-good) takes the configured service's settings at once, with its
/// saved backends, so an edited vip or mode does not wait for the first answer. Saved backends
/// that no longer fit (another family) are dropped with the entry.
fn refresh_saved(registry: &Registry, entry: &DnsConfig) {
    let name = &entry.service.name;
    let Some(saved) = registry.get(Source::Dns, name) else {
        return;
    };
    let mut service = entry.service.clone();
    service.backends = saved.backends.clone();
    if service == *saved {
        return;
    }
    match service.validate() {
        Ok(()) => registry.put(Source::Dns, name, Some(service)),
        Err(_) => registry.put(Source::Dns, name, None),
    }
}

/// A resolver asking `nameserver` (UDP, then TCP), or the system's nameservers. Never the
/// hosts file: this source follows DNS.
fn resolver(nameserver: Option<SocketAddr>) -> Result<TokioResolver, DnsError> {
    let mut builder = match nameserver {
        Some(ns) => {
            let mut server = NameServerConfig::udp_and_tcp(ns.ip());
            for c in &mut server.connections {
                c.port = ns.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(DnsError::Resolver)?,
    };
    let options = builder.options_mut();
    options.timeout = defaults::DNS_TIMEOUT;
    options.attempts = defaults::DNS_ATTEMPTS;
    options.use_hosts_file = ResolveHosts::Never;
    builder.build().map_err(DnsError::Resolver)
}

/// One resolution of `entry`, asked of the server (not the resolver's cache).
pub async fn resolve(resolver: &TokioResolver, entry: &DnsConfig) -> Result<Answer, DnsError> {
    resolver.clear_cache();
    let v4 = entry.service.addr.vip.is_ipv4();
    let (mut backends, ttl) = match entry.record {
        DnsRecord::A | DnsRecord::Aaaa => {
            let port = entry.port.unwrap_or_default();
            let (ips, ttl) = addresses(resolver, &entry.query, v4).await?;
            let backends = ips
                .into_iter()
                .map(|ip| backend(SocketAddr::new(ip, port), defaults::WEIGHT))
                .collect();
            (backends, ttl)
        }
        DnsRecord::Srv => srv(resolver, &entry.query, v4).await?,
    };
    backends.sort_by_key(|b| b.addr);
    backends.dedup_by_key(|b| b.addr);
    if backends.is_empty() {
        let record = if entry.record == DnsRecord::Srv {
            RecordType::SRV
        } else {
            family(v4)
        };
        return Err(DnsError::Empty {
            query: entry.query.clone(),
            record,
        });
    }
    Ok(Answer { backends, ttl })
}

fn family(v4: bool) -> RecordType {
    if v4 { RecordType::A } else { RecordType::AAAA }
}

fn backend(addr: SocketAddr, weight: u32) -> Backend {
    Backend {
        addr,
        weight,
        state: BackendState::Ready,
    }
}

/// A name as asked: absolute, so no search domain is tried first.
fn absolute(query: &str) -> String {
    if query.ends_with('.') {
        query.to_owned()
    } else {
        format!("{query}.")
    }
}

async fn lookup(
    resolver: &TokioResolver,
    query: &str,
    record: RecordType,
) -> Result<hickory_resolver::lookup::Lookup, DnsError> {
    resolver
        .lookup(absolute(query), record)
        .await
        .map_err(|source| DnsError::Lookup {
            query: query.to_owned(),
            record,
            source,
        })
}

/// The A (or AAAA) addresses of `query`, and the smallest TTL on the way (CNAMEs included).
async fn addresses(
    resolver: &TokioResolver,
    query: &str,
    v4: bool,
) -> Result<(Vec<IpAddr>, Duration), DnsError> {
    let found = lookup(resolver, query, family(v4)).await?;
    let (ips, ttl) = addresses_in(found.answers(), v4);
    Ok((ips, Duration::from_secs(ttl.into())))
}

/// The addresses of one family among `records`, and the smallest TTL of all of them.
pub(crate) fn addresses_in(records: &[Record], v4: bool) -> (Vec<IpAddr>, u32) {
    let mut ttl = u32::MAX;
    let mut ips = Vec::new();
    for record in records {
        ttl = ttl.min(record.ttl);
        match &record.data {
            RData::A(a) if v4 => ips.push(IpAddr::V4(a.0)),
            RData::AAAA(a) if !v4 => ips.push(IpAddr::V6(a.0)),
            _ => {}
        }
    }
    (ips, ttl)
}

/// One SRV target of the lowest priority present, at its port and our weight, with the
/// addresses the answer's additional records give for it (none: to be looked up).
pub(crate) struct Target {
    pub name: Name,
    pub port: u16,
    pub weight: u32,
    pub ips: Vec<IpAddr>,
}

/// The targets of the lowest SRV priority in `answers`, addressed from `additionals` where
/// they can be, and the smallest TTL of the records used.
pub(crate) fn srv_targets(
    answers: &[Record],
    additionals: &[Record],
    v4: bool,
) -> (Vec<Target>, u32) {
    let mut ttl = u32::MAX;
    let mut targets = Vec::new();
    for record in answers {
        ttl = ttl.min(record.ttl);
        if let RData::SRV(s) = &record.data {
            targets.push((s.priority, s.weight, s.port, s.target.clone()));
        }
    }
    let Some(best) = targets.iter().map(|t| t.0).min() else {
        return (Vec::new(), ttl);
    };
    targets.retain(|t| t.0 == best);
    let heaviest = targets.iter().map(|t| t.1).max().unwrap_or(0);
    let mut out = Vec::new();
    for (_, weight, port, target) in targets {
        let mut ips = Vec::new();
        for record in additionals {
            match &record.data {
                RData::A(a) if v4 && record.name == target => ips.push(IpAddr::V4(a.0)),
                RData::AAAA(a) if !v4 && record.name == target => ips.push(IpAddr::V6(a.0)),
                _ => continue,
            }
            ttl = ttl.min(record.ttl);
        }
        out.push(Target {
            name: target,
            port,
            weight: srv_weight(weight, heaviest),
            ips,
        });
    }
    (out, ttl)
}

/// The targets of the lowest SRV priority present, each at its port and weight, addressed
/// from the answer's additional records or else looked up.
async fn srv(
    resolver: &TokioResolver,
    query: &str,
    v4: bool,
) -> Result<(Vec<Backend>, Duration), DnsError> {
    let found = lookup(resolver, query, RecordType::SRV).await?;
    let (targets, mut ttl) = srv_targets(found.answers(), found.additionals(), v4);
    let mut backends = Vec::new();
    for t in targets {
        let mut ips = t.ips;
        if ips.is_empty() {
            let (more, found_ttl) = addresses(resolver, &name_text(&t.name), v4).await?;
            ips = more;
            ttl = ttl.min(u32::try_from(found_ttl.as_secs()).unwrap_or(u32::MAX));
        }
        backends.extend(
            ips.into_iter()
                .map(|ip| backend(SocketAddr::new(ip, t.port), t.weight)),
        );
    }
    Ok((backends, Duration::from_secs(ttl.into())))
}

/// What an answer message gives an entry, as the source makes it (for the fuzz target and its
/// corpus test): the backends, sorted and deduplicated as [`resolve`] leaves them, SRV targets
/// without addresses left out.
pub(crate) fn backends_of(
    message: &hickory_resolver::proto::op::Message,
    v4: bool,
    srv: bool,
    port: u16,
) -> Vec<Backend> {
    let mut backends: Vec<Backend> = if srv {
        srv_targets(&message.answers, &message.additionals, v4)
            .0
            .into_iter()
            .flat_map(|t| {
                t.ips
                    .into_iter()
                    .map(move |ip| backend(SocketAddr::new(ip, t.port), t.weight))
            })
            .collect()
    } else {
        addresses_in(&message.answers, v4)
            .0
            .into_iter()
            .map(|ip| backend(SocketAddr::new(ip, port), defaults::WEIGHT))
            .collect()
    };
    backends.sort_by_key(|b| b.addr);
    backends.dedup_by_key(|b| b.addr);
    backends
}

fn name_text(name: &Name) -> String {
    name.to_ascii()
}

/// SRV weights (0–65535) onto ours (1–`MAX_WEIGHT`): kept when they fit, scaled down in
/// proportion when not. Weight 0 ("no preference", or "very rarely" beside others) becomes 1.
fn srv_weight(weight: u16, heaviest: u16) -> u32 {
    let max = defaults::MAX_WEIGHT;
    let w = if u32::from(heaviest) <= max {
        u32::from(weight)
    } else {
        u32::from(weight) * max / u32::from(heaviest)
    };
    w.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_weights_fit_ours() {
        assert_eq!(srv_weight(0, 0), 1);
        assert_eq!(srv_weight(10, 20), 10);
        assert_eq!(srv_weight(65535, 65535), defaults::MAX_WEIGHT);
        assert_eq!(srv_weight(1, 65535), 1);
        assert_eq!(srv_weight(32768, 65535), 128);
    }

    #[test]
    fn queries_are_absolute() {
        assert_eq!(absolute("web.example.test"), "web.example.test.");
        assert_eq!(absolute("web.example.test."), "web.example.test.");
    }
}
