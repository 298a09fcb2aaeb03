//! Last-known-good: every source's layer on disk, written atomically after each change and
//! read at start.
//!
//! Format: a header line `switchyard-lkg 1 <body length> <FNV-1a 64 of body, hex>` and a JSON
//! body. A file whose header, length or checksum does not match (truncated by a crash mid-copy,
//! edited by hand, disk trouble) is set aside as `catalog.json.corrupt` with a message, and the
//! agent starts without it: never half-loaded.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use super::{Layer, Source};

const MAGIC: &str = "switchyard-lkg";
const VERSION: u32 = 1;
const FILE: &str = "catalog.json";

#[derive(Debug, thiserror::Error)]
pub enum LastKnownGoodError {
    #[error("last-known-good {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("last-known-good {path} is corrupt ({why}); set aside as {aside}, starting without it")]
    Corrupt {
        path: PathBuf,
        why: String,
        aside: PathBuf,
    },
}

pub struct Store {
    dir: PathBuf,
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Store {
    pub fn new(dir: PathBuf) -> Self {
        Store { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> LastKnownGoodError + '_ {
        let path = path.to_owned();
        move |source| LastKnownGoodError::Io { path, source }
    }

    /// Write to a temporary file, fsync it, rename over the old one, fsync the directory.
    pub fn save(&self, layers: &BTreeMap<Source, Layer>) -> Result<(), LastKnownGoodError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let body = serde_json::to_vec(layers).map_err(|e| LastKnownGoodError::Io {
            path: self.path(),
            source: std::io::Error::other(e),
        })?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut f = File::create(&tmp).map_err(self.io(&tmp))?;
        writeln!(
            f,
            "{MAGIC} {VERSION} {} {:016x}",
            body.len(),
            fnv1a64(&body)
        )
        .and_then(|_| f.write_all(&body))
        .and_then(|_| f.sync_all())
        .map_err(self.io(&tmp))?;
        fs::rename(&tmp, self.path()).map_err(self.io(&tmp))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The saved layers, `None` if there is no file yet.
    pub fn load(&self) -> Result<Option<BTreeMap<Source, Layer>>, LastKnownGoodError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LastKnownGoodError::Io { path, source: e }),
        };
        match parse(&bytes) {
            Ok(layers) => Ok(Some(layers)),
            Err(why) => {
                let aside = self.dir.join(format!("{FILE}.corrupt"));
                let _ = fs::rename(&path, &aside);
                Err(LastKnownGoodError::Corrupt { path, why, aside })
            }
        }
    }
}

/// `body` behind the header [`Store::save`] writes.
pub(crate) fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{MAGIC} {VERSION} {} {:016x}\n", body.len(), fnv1a64(body)).into_bytes();
    out.extend_from_slice(body);
    out
}

pub(crate) fn parse(bytes: &[u8]) -> Result<BTreeMap<Source, Layer>, String> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "header is not text")?;
    let body = &bytes[newline + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, len, sum] = fields[..] else {
        return Err("malformed header".into());
    };
    if magic != MAGIC || version != VERSION.to_string() {
        return Err(format!("unknown format {magic:?} {version:?}"));
    }
    let len: usize = len.parse().map_err(|_| "bad length")?;
    if body.len() != len {
        return Err(format!(
            "{} bytes of body, header says {len} (truncated?)",
            body.len()
        ));
    }
    if format!("{:016x}", fnv1a64(body)) != sum {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Algorithm, Mode, Service};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sy-lkg-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn layers() -> BTreeMap<Source, Layer> {
        let mut l = Layer::default();
        l.entries.insert(
            "web".into(),
            std::sync::Arc::new(Service {
                mode: Mode::Proxy,
                algorithm: Algorithm::Maglev,
                ..crate::test_helpers::service("web", "10.96.0.1:80", &[])
            }),
        );
        [(Source::Etcd, l)].into()
    }

    #[test]
    fn round_trips() {
        let s = Store::new(dir("rt"));
        s.save(&layers()).unwrap();
        let back = s.load().unwrap().unwrap();
        assert_eq!(back[&Source::Etcd].entries, layers()[&Source::Etcd].entries);
    }

    #[test]
    fn a_truncated_file_is_set_aside_not_half_loaded() {
        let d = dir("trunc");
        let s = Store::new(d.clone());
        s.save(&layers()).unwrap();
        let bytes = fs::read(s.path()).unwrap();
        fs::write(s.path(), &bytes[..bytes.len() - 5]).unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        assert!(d.join("catalog.json.corrupt").exists());
        assert!(s.load().unwrap().is_none());
    }
}

/// Saves in the background, latest state first, at most once per [`MIN_INTERVAL`]: a burst of
/// changes (a control plane catching up) costs one write, and no write, serialisation and fsync
/// included, delays a change reaching the kernel or takes a core from the forwarder. A crash
/// loses at most the last interval's changes; a clean stop flushes.
pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the saver gets the state to write: called at most once per [`MIN_INTERVAL`], so a
/// change costs a flag, not a copy of the catalog.
pub type Snapshot = Box<dyn Fn() -> BTreeMap<Source, Layer> + Send>;

#[derive(Clone)]
pub struct Saver {
    shared: std::sync::Arc<(std::sync::Mutex<Pending>, std::sync::Condvar)>,
}

#[derive(Default)]
pub struct Pending {
    dirty: bool,
    busy: bool,
}

impl Saver {
    /// A saver whose thread starts once `snapshot` is given (see [`Saver::run`]).
    pub fn new() -> Saver {
        Saver {
            shared: Default::default(),
        }
    }

    /// Runs the saving thread.
    pub fn run(&self, store: Store, snapshot: Snapshot) {
        let theirs = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("sy-lkg".into())
            .spawn(move || {
                let (lock, wake) = &*theirs;
                loop {
                    {
                        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                        while !p.dirty {
                            p = wake.wait(p).unwrap_or_else(|e| e.into_inner());
                        }
                        p.dirty = false;
                        p.busy = true;
                    }
                    let started = std::time::Instant::now();
                    if let Err(e) = store.save(&snapshot()) {
                        tracing::warn!("last-known-good not saved: {e}");
                    }
                    let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                    p.busy = false;
                    wake.notify_all();
                    drop(p);
                    std::thread::sleep(MIN_INTERVAL.saturating_sub(started.elapsed()));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("last-known-good saver not started: {e}");
        }
    }

    /// Notes that the state changed.
    pub fn touch(&self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
        wake.notify_all();
    }

    /// Waits until everything changed so far is on disk (at shutdown).
    pub fn flush(&self) {
        let (lock, wake) = &*self.shared;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        while p.dirty || p.busy {
            let (g, timeout) = wake
                .wait_timeout(p, std::time::Duration::from_secs(5))
                .unwrap_or_else(|e| e.into_inner());
            p = g;
            if timeout.timed_out() {
                return;
            }
        }
    }
}

impl Default for Saver {
    fn default() -> Self {
        Saver::new()
    }
}
