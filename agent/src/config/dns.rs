//! `[[registry.dns]]`: services whose backends are what a DNS name resolves to. Checked with the
//! rest of the file, so a mistake here names its line and field and the agent does not start.

use std::net::SocketAddr;

use serde::Deserialize;

use super::HumanDuration;
use crate::catalog::{
    Algorithm, Mode, Protocol, Service, ServiceAddr,
    entry::{affinity, check_service, tcp},
};

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
    use crate::config::AgentConfig;

    const HEAD: &str =
        "[datapath]\ncgroup = \"pods\"\n[forwarder]\nlisten = [\"10.77.0.1:15001\"]\n";

    fn parse(rest: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("t.toml"), &format!("{HEAD}{rest}")).map_err(|e| e.to_string())
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
