//! The agent as a real process, in the node namespace and a cgroup of its own.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use crate::{Process, Topology, process::Place, unique};

pub struct Agent {
    pub process: Process,
    pub config: PathBuf,
}

/// How long an agent may take to load, attach and apply.
const START: Duration = Duration::from_secs(30);

impl Agent {
    /// Writes `config` to a file and starts `switchyard agent` on it; waits until it is ready.
    pub fn start(topo: &Topology, config: &str) -> anyhow::Result<Agent> {
        let mut agent = Self::spawn(topo, config)?;
        agent.process.wait_for("switchyard agent ready", START)?;
        Ok(agent)
    }

    /// Starts the agent without waiting: for configs it should refuse.
    pub fn spawn(topo: &Topology, config: &str) -> anyhow::Result<Agent> {
        Self::spawn_with(topo, config, &[])
    }

    /// As [`Agent::spawn`], with more `switchyard agent` arguments (`--no-handover`).
    pub fn spawn_with(topo: &Topology, config: &str, args: &[&str]) -> anyhow::Result<Agent> {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("sy-agent-")));
        fs::write(&path, config)?;
        let mut cmd = Command::new(crate::binary("SWITCHYARD_BIN", "switchyard"));
        cmd.arg("agent").arg("--config").arg(&path).args(args);
        let place = Place {
            netns: Some(&topo.node),
            cgroup: Some(&topo.agent_cgroup),
        };
        let process = Process::spawn("switchyard", cmd, place)?;
        Ok(Agent {
            process,
            config: path,
        })
    }

    /// The agent's log lines that contain every one of `words`.
    pub fn said(&self, words: &[&str]) -> Vec<String> {
        self.process
            .output()
            .into_iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .collect()
    }

    /// Replaces the config file (for the file source's watch).
    pub fn rewrite_config(&self, config: &str) -> anyhow::Result<()> {
        let tmp = self.config.with_extension("tmp");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, &self.config)?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.stop(Duration::from_secs(5));
        let _ = fs::remove_file(&self.config);
    }
}
