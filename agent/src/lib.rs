//! Switchyard, the agent. `ARCHITECTURE.md` at the repository's root draws the whole; here is
//! where each part lives.
//!
//! Start and control:
//! - [`cli`] is the command line; [`run`] is `switchyard agent` (load, attach, apply, serve, the
//!   loop that hands each catalog to the reconciler) and `switchyard cleanup`.
//! - [`config`] reads the agent's file: where to attach, where the forwarder listens, the
//!   registry's sources, services; [`reload`] acts on later edits of its other sections (live
//!   where it can, a warning naming the section where a restart is needed) and runs the
//!   network sources. [`defaults`] holds every default, with the peers' values.
//! - [`limits`] raises the descriptor limit at start.
//!
//! Services, from their sources to the datapath:
//! - [`catalog`] is the model every source produces and every consumer reads; its
//!   [`entry`](catalog::entry) is the one schema and check of a service entry.
//! - [`registry`] keeps one layer per source (file, etcd, DNS, Kubernetes, Consul, API), merges
//!   them by precedence, publishes the catalog and saves it as last known good.
//! - [`reconcile`] turns a catalog into kernel map entries and the forwarder's table; it is
//!   userspace's only writer of the maps that steer.
//! - [`datapath`] loads and attaches the eBPF programs (crate `switchyard-ebpf`) and owns the
//!   maps; in the kernel, `connect()` to a service address is rewritten to a backend (kernel
//!   mode) or to the forwarder (proxy mode).
//!
//! Connections:
//! - [`forwarder`] accepts redirected connections, recovers the original service address,
//!   connects (retrying others) and copies bytes.
//! - [`http`] is HTTP mode: detection, routes, gateways, a pool of upstream connections, and
//!   per-request balancing, retries and timeouts (`docs/http.md`).
//! - [`balance`] makes every choice of a backend, in either mode: candidates and algorithms for
//!   the forwarder, the kernel's slot layout.
//! - [`health`] is what the node knows of each backend: outlier ejection, active checks,
//!   latency, slow start, drains, and the counters.
//! - [`socket`] makes the agent's own outgoing sockets, which the hooks never steer.
//!
//! Looking in:
//! - [`live`] is one consistent look at the catalog, the health board and the forwarder's table.
//! - [`api`] is the local API on a Unix socket; [`ctl`] is its client, `switchyard ctl`.
//! - [`metrics`] serves Prometheus, `/healthz` and `/readyz`.
//! - [`listener`] is what the listeners share: the bounded HTTP server, failed accepts.
//!
//! Restarts and hardening:
//! - [`handover`] passes the listening sockets from a running agent to its successor, and
//!   [`fallback`] reports the kernel's balancing of proxy-mode services while none listens.
//! - [`fuzzing`] is where the fuzz targets (`fuzz/`) enter the parsers of outside input.

pub mod api;
pub mod balance;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod datapath;
pub mod defaults;
pub mod fallback;
pub mod forwarder;
pub mod fuzzing;
pub mod handover;
pub mod health;
pub mod http;
pub mod limits;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod reconcile;
pub mod registry;
pub mod reload;
pub mod run;
pub mod socket;
#[cfg(test)]
mod test_helpers;
