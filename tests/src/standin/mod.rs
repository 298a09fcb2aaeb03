//! **Stand-ins** for the control planes the agent follows that cannot be run here: the
//! Kubernetes API server ([`kube`]) and Consul ([`consul`]). They are not the real servers:
//! each is written from the server's documented wire format (JSON over HTTP/1.1, streamed
//! watches, resource versions, `410 Gone`, bookmarks; blocking queries, ACL tokens, TLS),
//! serves only what the agent asks for, and runs in the test process with its listener inside
//! the topology's node namespace (where the agent runs). What they prove is that the agent speaks
//! those documented protocols; a real cluster may still differ in what the documents leave
//! unsaid.

pub mod consul;
pub mod http;
pub mod kube;
mod shared;

pub use consul::ConsulApi;
pub use kube::KubeApi;
