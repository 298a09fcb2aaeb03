//! The file source: the `[[service]]` and `[[route]]` tables of the agent's config file,
//! watched.
//!
//! The file is taken whole or not at all, at start (the agent refuses to start) and on every
//! edit (the edit is reported and nothing changes). Editors replace files by rename, so the
//! watch compares contents on a short poll rather than following an inode.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tracing::{info, warn};

use super::{Registry, Source};
use crate::{catalog::Catalog, config::AgentConfig};

/// How often the file is looked at; an edit applies within this (plus the apply).
pub const POLL: Duration = Duration::from_millis(200);

pub fn entries(catalog: &Catalog) -> BTreeMap<String, crate::catalog::Service> {
    catalog
        .services
        .values()
        .map(|s| (s.name.clone(), (**s).clone()))
        .collect()
}

/// The file's routes by name (the file's check made the names unique).
pub fn routes(
    raw: &[crate::http::route::RawRoute],
) -> BTreeMap<String, crate::http::route::RawRoute> {
    raw.iter().map(|r| (r.name.clone(), r.clone())).collect()
}

/// Watches `path` until the task is dropped. `initial` is the text already applied. The rest
/// of each valid edit (without its services) goes to `settings`, for `reload` to act on.
pub async fn watch(
    registry: Registry,
    path: PathBuf,
    initial: String,
    settings: tokio::sync::watch::Sender<std::sync::Arc<AgentConfig>>,
) {
    let mut applied = initial;
    let mut interval = tokio::time::interval(POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        if text == applied {
            continue;
        }
        match AgentConfig::parse(&path, &text) {
            Ok(mut config) => {
                info!(path = %path.display(), services = config.catalog.services.len(), routes = config.routes.len(), "config file changed: applying its services and routes");
                registry.replace(Source::File, entries(&config.catalog), &[]);
                registry.replace_routes(Source::File, routes(&config.routes));
                config.catalog = Catalog::default();
                settings.send_replace(std::sync::Arc::new(config));
            }
            Err(e) => {
                warn!("config file changed but is not valid; nothing applied: {e}");
                registry.set_live(Source::File, false, Some(e.to_string()));
            }
        }
        applied = text;
    }
}
