//! Slots of the per-CPU counter array the programs bump and the agent sums for metrics.

/// A counter slot. The names are the metric label values the agent exports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` calls seen by the connect hooks.
    Connect = 0,
    /// Connects whose destination was a known service address.
    ServiceHit = 1,
    /// Connects rewritten to a backend by the kernel (kernel mode).
    Translated = 2,
    /// Connects rewritten to the forwarder (proxy mode).
    Redirected = 3,
    /// Connects refused at once because the service had no usable backend.
    FailFast = 4,
    /// Connections whose original destination the forwarder asked the `getsockopt` hook for
    /// and got (those whose `ORIG_SLOTS` slot another connection took over first).
    OrigDstAnswered = 5,
    /// Connections kept on their backend by session affinity.
    AffinityHit = 6,
    /// Connects skipped because the socket belongs to the agent itself.
    SkippedOwn = 7,
    /// UDP datagrams sent to a service address and translated (`sendmsg4/6`).
    SendTranslated = 8,
    /// UDP replies shown as coming from the service address (`recvmsg4/6`).
    RecvTranslated = 9,
    /// Connects or sends left alone because the cgroup or the port is opted out.
    OptedOut = 10,
    /// Connects to a proxy-mode service balanced in the kernel because no forwarder listened
    /// (the agent stopped, crashed, or not yet listening).
    Fallback = 20,
}

impl Counter {
    pub const ALL: [Counter; 12] = [
        Counter::Connect,
        Counter::ServiceHit,
        Counter::Translated,
        Counter::Redirected,
        Counter::FailFast,
        Counter::OrigDstAnswered,
        Counter::AffinityHit,
        Counter::SkippedOwn,
        Counter::SendTranslated,
        Counter::RecvTranslated,
        Counter::OptedOut,
        Counter::Fallback,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect => "connect",
            Counter::ServiceHit => "service_hit",
            Counter::Translated => "translated",
            Counter::Redirected => "redirected",
            Counter::FailFast => "fail_fast",
            Counter::OrigDstAnswered => "orig_dst_answered",
            Counter::AffinityHit => "affinity_hit",
            Counter::SkippedOwn => "skipped_own",
            Counter::SendTranslated => "send_translated",
            Counter::RecvTranslated => "recv_translated",
            Counter::OptedOut => "opted_out",
            Counter::Fallback => "proxy_fallback",
        }
    }
}

/// Size of the counter array; leaves room for counters to come without a layout change.
pub const COUNTER_SLOTS: u32 = 32;
