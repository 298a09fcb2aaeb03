//! Process limits the agent sets for itself at start.
//!
//! Every proxied connection holds two descriptors (client and upstream), so the usual soft
//! `RLIMIT_NOFILE` of 1024 would cap the forwarder near 500 connections while the hard limit
//! (systemd's `LimitNOFILE`, the container runtime's, `ulimit -Hn`) allows far more. As HAProxy
//! and Envoy deployments do, the agent takes the soft limit up to the hard one; the operator
//! sets the ceiling.

use std::io;

/// What became of the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit the agent was started with.
    pub was: u64,
    /// The soft limit now.
    pub now: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("cannot read the descriptor limit: {0}")]
    Get(io::Error),
    #[error("cannot raise the descriptor limit from {was} to {want}: {source}")]
    Set {
        was: u64,
        want: u64,
        source: io::Error,
    },
}

/// Where the kernel caps descriptors per process when the hard limit says "unlimited".
const NR_OPEN: &str = "/proc/sys/fs/nr_open";
/// The kernel's default `nr_open`, if it cannot be read.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> Result<Nofile, LimitError> {
    // SAFETY: getrlimit fills a valid struct for our own process.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(LimitError::Get(io::Error::last_os_error()));
    }
    let was = lim.rlim_cur;
    // An unlimited hard limit still stops at nr_open: asking for more fails.
    let want = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string(NR_OPEN)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(NR_OPEN_DEFAULT)
    } else {
        lim.rlim_max
    };
    if was >= want {
        return Ok(Nofile { was, now: was });
    }
    lim.rlim_cur = want;
    // SAFETY: setrlimit reads a valid struct; raising the soft limit up to the hard one needs
    // no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(LimitError::Set {
            was,
            want,
            source: io::Error::last_os_error(),
        });
    }
    Ok(Nofile { was, now: want })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let got = raise_nofile().expect("raise");
        assert!(got.now >= got.was);
        // SAFETY: as above.
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, got.now);
        assert!(lim.rlim_cur == lim.rlim_max || lim.rlim_max == libc::RLIM_INFINITY);
    }
}
