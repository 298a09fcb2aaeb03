//! Present so the agent can list this crate as a build-dependency (and rebuild when it
//! changes); the programs themselves are the `switchyard` binary built for the BPF target.
#![no_std]
