//! Switchyard, the agent.
//!
//! The flow of a connection, and where each step lives:
//!
//! - [`config`] reads the agent's file: where to attach, where the forwarder listens, services.
//! - [`catalog`] is the model every source produces and every consumer reads.
//! - [`reconcile`] turns a catalog into kernel map entries and the forwarder's table; it is the
//!   only writer of either.
//! - [`datapath`] loads and attaches the eBPF programs (crate `switchyard-ebpf`) and owns the
//!   maps; in the kernel, `connect()` to a service address is rewritten to a backend (kernel
//!   mode) or to the forwarder (proxy mode).
//! - [`forwarder`] accepts redirected connections, recovers the original service address,
//!   picks a backend with [`balance`], connects (retrying others) and copies bytes.
//! - [`api`] is the local API on a Unix socket (services, backends, live state, registry);
//!   [`ctl`] is its client, `switchyard ctl`. [`metrics`] serves Prometheus, `/healthz`,
//!   `/readyz`.
//! - [`defaults`] holds every default, with the peers' values beside ours.

pub mod api;
pub mod balance;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod datapath;
pub mod defaults;
pub mod forwarder;
pub mod health;
pub mod http;
pub mod limits;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod reconcile;
pub mod registry;
pub mod run;
pub mod socket;
