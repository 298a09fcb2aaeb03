//! Every default in one place, with the peers' value where ours differs and why.

use std::time::Duration;

/// Upstream connect timeout. Envoy 5 s, ztunnel 10 s, linkerd2-proxy 1 s. A node agent's
/// backends are one hop away in the same cluster: a second is long, and a fast timeout lets the
/// retry on another backend still fit within a client's patience.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Extra upstream connect attempts on *other* backends after a failure. HAProxy: 3 retries with
/// redispatch; kube-proxy and ztunnel: none. Two keeps a dead backend invisible to clients
/// without multiplying load when the whole service is down.
pub const CONNECT_RETRIES: u32 = 2;

/// Per-direction copy buffer of the forwarder. Bounded memory per connection: two of these.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Session affinity timeout when a service asks for affinity without one (kube-proxy's
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default).
pub const AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// `SO_MARK` on the agent's own upstream sockets, so the connect hooks never steer them again
/// even if the agent shares a cgroup with intercepted processes.
pub const OWN_MARK: u32 = 0x5359_0001;

/// Backend weight when none is given, and the largest accepted (HAProxy: 1 and 256).
pub const WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u32 = 256;

/// Kernel-side log level when the config names none.
pub const KERNEL_LOG: &str = "info";

/// Where the last-known-good catalog lives.
pub const STATE_DIR: &str = "/var/lib/switchyard";
