//! Child processes placed in a network namespace and a cgroup before they run, ended by PID on
//! drop, with their stderr kept for assertions.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Netns;

pub struct Process {
    child: Child,
    name: String,
    output: Arc<Mutex<Vec<String>>>,
}

/// Where a process runs.
#[derive(Default)]
pub struct Place<'a> {
    pub netns: Option<&'a Netns>,
    pub cgroup: Option<&'a Path>,
}

impl Process {
    /// Starts `cmd` in `place`; stdout and stderr lines are collected.
    pub fn spawn(name: &str, mut cmd: Command, place: Place) -> anyhow::Result<Self> {
        let ns: Option<File> = place.netns.map(|n| n.file()).transpose()?;
        let cg: Option<File> = place
            .cgroup
            .map(|p| {
                OpenOptions::new()
                    .write(true)
                    .open(p.join("cgroup.procs"))
                    .with_context(|| format!("open {}/cgroup.procs", p.display()))
            })
            .transpose()?;
        let (ns_fd, cg_fd) = (
            ns.as_ref().map(|f| f.as_raw_fd()),
            cg.as_ref().map(|f| f.as_raw_fd()),
        );
        // SAFETY: only async-signal-safe calls (write, setns) on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = cg_fd {
                    // "0" moves the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = ns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            let echo = std::env::var_os("SY_ECHO").is_some();
            let label = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[{label}] {line}");
                    }
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Ok(Process {
            child,
            name: name.to_owned(),
            output,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines printed so far (stdout and stderr interleaved).
    pub fn output(&self) -> Vec<String> {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a line contains `needle`; fails early if the process exits.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().iter().any(|l| l.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                bail!(
                    "{} exited ({status}) before printing {needle:?}; it said:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; it said:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL if it does not go within `grace`.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        match self.wait_exit(grace) {
            Ok(s) => Ok(s),
            Err(_) => {
                let _ = self.child.kill();
                Ok(self.child.wait()?)
            }
        }
    }

    /// SIGKILL at once.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(3));
    }
}
