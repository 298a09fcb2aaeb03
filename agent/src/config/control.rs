//! `[api]` and `[metrics]`: where the local API and the Prometheus endpoint listen. Checked with
//! the rest of the file, so a mistake names its field and the agent does not start.

use std::{fmt, net::SocketAddr, path::PathBuf};

use serde::{
    Deserialize,
    de::{self, Deserializer, Visitor},
};

use crate::defaults;

/// The local API (HTTP/JSON on a Unix socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// `None`: no API (`socket = ""`).
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file; connecting needs write permission on it.
    pub mode: u32,
    /// The group the socket is given to (its members may then connect, with mode 0660).
    pub group: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: Some(PathBuf::from(defaults::API_SOCKET)),
            mode: defaults::API_MODE,
            group: None,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `None`: no metrics endpoint (`listen = ""`).
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: defaults::METRICS_LISTEN.parse().ok(),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    socket: Option<PathBuf>,
    mode: Option<Mode>,
    group: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    listen: Option<String>,
}

/// A file mode written as an octal string (`"0660"`) or a TOML octal integer (`0o660`).
struct Mode(u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal mode such as \"0600\" or 0o660")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let digits = v.trim().trim_start_matches("0o");
                u32::from_str_radix(digits, 8)
                    .map(Mode)
                    .map_err(|_| E::custom(format!("`{v}` is not an octal mode such as \"0600\"")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                u32::try_from(v)
                    .map(Mode)
                    .map_err(|_| E::custom("a mode cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

impl RawApi {
    /// The checked section; the error names the field.
    pub(super) fn check(self) -> Result<ApiConfig, String> {
        let socket = match self.socket {
            None => Some(PathBuf::from(defaults::API_SOCKET)),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) if !p.is_absolute() => {
                return Err(format!(
                    "api.socket: {} must be an absolute path (or \"\" for no API)",
                    p.display()
                ));
            }
            Some(p) => Some(p),
        };
        let mode = match self.mode {
            None if self.group.is_some() => 0o660,
            None => defaults::API_MODE,
            Some(Mode(m)) if m > 0o777 => {
                return Err(format!(
                    "api.mode: {m:#o} is not a permission mode (0 to 0777; write it as \"0600\")"
                ));
            }
            Some(Mode(m)) if m & 0o002 != 0 => {
                return Err(format!(
                    "api.mode: {m:#o} lets every local user write to the socket, which is full \
                     control of the agent; use 0600, or 0660 with api.group"
                ));
            }
            Some(Mode(m)) if m & 0o200 == 0 => {
                return Err(format!(
                    "api.mode: {m:#o} leaves the owner without write permission: nobody could connect"
                ));
            }
            Some(Mode(m)) => m,
        };
        if self.group.as_ref().is_some_and(|g| g.trim().is_empty()) {
            return Err("api.group: name a group (or leave it out)".into());
        }
        Ok(ApiConfig {
            socket,
            mode,
            group: self.group,
        })
    }
}

impl RawMetrics {
    pub(super) fn check(self) -> Result<MetricsConfig, String> {
        let listen = match self.listen.as_deref().map(str::trim) {
            None => return Ok(MetricsConfig::default()),
            Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| {
                format!(
                    "metrics.listen: `{s}` is not an ip:port address (or \"\" to turn metrics off)"
                )
            })?),
        };
        Ok(MetricsConfig { listen })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::AgentConfig;

    fn parse(rest: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(
            Path::new("t.toml"),
            &format!("[datapath]\ncgroup = \"pods\"\n{rest}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_when_left_out() {
        let c = parse("").unwrap();
        assert_eq!(
            c.api.socket.as_deref(),
            Some(Path::new("/run/switchyard/api.sock"))
        );
        assert_eq!(c.api.mode, 0o600);
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9479".parse().unwrap()));
    }

    #[test]
    fn reads_both_sections() {
        let c = parse(
            "[api]\nsocket = \"/tmp/sy.sock\"\ngroup = \"adm\"\n[metrics]\nlisten = \"[::1]:9000\"\n",
        )
        .unwrap();
        assert_eq!(c.api.mode, 0o660, "a group opens the socket to it");
        assert_eq!(c.api.group.as_deref(), Some("adm"));
        assert_eq!(c.metrics.listen, Some("[::1]:9000".parse().unwrap()));
        let c = parse("[api]\nsocket = \"\"\nmode = 0o640\n[metrics]\nlisten = \"\"\n").unwrap();
        assert_eq!((c.api.socket, c.api.mode), (None, 0o640));
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            ("[api]\nsocket = \"run/api.sock\"\n", "api.socket"),
            ("[api]\nmode = \"0999\"\n", "not an octal mode"),
            ("[api]\nmode = 600\n", "api.mode"),
            ("[api]\nmode = \"0400\"\n", "api.mode"),
            ("[api]\ngroup = \"\"\n", "api.group"),
            ("[api]\nmode = \"0666\"\n", "lets every local user write"),
            ("[api]\nmode = 0o602\n", "api.mode"),
            ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
            ("[api]\nport = 1\n", "unknown field `port`"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
