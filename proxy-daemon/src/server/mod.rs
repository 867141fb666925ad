//! The SOCKS server: the listener (rebound live when `port`, `listen-address`,
//! `vrf` or `enabled` change), admission against `max-connections`, the handshake
//! and CONNECT/BIND ([`conn`]), the idle reaper, and the data path in use.
//! Configuration changes arrive through [`Server::prepare`] (which does
//! everything that can fail) and [`Server::commit`] (which cannot fail).

pub mod conn;
pub mod dial;
pub mod registry;
pub mod shards;
pub mod shared;
pub mod socks4;
pub mod socks5;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, DataPathMode, Settings};
use crate::datapath::kernel::{KernelDataPath, Policy};
use crate::datapath::userspace::UserspaceRelay;
use crate::datapath::{DataPathKind, SharedDataPath};
use crate::metrics::{self, Metrics, RefusalReason, Snapshot};
use crate::xdp::{self, Prefilter};
use registry::ConnType;
use shards::{Shards, Spawned};
use shared::Shared;

/// How often the idle reaper looks at the connections.
const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// Listen backlog.
const BACKLOG: u32 = 1024;

/// The running server, shared by the accept loop, the connections and the control socket.
pub struct Server {
    /// What the connection tasks read (configuration, data path, the
    /// connections list, counters).
    pub shared: Arc<Shared>,
    /// The kernel data path once loaded: `auto` and `kernel` share it, and a
    /// switch between them (or back from `userspace`) loads nothing again.
    kernel: Mutex<Option<Arc<KernelDataPath>>>,
    listener: Mutex<Option<ActiveListener>>,
    pin_dir: PathBuf,
    /// The metrics endpoint, when `metrics-address` is set.
    metrics_listener: Mutex<Option<ActiveListener>>,
    /// The XDP prefilter, loaded while `xdp-interfaces` is not empty.
    prefilter: Mutex<Option<Prefilter>>,
    /// The runtimes connections run on.
    shards: Shards,
    /// Why the configuration's settings are not in effect (they could not
    /// be at start: a port in use, an interface gone); the next change,
    /// even one that changes nothing, tries again.
    unapplied: Mutex<Option<String>>,
}

/// The SOCKS listening sockets as handed between processes: their address,
/// the device they are bound to (`vrf`), and the sockets (one per shard, a
/// `SO_REUSEPORT` group; see [`Server::spawn_accept`]).
pub type SocksListener = (SocketAddr, Option<String>, Vec<OwnedFd>);

struct ActiveListener {
    addr: SocketAddr,
    /// The device it is bound to (`vrf`); `None` for `vrf=main`.
    device: Option<String>,
    /// A second descriptor of each listening socket (its accept loop owns
    /// the first), for handing its port over to a new listener or process.
    sockets: Vec<OwnedFd>,
    /// What accepts on it (stopped when this is dropped).
    task: Spawned,
}

/// What [`Server::prepare`] got ready for a configuration change.
#[derive(Default)]
pub struct Prepared {
    /// A new listener to swap in, or `Some(None)` to stop listening.
    listener: Option<Option<(Listen, std::net::TcpListener)>>,
    /// The same for the metrics endpoint.
    metrics: Option<Option<(SocketAddr, std::net::TcpListener)>>,
    /// A data path to switch to, and the mode it serves.
    datapath: Option<(DataPathMode, SharedDataPath)>,
    /// The XDP prefilter: a freshly loaded one (it was off) and the
    /// interfaces newly attached; `None` when `xdp-interfaces` is empty.
    /// Dropped uncommitted, it detaches and unloads again.
    xdp: Option<(Option<Prefilter>, xdp::NewAttachments)>,
}

impl metrics::Source for Server {
    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn snapshot(&self) -> Snapshot {
        let rows = self.shared.registry.rows();
        let count = |f: &dyn Fn(&registry::Row) -> bool| rows.iter().filter(|r| f(r)).count() as u64;
        let kernel = self.kernel();
        let (promoted, demoted) = kernel.as_ref().map_or((0, 0), |k| k.switches());
        let (retransmit_cut_skbs, retransmit_cut_bytes) = kernel.as_ref().map_or((0, 0), |k| k.retransmit_cuts());
        Snapshot {
            connections: [ConnType::Unknown, ConnType::Out, ConnType::In, ConnType::Udp]
                .into_iter()
                .map(|t| (t.as_str(), count(&|r| r.kind == t)))
                .collect(),
            open_tx: rows.iter().map(|r| r.tx).sum(),
            open_rx: rows.iter().map(|r| r.rx).sum(),
            tunnels_kernel: count(&|r| r.path == Some(DataPathKind::Kernel)),
            tunnels_userspace: count(&|r| r.path == Some(DataPathKind::Userspace)),
            promoted,
            demoted,
            retransmit_cut_skbs,
            retransmit_cut_bytes,
            data_path: self.datapath_kind(),
        }
    }
}

impl Server {
    /// Creates the server with the data path `mode` asks for.
    pub fn new(config: Config, mode: DataPathMode, pin_dir: PathBuf) -> io::Result<Arc<Self>> {
        let kernel = Mutex::new(None);
        let datapath = select_datapath(mode, &pin_dir, &kernel)?;
        Ok(Arc::new(Server {
            shared: Arc::new(Shared::new(config, mode, datapath)),
            kernel,
            listener: Mutex::new(None),
            pin_dir,
            metrics_listener: Mutex::new(None),
            prefilter: Mutex::new(None),
            shards: Shards::default(),
            unapplied: Mutex::new(None),
        }))
    }

    /// Puts the settings of the configuration it was created with into
    /// effect (listener, metrics, XDP); what fails is logged and kept for
    /// `ip socks print`, and the daemon runs on so that it can be fixed.
    pub fn apply_initial(self: &Arc<Self>) {
        let config = self.config();
        match self.prepare(&config.settings, false) {
            Ok(p) => self.commit((*config).clone(), p),
            Err(e) => {
                tracing::error!("not accepting clients: {e}; fix it with `proxyd ip socks set ...`");
                *self.unapplied.lock().unwrap() = Some(e.to_string());
            }
        }
    }

    /// Why the settings are not in effect, if they are not.
    pub fn unapplied(&self) -> Option<String> {
        self.unapplied.lock().unwrap().clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.config()
    }

    pub fn datapath_kind(&self) -> DataPathKind {
        self.shared.datapath_kind()
    }

    /// The `data-path` mode new tunnels follow (see [`Server::prepare`]).
    pub fn data_path_mode(&self) -> DataPathMode {
        self.shared.data_path_mode()
    }

    /// The address the listener is bound to, if it is listening.
    pub fn listening_on(&self) -> Option<SocketAddr> {
        self.listener.lock().unwrap().as_ref().map(|l| l.addr)
    }

    /// Does what can fail for moving from the current settings to `new`:
    /// checks a new `vrf`, binds a new listener, loads a new data path.
    /// Nothing changes yet. The data path changes with the `data-path`
    /// setting, and also when the change names `data-path`
    /// (`data_path_named`) while `run --data-path` runs another mode: a
    /// `set data-path=` to the saved value ends that override.
    pub fn prepare(&self, new: &Settings, data_path_named: bool) -> io::Result<Prepared> {
        let old = self.config();
        let mut p = Prepared::default();
        // A new vrf must name a device now, even while the server is
        // disabled (then no listener would catch it). An unchanged one is
        // not checked again: a VRF that went away must not block other
        // changes (a listener bound to it fails on its own, naming it).
        if new.vrf != old.settings.vrf {
            if let Some(device) = new.vrf_device() {
                crate::vrf::check(device)?;
            }
        }
        let want = new.enabled.then(|| Listen {
            addr: SocketAddr::new(new.listen_address, new.port),
            device: new.vrf_device().map(str::to_owned),
        });
        let current = self.listener.lock().unwrap();
        let have = current.as_ref().map(|l| Listen { addr: l.addr, device: l.device.clone() });
        if want != have {
            p.listener = Some(match want {
                Some(listen) => {
                    // The same port with another address or vrf: the new
                    // listener is bound while the old one still listens.
                    let old_socket = current.as_ref().filter(|l| l.addr.port() == listen.addr.port());
                    let l = bind(listen.addr, listen.device.as_deref(), old_socket.and_then(|l| l.sockets.first()))?;
                    Some((listen, l))
                }
                None => None,
            });
        }
        drop(current);
        let current = self.metrics_listener.lock().unwrap();
        if new.metrics_address != current.as_ref().map(|l| l.addr) {
            p.metrics = Some(match new.metrics_address {
                Some(addr) => {
                    // Not in the vrf: the metrics endpoint is management, not the
                    // SOCKS service. On the same port (127.0.0.1:9100 to
                    // 0.0.0.0:9100) the new socket joins the old one's port, as
                    // the SOCKS listener does.
                    let old_socket = current.as_ref().filter(|l| l.addr.port() == addr.port());
                    let l = bind(addr, None, old_socket.and_then(|l| l.sockets.first()))
                        .map_err(|e| io::Error::new(e.kind(), format!("metrics-address: {e}")))?;
                    Some((addr, l))
                }
                None => None,
            });
        }
        drop(current);
        if !new.xdp_interfaces.is_empty() {
            let current = self.prefilter.lock().unwrap();
            p.xdp = Some(match &*current {
                Some(pf) => (None, pf.attach_missing(&new.xdp_interfaces)?),
                None => {
                    let pf = Prefilter::load(&self.pin_dir)?;
                    let links = pf.attach_missing(&new.xdp_interfaces)?;
                    (Some(pf), links)
                }
            });
        }
        if new.data_path != old.settings.data_path || (data_path_named && new.data_path != self.data_path_mode()) {
            p.datapath = Some((new.data_path, select_datapath(new.data_path, &self.pin_dir, &self.kernel)?));
        }
        Ok(p)
    }

    /// Makes `config` current, with what [`Server::prepare`] got ready for it.
    pub fn commit(self: &Arc<Self>, config: Config, prepared: Prepared) {
        if config.settings.max_connections > self.config().settings.max_connections {
            raise_nofile_limit(config.settings.max_connections);
        }
        {
            // Before the new access list is current: the trie drops only what
            // the new list denies by the time it decides.
            let mut slot = self.prefilter.lock().unwrap();
            match prepared.xdp {
                Some((loaded, links)) => {
                    if let Some(pf) = loaded {
                        tracing::info!(prog_id = pf.prog_id(), "XDP prefilter loaded");
                        *slot = Some(pf);
                    }
                    if let Some(pf) = slot.as_ref() {
                        pf.commit(&config.settings, &config.access, links);
                    }
                }
                None => {
                    if slot.take().is_some() {
                        tracing::info!("xdp-interfaces is empty: XDP prefilter unloaded");
                    }
                }
            }
        }
        self.shared.set_config(config);
        if let Some((mode, dp)) = prepared.datapath {
            // As `ip socks print` says it: under `auto` the kernel path in use
            // still starts every tunnel on the relay.
            tracing::info!(data_path = %mode, in_use = %dp.kind(), "new tunnels use data-path={mode} (in use: {})", dp.kind());
            self.shared.set_datapath(mode, dp);
        }
        if let Some(metrics) = prepared.metrics {
            let mut slot = self.metrics_listener.lock().unwrap();
            *slot = None;
            if let Some((addr, std_listener)) = metrics {
                tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
                *slot = Some(self.serve_metrics(addr, std_listener));
            }
        }
        if let Some(listener) = prepared.listener {
            let mut slot = self.listener.lock().unwrap();
            // Dropping the old listener stops its accept loop; open tunnels stay.
            *slot = None;
            match listener {
                Some((Listen { addr, device }, std_listener)) => {
                    let (task, sockets) = self.spawn_accept(vec![std_listener], addr, device.as_deref());
                    let vrf = device.as_deref().unwrap_or(crate::config::VRF_MAIN);
                    tracing::info!(%addr, vrf, "accepting SOCKS clients");
                    *slot = Some(ActiveListener { addr, device, sockets, task });
                }
                None => tracing::info!("SOCKS server disabled: not accepting new clients"),
            }
        }
        *self.unapplied.lock().unwrap() = None;
    }

    /// Stops accepting new clients (shutdown) and waits until every accept
    /// loop is gone: each holds the server, and so the kernel path, whose
    /// pins are removed only when it is dropped. An abort alone is carried
    /// out by the shard's thread later, possibly after the process exited.
    pub async fn stop_listening(&self) {
        let listener = self.listener.lock().unwrap().take();
        if let Some(l) = listener {
            l.task.stop().await;
        }
    }

    /// The listening sockets (SOCKS, metrics), each as its address, device
    /// and a second descriptor, to hand to a new process (an upgrade).
    pub fn listeners(&self) -> (Option<SocksListener>, Option<(SocketAddr, OwnedFd)>) {
        let dups = |l: &ActiveListener| l.sockets.iter().filter_map(|s| s.try_clone().ok()).collect::<Vec<_>>();
        let socks = self.listener.lock().unwrap();
        let socks = socks.as_ref().map(|l| (l.addr, l.device.clone(), dups(l))).filter(|(_, _, fds)| !fds.is_empty());
        let metrics = self.metrics_listener.lock().unwrap();
        let metrics = metrics.as_ref().and_then(|l| Some((l.addr, dups(l).into_iter().next()?)));
        (socks, metrics)
    }

    /// Stops (`false`) or restarts (`true`) the SOCKS accept loop, keeping the
    /// listening socket: an upgrade pauses it while a new process takes over,
    /// and restarts it when the new process fails.
    pub fn set_accepting(self: &Arc<Self>, on: bool) {
        let mut slot = self.listener.lock().unwrap();
        let Some(l) = slot.as_mut() else { return };
        l.task.abort();
        if on {
            let group = l.sockets.iter().filter_map(|s| s.try_clone().ok()).map(std::net::TcpListener::from).collect();
            (l.task, l.sockets) = self.spawn_accept(group, l.addr, l.device.as_deref());
        }
    }

    /// Takes over listening sockets another process handed over (an
    /// upgrade); a later `prepare` for the same address keeps them.
    pub fn adopt_listeners(
        self: &Arc<Self>,
        socks: Option<SocksListener>,
        metrics: Option<(SocketAddr, OwnedFd)>,
        accept: bool,
    ) {
        if let Some((addr, device, fds)) = socks {
            let group: Vec<_> = fds.into_iter().map(std::net::TcpListener::from).collect();
            for l in &group {
                let _ = l.set_nonblocking(true);
                // A listener from a release that set TCP_NODELAY per connection.
                let _ = accepted_without_delay(l);
            }
            let (task, sockets) = if accept {
                self.spawn_accept(group, addr, device.as_deref())
            } else {
                (Spawned::default(), group.into_iter().map(OwnedFd::from).collect())
            };
            *self.listener.lock().unwrap() = Some(ActiveListener { addr, device, sockets, task });
        }
        if let Some((addr, fd)) = metrics {
            let listener = std::net::TcpListener::from(fd);
            let _ = listener.set_nonblocking(true);
            *self.metrics_listener.lock().unwrap() = Some(self.serve_metrics(addr, listener));
        }
    }

    /// Serves the metrics endpoint on `listener` (bound to `addr`) until
    /// the returned listener is dropped.
    fn serve_metrics(self: &Arc<Self>, addr: SocketAddr, listener: std::net::TcpListener) -> ActiveListener {
        let sockets = listener.try_clone().ok().map(OwnedFd::from).into_iter().collect();
        let server = self.clone();
        let task = Spawned::here(tokio::spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => metrics::serve(l, server).await,
                Err(e) => tracing::error!(%addr, error = %e, "cannot register the metrics listener"),
            }
        }));
        ActiveListener { addr, device: None, sockets, task }
    }

    /// An accept loop on every shard, each on a listening socket of its own:
    /// `group`'s sockets, and for shards beyond them new sockets that join
    /// the group (`SO_REUSEPORT`, same address and device). The kernel then
    /// hands each new connection to one socket, and so wakes one shard;
    /// `accept_loop` steers it to the shard on the core that took the SYN.
    /// A socket that cannot join (the group's first one lacks `SO_REUSEPORT`:
    /// taken over from a release without groups) leaves its shard sharing
    /// the first socket; every socket of the group has a loop. Returns the
    /// loops and a second descriptor of each socket.
    fn spawn_accept(
        self: &Arc<Self>,
        mut group: Vec<std::net::TcpListener>,
        addr: SocketAddr,
        device: Option<&str>,
    ) -> (Spawned, Vec<OwnedFd>) {
        while !group.is_empty() && group.len() < self.shards.handles().len().min(MAX_GROUP) {
            match listen(addr, device) {
                Ok(l) => group.push(l),
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cannot add a listening socket: shards share one");
                    break;
                }
            }
        }
        let sockets = group.iter().filter_map(|l| l.try_clone().ok()).map(OwnedFd::from).collect();
        // Steering picks a socket of a group; shards sharing one socket skip it.
        let steer = group.len() > 1;
        let task = self.shards.spawn_spread(group.len(), |i| {
            let server = self.clone();
            let listener = group.get(i % group.len().max(1)).map(std::net::TcpListener::try_clone);
            async move {
                match listener.map(|l| l.and_then(TcpListener::from_std)) {
                    Some(Ok(l)) => server.accept_loop(l, steer).await,
                    Some(Err(e)) => tracing::error!(%addr, error = %e, "cannot register the listener"),
                    None => {}
                }
            }
        });
        (task, sockets)
    }

    /// The runtime for a tunnel that did not arrive through an accept (one
    /// taken over from another process): the shards in turn.
    pub fn shard(&self) -> Option<&tokio::runtime::Handle> {
        self.shards.next()
    }

    /// The kernel data path, when loaded.
    pub fn kernel(&self) -> Option<Arc<KernelDataPath>> {
        self.kernel.lock().unwrap().clone()
    }

    /// Loads the kernel data path another process runs on the maps it
    /// pinned (an upgrade), not attached yet (see [`KernelDataPath::adopt`]).
    pub fn adopt_kernel(&self, lock: OwnedFd) -> io::Result<()> {
        let k = Arc::new(KernelDataPath::adopt(&self.pin_dir, lock)?);
        *self.kernel.lock().unwrap() = Some(k);
        Ok(())
    }

    /// Makes new tunnels use the data path `mode` selects (loading the
    /// kernel path if needed).
    pub fn use_data_path(&self, mode: DataPathMode) -> io::Result<()> {
        let dp = select_datapath(mode, &self.pin_dir, &self.kernel)?;
        self.shared.set_datapath(mode, dp);
        Ok(())
    }

    /// The data path new tunnels use.
    pub fn datapath(&self) -> SharedDataPath {
        self.shared.datapath()
    }

    /// Detaches and unloads the XDP prefilter and removes its pins (shutdown).
    pub fn stop_prefilter(&self) {
        if self.prefilter.lock().unwrap().take().is_some() {
            tracing::info!("XDP prefilter unloaded");
        }
    }

    /// Where the XDP prefilter is attached, and how; empty when it is off.
    pub fn prefilter_status(&self) -> Vec<xdp::InterfaceStatus> {
        self.prefilter.lock().unwrap().as_ref().map(|p| p.status()).unwrap_or_default()
    }

    /// The XDP prefilter's drops per access-list rule; `None` when it is off.
    pub fn prefilter_drops(&self) -> Option<std::collections::BTreeMap<usize, xdp::RuleDrops>> {
        self.prefilter.lock().unwrap().as_ref().map(|p| p.drops_by_rule())
    }

    /// Accepts on `listener` until aborted; with `steer`, the listener is one
    /// of a `SO_REUSEPORT` group and claims the core its shard runs on.
    async fn accept_loop(self: Arc<Self>, listener: TcpListener, steer: bool) {
        let mut backoff = Duration::from_millis(5);
        let mut steered_to = None;
        loop {
            // The kernel gives a new connection to the group's socket whose
            // SO_INCOMING_CPU is the core that took its SYN (Linux 6.2+), else
            // one by hash: this socket claims the core its shard runs on now,
            // so a connection is served where its packets are, and its first
            // wake-up finds the shard's thread there (docs/decisions.md).
            let cpu = if steer { crate::sys::current_cpu() } else { None };
            if cpu != steered_to {
                if let Some(cpu) = cpu {
                    let _ = crate::sys::setsockopt_int(&listener, libc::SOL_SOCKET, libc::SO_INCOMING_CPU, cpu);
                }
                steered_to = cpu;
            }
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d;
                    // rules and rows use the plain IPv4 form.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    self.clone().admit(stream, peer);
                }
                Err(e) => {
                    // EMFILE and friends: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed; backing off {:?}", backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn admit(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let max = self.config().settings.max_connections as usize;
        self.shared.metrics.accepted();
        match self.shared.registry.admit(peer, max) {
            Some(slot) => {
                self.shared.tasks.spawn(conn::serve(self.shared.clone(), stream, peer, slot));
            }
            None => {
                self.shared.metrics.refused(RefusalReason::Limit);
                tracing::info!(src = %peer, max, "refused: max-connections reached");
                conn::refuse(stream);
            }
        }
    }

    /// Runs the idle reaper until the process ends.
    pub async fn reap_idle_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let timeout = self.config().settings.connection_idle_timeout;
            self.shared.registry.reap_idle(timeout);
        }
    }
}

/// Each connection holds two sockets; raises the soft open-files limit towards
/// what `max-connections` needs, as far as the hard limit allows (no
/// capability needed), and warns when the hard limit is too low.
pub fn raise_nofile_limit(max_connections: u32) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = (max_connections as u64) * 2 + 64;
    let target = want.min(hard).max(soft);
    if target > soft {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => {
                tracing::info!("open-files limit raised from {soft} to {target} for max-connections={max_connections}")
            }
            Err(e) => tracing::warn!("cannot raise the open-files limit from {soft} to {target}: {e}"),
        }
    }
    if want > hard {
        tracing::warn!("max-connections={max_connections} needs about {want} open files, but the limit is {hard}; connections beyond it will be refused at accept");
    }
}

/// Most sockets in a SOCKS listener group (more shards share them): the
/// hand-over's offer carries them all in one message, which holds at most
/// 253 descriptors.
const MAX_GROUP: usize = 128;

/// Where the SOCKS listener listens: an address, and the `vrf` device.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listen {
    addr: SocketAddr,
    device: Option<String>,
}

/// Binds the first listening socket of a group (see [`Server::spawn_accept`]).
///
/// Every socket of a group has `SO_REUSEPORT`, which would let a second
/// proxyd (which sets it too) join the port and take a share of its
/// clients. So a fresh port is first bound by a socket without it, which
/// fails while anything listens there. (Another program that sets it and
/// runs as the daemon's user could still join; that user can reach into the
/// daemon anyway.)
/// `replacing` is the listener this one replaces on the same port (another
/// address or vrf): both listen until the change is committed (the old one is
/// closed only then, so a refused change leaves it as it was), which the
/// kernel allows only while both sockets have `SO_REUSEPORT` (set here on an
/// old one taken over from a release without groups).
fn bind(addr: SocketAddr, device: Option<&str>, replacing: Option<&OwnedFd>) -> io::Result<std::net::TcpListener> {
    match replacing {
        Some(old) => nix::sys::socket::setsockopt(old, nix::sys::socket::sockopt::ReusePort, &true)?,
        None => {
            let probe = new_socket(addr)?;
            probe.set_reuseaddr(true)?;
            crate::vrf::bind(&probe, device)?;
            probe.bind(addr).map_err(|e| cannot_listen(addr, e))?;
        }
    }
    listen(addr, device)
}

/// A listening socket of a group: `SO_REUSEADDR` (restarts do not wait for
/// TIME_WAIT) and `SO_REUSEPORT`, bound to `device` when one is given (`vrf`).
fn listen(addr: SocketAddr, device: Option<&str>) -> io::Result<std::net::TcpListener> {
    let socket = new_socket(addr)?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    crate::vrf::bind(&socket, device)?;
    let listener = socket.bind(addr).and_then(|()| socket.listen(BACKLOG)).map_err(|e| cannot_listen(addr, e))?;
    let listener = listener.into_std()?;
    accepted_without_delay(&listener)?;
    Ok(listener)
}

fn new_socket(addr: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
}

fn cannot_listen(addr: SocketAddr, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
}

/// Sets `TCP_NODELAY` on a listening socket: Linux copies it into every
/// socket accepted from it, which saves a `setsockopt` per connection (the
/// relay writes each message as it comes; Nagle would hold small replies
/// back behind the client's delayed ACK).
fn accepted_without_delay(listener: &std::net::TcpListener) -> io::Result<()> {
    nix::sys::socket::setsockopt(listener, nix::sys::socket::sockopt::TcpNoDelay, &true).map_err(io::Error::from)
}

/// Picks the data path for `mode`, loading the kernel path into `kernel`
/// unless it is there already; `auto` falls back to the relay and says why.
pub fn select_datapath(
    mode: DataPathMode,
    pin_dir: &std::path::Path,
    kernel: &Mutex<Option<Arc<KernelDataPath>>>,
) -> io::Result<SharedDataPath> {
    let policy = match mode {
        DataPathMode::Userspace => return Ok(Arc::new(UserspaceRelay)),
        DataPathMode::Kernel => Policy::Always,
        DataPathMode::Auto => Policy::Auto,
    };
    let mut slot = kernel.lock().unwrap();
    let loaded = match &*slot {
        Some(k) => Ok(k.clone()),
        None => KernelDataPath::load(pin_dir).map(Arc::new),
    };
    match (loaded, mode) {
        (Ok(k), _) => {
            *slot = Some(k.clone());
            Ok(k.with_policy(policy))
        }
        (Err(e), DataPathMode::Kernel) => {
            Err(io::Error::new(e.kind(), format!("data-path=kernel: cannot load the BPF data path: {e}")))
        }
        (Err(e), _) => {
            tracing::warn!("data-path=auto: kernel data path unavailable ({e}); using the userspace relay");
            Ok(Arc::new(UserspaceRelay))
        }
    }
}
