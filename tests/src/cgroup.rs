//! A child cgroup v2 of the test's own, removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 mount in /proc/mounts")
}

pub struct Cgroup {
    path: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/<name>`.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let path = cgroup2_mount()?.join(name);
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup {
            path,
            children: Vec::new(),
        })
    }

    /// Creates a child cgroup, removed with this one.
    pub fn child(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.path.join(name);
        fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
        self.children.push(p.clone());
        Ok(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup v2 mount, as the agent's config takes it.
    pub fn relative(&self, child: &Path) -> PathBuf {
        let mount = cgroup2_mount().unwrap_or_default();
        child.strip_prefix(&mount).unwrap_or(child).to_owned()
    }
}

fn remove(path: &Path) -> anyhow::Result<()> {
    // Processes of ours may still be exiting; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("rmdir {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for c in self.children.iter().rev() {
            if let Err(e) = remove(c) {
                eprintln!("warning: {e}");
            }
        }
        if let Err(e) = remove(&self.path) {
            eprintln!("warning: {e}");
        }
    }
}
