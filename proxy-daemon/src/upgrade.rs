//! `proxyd upgrade`: a new proxyd process takes over the running one's
//! listening sockets, control socket, kernel data path and every established
//! tunnel, while the bytes keep flowing. See docs/upgrade.md.
//!
//! The old process starts the new binary with the same arguments and one
//! end of a `SOCK_SEQPACKET` pair (`PROXYD_HANDOVER_FD`); each message is one
//! JSON object, with the descriptors it carries (`SCM_RIGHTS`):
//!
//! 1. new -> old `hello {version}`; old -> new `offer {version, ...}` with
//!    the listening sockets. A version either side cannot read ends it here.
//! 2. new -> old `ready` (its configuration loaded, its data path able to
//!    carry the old one's tunnels) or `failed {reason}`. Until here the old
//!    process changed nothing: on any failure it goes on serving.
//! 3. old: parks every tunnel (`datapath::park`: relayed ones stop between
//!    chunks, spliced ones stay in the maps) and sends each as `tunnel {...}`
//!    with its two sockets, accepting new clients meanwhile (they park too);
//!    once all are sent and the new process has resumed them (`sync`,
//!    `synced`), it stops accepting, sends the last ones, detaches its
//!    verdict and XDP program and sends `done`.
//! 4. new: takes the kernel data path over (same pinned maps, its own
//!    verdict), starts accepting, resumes every tunnel under its old number,
//!    serves the control socket, and answers `adopted {tunnels}`. The old
//!    process then answers its `upgrade` command and exits.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use crate::config::DataPathMode;
use crate::datapath::park::ParkedState;
use crate::server::registry::ConnType;
use crate::server::{conn, Server};
use crate::sys;

/// The hand-over protocol's version. A new binary that cannot read an old
/// peer's messages (or the other way round) refuses, and the old one goes on.
pub const VERSION: u32 = 1;

/// The environment variable that gives the new process its end of the pair.
pub const HANDOVER_FD: &str = "PROXYD_HANDOVER_FD";

/// How long the new process may take to start and say `ready`.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long the old process waits for its tunnels to park (handshakes
/// finish first; they take at most 10 s).
const PARK_DEADLINE: Duration = Duration::from_secs(15);
/// Tunnels sent between two looks for newly parked ones.
const SEND_BATCH: usize = 64;
/// How long the new process may take to adopt what it was sent.
const ADOPT_DEADLINE: Duration = Duration::from_secs(30);
/// Largest message (a tunnel's state is a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// One message of the hand-over.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum Message {
    Hello {
        version: u32,
        pid: u32,
    },
    /// Descriptors: the SOCKS listener (when `socks` is set), the metrics
    /// listener (when `metrics` is set), the control socket, the BPF pin
    /// dir's lock (when `kernel`), and the SOCKS listener group's other
    /// sockets (`socks_group`), in this order.
    Offer {
        version: u32,
        socks: Option<(SocketAddr, Option<String>)>,
        /// The SOCKS listener group's sockets after the first, sent last: a
        /// release without groups reads none (and closes them).
        #[serde(default)]
        socks_group: usize,
        metrics: Option<SocketAddr>,
        /// New connections are numbered from here on.
        next_number: u64,
        /// Whether the old process runs the kernel data path (its spliced
        /// tunnels need one in the new process).
        kernel: bool,
    },
    Ready,
    Failed {
        reason: String,
    },
    /// Descriptors: the client socket, then the upstream socket.
    Tunnel(TunnelRecord),
    /// Asks the new process to answer `synced` once it has resumed every
    /// tunnel sent before: the old one stops accepting only then, so new
    /// clients do not wait behind a backlog of tunnels to resume.
    Sync,
    Synced,
    /// Everything was sent; the old process detached its BPF programs.
    Done,
    Adopted {
        tunnels: usize,
    },
}

/// What a tunnel's row and its data path need in the new process.
#[derive(Debug, Serialize, Deserialize)]
struct TunnelRecord {
    /// Its number in the connections list.
    number: u64,
    src: SocketAddr,
    dst: SocketAddr,
    kind: String,
    user: Option<String>,
    state: ParkedState,
}

/// One end of the hand-over pair, in tokio's reactor.
struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_RDWR),
        )?;
        Ok(Channel { fd: sys::async_fd(fd)? })
    }

    async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| sys::send_with_fds(fd, &bytes, fds)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn recv(&self) -> io::Result<(Message, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::recv_with_fds(fd, &mut buf)) {
                Ok(Ok((0, _))) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other proxyd left")),
                Ok(Ok((n, fds))) => {
                    let msg = serde_json::from_slice(&buf[..n])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("hand-over message: {e}")))?;
                    return Ok((msg, fds));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// What the old process needs to hand itself over.
pub struct Handover<'a> {
    pub server: &'a Arc<Server>,
    /// The control socket (a second descriptor of it).
    pub control: BorrowedFd<'a>,
    /// Stops the old process's control loop once the new one serves it.
    pub stop_control: &'a CancellationToken,
}

/// Runs `binary` (this process's own, by default) with this process's
/// arguments and hands everything over to it. `Ok` says what was handed
/// over (the caller then exits); `Err` says why not, and then this process
/// serves on as before.
pub async fn hand_over(h: Handover<'_>, binary: Option<PathBuf>) -> Result<String, String> {
    let binary = match binary {
        Some(b) => b,
        None => std::env::current_exe().map_err(|e| format!("cannot find this proxyd's binary: {e}"))?,
    };
    let (mine, theirs) = sys::seqpacket_pair().map_err(|e| format!("hand-over socket: {e}"))?;
    sys::inheritable(&theirs).map_err(|e| format!("hand-over socket: {e}"))?;
    let mut child = tokio::process::Command::new(&binary)
        .args(std::env::args_os().skip(1))
        .env(HANDOVER_FD, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    drop(theirs);
    let channel = Channel::new(mine).map_err(|e| format!("hand-over socket: {e}"))?;
    let pid = child.id().unwrap_or(0);

    // 1-2: nothing changes here until the new process is ready.
    let started = tokio::time::timeout(START_DEADLINE, offer(&h, &channel));
    let outcome = tokio::select! {
        r = started => r.unwrap_or_else(|_| Err(format!("no answer within {START_DEADLINE:?}"))),
        status = child.wait() => Err(match status {
            Ok(s) => format!("the new proxyd exited at start ({s})"),
            Err(e) => format!("the new proxyd: {e}"),
        }),
    };
    if let Err(mut reason) = outcome {
        // A process that left says more by how it exited.
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
            if !reason.contains("exited") {
                reason = format!("the new proxyd exited ({status}): {reason}");
            }
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
        tracing::warn!("upgrade to {} failed: {reason}; serving on", binary.display());
        return Err(format!("upgrade failed, this proxyd serves on: {reason}"));
    }

    // 3: stop, park and send.
    tracing::info!(new_pid = pid, "upgrade: the new proxyd is ready; handing over");
    let sent = match send_tunnels(&h, &channel).await {
        Ok(n) => n,
        Err(e) => {
            // The new process broke off: whatever was not sent yet is still ours.
            h.server.set_accepting(true);
            let _ = child.start_kill();
            return Err(format!("upgrade failed while handing over ({e}); tunnels not yet sent stay here"));
        }
    };
    let done = async {
        match channel.recv().await {
            Ok((Message::Adopted { tunnels }, _)) => Ok(tunnels),
            Ok((Message::Failed { reason }, _)) => Err(reason),
            Ok((other, _)) => Err(format!("unexpected {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    };
    let failed = match tokio::time::timeout(ADOPT_DEADLINE, done).await {
        Ok(Ok(adopted)) => {
            h.stop_control.cancel();
            return Ok(format!(
                "upgraded: pid {} -> {pid}, {adopted} of {sent} tunnels taken over",
                std::process::id()
            ));
        }
        Ok(Err(reason)) => format!("the new proxyd (pid {pid}) failed to take over: {reason}"),
        Err(_) => format!("the new proxyd (pid {pid}) did not take over within {ADOPT_DEADLINE:?}"),
    };
    // After `done` the tunnels already sent went with the new process. What
    // can be given back is: accepting, and the verdict for new tunnels.
    let _ = child.start_kill();
    if let Some(k) = h.server.kernel() {
        if let Err(e) = k.take_over() {
            tracing::warn!("after the failed upgrade, the verdict could not be attached again: {e}");
        }
    }
    h.server.set_accepting(true);
    Err(format!(
        "upgrade failed after the hand-over, this proxyd accepts again (the tunnels it sent are lost): {failed}"
    ))
}

/// Steps 1 and 2, on the old side.
async fn offer(h: &Handover<'_>, channel: &Channel) -> Result<(), String> {
    match channel.recv().await.map_err(|e| e.to_string())? {
        (Message::Hello { version, .. }, _) if version == VERSION => {}
        (Message::Hello { version, .. }, _) => {
            let reason = format!("the new proxyd speaks hand-over version {version}, this one {VERSION}");
            let _ = channel.send(&Message::Failed { reason: reason.clone() }, &[]).await;
            return Err(reason);
        }
        (other, _) => return Err(format!("unexpected {other:?}")),
    }
    let (socks, metrics) = h.server.listeners();
    let lock = match h.server.kernel() {
        Some(k) => Some(k.pin_lock().map_err(|e| format!("the BPF pin dir's lock: {e}"))?),
        None => None,
    };
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let (first, group) = match &socks {
        Some((_, _, group)) => group.split_first().map_or((None, &[][..]), |(f, g)| (Some(f), g)),
        None => (None, &[][..]),
    };
    if let Some(fd) = first {
        fds.push(fd.as_fd());
    }
    if let Some((_, fd)) = &metrics {
        fds.push(fd.as_fd());
    }
    fds.push(h.control);
    if let Some(lock) = &lock {
        fds.push(lock.as_fd());
    }
    fds.extend(group.iter().map(|fd| fd.as_fd()));
    let msg = Message::Offer {
        version: VERSION,
        socks: socks.as_ref().map(|(a, d, _)| (*a, d.clone())),
        socks_group: group.len(),
        metrics: metrics.as_ref().map(|(a, _)| *a),
        next_number: h.server.shared.registry.next_number(),
        kernel: lock.is_some(),
    };
    channel.send(&msg, &fds).await.map_err(|e| e.to_string())?;
    match channel.recv().await.map_err(|e| e.to_string())? {
        (Message::Ready, _) => Ok(()),
        (Message::Failed { reason }, _) => Err(format!("the new proxyd cannot adopt: {reason}")),
        (other, _) => Err(format!("unexpected {other:?}")),
    }
}

/// Step 3: parks every tunnel and sends it; then the BPF state. Returns how
/// many tunnels were sent.
async fn send_tunnels(h: &Handover<'_>, channel: &Channel) -> io::Result<usize> {
    let registry = &h.server.shared.registry;
    let deadline = tokio::time::Instant::now() + PARK_DEADLINE;
    let mut sent = std::collections::HashSet::new();
    // Asked to park, not sent yet. The entry and its park are held here: a
    // parked tunnel's task ends and its row leaves the list, but the sockets
    // wait in the park until they are sent.
    let mut pending = std::collections::BTreeMap::new();
    // Parked, not sent yet: (last activity, number, entry, what it parked).
    let mut ready = Vec::new();
    // This process accepts new clients until everything else is parked:
    // they park too (after their handshake), and the listen queue is the
    // only gap new clients see.
    let mut accepting = true;
    loop {
        let mut handshakes = 0;
        let listed = registry.numbered();
        for (number, entry) in &listed {
            if sent.contains(number) || pending.contains_key(number) {
                continue;
            }
            match entry.park() {
                Some(park) => {
                    park.request();
                    pending.insert(*number, (entry.clone(), park));
                }
                // In its handshake: it parks once it has a tunnel.
                None if entry.row().kind == ConnType::Unknown => handshakes += 1,
                // A UDP association stays here until it ends.
                None => {}
            }
        }
        let mut ended = Vec::new();
        for (number, (entry, park)) in &pending {
            match park.take() {
                Some(parked) => {
                    let last_ns = entry.row().last_activity_ns;
                    ready.push((last_ns, *number, entry.clone(), parked));
                    // Counted as sent from here: it leaves with the next batches.
                    sent.insert(*number);
                    ended.push(*number);
                }
                // Ended before it parked (closed by its peers).
                None if !listed.iter().any(|(n, _)| n == number) => ended.push(*number),
                None => {}
            }
        }
        for n in ended {
            pending.remove(&n);
        }
        // The most recently active first, a batch at a time, looking again for
        // newly parked ones in between: a busy tunnel (and a client accepted
        // just now) waits for a few idle ones at most, not for all of them.
        ready.sort_unstable_by_key(|(last_ns, number, ..)| (std::cmp::Reverse(*last_ns), *number));
        let batch: Vec<_> = ready.drain(..ready.len().min(SEND_BATCH)).collect();
        for (_, number, entry, parked) in batch {
            let row = entry.row();
            let record = TunnelRecord {
                number,
                src: entry.src,
                dst: row.dst_address.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                kind: row.kind.as_str().to_owned(),
                user: row.user,
                state: parked.state,
            };
            let fds = [parked.socks[0].as_fd(), parked.socks[1].as_fd()];
            channel.send(&Message::Tunnel(record), &fds).await?;
        }
        if !ready.is_empty() {
            continue;
        }
        if pending.is_empty() && handshakes == 0 && accepting {
            // Everything so far is sent: once the new process has resumed it
            // all, stop accepting (the new process starts as soon as it has
            // the kernel path), then one more pass for what came meanwhile.
            channel.send(&Message::Sync, &[]).await?;
            match channel.recv().await? {
                (Message::Synced, _) => {}
                (other, _) => return Err(io::Error::other(format!("unexpected {other:?}"))),
            }
            h.server.set_accepting(false);
            tracing::info!(
                tunnels = sent.len(),
                "upgrade: the new proxyd has resumed every tunnel; not accepting here any more"
            );
            accepting = false;
            continue;
        }
        if (pending.is_empty() && handshakes == 0) || tokio::time::Instant::now() >= deadline {
            h.server.set_accepting(false);
            if !pending.is_empty() || handshakes > 0 {
                tracing::warn!(
                    "upgrade: {} tunnel(s) did not park and {handshakes} handshake(s) did not finish in time; they stay here",
                    pending.len()
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The new process loads its own XDP program and verdict on the same pins.
    h.server.stop_prefilter();
    if let Some(k) = h.server.kernel() {
        k.hand_over()?;
    }
    channel.send(&Message::Done, &[]).await?;
    tracing::info!(tunnels = sent.len(), "upgrade: everything handed over");
    Ok(sent.len())
}

/// The new process's end: the hand-over socket it was given, when started
/// by `proxyd upgrade`.
pub fn incoming() -> Option<OwnedFd> {
    let fd: i32 = std::env::var(HANDOVER_FD).ok()?.parse().ok()?;
    std::env::remove_var(HANDOVER_FD);
    match sys::take_inherited(fd) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::error!("{HANDOVER_FD}={fd}: {e}");
            None
        }
    }
}

/// What the new process got in `offer`, before it says `ready`.
pub struct Offered {
    channel: Channel,
    pub socks: Option<crate::server::SocksListener>,
    pub metrics: Option<(SocketAddr, OwnedFd)>,
    pub control: OwnedFd,
    pub next_number: u64,
    /// The BPF pin dir's lock, when the old process runs the kernel path.
    pub kernel: Option<OwnedFd>,
}

/// Step 1 on the new side: says hello and takes the offer.
pub async fn receive_offer(fd: OwnedFd) -> Result<Offered, String> {
    let channel = Channel::new(fd).map_err(|e| format!("hand-over socket: {e}"))?;
    channel
        .send(&Message::Hello { version: VERSION, pid: std::process::id() }, &[])
        .await
        .map_err(|e| e.to_string())?;
    let (msg, fds) = channel.recv().await.map_err(|e| e.to_string())?;
    let Message::Offer { version, socks, socks_group, metrics, next_number, kernel } = msg else {
        return Err(format!("the running proxyd refused: {msg:?}"));
    };
    if version != VERSION {
        let reason = format!("the running proxyd speaks hand-over version {version}, this one {VERSION}");
        let _ = channel.send(&Message::Failed { reason: reason.clone() }, &[]).await;
        return Err(reason);
    }
    let mut fds = fds.into_iter();
    let mut next = |what: &str| fds.next().ok_or_else(|| format!("the offer lacks the {what} socket"));
    let socks = match socks {
        Some((addr, device)) => Some((addr, device, vec![next("SOCKS")?])),
        None => None,
    };
    let metrics = match metrics {
        Some(addr) => Some((addr, next("metrics")?)),
        None => None,
    };
    let control = next("control")?;
    let kernel = match kernel {
        true => Some(next("BPF pin dir lock")?),
        false => None,
    };
    let mut socks = socks;
    for _ in 0..socks_group {
        let fd = next("SOCKS group")?;
        if let Some((_, _, group)) = &mut socks {
            group.push(fd);
        }
    }
    Ok(Offered { channel, socks, metrics, control, next_number, kernel })
}

impl Offered {
    /// Step 2 on the new side: `ready`, or `failed` with the reason (then
    /// the old process serves on and this one exits).
    pub async fn answer(&self, ready: Result<(), String>) -> Result<(), String> {
        let msg = match &ready {
            Ok(()) => Message::Ready,
            Err(reason) => Message::Failed { reason: reason.clone() },
        };
        self.channel.send(&msg, &[]).await.map_err(|e| e.to_string())?;
        ready
    }

    /// Step 4 on the new side: receives every tunnel and the BPF state,
    /// takes the kernel data path over (under `mode`) and resumes each
    /// tunnel under its number. Returns how many it took over.
    pub async fn adopt(self, server: &Arc<Server>, mode: DataPathMode) -> Result<usize, String> {
        server.shared.registry.number_from(self.next_number);
        // Each tunnel resumes as it arrives, on the data path the mode selects
        // (with the kernel path loaded at `ready`: its verdict attaches at
        // `done`, and until then no tunnel enters the maps).
        server.use_data_path(mode).map_err(|e| e.to_string())?;
        let mut resumed = 0;
        loop {
            let (msg, fds) = self.channel.recv().await.map_err(|e| e.to_string())?;
            match msg {
                Message::Tunnel(record) => {
                    let [client, upstream]: [OwnedFd; 2] =
                        fds.try_into().map_err(|_| "a tunnel arrived without its two sockets".to_string())?;
                    let socks = [std::net::TcpStream::from(client), std::net::TcpStream::from(upstream)];
                    resumed += usize::from(resume(server, record, socks));
                }
                Message::Sync => self.channel.send(&Message::Synced, &[]).await.map_err(|e| e.to_string())?,
                Message::Done => break,
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        let result = take_over(server).map(|()| {
            server.set_accepting(true);
            tracing::info!(tunnels = resumed, "upgrade: took over; accepting");
            resumed
        });
        let reply = match &result {
            Ok(n) => Message::Adopted { tunnels: *n },
            Err(reason) => Message::Failed { reason: reason.clone() },
        };
        let _ = self.channel.send(&reply, &[]).await;
        result
    }
}

/// The old process let go: this process's verdict attaches to the maps (when
/// it loaded the kernel path at `ready`).
fn take_over(server: &Arc<Server>) -> Result<(), String> {
    match server.kernel() {
        Some(k) => k.take_over().map_err(|e| format!("taking over the kernel data path: {e}")),
        None => Ok(()),
    }
}

/// Lists a parked tunnel under its number and resumes it on the data path
/// in use (a rate-limited user's on the relay). False when it cannot.
fn resume(server: &Arc<Server>, record: TunnelRecord, socks: [std::net::TcpStream; 2]) -> bool {
    // On a shard, like the tunnels this process accepts: its sockets, tasks
    // and timers are registered with the runtime entered here.
    let _shard = server.shard().map(|h| h.enter());
    let slot = server.shared.registry.adopt(record.number, record.src);
    let kind = match record.kind.as_str() {
        "in" => ConnType::In,
        _ => ConnType::Out,
    };
    slot.entry.set_user(record.user.clone());
    let cancel = slot.entry.cancel.clone();
    let limits = record.user.as_deref().and_then(|name| {
        let config = server.config();
        let user = config.users.iter().find(|u| u.name == name)?;
        user.rate_limit.map(|bps| server.shared.user_limits(name, bps))
    });
    let tunnel = match limits {
        Some(l) => crate::datapath::userspace::UserspaceRelay.resume_limited(socks, record.state, cancel, Some(l)),
        None => server.datapath().resume(socks, record.state, cancel),
    };
    match tunnel {
        Ok(t) => {
            slot.entry.set_tunnel(kind, record.dst, t.stats.clone());
            server.shared.tasks.spawn(conn::adopted(server.shared.clone(), slot, t));
            true
        }
        Err(e) => {
            tracing::warn!(src = %record.src, "cannot take over a tunnel: {e}");
            false
        }
    }
}
