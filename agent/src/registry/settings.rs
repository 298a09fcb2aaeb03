//! Per-service settings carried on another system's objects: Kubernetes annotations
//! (`switchyard.io/connect-timeout: 500ms`), Consul tags (`switchyard-connect-timeout=500ms`)
//! and service meta (`switchyard_connect_timeout`). Each names a field of a `[[service]]` table
//! (dashes for underscores); the value is written into that entry's JSON, which then goes
//! through the one validation path every source uses
//! ([`crate::catalog::entry::service_from_json`]), so a bad value is refused with the same
//! message as in the file.
//!
//! An unknown name is refused too, rather than ignored: a misspelt setting would otherwise
//! silently not apply.

use serde_json::{Map, Value};

/// How a setting's text becomes a JSON value.
#[derive(Clone, Copy)]
enum Kind {
    /// Kept as a string (modes, algorithms, durations: `"500ms"`).
    Text,
    /// A whole number.
    Number,
    /// JSON itself (`health: {"kind": "http", "path": "/healthz"}`).
    Json,
}

/// The settings an object may carry, by field name. Whatever is not set takes the file's
/// default (mode `kernel`, algorithm `round_robin`, the forwarder's connect timeout and
/// retries, no connection limit, a drain deadline of `defaults::DRAIN_TIMEOUT`, …).
const FIELDS: &[(&str, Kind)] = &[
    ("mode", Kind::Text),
    ("algorithm", Kind::Text),
    ("connect_timeout", Kind::Text),
    ("retries", Kind::Number),
    ("max_connections", Kind::Number),
    ("drain_timeout", Kind::Text),
    ("idle_timeout", Kind::Text),
    ("hash_key", Kind::Text),
    ("byte_path", Kind::Text),
    ("outlier_failures", Kind::Number),
    ("outlier_ejection", Kind::Text),
    ("health", Kind::Json),
    ("app_protocol", Kind::Text),
    ("request_timeout", Kind::Text),
    ("try_timeout", Kind::Text),
    ("access_log", Kind::Json),
];

/// Fields some sources take from settings and others from their own objects (Kubernetes has
/// the protocol and affinity in the Service spec; Consul has no such place).
pub const PROTOCOL_AND_AFFINITY: &[&str] = &["protocol", "affinity_timeout"];

/// Writes setting `name` (dashes or underscores) into `fields`. `extra` names more fields this
/// source accepts as text ([`PROTOCOL_AND_AFFINITY`]). The error names the setting.
pub fn set(
    fields: &mut Map<String, Value>,
    name: &str,
    value: &str,
    extra: &[&str],
) -> Result<(), String> {
    let field = name.replace('-', "_");
    let kind = FIELDS
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, k)| *k)
        .or_else(|| extra.contains(&field.as_str()).then_some(Kind::Text));
    let Some(kind) = kind else {
        let mut known: Vec<String> = FIELDS.iter().map(|(f, _)| f.replace('_', "-")).collect();
        known.extend(extra.iter().map(|f| f.replace('_', "-")));
        return Err(format!(
            "{name}: not a setting (known: {})",
            known.join(", ")
        ));
    };
    let value = value.trim();
    let json = match kind {
        Kind::Text => Value::String(value.to_owned()),
        Kind::Number => value
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| format!("{name}: `{value}` is not a whole number"))?,
        Kind::Json => serde_json::from_str(value).map_err(|e| format!("{name}: not JSON: {e}"))?,
    };
    fields.insert(field, json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_fields() {
        let mut f = Map::new();
        set(&mut f, "mode", "proxy", &[]).unwrap();
        set(&mut f, "connect-timeout", "250ms", &[]).unwrap();
        set(&mut f, "retries", " 3 ", &[]).unwrap();
        set(&mut f, "health", r#"{"kind": "tcp"}"#, &[]).unwrap();
        set(&mut f, "protocol", "udp", PROTOCOL_AND_AFFINITY).unwrap();
        assert_eq!(
            Value::Object(f),
            serde_json::json!({"mode": "proxy", "connect_timeout": "250ms", "retries": 3,
                "health": {"kind": "tcp"}, "protocol": "udp"})
        );
    }

    #[test]
    fn unknown_or_malformed_settings_are_named() {
        let mut f = Map::new();
        let e = set(&mut f, "mdoe", "proxy", &[]).unwrap_err();
        assert!(e.starts_with("mdoe: not a setting"), "{e}");
        let e = set(&mut f, "protocol", "udp", &[]).unwrap_err();
        assert!(e.starts_with("protocol: not a setting"), "{e}");
        let e = set(&mut f, "retries", "many", &[]).unwrap_err();
        assert_eq!(e, "retries: `many` is not a whole number");
    }
}
