//! Pinning: the agent's bpffs directory, where maps and the steering links outlive the agent.
//!
//! Layout: `<dir>/maps/<MAP>` (aya pins maps declared `pinned` there, and reuses them when they
//! exist) and `<dir>/links/<program>`. A new agent attaches its programs first and only then
//! unpins and drops the old links, so some program is attached at every instant; in the
//! overlap both run, and the second sees a destination already rewritten. The `getsockopt`
//! hook is not pinned: it serves the forwarder, which lives and dies with the agent.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};

/// `statfs(2)` type of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pin directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot mount a BPF filesystem on {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot pin link {path}: {message}")]
    Link { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type == BPF_FS_MAGIC
}

/// `/sys/fs/bpf/switchyard` where the host has bpffs there (most distributions, and Kubernetes
/// nodes); otherwise a bpffs the agent mounts itself.
pub fn default_dir() -> PathBuf {
    if is_bpffs(Path::new("/sys/fs/bpf")) {
        PathBuf::from("/sys/fs/bpf/switchyard")
    } else {
        PathBuf::from("/run/switchyard/bpffs")
    }
}

/// Makes `dir` a directory on a BPF filesystem: inside an existing one, or a new mount.
pub fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    if is_bpffs(dir) {
        return Ok(());
    }
    let parent_is_bpffs = dir.parent().is_some_and(is_bpffs);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    if parent_is_bpffs {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_bytes()).map_err(|_| PinError::Mount {
        path: dir.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: valid C strings; mode=0700 keeps the pins the agent's.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount {
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub fn maps_dir(dir: &Path) -> PathBuf {
    dir.join("maps")
}

pub fn links_dir(dir: &Path) -> PathBuf {
    dir.join("links")
}

/// Pins `link` at `path`, replacing (and detaching) whatever link was pinned there.
pub fn replace_link(path: &Path, link: FdLink) -> Result<PinnedLink, PinError> {
    let err = |message: String| PinError::Link {
        path: path.to_owned(),
        message,
    };
    // Keep the old link alive (its fd) until the new one is pinned in its place.
    let old = if path.exists() {
        let pinned = PinnedLink::from_pin(path).map_err(|e| err(e.to_string()))?;
        Some(pinned.unpin().map_err(|e| err(e.to_string()))?)
    } else {
        None
    };
    let pinned = link.pin(path).map_err(|e| err(e.to_string()))?;
    drop(old);
    Ok(pinned)
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
    pub unmounted: bool,
}

/// Detaches every pinned link, removes every pinned map, and unmounts the bpffs if the agent
/// mounted it. Safe to run on a directory that is gone or half there.
pub fn cleanup(dir: &Path) -> Result<Removed, PinError> {
    let mut removed = Removed::default();
    if !dir.exists() {
        return Ok(removed);
    }
    let links = links_dir(dir);
    for entry in read_dir(&links)? {
        if let Ok(link) = PinnedLink::from_pin(&entry)
            && let Ok(fd) = link.unpin()
        {
            drop(fd);
            removed.links += 1;
        } else {
            fs::remove_file(&entry).map_err(io_err(&entry))?;
        }
    }
    let maps = maps_dir(dir);
    for entry in read_dir(&maps)? {
        fs::remove_file(&entry).map_err(io_err(&entry))?;
        removed.maps += 1;
    }
    for d in [&links, &maps] {
        if d.exists() {
            fs::remove_dir(d).map_err(io_err(d))?;
        }
    }
    let mounted_here = is_bpffs(dir) && !dir.parent().is_some_and(is_bpffs);
    if mounted_here {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io_err(dir)(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: a valid C string naming our own mount.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io_err(dir)(io::Error::last_os_error()));
        }
        removed.unmounted = true;
    }
    fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(removed)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd.filter_map(Result::ok).map(|e| e.path()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(dir)(e)),
    }
}
