//! The entry points of the fuzz targets (`fuzz/`): one per parser of outside input, each taking
//! any bytes and required to return, whatever they are, without a panic and in work bounded by
//! their size. `cargo xtask fuzz` drives them under libFuzzer; the test below feeds each
//! target's committed seeds (`fuzz/seeds/<target>/`) through the same functions on every
//! `cargo test`, so a crash once found and added there stays fixed.

use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

use crate::{
    catalog::{Algorithm, Mode, Protocol, Service, ServiceAddr, entry},
    config::AgentConfig,
    datapath::udp,
    registry::{consul, dns, kubernetes, last_known_good as lkg},
};

/// A target's entry point.
pub type Entry = fn(&[u8]);

/// Every target: its name (the file under `fuzz/fuzz_targets/` and the seed directory) and
/// its entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("config_toml", config_toml),
    ("service_json", service_json),
    ("lkg_file", lkg_file),
    ("sock_diag", sock_diag),
    ("kubernetes_entries", kubernetes_entries),
    ("consul_entries", consul_entries),
    ("dns_answer", dns_answer),
];

fn listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([10, 77, 0, 1], 15001)),
        SocketAddr::from(([0xfd77, 0, 0, 0, 0, 0, 0, 1], 15001)),
    ]
}

/// The agent's config file, as `switchyard run --config` and the file source read it.
pub fn config_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = AgentConfig::parse(Path::new("fuzz.toml"), text);
    }
}

/// One service entry as JSON (an etcd value, an API body, what the Kubernetes and Consul
/// builders make), and one backend as the API's backend calls take it.
pub fn service_json(data: &[u8]) {
    let _ = entry::service_from_json(data, "fuzz", &listen());
    let _ = entry::backend_from_json(data);
}

/// The last-known-good file: as found on disk, and (since a checksum stands in front of the
/// body) the same bytes as a body behind a valid header.
pub fn lkg_file(data: &[u8]) {
    let _ = lkg::parse(data);
    let _ = lkg::parse(&lkg::framed(data));
}

/// One netlink datagram of `sock_diag` replies.
pub fn sock_diag(data: &[u8]) {
    let mut out = Vec::new();
    let _ = udp::parse_datagram(data, &mut out);
    let _ = udp::peers(&out);
}

/// What the Kubernetes source builds entries from: a Service, its EndpointSlices and the
/// node's view, as one JSON document (the objects as the API server sends them).
pub fn kubernetes_entries(data: &[u8]) {
    #[derive(Deserialize)]
    struct Input {
        service: k8s_openapi::api::core::v1::Service,
        #[serde(default)]
        slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
        #[serde(default)]
        node: Option<String>,
        #[serde(default)]
        prefer_local: bool,
    }
    let Ok(input) = serde_json::from_slice::<Input>(data) else {
        return;
    };
    let slices: Vec<_> = input.slices.iter().collect();
    let view = kubernetes::View {
        node: input.node.as_deref(),
        prefer_local: input.prefer_local,
    };
    let _ = kubernetes::entries(&input.service, &slices, view, &listen());
}

/// What the Consul source builds entries from: a service's name and catalog tags and its
/// passing instances (`/v1/health/service` as Consul sends it), as one JSON document.
pub fn consul_entries(data: &[u8]) {
    #[derive(Deserialize)]
    struct Input {
        name: String,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        instances: Vec<consul::Instance>,
        #[serde(default)]
        last_meta_vips: Vec<SocketAddr>,
    }
    let Ok(input) = serde_json::from_slice::<Input>(data) else {
        return;
    };
    let _ = consul::entries(
        &input.name,
        &input.tags,
        &input.instances,
        &input.last_meta_vips,
        &listen(),
    );
}

/// A DNS answer message as the DNS source receives it (A, AAAA or SRV), made into an entry's
/// backends for either family, and the entry checked.
pub fn dns_answer(data: &[u8]) {
    let Ok(message) = hickory_resolver::proto::op::Message::from_vec(data) else {
        return;
    };
    for (v4, srv) in [(true, false), (false, false), (true, true), (false, true)] {
        let backends = dns::backends_of(&message, v4, srv, 80);
        let vip: SocketAddr = if v4 {
            ([10, 96, 0, 53], 53).into()
        } else {
            ([0xfd00, 0, 0, 0, 0, 0, 0, 0x53], 53).into()
        };
        let service = Service {
            name: "dns".into(),
            addr: ServiceAddr {
                vip,
                protocol: Protocol::Udp,
            },
            mode: Mode::Kernel,
            algorithm: Algorithm::RoundRobin,
            affinity: None,
            backends,
            policy: Default::default(),
        };
        let _ = service.validate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each target's seeds, once each, through the function its fuzz target calls.
    #[test]
    fn every_seed_of_every_fuzz_target_runs_clean() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        for (name, entry) in TARGETS {
            let dir = seeds.join(name);
            let files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|f| f.unwrap().path())
                .collect();
            assert!(!files.is_empty(), "{name}: no seeds in {}", dir.display());
            let targets = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/fuzz_targets")
                .join(format!("{name}.rs"));
            assert!(
                targets.exists(),
                "{name}: no fuzz target {}",
                targets.display()
            );
            for f in files {
                let bytes = std::fs::read(&f).unwrap();
                eprintln!("{name}: {}", f.display());
                entry(&bytes);
            }
        }
    }
}
