//! Log lines from the eBPF programs (aya-log) into the agent's `tracing` output, under the
//! target `kernel`. The kernel-side level (config `datapath.kernel_log`) decides what is sent;
//! the agent shows whatever arrives.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

/// Re-emits aya-log's `log` records as `tracing` events with target `kernel`.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let program = record.target();
        let line = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "kernel", program, "{line}"),
            log::Level::Warn => tracing::warn!(target: "kernel", program, "{line}"),
            log::Level::Info => tracing::info!(target: "kernel", program, "{line}"),
            log::Level::Debug => tracing::debug!(target: "kernel", program, "{line}"),
            log::Level::Trace => tracing::trace!(target: "kernel", program, "{line}"),
        }
    }

    fn flush(&self) {}
}

/// Starts forwarding; without the logger map (programs built without logging) it does nothing.
pub fn forward(ebpf: &mut Ebpf) {
    let logger = match EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(l) => l,
        Err(e) => {
            warn!("kernel log lines will not be shown: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as long
    // as the AsyncFd holds the logger.
    let fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel log lines will not be shown: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
