//! Edits to the config file beyond its `[[service]]` tables (the file source applies those).
//!
//! What can change under a running agent does: the opted-out cgroups and ports, and the
//! network sources (a source whose section changed is restarted on its new settings; its
//! layer serves on meanwhile). What cannot (where the programs attach and pin, where the
//! forwarder, the API and the metrics listen, where the last-known-good lives) is said with a
//! warning naming the section, and the agent runs on as it was started.

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    config::AgentConfig,
    registry::{Registry, Source, consul, dns, etcd, kubernetes},
};

/// The network sources' tasks, one per source; dropping this ends them.
#[derive(Default)]
pub struct Sources {
    etcd: Option<JoinHandle<()>>,
    kubernetes: Option<JoinHandle<()>>,
    consul: Option<JoinHandle<()>>,
    dns: Option<JoinHandle<()>>,
}

impl Drop for Sources {
    fn drop(&mut self) {
        for t in [&self.etcd, &self.kubernetes, &self.consul, &self.dns]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

/// One network source: its section's name and how to (re)start it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Etcd,
    Kubernetes,
    Consul,
    Dns,
}

const ALL: [Which; 4] = [Which::Etcd, Which::Kubernetes, Which::Consul, Which::Dns];

impl Which {
    fn section(self) -> &'static str {
        match self {
            Which::Etcd => "[registry.etcd]",
            Which::Kubernetes => "[registry.kubernetes]",
            Which::Consul => "[registry.consul]",
            Which::Dns => "[[registry.dns]]",
        }
    }

    fn changed(self, old: &AgentConfig, new: &AgentConfig) -> bool {
        let (o, n) = (&old.registry, &new.registry);
        match self {
            Which::Etcd => o.etcd != n.etcd,
            Which::Kubernetes => o.kubernetes != n.kubernetes,
            Which::Consul => o.consul != n.consul,
            Which::Dns => o.dns != n.dns,
        }
    }
}

impl Sources {
    /// Starts the sources `config` names. `listen` (the forwarder's addresses, which sources
    /// keep out of the catalog) is the running agent's, whatever a later file says.
    pub fn start(registry: &Registry, config: &AgentConfig) -> Self {
        let mut s = Sources::default();
        for w in ALL {
            s.restart(w, registry, config);
        }
        s
    }

    fn slot(&mut self, w: Which) -> &mut Option<JoinHandle<()>> {
        match w {
            Which::Etcd => &mut self.etcd,
            Which::Kubernetes => &mut self.kubernetes,
            Which::Consul => &mut self.consul,
            Which::Dns => &mut self.dns,
        }
    }

    /// Stops source `w` and starts it again from `config` (or forgets its layer when `config`
    /// no longer names it).
    fn restart(&mut self, w: Which, registry: &Registry, config: &AgentConfig) {
        if let Some(t) = self.slot(w).take() {
            t.abort();
        }
        let r = registry.clone();
        let listen = config.forwarder.listen.clone();
        let task = match w {
            Which::Etcd => config
                .registry
                .etcd
                .clone()
                .map(|c| tokio::spawn(etcd::run(r, c, listen))),
            Which::Kubernetes => config
                .registry
                .kubernetes
                .clone()
                .map(|c| tokio::spawn(kubernetes::run(r, c, listen))),
            Which::Consul => config
                .registry
                .consul
                .clone()
                .map(|c| tokio::spawn(consul::run(r, c, listen))),
            Which::Dns => (!config.registry.dns.is_empty())
                .then(|| tokio::spawn(dns::run(r, config.registry.dns.clone()))),
        };
        if task.is_none() {
            registry.forget(match w {
                Which::Etcd => Source::Etcd,
                Which::Kubernetes => Source::Kubernetes,
                Which::Consul => Source::Consul,
                Which::Dns => Source::Dns,
            });
        }
        *self.slot(w) = task;
    }
}

/// What an edit changed that the running agent must act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Edit {
    /// `exclude_cgroups` or `exclude_ports` changed: the opt-out maps are rewritten.
    pub opt_out: bool,
    /// Sections that take effect only at the next start, as they are named in the file.
    pub needs_restart: Vec<&'static str>,
}

/// Compares the running configuration with an edited file.
pub fn compare(running: &AgentConfig, edited: &AgentConfig) -> Edit {
    let (o, n) = (running, edited);
    let mut needs_restart = Vec::new();
    let mut differs = |section: &'static str, changed: bool| {
        if changed {
            needs_restart.push(section);
        }
    };
    differs(
        "[datapath] cgroup, kernel_log, pin_dir",
        o.datapath.cgroup != n.datapath.cgroup
            || o.datapath.kernel_log != n.datapath.kernel_log
            || o.datapath.pin_dir != n.datapath.pin_dir,
    );
    differs("[forwarder]", o.forwarder != n.forwarder);
    differs(
        "[registry] state_dir",
        o.registry.state_dir != n.registry.state_dir,
    );
    differs("[api]", o.api != n.api);
    differs("[metrics]", o.metrics != n.metrics);
    Edit {
        opt_out: o.datapath.exclude_cgroups != n.datapath.exclude_cgroups
            || o.datapath.exclude_ports != n.datapath.exclude_ports,
        needs_restart,
    }
}

/// Applies to `running` what an edited file changes live, restarting the sources whose
/// sections changed, and warns about the rest. `opt_out` rewrites the opted-out cgroups and
/// ports; when it fails, the old ones stay and the error is logged.
pub fn apply(
    running: &mut AgentConfig,
    edited: &AgentConfig,
    sources: &mut Sources,
    registry: &Registry,
    opt_out: impl FnOnce(&crate::config::DatapathConfig) -> Result<(), String>,
) {
    let edit = compare(running, edited);
    if edit.opt_out {
        match opt_out(&edited.datapath) {
            Ok(()) => {
                running.datapath.exclude_cgroups = edited.datapath.exclude_cgroups.clone();
                running.datapath.exclude_ports = edited.datapath.exclude_ports.clone();
                info!(
                    cgroups = ?running.datapath.exclude_cgroups,
                    ports = ?running.datapath.exclude_ports,
                    "config file changed: [datapath] exclude_cgroups, exclude_ports applied"
                );
            }
            Err(e) => warn!(
                "config file changed: [datapath] exclude_cgroups, exclude_ports not applied \
                 (the previous ones stay): {e}"
            ),
        }
    }
    for w in ALL {
        if w.changed(running, edited) {
            match w {
                Which::Etcd => running.registry.etcd = edited.registry.etcd.clone(),
                Which::Kubernetes => {
                    running.registry.kubernetes = edited.registry.kubernetes.clone()
                }
                Which::Consul => running.registry.consul = edited.registry.consul.clone(),
                Which::Dns => running.registry.dns = edited.registry.dns.clone(),
            }
            sources.restart(w, registry, running);
            info!(
                "config file changed: {} applied (source restarted)",
                w.section()
            );
        }
    }
    for section in edit.needs_restart {
        warn!(
            "config file changed: {section} takes effect only when the agent restarts; \
             running on the previous settings"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> AgentConfig {
        let text = format!("[datapath]\ncgroup = \"/sy\"\n{extra}");
        AgentConfig::parse(std::path::Path::new("t.toml"), &text).unwrap()
    }

    #[test]
    fn names_what_needs_a_restart_and_what_applies_live() {
        let base = config("");
        assert_eq!(compare(&base, &base), Edit::default());
        let edit = compare(&base, &config("exclude_ports = [80]\n"));
        assert!(edit.opt_out && edit.needs_restart.is_empty(), "{edit:?}");
        let edit = compare(
            &base,
            &config("kernel_log = \"debug\"\n[metrics]\nlisten = \"127.0.0.1:1\"\n"),
        );
        assert!(!edit.opt_out);
        assert_eq!(
            edit.needs_restart,
            vec!["[datapath] cgroup, kernel_log, pin_dir", "[metrics]"]
        );
    }
}
