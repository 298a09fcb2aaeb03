//! The `[[service]]` tables the tests write into the agent's config file.

use crate::Topology;

/// A `[[service]]` table: `extra` holds any further lines (mode, algorithm, policy), `backends`
/// the addresses as the table lists them.
pub fn service(name: &str, vip: &str, extra: &str, backends: &[String]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("{b:?}")).collect();
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\n{extra}\nbackends = [{}]\n\n",
        list.join(", ")
    )
}

/// The topology's IPv4 backends `which`, as a service lists them.
pub fn backends(topo: &Topology, which: &[usize]) -> Vec<String> {
    which
        .iter()
        .map(|&i| topo.backend(i, false).to_string())
        .collect()
}
