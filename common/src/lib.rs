//! What the eBPF programs and the agent must agree on, and nothing else.
//!
//! Both sides read the same bytes, so every map key and value here is `#[repr(C)]` with its
//! padding spelled out as named fields: the kernel hashes whole keys, and uninitialised padding
//! would make two equal keys differ. The Maglev builder lives here too, so the table the agent
//! writes for the kernel and the one its forwarder uses are built by one piece of code.
#![no_std]

pub mod addr;
pub mod counters;
pub mod hash;
pub mod maglev;
pub mod maps;

pub use addr::Addr;
