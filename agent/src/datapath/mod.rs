//! The kernel side, seen from the agent: load the programs, attach them, hand out the maps.
//!
//! The steering hooks (`connect4/6`, `getpeername4/6`, `sock_ops`) attach to the configured
//! cgroup and are pinned, with every map, under the agent's bpffs directory ([`pin`]): they keep
//! working while the agent is down, and a restarted agent takes them over. The `getsockopt` hook
//! that answers the original destination attaches to the agent's own cgroup (the forwarder is
//! the one asking) and lives only as long as [`Datapath`].

pub mod addr;
pub mod host;
pub mod learned;
mod log;
pub mod maps;
pub mod origslots;
pub mod pin;
pub mod udp;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps, links::FdLink,
    },
};
use tracing::{info, warn};

pub use maps::{KernelMaps, MapsError, OrigDstTable};
pub use origslots::OrigSlots;

use crate::config::DatapathConfig;

/// The object built by `build.rs` from the `switchyard-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(
        "the kernel refused the eBPF object: {0}. Switchyard needs root (or CAP_BPF, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN) and a kernel with BPF and cgroup-BPF support \
         (CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
}

/// Loaded and attached programs. Dropping it detaches only the `getsockopt` hook; the pinned
/// steering links stay until `switchyard cleanup`.
pub struct Datapath {
    _ebpf: Ebpf,
    _links: Vec<aya::programs::links::PinnedLink>,
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Where the steering hooks are attached.
    pub cgroup: PathBuf,
    /// Ids of the opted-out cgroups (their directories' inode numbers).
    pub opt_out_cgroups: Vec<u64>,
    /// Whether the forwarder's `getsockopt` for the original destination is answered by the
    /// hook; if not, the forwarder reads [`OrigDstTable`] itself.
    pub getsockopt_hook: bool,
}

const SOCK_ADDR_HOOKS: [&str; 8] = [
    "sy_connect4",
    "sy_connect6",
    "sy_sendmsg4",
    "sy_sendmsg6",
    "sy_recvmsg4",
    "sy_recvmsg6",
    "sy_getpeername4",
    "sy_getpeername6",
];

/// Where the forwarder finds original destinations: the slots it has mapped, if the kernel let
/// it map them, and the table behind the `getsockopt` hook.
pub struct Originals {
    pub slots: Option<OrigSlots>,
    pub table: OrigDstTable,
}

/// Loads the programs and attaches them. Returns the maps for the reconciler and the
/// original destinations for the forwarder.
pub fn load(cfg: &DatapathConfig) -> Result<(Datapath, KernelMaps, Originals), DatapathError> {
    let mount = host::cgroup2_mount()?;
    let cgroup = host::resolve_cgroup(&mount, &cfg.cgroup)?;
    let own = host::own_cgroup(&mount)?;

    let pin_dir = cfg.pin_dir.clone().unwrap_or_else(pin::default_dir);
    pin::ensure_bpffs(&pin_dir)?;
    for d in [pin::maps_dir(&pin_dir), pin::links_dir(&pin_dir)] {
        std::fs::create_dir_all(&d).map_err(|source| pin::PinError::Io { path: d, source })?;
    }

    let level = cfg.kernel_log.level();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin::maps_dir(&pin_dir))
        .override_global("AYA_LOG_LEVEL", &level, false)
        .load(OBJECT)
        .map_err(DatapathError::Load)?;
    log::forward(&mut ebpf);

    // Cgroup attachments are made as BPF links, which coexist with other programs on the same
    // cgroup whatever the mode; the kernel refuses flags on link creation, so `Single` it is.
    let opt_out_cgroups = opt_out_cgroups(cfg)?;
    let target = open_cgroup(&cgroup)?;
    let links_dir = pin::links_dir(&pin_dir);
    let mut links = Vec::new();
    for name in SOCK_ADDR_HOOKS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(prog_err(name))?;
        let id = prog
            .attach(&target, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        let fd = FdLink::try_from(link).map_err(|e| pin_link_err(name, e))?;
        links.push(pin::replace_link(&links_dir.join(name), fd)?);
    }
    let name = "sy_sockops";
    let sockops: &mut SockOps = program(&mut ebpf, name)?;
    sockops.load().map_err(prog_err(name))?;
    let id = sockops
        .attach(&target, CgroupAttachMode::Single)
        .map_err(prog_err(name))?;
    let link = sockops.take_link(id).map_err(prog_err(name))?;
    let fd = FdLink::try_from(link).map_err(|e| pin_link_err(name, e))?;
    links.push(pin::replace_link(&links_dir.join(name), fd)?);

    let getsockopt_hook = own != mount;
    let name = "sy_getsockopt";
    let getsockopt: &mut CgroupSockopt = program(&mut ebpf, name)?;
    getsockopt
        .load()
        .map_err(|source| DatapathError::Program { name, source })?;
    if getsockopt_hook {
        getsockopt
            .attach(open_cgroup(&own)?, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Program { name, source })?;
    } else {
        warn!(
            "the agent runs in the root cgroup; its forwarder reads original destinations from \
             the map instead of through a getsockopt hook on every process of the host"
        );
    }
    info!(
        cgroup = %cgroup.display(),
        own_cgroup = %own.display(),
        "eBPF programs attached"
    );

    let maps = KernelMaps::take(&mut ebpf)?;
    let slots = OrigSlots::map(&mut ebpf)
        .inspect_err(|e| warn!("{e}; the forwarder asks for original destinations with getsockopt"))
        .ok();
    let orig = Originals {
        slots,
        table: OrigDstTable::take(&mut ebpf)?,
    };
    Ok((
        Datapath {
            _ebpf: ebpf,
            _links: links,
            pin_dir,
            opt_out_cgroups,
            cgroup,
            getsockopt_hook,
        },
        maps,
        orig,
    ))
}

/// The ids of the opted-out cgroups (their directories' inode numbers), for the opt-out map;
/// also when an edited file changes them.
pub fn opt_out_cgroups(cfg: &DatapathConfig) -> Result<Vec<u64>, DatapathError> {
    use std::os::unix::fs::MetadataExt;
    let mount = host::cgroup2_mount()?;
    let mut ids = Vec::new();
    for c in &cfg.exclude_cgroups {
        let path = host::resolve_cgroup(&mount, c)?;
        let meta =
            std::fs::metadata(&path).map_err(|source| DatapathError::Cgroup { path, source })?;
        ids.push(meta.ino());
    }
    Ok(ids)
}

impl Datapath {
    /// Lets go of the steering links: after a handover the successor has attached and pinned
    /// its own, and these (unpinned by it) would run beside them until this agent exits.
    pub fn release_links(&mut self) {
        self._links.clear();
    }
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn pin_link_err(name: &str, e: impl std::fmt::Display) -> pin::PinError {
    pin::PinError::Link {
        path: PathBuf::from(name),
        message: e.to_string(),
    }
}

fn open_cgroup(path: &Path) -> Result<File, DatapathError> {
    File::open(path).map_err(|source| DatapathError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    p.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}
