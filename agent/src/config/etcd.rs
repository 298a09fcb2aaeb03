//! `[registry.etcd]`: where the etcd source reads services. Checked with the rest of the file,
//! so a mistake here names its line and field and the agent does not start.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::HumanDuration;
use crate::defaults;

/// Where the etcd source reads services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Every member (`host:port`, `http://…` or `https://…`): the client balances over them
    /// and carries on while any answers.
    pub endpoints: Vec<String>,
    /// Each key `<prefix><name>` holds one service as JSON.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Name and password, for a cluster with authentication on.
    pub user: Option<(String, String)>,
    pub connect_timeout: Duration,
}

/// TLS to the members. The files are read at each connect, so a renewed certificate is taken
/// at the next reconnect without a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates.
    pub ca: PathBuf,
    /// A client certificate and its key, for members that ask for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    prefix: String,
    connect_timeout: Option<HumanDuration>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
}

fn default_prefix() -> String {
    defaults::ETCD_PREFIX.into()
}

impl RawEtcd {
    /// The checked section; the error names the field.
    pub(super) fn check(self) -> Result<EtcdConfig, String> {
        if self.endpoints.is_empty() {
            return Err("endpoints: name at least one member (host:port)".into());
        }
        if let Some(e) = self.endpoints.iter().find(|e| e.trim().is_empty()) {
            return Err(format!("endpoints: {e:?} is not an address"));
        }
        if self.prefix.is_empty() {
            return Err("prefix: must not be empty (it would read the whole keyspace)".into());
        }
        let identity = match (self.cert, self.key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err("cert, key: give both or neither".into()),
        };
        let tls = match (self.ca, identity) {
            (Some(ca), identity) => Some(EtcdTls { ca, identity }),
            (None, Some(_)) => return Err("ca: a client certificate needs the members' CA".into()),
            (None, None) => None,
        };
        let scheme = |s: &str| self.endpoints.iter().find(|e| e.starts_with(s)).cloned();
        match (&tls, scheme("https://"), scheme("http://")) {
            (None, Some(e), _) => return Err(format!("ca: {e} is https and needs the CA")),
            (Some(_), _, Some(e)) => {
                return Err(format!("endpoints: {e} is plain http but ca is set"));
            }
            _ => {}
        }
        let user = match (self.username, self.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err("username, password: give both or neither".into()),
        };
        Ok(EtcdConfig {
            endpoints: self.endpoints,
            prefix: self.prefix,
            tls,
            user,
            connect_timeout: self
                .connect_timeout
                .map_or(defaults::ETCD_CONNECT_TIMEOUT, |d| d.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::AgentConfig;

    const HEAD: &str =
        "[datapath]\ncgroup = \"pods\"\n[forwarder]\nlisten = [\"10.77.0.1:15001\"]\n";

    fn parse(rest: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("t.toml"), &format!("{HEAD}{rest}")).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_an_etcd_section() {
        let c = parse(
            "[registry.etcd]\nendpoints = [\"127.0.0.1:2379\", \"127.0.0.1:22379\"]\n\
             prefix = \"/sy/\"\nconnect_timeout = \"500ms\"\n",
        )
        .unwrap();
        let etcd = c.registry.etcd.unwrap();
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.prefix, "/sy/");
        assert_eq!(etcd.connect_timeout, Duration::from_millis(500));
        assert!(etcd.tls.is_none() && etcd.user.is_none());
        let e = parse("[registry.etcd]\nendpoints = []\n").unwrap_err();
        assert!(e.contains("line 5: registry.etcd: endpoints"), "{e}");
        let e = parse("[registry.etcd]\nendpoints = [\"a:1\"]\ncert = \"/c.pem\"\n").unwrap_err();
        assert!(e.contains("cert, key"), "{e}");
        let e = parse("[registry.etcd]\nendpoints = [\"https://a:1\"]\n").unwrap_err();
        assert!(e.contains("ca: "), "{e}");
    }
}
