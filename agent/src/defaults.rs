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

/// Proxy-mode affinity entries kept node-wide (client address and service → backend), the
/// same bound as the kernel's `AFFINITY` map; past it the entry nearest its expiry gives way.
pub const PROXY_AFFINITY_ENTRIES: usize = 65_536;

/// `SO_MARK` on the agent's own upstream sockets, so the connect hooks never steer them again
/// even if the agent shares a cgroup with intercepted processes.
pub const OWN_MARK: u32 = 0x5359_0001;

/// Backend weight when none is given, and the largest accepted (HAProxy: 1 and 256).
pub const WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u32 = 256;

/// Backends one service may have. Envoy and kube-proxy set no limit; ours keeps every
/// per-service structure bounded (a ring, a round-robin cycle, the kernel's 65,536 slots with at
/// least one per backend, the forwarder's largest Maglev table with four entries per backend)
/// and is far above what a Service's EndpointSlices hold in practice.
pub const MAX_BACKENDS_PER_SERVICE: usize = 16_384;

/// Kernel-side log level when the config names none.
pub const KERNEL_LOG: &str = "info";

/// Where the last-known-good catalog lives.
pub const STATE_DIR: &str = "/var/lib/switchyard";

/// Active health checks (HAProxy: `inter 2s`, `rise 2`, `fall 3`; its timeout defaults to the
/// interval, ours is shorter so a hung backend is seen within one interval).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const HEALTH_RISE: u32 = 2;
pub const HEALTH_FALL: u32 = 3;

/// How long a drained backend's connections run on before they are closed. Envoy, kube-proxy
/// and ztunnel have no such deadline (connections are stranded or cut at once); HAProxy drains
/// without one. Five minutes lets typical long-lived connections finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Passive outlier ejection (Envoy: 5 consecutive errors, 30 s × times ejected, capped at
/// 300 s, at most 10 % ejected). Our share cap is higher: a node agent's services are often
/// 2–5 backends, where 10 % would allow no ejection at all.
pub const OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
pub const OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const OUTLIER_MAX_EJECTION: Duration = Duration::from_secs(300);
pub const OUTLIER_MAX_EJECTED_PERCENT: u32 = 50;

/// Below this share of healthy backends, a service ignores health and ejection and balances
/// over all of them (Envoy's panic threshold is 50 %), so a mass failure never empties it.
pub const PANIC_THRESHOLD_PERCENT: u32 = 50;

/// Retry budget: retries allowed in flight as a share of active connections, with a floor
/// (Envoy: 20 %, minimum 3).
pub const RETRY_BUDGET_PERCENT: u32 = 20;
pub const RETRY_BUDGET_MIN: u32 = 3;

/// Peak-EWMA (linkerd2-proxy): a new backend's assumed latency, and the decay time.
pub const EWMA_DEFAULT_RTT: Duration = Duration::from_millis(30);
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Ring hash points per unit of weight. Envoy sizes its ring from the total (minimum 1024
/// entries), so every change reshapes it a little; fixed points per backend keep the clients of
/// unchanged backends where they are. Four backends of weight 1 make Envoy's 1024.
pub const RING_POINTS_PER_WEIGHT: usize = 256;
/// The most points one ring holds (12 bytes each: 768 KiB): a service whose weights would need
/// more has every backend's share scaled down to fit, each keeping at least one point. Envoy
/// bounds its ring between 1,024 and 8,388,608 entries (`minimum_ring_size`,
/// `maximum_ring_size`); ours is smaller because a node may hold thousands of hashed services.
/// One backend of the largest weight fills it exactly.
pub const RING_MAX_POINTS: usize = RING_POINTS_PER_WEIGHT * MAX_WEIGHT as usize;

/// Slow start: a backend returning from ejection or a failed health check ramps its weight up
/// over this long (HAProxy's `slowstart`; off by default there, on here because a node agent's
/// retries and P2C would otherwise send a recovering backend its full share at once).
pub const SLOW_START: Duration = Duration::from_secs(10);

/// The etcd source. Key prefix when the config names none (one service per key below it).
pub const ETCD_PREFIX: &str = "/switchyard/services/";
/// Connect timeout per member (etcd's clientv3 `DialTimeout` is commonly 5 s; members are in
/// the cluster's own network, and a short timeout moves on to the next member sooner).
pub const ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one request (the range read, opening the watch): a member that accepts the
/// connection but never answers must not stall the source.
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive on the watch connection: a silently dead member is noticed within about
/// interval + timeout. etcd refuses pings more often than every 5 s (`--grpc-keepalive-min-time`).
pub const ETCD_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const ETCD_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnect backoff of the network sources (etcd; DNS after a failed lookup): doubled on each
/// failure from the first to the last value, with jitter (Kubernetes' reflector: 800 ms to
/// 30 s). Short enough that a restarted etcd is followed again within seconds.
pub const SOURCE_RETRY_MIN: Duration = Duration::from_millis(250);
pub const SOURCE_RETRY_MAX: Duration = Duration::from_secs(5);

/// The DNS source re-resolves when the answer's TTL runs out, but not more often than the
/// first value (a TTL of 0 would mean a query loop) nor less often than the second (a record
/// with a day's TTL still gets looked at). CoreDNS's cache caps at 1 h; we watch closer.
pub const DNS_MIN_REFRESH: Duration = Duration::from_secs(1);
pub const DNS_MAX_REFRESH: Duration = Duration::from_secs(300);
/// One lookup's timeout and attempts (glibc's resolver: 5 s and 2).
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);
pub const DNS_ATTEMPTS: usize = 2;

/// The local API's Unix socket, and its mode: owner only, as HAProxy's admin-level stats socket
/// is usually set (`mode 600 level admin`). `[api] group` opens it to a group (mode 0660).
pub const API_SOCKET: &str = "/run/switchyard/api.sock";
pub const API_MODE: u32 = 0o600;
/// Largest request body the API reads (a service with thousands of backends fits); larger is
/// refused with 413 before it is read.
pub const API_MAX_BODY: usize = 1 << 20;
/// A client has this long to send its request head (also the idle time between keep-alive
/// requests) and then this long for its body: one that connects and sends nothing, or trickles,
/// is cut off (hyper's default head timeout is 30 s; a local admin tool answers within ms).
pub const API_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const API_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once per listener (API, metrics); more wait in the listen backlog.
pub const API_MAX_CONNECTIONS: usize = 64;
/// Connections the metrics listener keeps, past its `API_MAX_CONNECTIONS`, for `/healthz` and
/// `/readyz` alone: the kubelet's probes are answered whatever scrapers hold (the kubelet
/// probes one at a time per container; a few spare cover liveness, readiness and a human).
pub const PROBE_RESERVE: usize = 4;
/// Descriptors the forwarder leaves for the control side: a full API and metrics listener each
/// (the probes' reserve included), and some for health checks and registry sources. HAProxy
/// instead derives `maxconn` from `ulimit -n`; a reserve keeps the agent answerable whatever
/// the limit.
pub const FD_RESERVE: u64 = 2 * API_MAX_CONNECTIONS as u64 + PROBE_RESERVE as u64 + 32;
/// No connection lives longer than this, whatever it does (keep-alive included).
pub const API_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long `switchyard ctl` waits for the agent's answer.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(15);

/// Prometheus endpoint (`/metrics`, `/healthz`, `/readyz`). Loopback by default, as Envoy's
/// admin (9901) and ztunnel's admin; ztunnel serves metrics on 15020, linkerd2-proxy on 4191.
pub const METRICS_LISTEN: &str = "127.0.0.1:9479";

/// The Consul source: the local Consul agent's HTTP API, as Consul's own clients default to.
pub const CONSUL_ADDRESS: &str = "http://127.0.0.1:8500";
/// How long one blocking query waits for a change (Consul's default is 5 min, its cap 10 min;
/// consul-template uses 1 min). Shorter: a half-dead connection is noticed within about this.
pub const CONSUL_WAIT: Duration = Duration::from_secs(60);
/// Largest Consul answer read (a catalog of thousands of services fits).
pub const CONSUL_MAX_BODY: usize = 16 << 20;
/// Each Consul request may take the wait, plus Consul's jitter (up to wait/16), plus this.
pub const CONSUL_REQUEST_SLACK: Duration = Duration::from_secs(10);

/// The Kubernetes source counts as live again this long after its last watch error (kube's
/// watcher resumes silently; a resumed watch that fails again within this shows at once).
pub const KUBE_LIVE_AFTER: Duration = Duration::from_secs(10);

/// Restarts without downtime (see docs/zero-downtime.md).
///
/// The agent's run directory (the API socket's directory when `[api] socket` names one): the
/// handover socket lives there, mode 0600.
pub const RUN_DIR: &str = "/run/switchyard";
pub const HANDOVER_SOCKET: &str = "handover.sock";
/// How long each side of a handover waits for the other's next message. The new agent loads
/// and attaches the programs and applies the catalog between two of them: seconds, not ms.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// `[forwarder] drain_on_exit`: how long a stopping (or handed-over) agent keeps copying the
/// connections it carries before it closes them. Matched to the DaemonSet's
/// `terminationGracePeriodSeconds` (deploy/daemonset.yaml: 300), less the time to stop, so the
/// kubelet's SIGKILL never comes first. HAProxy's `hard-stop-after` is unset (no deadline) by
/// default; Envoy's hot restart drains for 600 s (`--drain-time-s`), then its parent lingers
/// 900 s (`--parent-shutdown-time-s`); a node agent's pods are being rolled too, so minutes.
pub const DRAIN_ON_EXIT: Duration = Duration::from_secs(290);
/// A graceful stop without a successor empties the forwarder's listener slots (new connects
/// are balanced in the kernel from then on) and keeps accepting this long, so a connect that
/// passed the hook just before is not reset by a closing listener.
pub const LISTENER_SETTLE: Duration = Duration::from_millis(200);

/// HTTP mode (docs/http.md). `auto` detection: one peek of up to this many bytes
/// (linkerd2-proxy reads 1024), waited for at most this long (linkerd2-proxy: 10 s; a node
/// agent's clients are local, and a server-first protocol behind `auto` waits this long for
/// its first byte, so ours is shorter).
pub const DETECT_BYTES: usize = 1024;
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP mode: a client's request headers must arrive within this long and this size (hyper's
/// defaults: 30 s and about 400 KiB; nginx: 60 s and 8 KiB lines in 4 buffers).
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const HTTP_MAX_HEADER_BYTES: usize = 64 * 1024;
/// HTTP/2 streams one client connection may have open (hyper: 200; Envoy: 2^31).
pub const HTTP2_MAX_STREAMS: u32 = 256;

/// The upstream pool: idle HTTP/1.1 connections kept per backend, and how long one may idle
/// (hyper's legacy client: unbounded and 90 s; Envoy: 1 h idle). Each HTTP/2 backend gets one
/// multiplexed connection.
pub const POOL_MAX_IDLE_PER_BACKEND: usize = 64;
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A request body kept for a retry up to this size (Envoy's retry buffer: 64 KiB as its
/// per-request buffer limit; linkerd2-proxy: 64 KiB). Larger ones are never retried once sent.
pub const REPLAY_BODY_MAX: usize = 64 * 1024;

/// HTTP request series kept for the metrics, one per (service, route, backend): beyond this,
/// requests are counted as unrecorded (about 600 bytes each, so at most some 12 MB). Envoy and
/// linkerd2-proxy bound nothing here; their label sets follow the config as ours do, and this
/// is the backstop against a catalog that churns faster than it is scraped.
pub const HTTP_STATS_MAX_SERIES: usize = 20_000;

/// Open client connections a `[[gateway]]` listener takes; more are reset at once (HAProxy's
/// `maxconn` default is about 4,000 per process on small hosts; nginx 512 per worker).
pub const GATEWAY_MAX_CONNECTIONS: u32 = 10_000;
