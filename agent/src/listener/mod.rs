//! What the agent's listeners share: the bounded HTTP/1.1 server of the API and the metrics
//! ([`http`]), and the logging of failed accepts ([`AcceptFailures`]) that the forwarder uses
//! too.

mod accept;
pub mod http;

pub use accept::AcceptFailures;
