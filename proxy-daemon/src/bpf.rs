//! What the two BPF loaders (the kernel data path and the XDP prefilter)
//! share: the BPF object, bpffs detection and mounting, pin folders that
//! remove stale pins at start and their own pins at exit, and load errors as
//! one line.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use tracing::{info, warn};

/// The BPF object built by `build.rs` (empty when built with `PROXYD_SKIP_EBPF=1`).
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Where bpffs is mounted by convention; the daemon mounts it there if needed.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// `statfs.f_type` of a BPF filesystem (`include/uapi/linux/magic.h`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lies on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("statfs {}: {e}", path.display())))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mounts bpffs at [`BPFFS_ROOT`] when nothing is mounted there. Called at
/// start-up while the daemon still may (it needs CAP_SYS_ADMIN, which is
/// dropped right after); failure only matters if BPF is used, and then the
/// loader says so.
pub fn mount_if_missing() {
    let root = Path::new(BPFFS_ROOT);
    if !root.is_dir() || is_bpffs(root).unwrap_or(true) {
        return;
    }
    match nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700")) {
        Ok(()) => info!("mounted bpffs at {BPFFS_ROOT}"),
        Err(e) => tracing::debug!("cannot mount bpffs at {BPFFS_ROOT}: {e}"),
    }
}

/// A pin folder on bpffs and the pins this process made in it.
pub struct Pins {
    pub dir: PathBuf,
    /// Pinned paths with the id of the map pinned there; at exit only pins
    /// that are still ours are removed (a later load may have taken over).
    files: Vec<(PathBuf, Option<u32>)>,
    /// Also remove the parent folder when it is left empty (a subfolder of the pin dir).
    remove_parent: bool,
    /// The folder, open and `flock`ed: one daemon per pin folder. Held until
    /// drop (and released by the kernel if the process dies).
    _lock: std::fs::File,
}

impl Pins {
    /// Makes sure `dir` is a folder on bpffs (mounting bpffs at
    /// [`BPFFS_ROOT`] if `dir` is below it and nothing is mounted there),
    /// takes its lock (another running proxyd holding it is an error: its
    /// pins are not touched), and removes stale pins named `names` from it.
    pub fn prepare(dir: &Path, names: &[&str], remove_parent: bool) -> io::Result<Self> {
        let shown = dir.display();
        // The nearest existing ancestor tells which filesystem `dir` is on.
        let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(existing)? {
            let root = Path::new(BPFFS_ROOT);
            if dir.starts_with(root) && root.is_dir() && !is_bpffs(root).unwrap_or(false) {
                nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
                    .map_err(|e| {
                        io::Error::new(io::Error::from(e).kind(), format!("mounting bpffs at {BPFFS_ROOT}: {e}"))
                    })?;
                info!("mounted bpffs at {BPFFS_ROOT}");
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("BPF pin dir {shown} is not on a BPF filesystem (mount one with `mount -t bpf bpf DIR`)"),
                ));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| error_line(&format!("creating BPF pin dir {shown}"), &e))?;
        let lock = std::fs::File::open(dir).map_err(|e| error_line(&format!("opening BPF pin dir {shown}"), &e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                    "BPF pin dir {shown} is in use by another running proxyd (give each daemon its own --bpf-pin-dir)"
                ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(error_line(&format!("locking BPF pin dir {shown}"), &e))
            }
        }
        for name in names {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => info!("removed stale pin {}", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(error_line(&format!("removing stale pin {}", path.display()), &e)),
            }
        }
        Ok(Pins { dir: dir.to_path_buf(), files: Vec::new(), remove_parent, _lock: lock })
    }

    /// Joins the pin dir of a process that hands over its BPF state (an
    /// upgrade): its lock (the open file the old process locked); nothing is
    /// removed, and nothing is this process's to remove until
    /// [`Pins::take_over`].
    pub fn adopt(dir: &Path, lock: std::os::fd::OwnedFd) -> Self {
        Pins { dir: dir.to_path_buf(), files: Vec::new(), remove_parent: false, _lock: std::fs::File::from(lock) }
    }

    /// The pins named `names` are this process's now (removed at its exit).
    pub fn take_over(&mut self, names: &[&str]) {
        for path in names.iter().map(|n| self.dir.join(n)).filter(|p| p.exists()) {
            let id = MapInfo::from_pin(&path).map(|info| info.id()).ok();
            self.files.push((path, id));
        }
    }

    /// A descriptor of the pin dir's lock, to hand to a new process.
    pub fn lock(&self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(self._lock.try_clone()?.into())
    }

    /// Leaves the pins in place at exit (a new process uses them now).
    pub fn keep(&mut self) {
        self.files.clear();
    }

    /// Records a pin made at `path` for the map with id `id`.
    pub fn record(&mut self, path: PathBuf, id: Option<u32>) {
        self.files.push((path, id));
    }

    /// Unpins everything this process pinned (unless replaced since), then
    /// the folder if empty.
    pub fn remove(&mut self) {
        for (path, id) in self.files.drain(..) {
            let pinned = MapInfo::from_pin(&path).map(|info| info.id()).ok();
            if id.is_some() && pinned != id {
                continue;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!("removing pin {}: {e}", path.display());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        if self.remove_parent {
            if let Some(parent) = self.dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

impl Drop for Pins {
    /// Also unpins when a load fails half-way.
    fn drop(&mut self) {
        self.remove();
    }
}

/// An object without the named map or program.
pub fn missing(what: &str, name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("the BPF object has no {what} named {name}"))
}

/// `"<op>: <cause>: <cause>..."` on one line (verifier logs are cut to their
/// first line), keeping the `io::ErrorKind` of an underlying OS error so the
/// caller can tell "no permission" from other failures.
pub fn error_line(op: &str, err: &(dyn std::error::Error + 'static)) -> io::Error {
    let mut line = op.to_string();
    let mut kind = io::ErrorKind::Other;
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("").trim();
        if !first.is_empty() && !line.ends_with(first) {
            line.push_str(": ");
            line.push_str(first);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            kind = io.kind();
        }
        cur = e.source();
    }
    io::Error::new(kind, line)
}
