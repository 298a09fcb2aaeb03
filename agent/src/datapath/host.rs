//! Facts about the host, found rather than assumed: where cgroup v2 is mounted, which cgroup
//! the agent itself runs in.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "no cgroup v2 filesystem is mounted (searched /proc/mounts): Switchyard attaches its \
         programs to a cgroup v2; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) or boot \
         with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("cgroup {0} does not exist (datapath.cgroup names a cgroup v2 directory)")]
    NoSuchCgroup(PathBuf),
    #[error("{0} is not inside the cgroup v2 mount {1}")]
    OutsideMount(PathBuf, PathBuf),
}

/// The cgroup v2 mount point: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones (these machines), or wherever `/proc/mounts` says.
pub fn cgroup2_mount() -> Result<PathBuf, HostError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| HostError::Read {
        path: "/proc/mounts",
        source,
    })?;
    find_cgroup2(&mounts).ok_or(HostError::NoCgroup2)
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(dir)))
    })
}

/// `/proc/mounts` writes spaces and a few others as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// A configured cgroup: absolute paths must lie inside the mount; relative ones are taken from
/// the mount, so one config serves unified and hybrid hosts.
pub fn resolve_cgroup(mount: &Path, configured: &Path) -> Result<PathBuf, HostError> {
    let path = if configured.is_absolute() {
        if !configured.starts_with(mount) {
            return Err(HostError::OutsideMount(configured.into(), mount.into()));
        }
        configured.to_owned()
    } else {
        mount.join(configured)
    };
    if !path.join("cgroup.procs").exists() {
        return Err(HostError::NoSuchCgroup(path));
    }
    Ok(path)
}

/// The agent's own cgroup v2 directory (from the `0::` line of `/proc/self/cgroup`).
pub fn own_cgroup(mount: &Path) -> Result<PathBuf, HostError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| HostError::Read {
        path: "/proc/self/cgroup",
        source,
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/');
    Ok(mount.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "cgroup /sys/fs/cgroup/memory cgroup rw 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(find_cgroup2(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(find_cgroup2(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(find_cgroup2("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn relative_cgroups_are_taken_from_the_mount() {
        let err = resolve_cgroup(Path::new("/sys/fs/cgroup"), Path::new("/tmp/x")).unwrap_err();
        assert!(matches!(err, HostError::OutsideMount(..)));
    }
}
