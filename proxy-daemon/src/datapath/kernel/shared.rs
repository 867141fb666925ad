//! What the loader and the tunnel tasks share: the maps (with the element
//! commands in the order that keeps a tunnel's entries consistent), the
//! daemon-wide window budget and switch counters, and each tunnel's
//! counters ([`KernelFlow`]), which the connections list reads.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::Ebpf;
use proxy_common::{FlowStats as MapFlow, Splice};
use tokio::task::JoinHandle;

use super::hangup;
use crate::datapath::userspace::Counters;
use crate::datapath::{monotonic_ns, DataPathKind, FlowSource, FlowStats};
use crate::sys;

/// What the tunnel tasks share with the loader.
pub(super) struct Shared {
    /// The four maps, used without a lock: every element command is atomic
    /// in the kernel, and each tunnel touches only its own two keys.
    pub(super) maps: Maps,
    /// Keeps the program loaded and attached to `SPLICE`.
    pub(super) _ebpf: Mutex<Ebpf>,
    /// Most bytes in flight towards a spliced socket: its send queue plus
    /// what was redirected to it and has not reached it yet
    /// (`net.ipv4.tcp_wmem`'s maximum, what the relay lets a send queue hold).
    pub(super) queue_cap: u64,
    /// Bytes that directions past their window may still have redirected,
    /// summed over the daemon: what the kernel may hold outside TCP's
    /// accounting beyond the windows (see `tunnel`'s grace).
    pub(super) grace_budget: AtomicU64,
    /// Tunnels promoted from the relay into the maps, and demoted back.
    pub(super) promotions: AtomicU64,
    pub(super) demotions: AtomicU64,
    /// The hangup watcher shared by all tunnels, and its dispatcher task.
    pub(super) hangups: Arc<hangup::Hangups>,
    pub(super) hangup_task: JoinHandle<()>,
    /// The verdict's attachment to `SPLICE` (taken when handed over).
    pub(super) verdict_link: Mutex<Option<aya::programs::sk_skb::SkSkbLinkId>>,
    /// Whether this process's verdict is attached: until then (an upgrade's
    /// new process, before the old one let go) no tunnel enters the maps.
    pub(super) attached: AtomicBool,
    /// A test fault (`PROXYD_BPF_FAULTS=hand-over-busy`): every hand-over
    /// before a splice ends as if a side never went quiet.
    pub(super) busy_hand_over: bool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.hangup_task.abort();
    }
}

/// The maps, owned through aya (which created and pinned them); elements are
/// read and written with [`sys`]'s map commands, which take `&self`.
pub(super) struct Maps {
    pub(super) socks: SockHash<MapData, u64>,
    pub(super) splice: SockHash<MapData, u64>,
    pub(super) peers: BpfHashMap<MapData, u64, Splice>,
    pub(super) flows: BpfHashMap<MapData, u64, MapFlow>,
}

impl Maps {
    /// One socket's flow entry, if the socket is in the maps.
    pub(super) fn flow(&self, cookie: u64) -> Option<MapFlow> {
        sys::map_lookup(&self.flows, &cookie).ok().flatten()
    }

    /// Everything a pair needs before its first verdict, in the order of the
    /// module docs: `PEERS` (with each direction's window), `FLOWS`, `SOCKS`
    /// (both), then the upstream in `SPLICE`. The client enters `SPLICE`
    /// with [`Maps::splice_in`].
    pub(super) fn enter(
        &self,
        [c, u]: [u64; 2],
        [cfd, ufd]: [u32; 2],
        windows: [Splice; 2],
        fresh: MapFlow,
    ) -> io::Result<()> {
        self.set_splice(c, &windows[0])?;
        self.set_splice(u, &windows[1])?;
        sys::map_update(&self.flows, &c, &fresh, 0)?;
        sys::map_update(&self.flows, &u, &fresh, 0)?;
        sys::map_update(&self.socks, &c, &cfd, 0)?;
        sys::map_update(&self.socks, &u, &ufd, 0)?;
        self.splice_in(u, ufd)
    }

    /// One socket's `PEERS` value, if the socket is in the maps.
    pub(super) fn splice_of(&self, cookie: u64) -> Option<Splice> {
        sys::map_lookup(&self.peers, &cookie).ok().flatten()
    }

    /// Replaces one socket's `PEERS` value (one element, seen whole by the verdict).
    pub(super) fn set_splice(&self, cookie: u64, splice: &Splice) -> io::Result<()> {
        sys::map_update(&self.peers, &cookie, splice, 0)
    }

    /// Puts one socket under the verdict.
    pub(super) fn splice_in(&self, cookie: u64, fd: u32) -> io::Result<()> {
        sys::map_update(&self.splice, &cookie, &fd, 0)
    }

    /// Takes one socket from under the verdict (missing is fine).
    pub(super) fn splice_out(&self, cookie: u64) {
        let _ = sys::map_delete(&self.splice, &cookie);
    }

    /// Removes the pair from `SOCKS`, `PEERS` and `FLOWS` (missing entries
    /// are fine) once neither socket is under the verdict: every caller has
    /// taken both out of `SPLICE` first (`tunnel::unsplice`), or they never
    /// entered it. Then no verdict runs for them, so the order does not matter.
    pub(super) fn leave(&self, cookies: [u64; 2]) {
        for cookie in cookies {
            let _ = sys::map_delete(&self.socks, &cookie);
        }
        for cookie in cookies {
            let _ = sys::map_delete(&self.peers, &cookie);
        }
        for cookie in cookies {
            let _ = sys::map_delete(&self.flows, &cookie);
        }
    }
}

/// A tunnel's counters: what userspace moved itself (on the relay, and in
/// the hand-over before each splice) plus what the verdict counted in `FLOWS`
/// during each stay in the maps (an epoch: the entries go with it, so the last
/// value read is kept and added up when the epoch ends).
pub(super) struct KernelFlow {
    pub(super) shared: Arc<Shared>,
    /// The cookies of the client socket (its `FLOWS` entry counts tx) and of
    /// the upstream one (rx), read at the first splice: a tunnel that stays
    /// on the relay never needs them (two `getsockopt` calls per short
    /// connection saved).
    cookies: OnceLock<[u64; 2]>,
    /// Whether the verdict moves the bytes right now (the `path` column).
    pub(super) spliced: AtomicBool,
    /// What userspace moved.
    pub(super) user: Counters,
    /// What the verdict counted (a lock: an epoch's end must not race a read).
    pub(super) kernel: Mutex<KernelCounts>,
}

/// What the verdict counted for one tunnel, per side (client, upstream).
#[derive(Default)]
pub(super) struct KernelCounts {
    /// Whether the pair is in the maps (counters are read from `FLOWS`).
    pub(super) in_maps: bool,
    /// The epochs that ended.
    pub(super) done: [u64; 2],
    /// Last values read from `FLOWS` in the current epoch.
    pub(super) now: [u64; 2],
    /// Latest activity the verdict stamped, `CLOCK_MONOTONIC` ns.
    pub(super) last_ns: u64,
}

impl KernelFlow {
    /// A tunnel's flow; `cookies` when they are known already.
    pub(super) fn new(shared: Arc<Shared>, cookies: Option<[u64; 2]>) -> Self {
        KernelFlow {
            shared,
            cookies: cookies.map(OnceLock::from).unwrap_or_default(),
            spliced: AtomicBool::new(false),
            user: Counters::new(),
            kernel: Mutex::new(KernelCounts::default()),
        }
    }

    /// Folds the current `FLOWS` entries into the kept values while the
    /// pair is in the maps.
    pub(super) fn read_maps(&self, counts: &mut KernelCounts) {
        let maps = &self.shared.maps;
        if !counts.in_maps {
            return;
        }
        let Some(&[client, upstream]) = self.cookies.get() else { return };
        if let (Some(c), Some(u)) = (maps.flow(client), maps.flow(upstream)) {
            counts.now = [counts.now[0].max(c.bytes), counts.now[1].max(u.bytes)];
            counts.last_ns = counts.last_ns.max(c.last_ns).max(u.last_ns);
        }
    }

    /// The sockets' cookies (client, upstream), read from `socks` the first time.
    pub(super) fn cookies(&self, socks: &[impl AsFd; 2]) -> io::Result<[u64; 2]> {
        if let Some(cookies) = self.cookies.get() {
            return Ok(*cookies);
        }
        let cookies = [sys::socket_cookie(&socks[0])?, sys::socket_cookie(&socks[1])?];
        Ok(*self.cookies.get_or_init(|| cookies))
    }

    /// The tunnel's name in the logs: its client socket's cookie (0 until
    /// the first splice).
    pub(super) fn id(&self) -> u64 {
        self.cookies.get().map_or(0, |c| c[0])
    }

    pub(super) fn counts(&self) -> std::sync::MutexGuard<'_, KernelCounts> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A tunnel taken over from another process: what was counted before,
    /// and (`spliced`) whether its pair is in the maps, its `FLOWS` entries
    /// counting the current epoch.
    pub(super) fn resumed(&self, user: [u64; 3], kernel_done: [u64; 2], spliced: bool) {
        self.user.tx.store(user[0], Ordering::Relaxed);
        self.user.rx.store(user[1], Ordering::Relaxed);
        self.user.last_ns.store(user[2], Ordering::Relaxed);
        let mut counts = self.counts();
        counts.done = kernel_done;
        counts.in_maps = spliced;
        drop(counts);
        self.spliced.store(spliced, Ordering::Relaxed);
    }

    /// What the verdict counted in the epochs that ended (client, upstream side).
    pub(super) fn done_epochs(&self) -> [u64; 2] {
        self.counts().done
    }

    /// An epoch begins: the pair entered the maps with fresh `FLOWS` entries.
    pub(super) fn enter_maps(&self) {
        self.counts().in_maps = true;
        self.spliced.store(true, Ordering::Relaxed);
    }

    /// The epoch ends (called right before the entries are removed): the
    /// last values are read and added to the finished epochs.
    pub(super) fn freeze(&self) {
        let mut counts = self.counts();
        self.read_maps(&mut counts);
        counts.in_maps = false;
        for side in 0..2 {
            counts.done[side] += std::mem::take(&mut counts.now[side]);
        }
        self.spliced.store(false, Ordering::Relaxed);
    }

    /// Counts bytes moved by userspace outside the relay (the hand-over).
    pub(super) fn add_user(&self, tx: u64, rx: u64) {
        self.user.tx.fetch_add(tx, Ordering::Relaxed);
        self.user.rx.fetch_add(rx, Ordering::Relaxed);
        self.user.last_ns.fetch_max(monotonic_ns(), Ordering::Relaxed);
    }
}

impl FlowSource for KernelFlow {
    fn snapshot(&self) -> FlowStats {
        let (kernel, kernel_last) = {
            let mut counts = self.counts();
            self.read_maps(&mut counts);
            ([0, 1].map(|side| counts.done[side] + counts.now[side]), counts.last_ns)
        };
        let user = self.user.snapshot();
        FlowStats {
            tx: user.tx + kernel[0],
            rx: user.rx + kernel[1],
            last_activity_ns: user.last_activity_ns.max(kernel_last),
        }
    }

    fn path(&self) -> DataPathKind {
        if self.spliced.load(Ordering::Relaxed) {
            DataPathKind::Kernel
        } else {
            DataPathKind::Userspace
        }
    }
}
