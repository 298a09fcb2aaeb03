//! Session affinity in proxy mode: a client address keeps the backend it last used on a
//! service for the service's timeout (kube-proxy's `sessionAffinity: ClientIP`). One table for
//! the node's workers, bounded ([`defaults::PROXY_AFFINITY_ENTRIES`]); an entry names an
//! address, which counts only while it is one of the service's current, usable backends.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{catalog::ServiceAddr, defaults};

#[derive(Clone, Copy)]
struct Entry {
    backend: SocketAddr,
    expires: Instant,
}

pub struct AffinityTable {
    entries: Mutex<HashMap<(ServiceAddr, IpAddr), Entry>>,
    max: usize,
}

impl Default for AffinityTable {
    fn default() -> Self {
        AffinityTable::with_capacity(defaults::PROXY_AFFINITY_ENTRIES)
    }
}

impl AffinityTable {
    pub fn with_capacity(max: usize) -> Self {
        AffinityTable {
            entries: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ServiceAddr, IpAddr), Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend `client` last used on `service`, unless its time is up.
    pub fn get(&self, service: ServiceAddr, client: IpAddr, now: Instant) -> Option<SocketAddr> {
        let mut entries = self.lock();
        let key = (service, client);
        match entries.get(&key) {
            Some(e) if now < e.expires => Some(e.backend),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    /// `client` used `backend` on `service` now; it keeps it for `timeout`.
    pub fn set(
        &self,
        service: ServiceAddr,
        client: IpAddr,
        backend: SocketAddr,
        timeout: Duration,
        now: Instant,
    ) {
        let mut entries = self.lock();
        let key = (service, client);
        if entries.len() >= self.max && !entries.contains_key(&key) {
            entries.retain(|_, e| now < e.expires);
            if entries.len() >= self.max
                && let Some(soonest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| *k)
            {
                entries.remove(&soonest);
            }
        }
        entries.insert(
            key,
            Entry {
                backend,
                expires: now + timeout,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Protocol;

    fn svc(port: u16) -> ServiceAddr {
        ServiceAddr {
            vip: SocketAddr::from(([10, 96, 0, 1], port)),
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn entries_expire_stay_per_service_and_are_bounded() {
        let t = AffinityTable::with_capacity(3);
        let now = Instant::now();
        let client: IpAddr = [10, 0, 0, 1].into();
        let b1: SocketAddr = "10.1.0.1:80".parse().unwrap();
        t.set(svc(80), client, b1, Duration::from_secs(1), now);
        assert_eq!(t.get(svc(80), client, now), Some(b1));
        assert_eq!(t.get(svc(81), client, now), None, "another service");
        assert_eq!(t.get(svc(80), client, now + Duration::from_secs(2)), None);
        assert!(t.is_empty(), "an expired entry is dropped when met");
        for i in 0..10u8 {
            let c: IpAddr = [10, 0, 1, i].into();
            t.set(svc(80), c, b1, Duration::from_secs(60 + i as u64), now);
        }
        assert_eq!(t.len(), 3);
        let newest: IpAddr = [10, 0, 1, 9].into();
        assert_eq!(t.get(svc(80), newest, now), Some(b1));
    }
}
