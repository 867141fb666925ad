//! The kernel data path: a BPF sockhash and an `sk_skb` stream verdict splice
//! each tunnel's two sockets, so no payload byte passes through userspace.
//!
//! Maps (names in `proxy_common`, pinned under the pin dir):
//! - `SOCKS`: sockhash of redirect targets (cookie -> socket), no program;
//! - `SPLICE`: sockhash with the verdict attached (cookie -> socket);
//! - `PEERS`: cookie -> peer cookie (BTF);
//! - `FLOWS`: cookie -> `FlowStats { bytes, packets, last_ns }` of what was
//!   received on that socket and redirected (BTF, so `bpftool map dump
//!   pinned DIR/FLOWS` prints the fields by name).
//!
//! A tunnel enters the maps in the order `PEERS`, `FLOWS`, `SOCKS` (both
//! sockets), `SPLICE` (both): by the time a socket's verdict runs, its peer is
//! already a valid redirect target, so bytes that arrive during insertion (an
//! upstream's banner, a client's pipelined data) are never dropped. It leaves
//! in the reverse order. The per-tunnel task in [`tunnel`] watches both
//! sockets for FIN/RST and closes without loss (see there).

mod hangup;
mod sys;
mod tunnel;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, MapInfo, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use proxy_common::{
    FlowStats as MapFlow, FLOWS_MAP, PEERS_MAP, SOCKS_MAP, SPLICE_MAP, VERDICT_PROG,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{monotonic_ns, DataPath, DataPathKind, FlowSource, FlowStats, Pair, Tunnel};
use crate::bpf::{error_line, missing, Pins};

/// The BPF object built by `build.rs` (empty when built with `PROXYD_SKIP_EBPF=1`).
pub(crate) static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// `SO_SNDBUF`/`SO_RCVBUF` set on both sockets of a spliced pair, in bytes
/// (0 keeps the kernel's autotuning). Set with the `*FORCE` options, so
/// `net.core.[rw]mem_max` does not cap it.
///
/// Why fixed and large: a redirected skb is charged to the receiving
/// socket until the peer's psock has sent it, and the psock backs off for a
/// jiffy whenever the peer's send buffer is full, so small buffers stall the
/// splice. Measured here (Linux 6.18, 2 cores, loopback, one tunnel, sender
/// and receiver in the same process: `cargo run --release --example
/// kernel_datapath -- bench 4096`), Gbit/s, lowest .. highest of 4 runs:
///
/// | buffer    | one way     | both ways at once |
/// |-----------|-------------|-------------------|
/// | autotuned | 3.1 .. 9.1  | 3.6 .. 5.1        |
/// | 4 MiB     | 7.0 .. 11.3 | 5.6 .. 9.5        |
/// | 8 MiB     | 4.0 .. 11.1 | 2.4 .. 9.3        |
/// | 16 MiB    | 4.6 .. 11.3 | 2.1 .. 8.2        |
/// | 32 MiB    | 6.3 .. 11.9 | 5.9 .. 9.7        |
///
/// Noisy on 2 cores shared by the four busy sockets of the test, but fixed
/// buffers beat autotuning, and 4..32 MiB differ less than the noise;
/// design.md measured 5 vs 17 Gbit/s (defaults vs 16 MiB) with separate
/// processes, hence 16 MiB. The sizes are limits, not allocations: memory
/// is used only while bytes are queued, and `net.ipv4.tcp_mem` still caps
/// the total.
pub const DEFAULT_SOCKET_BUFFER: u32 = 16 << 20;

/// Tunnels the maps hold by default (see `proxy_common::MAX_SOCKETS`).
pub const DEFAULT_MAX_TUNNELS: u32 = (proxy_common::MAX_SOCKETS / 2) as u32;

/// Names of every pin this data path creates in its pin dir.
const PINNED_MAPS: [&str; 4] = [SOCKS_MAP, SPLICE_MAP, PEERS_MAP, FLOWS_MAP];

/// The loaded programs and maps; `attach` splices pairs through them.
pub struct KernelDataPath {
    /// Maps and the loaded object, shared with every tunnel task so the
    /// verdict stays attached while any tunnel is alive.
    shared: Arc<Shared>,
    /// The pins created at load; removed on drop.
    pins: Pins,
    /// Polls the programs' aya-log ring buffer.
    log_task: Option<JoinHandle<()>>,
}

/// What the tunnel tasks share with the loader.
struct Shared {
    /// The four maps, used without a lock: every element command is atomic
    /// in the kernel, and each tunnel touches only its own two keys.
    maps: Maps,
    /// Keeps the program loaded and attached to `SPLICE`.
    _ebpf: Mutex<Ebpf>,
    /// Socket buffer size for new pairs (0: leave the kernel's autotuning).
    socket_buffer: AtomicU32,
    /// Whether bytes already queued at attach time are moved by userspace
    /// (the default) or left to the verdict (tests of the kernel's handling).
    hand_over_queued: AtomicBool,
    /// The hangup watcher shared by all tunnels, and its dispatcher task.
    hangups: Arc<hangup::Hangups>,
    hangup_task: JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.hangup_task.abort();
    }
}

/// The maps, owned through aya (which created and pinned them); elements are
/// read and written with [`sys`]'s map commands, which take `&self`.
struct Maps {
    socks: SockHash<MapData, u64>,
    splice: SockHash<MapData, u64>,
    peers: BpfHashMap<MapData, u64, u64>,
    flows: BpfHashMap<MapData, u64, MapFlow>,
}

impl Maps {
    /// One socket's flow entry, if the socket is in the maps.
    fn flow(&self, cookie: u64) -> Option<MapFlow> {
        sys::map_lookup(self.flows.map().fd().as_fd(), &cookie).ok().flatten()
    }

    /// Everything a pair needs before its first verdict, in the order of the
    /// module docs: `PEERS`, `FLOWS`, `SOCKS` (both), then the upstream in
    /// `SPLICE`. The client enters `SPLICE` with [`Maps::splice_in`].
    fn enter(&self, [c, u]: [u64; 2], [cfd, ufd]: [u32; 2], fresh: MapFlow) -> io::Result<()> {
        let (peers, flows, socks) = (self.peers.map().fd().as_fd(), self.flows.map().fd().as_fd(), self.socks.map().fd().as_fd());
        sys::map_update(peers, &c, &u, 0)?;
        sys::map_update(peers, &u, &c, 0)?;
        sys::map_update(flows, &c, &fresh, 0)?;
        sys::map_update(flows, &u, &fresh, 0)?;
        sys::map_update(socks, &c, &cfd, 0)?;
        sys::map_update(socks, &u, &ufd, 0)?;
        self.splice_in(u, ufd)
    }

    /// Puts one socket under the verdict.
    fn splice_in(&self, cookie: u64, fd: u32) -> io::Result<()> {
        sys::map_update(self.splice.map().fd().as_fd(), &cookie, &fd, 0)
    }

    /// Takes one socket from under the verdict (missing is fine).
    fn splice_out(&self, cookie: u64) {
        let _ = sys::map_delete(self.splice.map().fd().as_fd(), &cookie);
    }

    /// Removes the pair from every map, in the reverse order of
    /// [`Maps::enter`] (missing entries are fine).
    fn leave(&self, cookies: [u64; 2]) {
        for cookie in cookies {
            self.splice_out(cookie);
        }
        for (map, cookie) in [self.socks.map(), self.peers.map(), self.flows.map()].into_iter().flat_map(|m| cookies.map(|c| (m, c))) {
            let _ = sys::map_delete(map.fd().as_fd(), &cookie);
        }
    }
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
        if BPF_OBJECT.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this proxyd was built without its BPF programs (PROXYD_SKIP_EBPF=1)",
            ));
        }
        let mut pins = Pins::prepare(pin_dir, &PINNED_MAPS, false)?;
        let sockets = max_tunnels.clamp(1, u32::MAX / 2) * 2;
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS {
            loader.map_max_entries(name, sockets);
        }
        let mut ebpf = loader
            .load(BPF_OBJECT)
            .map_err(|e| error_line("loading the BPF object", &e))?;

        let logger = match EbpfLogger::init_with_logger(&mut ebpf, BpfLog) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("BPF program logs unavailable: {e}");
                None
            }
        };

        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            let map = ebpf.map(name).ok_or_else(|| missing("map", name))?;
            map.pin(&path).map_err(|e| {
                error_line(&format!("pinning BPF map {name} at {}", path.display()), &e)
            })?;
            let id = MapInfo::from_pin(&path).map(|info| info.id()).ok();
            pins.record(path, id);
        }
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| missing("map", name));
        let convert =
            |name: &str, e: aya::maps::MapError| error_line(&format!("BPF map {name}"), &e);
        let maps = Maps {
            socks: SockHash::try_from(take(SOCKS_MAP)?).map_err(|e| convert(SOCKS_MAP, e))?,
            splice: SockHash::try_from(take(SPLICE_MAP)?).map_err(|e| convert(SPLICE_MAP, e))?,
            peers: BpfHashMap::try_from(take(PEERS_MAP)?).map_err(|e| convert(PEERS_MAP, e))?,
            flows: BpfHashMap::try_from(take(FLOWS_MAP)?).map_err(|e| convert(FLOWS_MAP, e))?,
        };

        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or_else(|| missing("program", VERDICT_PROG))?
            .try_into()
            .map_err(|e| error_line(&format!("BPF program {VERDICT_PROG}"), &e))?;
        program
            .load()
            .map_err(|e| error_line(&format!("loading BPF program {VERDICT_PROG}"), &e))?;
        program
            .attach(maps.splice.fd())
            .map_err(|e| error_line(&format!("attaching {VERDICT_PROG} to {SPLICE_MAP}"), &e))?;

        let log_task = logger.and_then(spawn_log_poller);
        let (hangups, hangup_task) =
            hangup::Hangups::start().map_err(|e| io::Error::new(e.kind(), format!("cannot start the hangup watcher: {e}")))?;
        info!(pin_dir = %pin_dir.display(), "kernel data path loaded: sk_skb verdict attached to sockhash {SPLICE_MAP}");
        Ok(KernelDataPath {
            shared: Arc::new(Shared {
                maps,
                _ebpf: Mutex::new(ebpf),
                socket_buffer: AtomicU32::new(DEFAULT_SOCKET_BUFFER),
                hand_over_queued: AtomicBool::new(true),
                hangups,
                hangup_task,
            }),
            pins,
            log_task,
        })
    }

    /// Sets `SO_SNDBUF`/`SO_RCVBUF` for pairs attached from now on
    /// (0 leaves the kernel's autotuning). See [`DEFAULT_SOCKET_BUFFER`].
    pub fn set_socket_buffer(&self, bytes: u32) {
        self.shared.socket_buffer.store(bytes, Ordering::Relaxed);
    }

    /// Test hook: with `false`, bytes that are already queued on a socket
    /// when its pair is attached are not moved by userspace first but left
    /// in the receive queue for the verdict, to test how the running kernel
    /// treats bytes queued before a socket enters the sockhash (they must be
    /// redirected once it does; see `tunnel::splice`). Only safe when the
    /// handshake read no partial skb.
    #[doc(hidden)]
    pub fn set_hand_over_queued(&self, on: bool) {
        self.shared.hand_over_queued.store(on, Ordering::Relaxed);
    }

    /// The folder holding the pinned maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }
}

impl DataPath for KernelDataPath {
    fn kind(&self) -> DataPathKind {
        DataPathKind::Kernel
    }

    fn attach(&self, pair: Pair, cancel: CancellationToken) -> io::Result<Tunnel> {
        let Pair {
            client,
            upstream,
            client_early,
        } = pair;
        let client_cookie = sys::socket_cookie(&client)?;
        let upstream_cookie = sys::socket_cookie(&upstream)?;
        let buffer = self.shared.socket_buffer.load(Ordering::Relaxed);
        for sock in [&client, &upstream] {
            tune_socket(sock, buffer);
        }
        let flow = Arc::new(KernelFlow::new(
            Arc::clone(&self.shared),
            client_cookie,
            upstream_cookie,
        ));
        let done = tokio::spawn(tunnel::run(
            Arc::clone(&self.shared),
            Arc::clone(&flow),
            client,
            upstream,
            client_early,
            cancel,
        ));
        Ok(Tunnel { stats: flow, done })
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

/// Socket options for a spliced socket; failures only cost performance.
fn tune_socket(sock: &tokio::net::TcpStream, buffer: u32) {
    if let Err(e) = sock.set_nodelay(true) {
        debug!("TCP_NODELAY: {e}");
    }
    if buffer == 0 {
        return;
    }
    let bytes = buffer.min(i32::MAX as u32 / 2) as i32;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        // The FORCE variants pass net.core.[rw]mem_max (needs CAP_NET_ADMIN,
        // which loading BPF programs needs too); fall back to the capped one.
        if sys::setsockopt_int(sock, libc::SOL_SOCKET, force, bytes).is_err() {
            if let Err(e) = sys::setsockopt_int(sock, libc::SOL_SOCKET, plain, bytes) {
                debug!("socket buffer {bytes}: {e}");
            }
        }
    }
}

/// Counters come from the flow map (before and while spliced).
const SOURCE_MAPS: u8 = 0;
/// The map entries are gone (tunnel ended) or were never made (relayed):
/// the values kept here are the whole story.
const SOURCE_LOCAL: u8 = 1;

/// A tunnel's counters: what userspace moved itself (the client's early
/// bytes, bytes that were already queued when the pair was spliced, or the
/// whole tunnel when it had to be relayed) plus what the verdict counted in
/// `FLOWS` (the last value read is kept, as the entries go with the tunnel).
struct KernelFlow {
    shared: Arc<Shared>,
    /// Cookie of the client socket: its `FLOWS` entry counts tx.
    client: u64,
    /// Cookie of the upstream socket: its `FLOWS` entry counts rx.
    upstream: u64,
    /// `SOURCE_MAPS` or `SOURCE_LOCAL`.
    source: AtomicU8,
    /// Bytes userspace moved towards the destination / the client.
    user_tx: AtomicU64,
    user_rx: AtomicU64,
    /// Last values read from `FLOWS` for the client / upstream socket.
    kernel_tx: AtomicU64,
    kernel_rx: AtomicU64,
    /// Latest activity seen, `CLOCK_MONOTONIC` ns (starts at attach time).
    last_ns: AtomicU64,
}

impl KernelFlow {
    fn new(shared: Arc<Shared>, client: u64, upstream: u64) -> Self {
        KernelFlow {
            shared,
            client,
            upstream,
            source: AtomicU8::new(SOURCE_MAPS),
            user_tx: AtomicU64::new(0),
            user_rx: AtomicU64::new(0),
            kernel_tx: AtomicU64::new(0),
            kernel_rx: AtomicU64::new(0),
            last_ns: AtomicU64::new(monotonic_ns()),
        }
    }

    /// Folds the current `FLOWS` entries into the kept values; does nothing
    /// when the pair is not (or no longer) in the maps.
    fn read_maps(&self) {
        let maps = &self.shared.maps;
        let (c, u) = match (maps.flow(self.client), maps.flow(self.upstream)) {
            (Some(c), Some(u)) => (c, u),
            _ => return,
        };
        self.kernel_tx.fetch_max(c.bytes, Ordering::Relaxed);
        self.kernel_rx.fetch_max(u.bytes, Ordering::Relaxed);
        self.last_ns
            .fetch_max(c.last_ns.max(u.last_ns), Ordering::Relaxed);
    }

    /// Stops reading the maps: the kept values are final from now on
    /// (called right before the entries are removed).
    fn freeze(&self) {
        self.read_maps();
        self.source.store(SOURCE_LOCAL, Ordering::Release);
    }

    /// Counts bytes moved by userspace.
    fn add_user(&self, tx: u64, rx: u64) {
        self.user_tx.fetch_add(tx, Ordering::Relaxed);
        self.user_rx.fetch_add(rx, Ordering::Relaxed);
        self.last_ns.fetch_max(monotonic_ns(), Ordering::Relaxed);
    }
}

impl FlowSource for KernelFlow {
    fn snapshot(&self) -> FlowStats {
        if self.source.load(Ordering::Acquire) == SOURCE_MAPS {
            self.read_maps();
        }
        FlowStats {
            tx: self.user_tx.load(Ordering::Relaxed) + self.kernel_tx.load(Ordering::Relaxed),
            rx: self.user_rx.load(Ordering::Relaxed) + self.kernel_rx.load(Ordering::Relaxed),
            last_activity_ns: self.last_ns.load(Ordering::Relaxed),
        }
    }
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

