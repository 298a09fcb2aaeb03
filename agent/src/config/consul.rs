//! `[registry.consul]`: where the Consul source reads services. Checked with the rest of the
//! file, so a mistake here names its line and field and the agent does not start.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::HumanDuration;
use crate::defaults;

/// Where the Consul source reads services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulConfig {
    /// The agent's (or a server's) HTTP API: `http://host:8500` or `https://host:8501`.
    pub address: String,
    /// ACL token sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Read the token from this file instead (at each connect: a rotated token is taken).
    pub token_file: Option<PathBuf>,
    /// The CA that signed the server's certificate (needed for `https://`).
    pub ca: Option<PathBuf>,
    /// Datacenter to ask about (`None`: the agent's own).
    pub datacenter: Option<String>,
    /// How long one blocking query may wait for a change (Consul caps it at 10 minutes).
    pub wait: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsul {
    #[serde(default = "default_consul_address")]
    address: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    datacenter: Option<String>,
    wait: Option<HumanDuration>,
}

fn default_consul_address() -> String {
    defaults::CONSUL_ADDRESS.into()
}

impl RawConsul {
    pub(super) fn check(self) -> Result<ConsulConfig, String> {
        let address = self.address.trim_end_matches('/').to_owned();
        let https = address.starts_with("https://");
        if !https && !address.starts_with("http://") {
            return Err(format!(
                "address: {:?} must start with http:// or https://",
                self.address
            ));
        }
        let rest = address.split_once("://").map_or("", |(_, r)| r);
        if rest.is_empty() || rest.contains('/') {
            return Err(format!(
                "address: {:?} must be scheme://host:port, without a path",
                self.address
            ));
        }
        match (https, &self.ca) {
            (true, None) => return Err("ca: an https:// address needs the server's CA".into()),
            (false, Some(_)) => return Err("ca: the address is plain http://".into()),
            _ => {}
        }
        if self.token.is_some() && self.token_file.is_some() {
            return Err("token, token_file: give one or neither".into());
        }
        let wait = self.wait.map_or(defaults::CONSUL_WAIT, |d| d.0);
        if wait < Duration::from_secs(1) || wait > Duration::from_secs(600) {
            return Err("wait: must be between 1s and 10m (Consul's own cap)".into());
        }
        Ok(ConsulConfig {
            address,
            token: self.token,
            token_file: self.token_file,
            ca: self.ca,
            datacenter: self.datacenter.filter(|d| !d.is_empty()),
            wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::AgentConfig;

    const HEAD: &str = "[datapath]\ncgroup = \"pods\"\n";

    fn parse(rest: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("t.toml"), &format!("{HEAD}{rest}")).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_a_consul_section() {
        let c = parse("[registry.consul]\ntoken = \"t\"\nwait = \"30s\"\n").unwrap();
        let consul = c.registry.consul.unwrap();
        assert_eq!(consul.address, defaults::CONSUL_ADDRESS);
        assert_eq!(consul.wait, Duration::from_secs(30));
        assert_eq!(consul.token.as_deref(), Some("t"));
        for (text, want) in [
            ("address = \"https://c:8501\"", "ca: an https"),
            ("address = \"c:8500\"", "address: "),
            ("address = \"http://c:8500/v1\"", "without a path"),
            ("ca = \"/ca.pem\"", "plain http"),
            ("wait = \"11m\"", "wait: "),
            ("token = \"a\"\ntoken_file = \"/t\"", "token, token_file"),
        ] {
            let e = parse(&format!("[registry.consul]\n{text}\n")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
