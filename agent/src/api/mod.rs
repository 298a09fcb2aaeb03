//! The local API: HTTP/JSON on a Unix socket (HAProxy's runtime API in spirit), for operators on
//! the node and for `switchyard ctl`.
//!
//! Routes (`/v1/routes`, [`http_routes`]) are the API's layer too, beside its services.
//!
//! Reads show the merged catalog, live state (connections, health, ejections, drains) and the
//! registry's sources. Changes are the API's own registry layer ([`Source::Api`], the highest
//! precedence, saved as last-known-good so they survive restarts): a service created here is
//! the API's; a backend changed on another source's service copies that service into the API's
//! layer with the change, which then wins until `DELETE /v1/services/NAME/override` hands it
//! back. Every request is checked whole before anything changes; a refusal is
//! `{"error": "...", "field": "..."}` with a 4xx status.
//!
//! Access is the socket file's permissions (mode 0600 by default; `[api] group` opens it to a
//! group; a mode open to "other" is refused), and [`peer`] checks every connection's
//! credentials too. [`crate::listener::http`] bounds what any one client can hold.
//!
//! [`Source::Api`]: crate::registry::Source::Api

mod http_routes;
pub mod peer;
mod routes;
pub mod state;
pub mod view;

use std::{
    ffi::CString,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Instant,
};

use hyper::Method;
use tokio::{net::UnixListener, task::JoinHandle};
use tracing::{debug, info};

pub use crate::listener::http::{Limits, Reply};
pub use routes::field_of;

use crate::{config::ApiConfig, live::Live};

/// The API's state: the live handles, and the forwarder addresses a proxy-mode entry needs.
pub struct Api {
    live: Live,
    listen: Vec<SocketAddr>,
    started: Instant,
    /// Changes are read-modify-write of the API's layer: one at a time.
    edits: Mutex<()>,
    /// The gateways listening now, which a route may name.
    gateways: crate::http::gateway::GatewayNames,
}

impl Api {
    /// `listen` are the forwarder's addresses (a proxy-mode service needs one of its family).
    pub fn new(live: Live, listen: Vec<SocketAddr>) -> Api {
        Api {
            live,
            listen,
            started: Instant::now(),
            edits: Mutex::new(()),
            gateways: Default::default(),
        }
    }

    /// The gateways a route may name (none without this).
    pub fn with_gateways(mut self, gateways: crate::http::gateway::GatewayNames) -> Api {
        self.gateways = gateways;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("api.socket: cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api.socket: {0} answers already: another agent is serving there")]
    InUse(PathBuf),
    #[error("api.socket: {0} exists and is not a socket")]
    NotSocket(PathBuf),
    #[error("api.group: no group named {0:?} on this host")]
    Group(String),
}

/// The running API; dropping it stops serving and removes the socket file.
pub struct ApiServer {
    task: JoinHandle<()>,
    path: PathBuf,
    /// Another descriptor of the listening socket, for a successor to take over.
    listener: Option<std::os::unix::net::UnixListener>,
    remove: bool,
}

impl ApiServer {
    /// The listening socket, for a successor agent (see `handover`).
    pub fn listener(&self) -> Option<&std::os::unix::net::UnixListener> {
        self.listener.as_ref()
    }

    /// Stops accepting and leaves the socket file in place: a successor serves on it now.
    /// Requests already accepted are answered.
    pub fn hand_over(mut self) {
        self.remove = false;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the socket as configured and serves `api` on it (`None`: the API is turned off).
pub fn start(config: &ApiConfig, api: Api) -> Result<Option<ApiServer>, ApiError> {
    start_on(config, api, None)
}

/// As [`start`], serving on `inherited` (a previous agent's listening socket, handed over)
/// when it is bound to the configured path: the socket never stops answering.
pub fn start_on(
    config: &ApiConfig,
    api: Api,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<Option<ApiServer>, ApiError> {
    let Some(path) = &config.socket else {
        return Ok(None);
    };
    let io = |source| ApiError::Io {
        path: path.to_owned(),
        source,
    };
    // A socket is bound under a temporary name and renamed into place (see `bind`): its
    // address is that name, `<path>.<pid>.tmp`.
    let same_path = |l: &std::os::unix::net::UnixListener| {
        let bound_as = l.local_addr().ok();
        let bound_as = bound_as.as_ref().and_then(|a| a.as_pathname());
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".");
        bound_as.is_some_and(|b| {
            b == path.as_path()
                || (b
                    .as_os_str()
                    .as_encoded_bytes()
                    .starts_with(tmp.as_encoded_bytes())
                    && b.as_os_str().as_encoded_bytes().ends_with(b".tmp"))
        })
    };
    let listener = match inherited.filter(same_path) {
        Some(l) => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
                .map_err(io)?;
            l.set_nonblocking(true).map_err(io)?;
            UnixListener::from_std(l).map_err(io)?
        }
        None => bind(path, config.mode, config.group.as_deref())?,
    };
    let kept = {
        use std::os::fd::AsFd as _;
        listener
            .as_fd()
            .try_clone_to_owned()
            .map(std::os::unix::net::UnixListener::from)
            .map_err(io)?
    };
    // `bind` refused an unknown group already.
    let listener = peer::Trusted::new(listener, config.group.as_deref().and_then(gid_of));
    info!(socket = %path.display(), mode = format!("{:#o}", config.mode), group = ?config.group, "API listening");
    let task = tokio::spawn(crate::listener::http::serve(
        listener,
        Limits::default(),
        move |req| {
            let reply = api.handle(&req.method, &req.path, &req.body);
            if req.method == Method::GET {
                debug!(peer = %req.peer, "api: {} {}: {}", req.method, req.path, reply.status.as_u16());
            } else {
                info!(peer = %req.peer, "api: {} {}: {}", req.method, req.path, reply.status.as_u16());
            }
            std::future::ready(reply)
        },
    ));
    Ok(Some(ApiServer {
        task,
        path: path.clone(),
        listener: Some(kept),
        remove: true,
    }))
}

/// Binds `path` with its mode and group already set: the socket is made under a temporary
/// name, given its permissions, then renamed into place, so it is never reachable with
/// looser ones.
fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, ApiError> {
    let io = |source| ApiError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ApiError::NotSocket(path.to_owned())),
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_owned()));
            }
            // A socket nobody answers on: a previous agent's. The rename below replaces it.
        }
        Err(_) => {}
    }
    let gid = group
        .map(|g| gid_of(g).ok_or_else(|| ApiError::Group(g.to_owned())))
        .transpose()?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io)?;
    let prepared = (|| {
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })();
    prepared.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// The id of group `name`.
fn gid_of(name: &str) -> Option<u32> {
    let name = CString::new(name.as_bytes()).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed `group` is a valid out-parameter; `buf` outlives the call and its length
    // is passed; `result` is only read after the call.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
    }
}

#[cfg(test)]
mod tests;
