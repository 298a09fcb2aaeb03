//! What the tests ask of a tally (which backends answered a round of connections) and how they
//! wait for a change to reach the datapath: on the condition itself, never on a timer.

use std::time::Duration;

use crate::{Topology, topology::Tally};

/// Generous: conditions are waited for, never timed.
pub const LIMIT: Duration = Duration::from_secs(60);

/// `count` connections to `vip` from pod 0 (steered, 1 s client timeout each).
pub fn ask(topo: &Topology, vip: &str, count: usize) -> anyhow::Result<Tally> {
    topo.ask_with(0, vip.parse()?, count, true, &["--timeout-ms", "1000"])
}

/// Asks rounds of `count` connections to `vip` until `want` holds; fails with the last tally
/// after [`LIMIT`].
pub fn wait_until(
    topo: &Topology,
    vip: &str,
    count: usize,
    what: &str,
    want: impl Fn(&Tally) -> bool,
) -> anyhow::Result<()> {
    topo.wait_until(vip.parse()?, count, LIMIT, what, want)
        .map(drop)
}

/// How many connections backend `i` answered.
pub fn count(t: &Tally, i: usize) -> usize {
    t.get(&Topology::backend_name(i)).copied().unwrap_or(0)
}

/// How many connections failed.
pub fn errors(t: &Tally) -> usize {
    t.iter()
        .filter(|(k, _)| k.starts_with("error:"))
        .map(|(_, v)| v)
        .sum()
}

/// Exactly these backends answered (each at least once), and nothing else.
pub fn exactly(which: &[usize]) -> impl Fn(&Tally) -> bool + use<> {
    let which = which.to_vec();
    move |t| which.iter().all(|&i| count(t, i) > 0) && t.len() == which.len()
}

/// Every connection answered by backend `i`.
pub fn only(i: usize) -> impl Fn(&Tally) -> bool {
    move |t| t.len() == 1 && count(t, i) > 0
}

/// No connection was answered.
pub fn unserved(t: &Tally) -> bool {
    t.keys().all(|k| k.starts_with("error:"))
}
