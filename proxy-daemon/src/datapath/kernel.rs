//! The kernel data path: a BPF sockhash and an `sk_skb` stream verdict splice
//! each tunnel's two sockets, so no payload byte passes through userspace.
//!
//! Maps (names in `proxy_common`, pinned under the pin dir):
//! - `SOCKS`: sockhash of redirect targets (cookie -> socket), no program;
//! - `SPLICE`: sockhash with the verdict attached (cookie -> socket);
//! - `PEERS`: cookie -> `Splice { peer, limit, low, forwarded, relay }`: the
//!   peer's cookie and the window userspace grants (BTF);
//! - `FLOWS`: cookie -> `FlowStats { bytes, packets, last_ns, passed, asked }`
//!   of what was received on that socket (BTF, so `bpftool map dump pinned
//!   DIR/FLOWS` prints the fields by name);
//! - `EVENTS` (not pinned): a ring of the verdict's requests to userspace;
//! - `CUTS` (not pinned): retransmitted bytes the verdict cut off because the
//!   socket had delivered them already (`proxyd_kernel_retransmit_cuts_total`).
//!
//! A tunnel enters the maps in the order `PEERS`, `FLOWS`, `SOCKS` (both
//! sockets), `SPLICE` (both): by the time a socket's verdict runs, its peer is
//! already a valid redirect target, so bytes that arrive during insertion (an
//! upstream's banner, a client's pipelined data) are never dropped. It leaves
//! in the reverse order. The per-tunnel task in [`tunnel`] decides when a
//! tunnel enters and leaves the maps, keeps its window, and closes without
//! loss (see there).
//!
//! One loaded object serves both policies: [`KernelDataPath::with_policy`]
//! gives `data-path=auto` (relay first, promote interactive tunnels) and
//! `data-path=kernel` (splice at once) without loading a second copy.
//!
//! An upgrade hands the whole path to a new process (docs/upgrade.md): the
//! old one detaches its verdict and keeps the pins ([`KernelDataPath::hand_over`]),
//! the new one loads its programs on the pinned maps ([`KernelDataPath::adopt`])
//! and attaches its verdict ([`KernelDataPath::take_over`]); sockets already
//! in `SPLICE` keep the program they were linked with, so their bytes go on.

mod btf;
mod hangup;
mod shared;
mod tunnel;

pub use tunnel::Policy;

use shared::{KernelFlow, Maps, Shared};

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData, MapInfo, PerCpuArray, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::EbpfLoader;
use aya_log::EbpfLogger;
use proxy_common::{
    CUTS_MAP, CUT_BYTES, CUT_MAX_GLOBAL, CUT_SKBS, EVENTS_MAP, FAULTS_GLOBAL, FAULT_RING_FULL, FLOWS_MAP, PEERS_MAP,
    SOCKS_MAP, SPLICE_MAP, VERDICT_PROG,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::park::{Park, ParkedState};
use super::userspace::to_tokio;
use super::{DataPath, DataPathKind, Pair, SharedDataPath, Tunnel};
use crate::bpf::{error_line, missing, Pins, BPF_OBJECT};
use crate::sys;

/// What a send queue may hold when `net.ipv4.tcp_wmem` cannot be read: its
/// maximum on a default Linux.
const DEFAULT_QUEUE_CAP: u64 = 4 << 20;

/// The grace budget of a daemon (see `Shared::grace_budget`).
const GRACE_BUDGET: u64 = 256 << 20;

/// Tunnels the maps hold by default (see `proxy_common::MAX_SOCKETS`).
pub const DEFAULT_MAX_TUNNELS: u32 = (proxy_common::MAX_SOCKETS / 2) as u32;

/// The verdict's read-only global holding `offsetof(struct tcp_sock, copied_seq)`.
const COPIED_SEQ_GLOBAL: &str = "TCP_COPIED_SEQ";

/// Names of every pin this data path creates in its pin dir (the events
/// ring too: a new process takes it over in an upgrade).
const PINNED_MAPS: [&str; 5] = [SOCKS_MAP, SPLICE_MAP, PEERS_MAP, FLOWS_MAP, EVENTS_MAP];

/// The environment variable that injects faults into the kernel data path,
/// for tests only: a comma-separated list of `cut-max=BYTES` (a cut of more
/// fails in the verdict, as one of more than 640 KiB does in service),
/// `ring-full` (the verdict tells no broken-stream event, as if the ring were
/// full each time) and `hand-over-busy` (the hand-over before a splice never
/// finds the pair quiet, as with a sender that pours faster than it reads).
const FAULTS_ENV: &str = "PROXYD_BPF_FAULTS";

/// The faults [`FAULTS_ENV`] asks for (none when it is unset).
struct Faults {
    /// The verdict's fault bits (`FAULTS_GLOBAL`).
    bits: u32,
    /// The verdict's cut limit (`CUT_MAX_GLOBAL`).
    cut_max: u32,
    /// See `Shared::busy_hand_over`.
    busy_hand_over: bool,
}

fn faults_from_env() -> io::Result<Faults> {
    let mut faults = Faults { bits: 0, cut_max: u32::MAX, busy_hand_over: false };
    let Some(list) = std::env::var_os(FAULTS_ENV) else { return Ok(faults) };
    let bad = |name: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{FAULTS_ENV}: unknown fault {name:?} (allowed: cut-max=BYTES, ring-full, hand-over-busy)"),
        )
    };
    for name in list.to_string_lossy().split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name.split_once('=') {
            None if name == "ring-full" => faults.bits |= FAULT_RING_FULL,
            None if name == "hand-over-busy" => faults.busy_hand_over = true,
            Some(("cut-max", n)) => faults.cut_max = n.parse().map_err(|_| bad(name))?,
            _ => return Err(bad(name)),
        }
    }
    warn!(
        "{FAULTS_ENV} is set: the kernel data path injects faults (ring-full {}, cut-max {}, hand-over-busy {}); for tests only",
        faults.bits & FAULT_RING_FULL != 0,
        faults.cut_max,
        faults.busy_hand_over
    );
    Ok(faults)
}

/// The loaded programs and maps; `attach` splices pairs through them.
pub struct KernelDataPath {
    /// Maps and the loaded object, shared with every tunnel task so the
    /// verdict stays attached while any tunnel is alive.
    shared: Arc<Shared>,
    /// The pins created at load; removed on drop (unless handed over).
    pins: Mutex<Pins>,
    pin_dir: std::path::PathBuf,
    /// Polls the programs' aya-log ring buffer.
    log_task: Option<JoinHandle<()>>,
    /// What the verdict cut off (see `CUTS` above).
    cuts: PerCpuArray<MapData, u64>,
}

impl KernelDataPath {
    /// Loads and attaches the BPF programs, pinning maps under `pin_dir`.
    ///
    /// Mounts bpffs at `/sys/fs/bpf` when `pin_dir` is below it and nothing
    /// is mounted there, creates `pin_dir`, and removes stale pins of ours
    /// left in it (a previous run killed with SIGKILL). Must be called inside
    /// a tokio runtime to get the programs' log messages (without one they
    /// are not read). Every error is one line naming what failed.
    pub fn load(pin_dir: &Path) -> Result<Self, io::Error> {
        Self::load_with_capacity(pin_dir, DEFAULT_MAX_TUNNELS)
    }

    /// [`load`](Self::load) with maps sized for `max_tunnels` spliced
    /// tunnels. Tunnels beyond that (the maps are full) are relayed through
    /// userspace instead, so this bounds kernel memory, not service.
    pub fn load_with_capacity(pin_dir: &Path, max_tunnels: u32) -> Result<Self, io::Error> {
        Self::load_inner(pin_dir, max_tunnels, None)
    }

    /// Loads this binary's programs on the maps another proxyd pinned (an
    /// upgrade), so the tunnels it spliced go on, without attaching the
    /// verdict yet: the old process's is still attached. `lock` is the pin
    /// dir's lock, which the new process holds on. [`Self::take_over`]
    /// finishes once the old process detached.
    pub fn adopt(pin_dir: &Path, lock: std::os::fd::OwnedFd) -> Result<Self, io::Error> {
        Self::load_inner(pin_dir, DEFAULT_MAX_TUNNELS, Some(lock))
    }

    /// Attaches this process's verdict to `SPLICE` (the old process's was
    /// detached) and makes the pins this process's.
    pub fn take_over(&self) -> io::Result<()> {
        let mut ebpf = self.shared._ebpf.lock().unwrap();
        let link = verdict(&mut ebpf)?
            .attach(self.shared.maps.splice.fd())
            .map_err(|e| error_line(&format!("attaching {VERDICT_PROG} to {SPLICE_MAP}"), &e))?;
        *self.shared.verdict_link.lock().unwrap() = Some(link);
        self.shared.attached.store(true, Ordering::Release);
        self.pins.lock().unwrap().take_over(&PINNED_MAPS);
        info!(pin_dir = %self.pin_dir.display(), "kernel data path taken over: sk_skb verdict attached to sockhash {SPLICE_MAP}");
        Ok(())
    }

    fn load_inner(pin_dir: &Path, max_tunnels: u32, adopt: Option<std::os::fd::OwnedFd>) -> Result<Self, io::Error> {
        if BPF_OBJECT.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this proxyd was built without its BPF programs (PROXYD_SKIP_EBPF=1)",
            ));
        }
        let adopting = adopt.is_some();
        let mut pins = match adopt {
            Some(lock) => Pins::adopt(pin_dir, lock),
            None => Pins::prepare(pin_dir, &PINNED_MAPS, false)?,
        };
        let sockets = max_tunnels.clamp(1, u32::MAX / 2) * 2;
        let pin_paths: Vec<std::path::PathBuf> = PINNED_MAPS.iter().map(|n| pin_dir.join(n)).collect();
        let copied_seq = btf::tcp_copied_seq_offset()
            .map_err(|e| io::Error::new(e.kind(), format!("finding tcp_sock.copied_seq for the verdict: {e}")))?;
        let faults = faults_from_env()?;
        let mut loader = EbpfLoader::new();
        loader.override_global(COPIED_SEQ_GLOBAL, &copied_seq, true);
        loader.override_global(FAULTS_GLOBAL, &faults.bits, true);
        loader.override_global(CUT_MAX_GLOBAL, &faults.cut_max, true);
        for (name, path) in PINNED_MAPS.iter().zip(&pin_paths) {
            if adopting {
                // The maps the old process pinned, and everything in them.
                loader.map_pin_path(name, path.as_path());
            } else if *name != EVENTS_MAP {
                // (The ring keeps the size the object gives it.)
                loader.map_max_entries(name, sockets);
            }
        }
        let mut ebpf = loader.load(BPF_OBJECT).map_err(|e| error_line("loading the BPF object", &e))?;

        let logger = match EbpfLogger::init_with_logger(&mut ebpf, BpfLog) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("BPF program logs unavailable: {e}");
                None
            }
        };

        for name in PINNED_MAPS.into_iter().filter(|_| !adopting) {
            let path = pin_dir.join(name);
            let map = ebpf.map(name).ok_or_else(|| missing("map", name))?;
            map.pin(&path).map_err(|e| error_line(&format!("pinning BPF map {name} at {}", path.display()), &e))?;
            let id = MapInfo::from_pin(&path).map(|info| info.id()).ok();
            pins.record(path, id);
        }
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| missing("map", name));
        let convert = |name: &str, e: aya::maps::MapError| error_line(&format!("BPF map {name}"), &e);
        let maps = Maps {
            socks: SockHash::try_from(take(SOCKS_MAP)?).map_err(|e| convert(SOCKS_MAP, e))?,
            splice: SockHash::try_from(take(SPLICE_MAP)?).map_err(|e| convert(SPLICE_MAP, e))?,
            peers: BpfHashMap::try_from(take(PEERS_MAP)?).map_err(|e| convert(PEERS_MAP, e))?,
            flows: BpfHashMap::try_from(take(FLOWS_MAP)?).map_err(|e| convert(FLOWS_MAP, e))?,
        };
        let ring = RingBuf::try_from(take(EVENTS_MAP)?).map_err(|e| convert(EVENTS_MAP, e))?;
        let cuts = PerCpuArray::try_from(take(CUTS_MAP)?).map_err(|e| convert(CUTS_MAP, e))?;

        let program = verdict(&mut ebpf)?;
        program.load().map_err(|e| {
            error_line(
                &format!("loading BPF program {VERDICT_PROG} (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"),
                &e,
            )
        })?;
        let link = match adopting {
            // Attached by `take_over`, once the old process let go.
            true => None,
            false => Some(
                program
                    .attach(maps.splice.fd())
                    .map_err(|e| error_line(&format!("attaching {VERDICT_PROG} to {SPLICE_MAP}"), &e))?,
            ),
        };

        let log_task = logger.and_then(spawn_log_poller);
        let (hangups, hangup_task) = hangup::Hangups::start(ring)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the hangup watcher: {e}")))?;
        if !adopting {
            info!(pin_dir = %pin_dir.display(), "kernel data path loaded: sk_skb verdict attached to sockhash {SPLICE_MAP}");
        }
        Ok(KernelDataPath {
            shared: Arc::new(Shared {
                maps,
                _ebpf: Mutex::new(ebpf),
                queue_cap: tcp_mem_max("tcp_wmem").unwrap_or(DEFAULT_QUEUE_CAP),
                grace_budget: AtomicU64::new(GRACE_BUDGET),
                promotions: AtomicU64::new(0),
                demotions: AtomicU64::new(0),
                hangups,
                hangup_task,
                attached: AtomicBool::new(link.is_some()),
                verdict_link: Mutex::new(link),
                busy_hand_over: faults.busy_hand_over,
            }),
            pins: Mutex::new(pins),
            pin_dir: pin_dir.to_path_buf(),
            log_task,
            cuts,
        })
    }

    /// Hands the kernel data path over to a new process (an upgrade):
    /// detaches this process's verdict from `SPLICE` (the sockets already in
    /// it keep running the program they were linked with, so their bytes go
    /// on) and leaves the pins in place. Call it once no tunnel of this
    /// process can enter the maps any more.
    pub fn hand_over(&self) -> io::Result<()> {
        self.shared.attached.store(false, Ordering::Release);
        if let Some(link) = self.shared.verdict_link.lock().unwrap().take() {
            let mut ebpf = self.shared._ebpf.lock().unwrap();
            verdict(&mut ebpf)?.detach(link).map_err(|e| error_line(&format!("detaching {VERDICT_PROG}"), &e))?;
        }
        self.pins.lock().unwrap().keep();
        Ok(())
    }

    /// A descriptor of the pin dir's lock, for a new process (an upgrade).
    pub fn pin_lock(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.pins.lock().unwrap().lock()
    }

    /// This data path under `policy`, as the server's [`DataPath`]; both
    /// policies share the loaded programs and maps.
    pub fn with_policy(self: &Arc<Self>, policy: Policy) -> SharedDataPath {
        Arc::new(WithPolicy { kernel: Arc::clone(self), policy })
    }

    /// Tunnels promoted from the relay into the maps, and demoted back, so far.
    pub fn switches(&self) -> (u64, u64) {
        (self.shared.promotions.load(Ordering::Relaxed), self.shared.demotions.load(Ordering::Relaxed))
    }

    /// Retransmitted skbs whose head the verdict cut off, and the bytes cut,
    /// so far (this process's program).
    pub fn retransmit_cuts(&self) -> (u64, u64) {
        let sum = |index| self.cuts.get(&index, 0).map_or(0, |per_cpu| per_cpu.iter().sum());
        (sum(CUT_SKBS), sum(CUT_BYTES))
    }

    /// The folder holding the pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// The verdict program of the loaded object.
fn verdict(ebpf: &mut aya::Ebpf) -> io::Result<&mut SkSkb> {
    ebpf.program_mut(VERDICT_PROG)
        .ok_or_else(|| missing("program", VERDICT_PROG))?
        .try_into()
        .map_err(|e| error_line(&format!("BPF program {VERDICT_PROG}"), &e))
}

/// The kernel data path under one policy.
struct WithPolicy {
    kernel: Arc<KernelDataPath>,
    policy: Policy,
}

impl DataPath for WithPolicy {
    fn kind(&self) -> DataPathKind {
        DataPathKind::Kernel
    }

    fn attach(&self, pair: Pair, cancel: CancellationToken) -> io::Result<Tunnel> {
        let Pair { client, upstream, client_early } = pair;
        let start = tunnel::Start::Fresh { client, upstream, early: client_early };
        Ok(self.tunnel(None, start, cancel, None))
    }

    fn resume(
        &self,
        socks: [std::net::TcpStream; 2],
        state: ParkedState,
        cancel: CancellationToken,
    ) -> io::Result<Tunnel> {
        let cookies = [sys::socket_cookie(&socks[0])?, sys::socket_cookie(&socks[1])?];
        let (user, kernel_done, start) = match state {
            ParkedState::Userspace { tx, rx, last_ns, ended } => {
                ([tx, rx, last_ns], [0, 0], tunnel::Start::Relayed { socks: to_tokio(socks)?, ended })
            }
            ParkedState::Kernel {
                cookies: parked,
                written_before,
                kernel_done,
                user_tx,
                user_rx,
                last_ns,
                fin,
                shut,
            } => {
                if parked != cookies {
                    return Err(io::Error::other("the parked tunnel's sockets are not the ones it names"));
                }
                for c in cookies {
                    if self.kernel.shared.maps.splice_of(c).is_none() {
                        return Err(io::Error::other("a parked spliced tunnel is not in this data path's maps"));
                    }
                }
                (
                    [user_tx, user_rx, last_ns],
                    kernel_done,
                    tunnel::Start::Spliced { socks, cookies, written_before, fin, shut },
                )
            }
        };
        let spliced = matches!(start, tunnel::Start::Spliced { .. });
        Ok(self.tunnel(Some(cookies), start, cancel, Some((user, kernel_done, spliced))))
    }
}

impl WithPolicy {
    /// The tunnel, its future not started yet; `resumed`: the counters
    /// (user tx, rx, last activity; the verdict's earlier epochs) and whether
    /// it is spliced, of a tunnel taken over from another process.
    fn tunnel(
        &self,
        cookies: Option<[u64; 2]>,
        start: tunnel::Start,
        cancel: CancellationToken,
        resumed: Option<([u64; 3], [u64; 2], bool)>,
    ) -> Tunnel {
        let shared = &self.kernel.shared;
        let flow = Arc::new(KernelFlow::new(Arc::clone(shared), cookies));
        if let Some((user, kernel_done, spliced)) = resumed {
            flow.resumed(user, kernel_done, spliced);
        }
        let park = Arc::new(Park::default());
        let run =
            Box::pin(tunnel::run(Arc::clone(shared), Arc::clone(&flow), start, cancel, self.policy, Arc::clone(&park)));
        Tunnel { stats: flow, run, park }
    }
}

impl Drop for KernelDataPath {
    fn drop(&mut self) {
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
        // `pins` unpins when dropped right after this; the program stays
        // attached until the last tunnel task drops its `Shared`.
    }
}

/// The maximum of `net.ipv4.<name>` (`tcp_wmem`), in bytes.
fn tcp_mem_max(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok()?;
    text.split_whitespace().nth(2)?.parse().ok()
}

/// Reads the programs' log ring buffer whenever it is readable.
fn spawn_log_poller(logger: EbpfLogger<BpfLog>) -> Option<JoinHandle<()>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        warn!("no tokio runtime: BPF program logs will not be read");
        return None;
    };
    let _guard = runtime.enter();
    let mut fd = match sys::async_logger(logger) {
        Ok(fd) => fd,
        Err(e) => {
            warn!("BPF program logs unavailable: {e}");
            return None;
        }
    };
    Some(runtime.spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            // Clear before reading: a record committed after `flush` wakes us again.
            guard.clear_ready();
            guard.get_inner_mut().flush();
        }
    }))
}

/// Forwards aya-log records (from the BPF programs) to `tracing`.
struct BpfLog;

impl log::Log for BpfLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "proxyd::bpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "proxyd::bpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "proxyd::bpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "proxyd::bpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "proxyd::bpf", "{msg}"),
        }
    }
    fn flush(&self) {}
}
