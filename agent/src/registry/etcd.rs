//! The etcd v3 source: one service per key under a prefix, the value JSON with the fields of a
//! `[[service]]` table (`name` defaults to the key's last part).
//!
//! A range read of the prefix replaces the layer whole; a watch from the next revision then
//! applies each put and delete on its own. An entry that does not parse or check (or takes an
//! address or name another key already has) is rejected alone, and its key keeps its last good
//! state. A lost connection leaves the layer serving as it was, marked not live, and is retried
//! with backoff; the watch resumes from the last revision seen, so a change made meanwhile is
//! still applied, in order. Only when etcd has compacted that revision away is the prefix read
//! whole again.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, Event, EventType, GetOptions, Identity, KeyValue,
    TlsOptions, WatchOptions,
};
use tracing::{info, warn};

use super::{Claims, Registry, Rejected, Source, retry::Backoff};
use crate::{
    catalog::{Service, entry::service_from_json},
    config::EtcdConfig,
    defaults,
};

/// Keys read per range request while listing: bounded responses for large prefixes.
const PAGE: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Client {
        what: &'static str,
        source: etcd_client::Error,
    },
    #[error("{what}: no answer within {:?}", defaults::ETCD_REQUEST_TIMEOUT)]
    Timeout { what: &'static str },
    #[error("watch canceled by the server: {0}")]
    Canceled(String),
    #[error("watch stream closed by the server")]
    Ended,
    #[error("revision {wanted} is compacted away (oldest kept: {compacted})")]
    Compacted { wanted: i64, compacted: i64 },
}

/// Follows `config.prefix` until the task is dropped. `listen` is the forwarder's addresses
/// (a proxy-mode entry needs one of its family).
pub async fn run(registry: Registry, config: EtcdConfig, listen: Vec<SocketAddr>) {
    let mut follower = Follower {
        registry,
        config,
        listen,
        revision: None,
    };
    let mut retry = Backoff::default();
    loop {
        let Err(e) = follower.session(&mut retry).await;
        if let EtcdError::Compacted { .. } = e {
            info!(prefix = %follower.config.prefix, "etcd: {e}; reading the prefix whole again");
            follower.revision = None;
            continue;
        }
        let wait = retry.next();
        warn!(
            endpoints = %follower.config.endpoints.join(","),
            "etcd: disconnected: {e}; retrying in {wait:?}, serving the entries as they were"
        );
        follower
            .registry
            .set_live(Source::Etcd, false, Some(e.to_string()));
        tokio::time::sleep(wait).await;
    }
}

struct Follower {
    registry: Registry,
    config: EtcdConfig,
    listen: Vec<SocketAddr>,
    /// The last revision applied; `None`: the prefix must be read whole first.
    revision: Option<i64>,
}

impl Follower {
    /// Connects, lists if need be, then applies watch events until something breaks.
    async fn session(&mut self, retry: &mut Backoff) -> Result<Infallible, EtcdError> {
        let options = self.options()?;
        let mut client = timed(
            "connect",
            Client::connect(&self.config.endpoints, Some(options)),
        )
        .await?;
        let revision = match self.revision {
            Some(r) => r,
            None => self.list(&mut client).await?,
        };
        let from = revision + 1;
        let watch = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream = timed(
            "opening the watch",
            client.watch(self.config.prefix.as_bytes(), Some(watch)),
        )
        .await?;
        loop {
            let response = stream
                .message()
                .await
                .map_err(|source| EtcdError::Client {
                    what: "watch",
                    source,
                })?
                .ok_or(EtcdError::Ended)?;
            if response.compact_revision() > 0 {
                return Err(EtcdError::Compacted {
                    wanted: self.revision.map_or(from, |r| r + 1),
                    compacted: response.compact_revision(),
                });
            }
            if response.canceled() {
                return Err(EtcdError::Canceled(response.cancel_reason().to_owned()));
            }
            if response.created() {
                info!(prefix = %self.config.prefix, "etcd: watching from revision {from}");
                self.registry.set_live(Source::Etcd, true, None);
                retry.reset();
                continue;
            }
            if response.events().is_empty() {
                // A progress notification: every change up to its revision has been sent.
                if let Some(h) = response.header() {
                    self.revision = Some(self.revision.unwrap_or(0).max(h.revision()));
                }
                continue;
            }
            self.apply(response.events());
            if let Some(last) = response.events().iter().filter_map(|e| e.kv()).next_back() {
                self.revision = Some(last.mod_revision());
            }
        }
    }

    fn options(&self) -> Result<ConnectOptions, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.config.connect_timeout)
            .with_keep_alive(
                defaults::ETCD_KEEPALIVE_INTERVAL,
                defaults::ETCD_KEEPALIVE_TIMEOUT,
            )
            // A member cut off from the others cancels the watch rather than going quiet.
            .with_require_leader(true);
        if let Some((user, password)) = &self.config.user {
            options = options
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.config.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| EtcdError::TlsFile {
                    path: path.clone(),
                    source,
                })
            };
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(t);
        }
        Ok(options)
    }

    /// Reads the prefix whole, page by page at one revision, and replaces the layer with it.
    async fn list(&mut self, client: &mut Client) -> Result<i64, EtcdError> {
        let prefix = self.config.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut kvs: Vec<KeyValue> = Vec::new();
        let mut start = prefix.clone();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut page = timed(
                "reading the prefix",
                client.get(start.clone(), Some(options)),
            )
            .await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let got = page.take_kvs();
            let Some(last) = got.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            kvs.extend(got);
            if !more {
                break;
            }
        }

        let mut entries: BTreeMap<String, Service> = BTreeMap::new();
        let mut claims = Claims::default();
        let mut rejected = Vec::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let checked = self
                .parse(&key, kv.value())
                .and_then(|s| claims.check(&key, &s).map_or(Ok(s), Err));
            match checked {
                Ok(service) => {
                    claims.claim(&key, &service);
                    entries.insert(key, service);
                }
                Err(reason) => rejected.push(Rejected { key, reason }),
            }
        }
        info!(
            prefix = %self.config.prefix,
            entries = entries.len(),
            rejected = rejected.len(),
            "etcd: read the prefix at revision {revision}"
        );
        self.registry.replace(Source::Etcd, entries, &rejected);
        self.revision = Some(revision);
        Ok(revision)
    }

    /// One watch response's events, applied together as the revisions made them: a
    /// transaction that moves an address from one key to another is not seen half done. A key
    /// whose new value does not parse or check (or takes an address or name another key keeps)
    /// is rejected and keeps its last good state.
    fn apply(&self, events: &[Event]) {
        // The last event of each key is its state now.
        let mut latest: BTreeMap<String, Result<Option<Service>, String>> = BTreeMap::new();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let change = match event.event_type() {
                EventType::Delete => {
                    info!(key = %key, revision = kv.mod_revision(), "etcd: key deleted");
                    Ok(None)
                }
                EventType::Put => self.parse(&key, kv.value()).map(Some),
            };
            latest.insert(key, change);
        }
        // Keys outside this batch keep what they have; within it, the first key wins. Only
        // the batch's keys are looked at (the layer through the registry's indexes).
        let batch: BTreeSet<String> = latest
            .iter()
            .filter(|(_, c)| c.is_ok())
            .map(|(k, _)| k.clone())
            .collect();
        let mut claims = Claims::default();
        let mut changes = Vec::new();
        let mut rejected = Vec::new();
        for (key, change) in latest {
            let service = match change {
                Ok(Some(service)) => service,
                Ok(None) => {
                    changes.push((key, None));
                    continue;
                }
                Err(reason) => {
                    rejected.push(Rejected { key, reason });
                    continue;
                }
            };
            let clash = claims
                .check(&key, &service)
                .or_else(|| self.registry.clash(Source::Etcd, &key, &service, &batch));
            if let Some(reason) = clash {
                rejected.push(Rejected { key, reason });
                continue;
            }
            info!(key = %key, "etcd: key applied");
            claims.claim(&key, &service);
            changes.push((key, Some(service)));
        }
        self.registry.apply(Source::Etcd, changes, &rejected);
    }

    fn parse(&self, key: &str, value: &[u8]) -> Result<Service, String> {
        let name = key.strip_prefix(&self.config.prefix).unwrap_or(key);
        service_from_json(value, name, &self.listen)
    }
}

/// The end of the key range that holds every key starting with `prefix` (etcd's own rule:
/// the last byte below 0xff incremented, the rest dropped).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An etcd call, bounded: a member that takes the connection but never answers must not
/// stall the source.
async fn timed<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(defaults::ETCD_REQUEST_TIMEOUT, call).await {
        Ok(r) => r.map_err(|source| EtcdError::Client { what, source }),
        Err(_) => Err(EtcdError::Timeout { what }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/sy/"), b"/sy0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
