//! The agent itself: readiness, version, and its process from `/proc/self` (memory, CPU
//! time, descriptors, threads).

use std::{fmt, fs};

use prometheus_client::{
    encoding::DescriptorEncoder,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::family::{gauge, one};

/// `ready`: the programs are attached and the first catalog is applied.
pub fn encode(enc: &mut DescriptorEncoder, ready: bool) -> fmt::Result {
    one(
        enc,
        "ready",
        "1 once the programs are attached and the first catalog is applied.",
        None,
        ConstGauge::new(u64::from(ready)),
    )?;
    gauge(
        enc,
        "build_info",
        "The agent's version (always 1).",
        None,
        [([("version", env!("CARGO_PKG_VERSION"))], 1u64)],
    )?;
    if let Some(p) = read() {
        one(
            enc,
            "process_resident_memory",
            "Resident memory of the agent.",
            Some(Unit::Bytes),
            ConstGauge::new(p.resident_bytes),
        )?;
        one(
            enc,
            "process_virtual_memory",
            "Virtual memory of the agent.",
            Some(Unit::Bytes),
            ConstGauge::new(p.virtual_bytes),
        )?;
        one(
            enc,
            "process_cpu",
            "CPU time the agent used, user and system.",
            Some(Unit::Seconds),
            ConstCounter::new(p.cpu_seconds),
        )?;
        one(
            enc,
            "process_open_fds",
            "Open file descriptors of the agent.",
            None,
            ConstGauge::new(p.open_fds),
        )?;
        if let Some(max) = p.max_fds {
            one(
                enc,
                "process_max_fds",
                "The agent's limit on open file descriptors.",
                None,
                ConstGauge::new(max),
            )?;
        }
        one(
            enc,
            "process_threads",
            "Threads of the agent.",
            None,
            ConstGauge::new(p.threads),
        )?;
        one(
            enc,
            "process_start_time",
            "When the agent started, in seconds since the Unix epoch.",
            Some(Unit::Seconds),
            ConstGauge::new(p.start_time_seconds),
        )?;
    }
    Ok(())
}

pub struct ProcessStats {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub cpu_seconds: f64,
    pub threads: u64,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Reads the numbers; `None` if `/proc` is not there or not as expected.
pub fn read() -> Option<ProcessStats> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is f[N - 3].
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    let boot = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
    let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(ProcessStats {
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
        open_fds,
        max_fds: max_fds(),
    })
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-parameter.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_its_own_process() {
        let p = super::read().expect("/proc/self");
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes);
        assert!(p.threads >= 1 && p.open_fds >= 3);
        assert!(p.start_time_seconds > 1.0e9);
    }
}
