//! `[registry.etcd]` and `[[registry.dns]]`: the sources besides the file. Checked with the rest
//! of the file, so a mistake here names its line and field and the agent does not start.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{HumanDuration, affinity, check_service, tcp};
use crate::{
    catalog::{Algorithm, Mode, Protocol, Service, ServiceAddr},
    defaults,
};

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

/// What a DNS entry asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DnsRecord {
    /// IPv4 addresses, all on `port`.
    A,
    /// IPv6 addresses, all on `port`.
    Aaaa,
    /// Targets with their own port and weight; the lowest priority present is used.
    Srv,
}

/// One service whose backends are what a DNS name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// The service, without backends: those come from the answers.
    pub service: Service,
    pub query: String,
    pub record: DnsRecord,
    /// The backends' port for A and AAAA answers (SRV answers carry their own).
    pub port: Option<u16>,
    /// `None`: the system's nameservers (`/etc/resolv.conf`).
    pub nameserver: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) name: String,
    vip: SocketAddr,
    #[serde(default = "tcp")]
    protocol: Protocol,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    affinity: bool,
    affinity_timeout: Option<HumanDuration>,
    query: String,
    #[serde(rename = "type")]
    record: DnsRecord,
    port: Option<u16>,
    nameserver: Option<SocketAddr>,
}

impl RawDns {
    /// The checked entry; the error names the field.
    pub(super) fn check(self, listen: &[SocketAddr]) -> Result<DnsConfig, String> {
        if self.query.trim().is_empty() {
            return Err("query: name the DNS name to resolve".into());
        }
        match (self.record, self.vip.is_ipv4()) {
            (DnsRecord::A, false) => {
                return Err("type: A answers are IPv4 but the vip is IPv6; use AAAA".into());
            }
            (DnsRecord::Aaaa, true) => {
                return Err("type: AAAA answers are IPv6 but the vip is IPv4; use A".into());
            }
            _ => {}
        }
        match (self.record, self.port) {
            (DnsRecord::Srv, Some(_)) => {
                return Err("port: SRV answers carry their own port; leave it out".into());
            }
            (DnsRecord::A | DnsRecord::Aaaa, None | Some(0)) => {
                return Err("port: A and AAAA answers need the backends' port (1-65535)".into());
            }
            _ => {}
        }
        if self.nameserver.is_some_and(|n| n.port() == 0) {
            return Err("nameserver: port 0 is not a DNS port".into());
        }
        let service = Service {
            name: self.name,
            addr: ServiceAddr {
                vip: self.vip,
                protocol: self.protocol,
            },
            mode: self.mode,
            algorithm: self.algorithm,
            affinity: affinity(self.affinity, self.affinity_timeout),
            backends: Vec::new(),
            policy: Default::default(),
        };
        check_service(&service, listen)?;
        Ok(DnsConfig {
            service,
            query: self.query,
            record: self.record,
            port: self.port,
            nameserver: self.nameserver,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{AgentConfig, service_from_json};

    const HEAD: &str =
        "[datapath]\ncgroup = \"pods\"\n[forwarder]\nlisten = [\"10.77.0.1:15001\"]\n";

    fn parse(rest: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("t.toml"), &format!("{HEAD}{rest}")).map_err(|e| e.to_string())
    }

    fn json(text: &str) -> Result<Service, String> {
        service_from_json(
            text.as_bytes(),
            "web",
            &["10.77.0.1:15001".parse().unwrap()],
        )
    }

    #[test]
    fn a_json_entry_reads_like_a_toml_table() {
        let toml = parse(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nmode = \"proxy\"\n\
             affinity_timeout = \"30s\"\n\
             backends = [\"10.0.0.1:8080\", { address = \"10.0.0.2:8080\", weight = 3 }]\n",
        )
        .unwrap();
        let from_json = json(
            r#"{"vip": "10.96.0.10:80", "mode": "proxy", "affinity_timeout": 30,
                "backends": ["10.0.0.1:8080", {"address": "10.0.0.2:8080", "weight": 3}]}"#,
        )
        .unwrap();
        assert_eq!(
            toml.catalog.services.values().next().map(|s| &**s),
            Some(&from_json)
        );
        assert_eq!(from_json.name, "web", "the name comes from the key");
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (
                r#"{"vip": "10.96.0.1:80", "backends": ["10.0.0.1:0"]}"#,
                "backends[0]: port 0",
            ),
            (r#"{"vip": "10.96.0.1"}"#, "vip: "),
            (
                r#"{"vip": "10.96.0.1:80", "mode": "teleport"}"#,
                "mode: unknown variant",
            ),
            (
                r#"{"vip": "10.96.0.1:80", "backends": [{"address": "10.0.0.1:1", "weight": -1}]}"#,
                "backends[0]",
            ),
            (
                r#"{"vip": "10.96.0.1:80", "colour": "red"}"#,
                "unknown field `colour`",
            ),
            (r#"{"vip": "#, "not JSON"),
            (r#"["10.96.0.1:80"]"#, "not an object"),
            (r#"{"name": "no spaces", "vip": "10.96.0.1:80"}"#, "name: "),
        ];
        for (text, want) in cases {
            let e = json(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e:?} lacks {want:?}");
        }
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

    #[test]
    fn reads_dns_entries() {
        let c = parse(
            "[[registry.dns]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nquery = \"web.example.test\"\n\
             type = \"A\"\nport = 8080\nnameserver = \"127.0.0.1:5353\"\n\n\
             [[registry.dns]]\nname = \"api\"\nvip = \"10.96.0.11:80\"\nmode = \"proxy\"\n\
             query = \"_api._tcp.example.test\"\ntype = \"SRV\"\n",
        )
        .unwrap();
        let [web, api] = &c.registry.dns[..] else {
            panic!("{:?}", c.registry.dns)
        };
        assert_eq!((web.record, web.port), (DnsRecord::A, Some(8080)));
        assert_eq!(web.nameserver, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(
            (api.record, api.service.mode),
            (DnsRecord::Srv, Mode::Proxy)
        );

        let entry =
            "[[registry.dns]]\nname = \"web\"\nvip = \"10.96.0.10:80\"\nquery = \"w.test\"\n";
        let e = parse(&format!("{entry}type = \"AAAA\"\nport = 80\n")).unwrap_err();
        assert!(
            e.contains("line 5: registry.dns[0] \"web\": type: AAAA"),
            "{e}"
        );
        let e = parse(&format!("{entry}type = \"A\"\n")).unwrap_err();
        assert!(e.contains("port: "), "{e}");
        let e = parse(&format!("{entry}type = \"SRV\"\nport = 80\n")).unwrap_err();
        assert!(e.contains("port: SRV"), "{e}");
        let e = parse(&format!(
            "{entry}type = \"A\"\nport = 80\n{entry}type = \"A\"\nport = 81\n"
        ))
        .unwrap_err();
        assert!(e.contains("name: already used by registry.dns[0]"), "{e}");
        let e = parse(&format!(
            "[[service]]\nname = \"web\"\nvip = \"10.96.0.9:80\"\n{entry}type = \"A\"\nport = 80\n"
        ))
        .unwrap_err();
        assert!(e.contains("already used by a [[service]]"), "{e}");
    }
}
