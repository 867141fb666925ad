//! The userspace relay, the one copy loop of proxyd: it serves the userspace
//! data path, rate-limited users, tunnels on the kernel path before they are
//! promoted into the sockhash and after they are demoted from it, and every
//! kernel-path fallback.
//!
//! Two pumps, one per direction, copy bytes through the daemon; each counts
//! what it has handed to the other socket and stamps the last activity. End
//! of stream on one side becomes a half-close (FIN after the last byte) on the
//! other; an error on either side resets both, so neither peer mistakes a
//! failure for a clean end. Buffers exist only while bytes are moving, so idle
//! tunnels cost little memory. A [`RateLimit`] paces each direction.
//!
//! [`relay`] can also stop at a byte boundary and hand the sockets back (a
//! [`Promote`] rule decides when): each pump stops only between chunks, after
//! its last read was written in full, so nothing is held in the daemon.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::park::{Park, Parked, ParkedState};
use super::pipe;
use super::{monotonic_ns, DataPath, DataPathKind, FlowSource, FlowStats, Pair, Tunnel};

/// Bytes copied per system call while a direction is busy.
const CHUNK: usize = 64 * 1024;
/// A busy pump yields its worker thread after moving this much (see `moved_chunk`)...
const YIELD_BYTES: usize = 512 * 1024;
/// ...and, with more than two spliced bursts running on its thread, splices
/// and yields in shares of this (see [`share`]).
const ROUND_BYTES: usize = 2 * 1024 * 1024;
/// A spliced burst smaller than this sends its direction back to copying.
const SMALL_BURST: u64 = 16 * 1024;

/// The relay (stateless: every tunnel carries its own counters).
#[derive(Default)]
pub struct UserspaceRelay;

/// Counters of what the relay moved for one tunnel.
#[derive(Default)]
pub struct Counters {
    /// Bytes from the client delivered towards the destination.
    pub tx: AtomicU64,
    /// Bytes from the destination delivered towards the client.
    pub rx: AtomicU64,
    /// `CLOCK_MONOTONIC` ns of the last byte moved.
    pub last_ns: AtomicU64,
}

impl Counters {
    /// Fresh counters, active as of now.
    pub fn new() -> Self {
        Counters { last_ns: AtomicU64::new(monotonic_ns()), ..Default::default() }
    }
}

impl FlowSource for Counters {
    fn snapshot(&self) -> FlowStats {
        FlowStats {
            tx: self.tx.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
            last_activity_ns: self.last_ns.load(Ordering::Relaxed),
        }
    }
}

/// When [`relay`] should stop and hand the sockets back, checked after each
/// chunk: once the tunnel has moved `bytes` (both directions, this relay
/// run), or once it has been relayed for `age` (when set) and neither
/// direction has moved bulk for `age` (see `pump`).
#[derive(Clone, Copy, Debug)]
pub struct Promote {
    pub bytes: u64,
    pub age: Option<Duration>,
}

/// How [`relay`] ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions ended (or failed, or were cancelled): the sockets are closed.
    Closed,
    /// The [`Promote`] rule fired, or a park request: the pumps stopped with
    /// no byte held in the daemon and (for a promotion) their reader's queue
    /// drained; the sockets are handed back, both open. `ended[i]`: the direction
    /// (client to upstream, upstream to client) had already ended with a
    /// half-close (only when parking).
    Stopped { ended: [bool; 2] },
}

/// What stops both pumps between chunks. Both pumps run in one task, so
/// their code between two awaits never interleaves: a pump that reads end of
/// stream decides (stop or half-close) and records it in one step.
#[derive(Default)]
struct Stop {
    set: AtomicBool,
    /// A pump has seen end of stream and half-closed: no stop from now on.
    eof: AtomicBool,
    /// The stop is a park: the next process relays on, so a pump may stop
    /// between any two chunks, not only with its reader's queue drained.
    parking: AtomicBool,
    notify: Notify,
}

impl Stop {
    fn request(&self) {
        if self.eof.load(Ordering::Acquire) {
            return;
        }
        self.force();
    }

    /// Stops the pumps still running even after a half-close (parking: the
    /// new process is told which directions ended).
    fn force(&self) {
        self.parking.store(true, Ordering::Release);
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
    fn requested(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
    fn parking(&self) -> bool {
        self.parking.load(Ordering::Acquire)
    }
    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.requested() {
                return;
            }
            notified.await;
        }
    }
}

/// How one pump ended.
enum PumpEnd {
    /// End of stream, passed on as a half-close.
    Eof,
    /// Stopped by [`Stop`], with the reader's queue drained.
    Stopped,
}

/// Moves bytes both ways between `socks` (client, upstream) until both
/// directions end, `cancel` fires, or `promote` (or a `park` request) says
/// to stop. `early` is sent to the upstream first. `gates[i]` must complete
/// before the pump that
/// writes to `socks[i]` starts (the kernel path waits there until its own
/// queue towards that socket has drained).
/// On [`RelayEnd::Closed`] the caller drops the sockets; a failed direction
/// has already set both to reset on close.
#[allow(clippy::manual_async_fn, reason = "an `async fn` stores its arguments twice (rustc #62958)")]
pub fn relay<'a, G: Future<Output = io::Result<()>> + 'a>(
    socks: &'a mut [TcpStream; 2],
    early: Vec<u8>,
    counters: &'a Counters,
    cancel: &'a CancellationToken,
    gates: [G; 2],
    opts: RelayOptions<'a>,
) -> impl Future<Output = RelayEnd> + 'a {
    // An async block for the reason `pump` gives.
    async move {
        let RelayOptions { limits, promote, park, ended } = opts;
        let [client, upstream] = &*socks;
        let stop = Stop::default();
        let started = Instant::now();
        let moved_before = counters.tx.load(Ordering::Relaxed) + counters.rx.load(Ordering::Relaxed);
        // Promotion waits until both directions run: a gate that has not opened
        // means bytes of the kernel path are still on their way to that writer.
        let opened = AtomicU8::new(0);
        let bulk = [AtomicBool::new(false), AtomicBool::new(false)];
        let bulk_seen = AtomicU64::new(0);
        let check = || {
            if let Some(p) = promote.filter(|_| opened.load(Ordering::Relaxed) == 2) {
                let moved = counters.tx.load(Ordering::Relaxed) + counters.rx.load(Ordering::Relaxed) - moved_before;
                // Interactive: neither direction moves bulk now, nor has for
                // `age` (one short burst in a bulk flow is not a change of kind).
                let quiet_ns =
                    counters.last_ns.load(Ordering::Relaxed).saturating_sub(bulk_seen.load(Ordering::Relaxed));
                let interactive = !bulk.iter().any(|b| b.load(Ordering::Relaxed));
                if moved >= p.bytes
                    || (interactive
                        && p.age.is_some_and(|age| started.elapsed() >= age && quiet_ns >= age.as_nanos() as u64))
                {
                    stop.request();
                }
            }
            stop.parking()
        };
        let [gate_client, gate_upstream] = gates;
        let direction = |count, limit, bulk| Direction {
            count,
            last_ns: &counters.last_ns,
            limit,
            bulk,
            bulk_seen: &bulk_seen,
            opened: &opened,
        };
        let up = direction(&counters.tx, limits.map(|l| &*l.up), &bulk[0]);
        let up = pump((!ended[0]).then_some(gate_upstream), client, upstream, early, up, &stop, &check);
        let down = direction(&counters.rx, limits.map(|l| &*l.down), &bulk[1]);
        let down = pump((!ended[1]).then_some(gate_client), upstream, client, Vec::new(), down, &stop, &check);
        let parked = async {
            match park {
                Some(p) => p.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(up, down, parked);
        let (mut up_end, mut down_end) = (None, None);
        let mut park_asked = false;
        while up_end.is_none() || down_end.is_none() {
            let (result, slot) = tokio::select! {
                _ = cancel.cancelled() => return RelayEnd::Closed,
                _ = &mut parked, if !park_asked => {
                    park_asked = true;
                    stop.force();
                    continue;
                }
                r = &mut up, if up_end.is_none() => (r, &mut up_end),
                r = &mut down, if down_end.is_none() => (r, &mut down_end),
            };
            match result {
                Ok(end) => *slot = Some(end),
                Err(e) => {
                    tracing::debug!(error = %e, "relay direction failed; resetting both sides");
                    super::reset_on_close(&[client, upstream]);
                    return RelayEnd::Closed;
                }
            }
        }
        match (up_end, down_end) {
            (Some(PumpEnd::Stopped), Some(PumpEnd::Stopped)) => RelayEnd::Stopped { ended: [false; 2] },
            (Some(PumpEnd::Eof), Some(PumpEnd::Eof)) => RelayEnd::Closed,
            (Some(up), Some(down)) if park_asked => {
                RelayEnd::Stopped { ended: [matches!(up, PumpEnd::Eof), matches!(down, PumpEnd::Eof)] }
            }
            _ => RelayEnd::Closed,
        }
    }
}

/// What else [`relay`] may do besides moving bytes.
#[derive(Clone, Copy, Default)]
pub struct RelayOptions<'a> {
    /// Pacing of a rate-limited user.
    pub limits: Option<&'a Limits>,
    /// When to stop and hand the sockets back (the kernel path's promotion).
    pub promote: Option<Promote>,
    /// Where an upgrade asks the relay to stop (see `datapath::park`).
    pub park: Option<&'a Park>,
    /// Directions that already ended with a half-close (client to upstream,
    /// upstream to client): a tunnel resumed after parking.
    pub ended: [bool; 2],
}

/// Paces traffic to a rate; one per user and direction, shared by that
/// user's tunnels.
pub struct RateLimit {
    bytes_per_sec: f64,
    /// When the next byte may go.
    next: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bits_per_sec: u64) -> Self {
        RateLimit { bytes_per_sec: bits_per_sec as f64 / 8.0, next: Mutex::new(Instant::now()) }
    }

    /// Most bytes to move at once: a twentieth of a second's worth keeps the pace smooth.
    fn chunk(&self) -> usize {
        ((self.bytes_per_sec / 20.0) as usize).clamp(512, CHUNK)
    }

    /// Books `n` bytes; returns how long to wait before sending them.
    fn reserve(&self, n: usize) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap();
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        start - now
    }
}

/// The limits of a rate-limited user's tunnel.
#[derive(Clone)]
pub struct Limits {
    /// Client towards destination.
    pub up: Arc<RateLimit>,
    /// Destination towards client.
    pub down: Arc<RateLimit>,
}

impl UserspaceRelay {
    /// Like [`DataPath::attach`], with each direction paced by `limits`.
    pub fn attach_limited(&self, pair: Pair, cancel: CancellationToken, limits: Option<Limits>) -> io::Result<Tunnel> {
        self.tunnel([pair.client, pair.upstream], pair.client_early, Counters::new(), cancel, limits, [false; 2])
    }

    /// Like [`DataPath::resume`], with each direction paced by `limits`.
    pub fn resume_limited(
        &self,
        socks: [std::net::TcpStream; 2],
        state: ParkedState,
        cancel: CancellationToken,
        limits: Option<Limits>,
    ) -> io::Result<Tunnel> {
        let ParkedState::Userspace { tx, rx, last_ns, ended } = state else {
            return Err(io::Error::other("a spliced tunnel needs the kernel data path"));
        };
        let socks = to_tokio(socks)?;
        let counters = Counters { tx: AtomicU64::new(tx), rx: AtomicU64::new(rx), last_ns: AtomicU64::new(last_ns) };
        self.tunnel(socks, Vec::new(), counters, cancel, limits, ended)
    }

    /// The tunnel, its future not started yet.
    fn tunnel(
        &self,
        mut socks: [TcpStream; 2],
        early: Vec<u8>,
        counters: Counters,
        cancel: CancellationToken,
        limits: Option<Limits>,
        ended: [bool; 2],
    ) -> io::Result<Tunnel> {
        let counters = Arc::new(counters);
        let park = Arc::new(Park::default());
        let (c, p) = (counters.clone(), park.clone());
        let run = Box::pin(async move {
            let open = || async { Ok(()) };
            let opts = RelayOptions { limits: limits.as_ref(), park: Some(&p), ended, ..Default::default() };
            if let RelayEnd::Stopped { ended } = relay(&mut socks, early, &c, &cancel, [open(), open()], opts).await {
                park_relayed(&p, socks, c.snapshot(), ended);
            }
            // Otherwise dropping the sockets closes both.
        });
        Ok(Tunnel { stats: counters, run, park })
    }
}

/// Sockets that left the reactor (parked by another process), back into it.
pub fn to_tokio(socks: [std::net::TcpStream; 2]) -> io::Result<[TcpStream; 2]> {
    let [client, upstream] = socks;
    client.set_nonblocking(true)?;
    upstream.set_nonblocking(true)?;
    Ok([TcpStream::from_std(client)?, TcpStream::from_std(upstream)?])
}

/// Leaves a relayed tunnel that stopped for parking in its `park`, with
/// its counters so far.
pub fn park_relayed(park: &Park, socks: [TcpStream; 2], stats: FlowStats, ended: [bool; 2]) {
    let state = ParkedState::Userspace { tx: stats.tx, rx: stats.rx, last_ns: stats.last_activity_ns, ended };
    let [client, upstream] = socks;
    match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => park.put(Parked { socks: [c, u], state }),
        (Err(e), _) | (_, Err(e)) => tracing::warn!("cannot park a relayed tunnel: {e}"),
    }
}

impl DataPath for UserspaceRelay {
    fn kind(&self) -> DataPathKind {
        DataPathKind::Userspace
    }

    fn attach(&self, pair: Pair, cancel: CancellationToken) -> io::Result<Tunnel> {
        self.attach_limited(pair, cancel, None)
    }

    fn resume(
        &self,
        socks: [std::net::TcpStream; 2],
        state: ParkedState,
        cancel: CancellationToken,
    ) -> io::Result<Tunnel> {
        self.resume_limited(socks, state, cancel, None)
    }
}

/// What one pump counts into and how it is paced.
struct Direction<'a> {
    count: &'a AtomicU64,
    last_ns: &'a AtomicU64,
    limit: Option<&'a RateLimit>,
    /// Set while the direction moves in bursts of bulk (spliced, see `pump`).
    bulk: &'a AtomicBool,
    /// `CLOCK_MONOTONIC` ns when either direction last moved bulk (0: never).
    bulk_seen: &'a AtomicU64,
    /// Counts the relay's directions that have started (their gate opened).
    opened: &'a AtomicU8,
}

/// How one burst (a readable reader, read until its queue is empty) ended.
enum Burst {
    /// The reader's queue is empty; `moved` bytes went to the writer.
    Drained { moved: u64 },
    /// A copy filled the whole buffer: more is waiting, worth a pipe.
    Full,
    /// The reader is at end of stream.
    End,
    /// A park stopped the burst between two chunks (the last written in full).
    Parked,
}

/// Copies one direction, once its `gate` has opened (none: the direction
/// had ended), until end of stream (then half-closes the writer) or until
/// `stop` (only between bursts, or for a park between chunks). `check` runs
/// after every chunk and says whether a park asks the pump to stop now.
///
/// A direction copies through its thread's buffer (`SCRATCH`), until a read
/// fills a whole chunk (the reader holds more than a chunk: bulk); from
/// then on its bursts go through a leased pipe with `splice(2)`, which hands
/// the socket's pages on without copying them through the daemon (measured,
/// one flow: 16.5-19.6 Gbit/s against 11-13 copying, a third less CPU per
/// byte for the machine), until a burst moves less than `SMALL_BURST`.
/// Interactive traffic (small messages) never leases a pipe, so it pays no
/// extra system calls.
#[allow(clippy::manual_async_fn, reason = "an `async fn` stores its arguments twice (rustc #62958)")]
fn pump<'a, G: Future<Output = io::Result<()>> + 'a>(
    gate: Option<G>,
    reader: &'a TcpStream,
    writer: &'a TcpStream,
    early: Vec<u8>,
    dir: Direction<'a>,
    stop: &'a Stop,
    check: &'a (dyn Fn() -> bool + Sync),
) -> impl Future<Output = io::Result<PumpEnd>> + 'a {
    // An async block rather than an `async fn`, which would keep a second
    // copy of each argument in the future (rustc #62958): every idle tunnel
    // holds two pumps.
    async move {
        let Some(gate) = gate else { return Ok(PumpEnd::Eof) };
        gate.await?;
        dir.opened.fetch_add(1, Ordering::Relaxed);
        let chunk = dir.limit.map_or(CHUNK, RateLimit::chunk);
        let mut unyielded = 0usize;
        if !early.is_empty() {
            let sent = send_at_once(writer, &early)?;
            write_all(writer, &early[sent..]).await?;
            dir.count.fetch_add(early.len() as u64, Ordering::Relaxed);
            dir.last_ns.store(monotonic_ns(), Ordering::Relaxed);
        }
        let mut bulk = false;
        let mut waiting = true;
        loop {
            if waiting {
                tokio::select! {
                    biased;
                    _ = stop.wait() => return Ok(PumpEnd::Stopped),
                    ready = readable(reader) => ready?,
                }
            }
            // No stop inside a burst: a pump stops only with the reader's queue
            // drained (above, or at end of stream), so that no partly read skb is
            // left: the kernel path hands its verdict whole skbs. A park is the
            // exception: the next process relays on, and a reader whose writer is
            // slower never drains (a bulk tunnel to a slow reader would never park).
            let burst = match bulk.then(pipe::lease).flatten() {
                Some(mut pipe) => {
                    let burst = Box::pin(splice_burst(reader, writer, &mut pipe, &dir, check, &mut unyielded)).await?;
                    if let Burst::Drained { moved } = burst {
                        // Nothing at all: a wake-up with nothing to read, or the
                        // copy that went bulk had just emptied the queue.
                        bulk = moved == 0 || moved >= SMALL_BURST;
                        dir.bulk.store(bulk, Ordering::Relaxed);
                        // The burst's last chunk stamped the activity clock.
                        dir.bulk_seen.store(dir.last_ns.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                    burst
                }
                None => {
                    let may_splice = !bulk && dir.limit.is_none();
                    Box::pin(copy_burst(reader, writer, chunk, may_splice, &dir, check, &mut unyielded)).await?
                }
            };
            waiting = true;
            match burst {
                Burst::Parked => return Ok(PumpEnd::Stopped),
                Burst::Drained { .. } => {}
                Burst::Full => {
                    bulk = true;
                    waiting = false;
                }
                Burst::End if stop.requested() => {
                    // End of stream stays readable: whoever reads next sees it again.
                    return Ok(PumpEnd::Stopped);
                }
                Burst::End => {
                    if stop.eof.swap(true, Ordering::AcqRel) {
                        // The other direction ended first: the relay ends
                        // `Closed` now, and closing the sockets sends this FIN
                        // (both receive queues are drained: no reset).
                        return Ok(PumpEnd::Eof);
                    }
                    // ENOTCONN: the write half was already shut (a tunnel
                    // demoted after the kernel path passed this FIN on).
                    return match nix::sys::socket::shutdown(writer.as_raw_fd(), nix::sys::socket::Shutdown::Write) {
                        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(PumpEnd::Eof),
                        Err(e) => Err(e.into()),
                    };
                }
            }
        }
    }
}

/// Counts a spliced burst in [`BULK`] while it moves bytes (a direction
/// waiting for bytes, or for room in a full writer, takes no turns: many
/// stalled peers do not shrink the others' shares). A pump runs in its
/// tunnel's task on a shard's single-threaded runtime, so a burst starts and
/// ends on the same thread.
struct BulkTurn;

impl BulkTurn {
    fn enter() -> BulkTurn {
        BULK.with(|b| b.set(b.get() + 1));
        BulkTurn
    }
}

impl Drop for BulkTurn {
    fn drop(&mut self) {
        BULK.with(|b| b.set(b.get().saturating_sub(1)));
    }
}

/// What a spliced burst moves at a time on this thread: the bursts running
/// here together move about [`ROUND_BYTES`] between two looks at the
/// thread's other sockets (each step of a handshake on the shard waits for
/// one such round), in shares of at least a `CHUNK`.
fn share() -> usize {
    (ROUND_BYTES / BULK.with(Cell::get).max(1)).max(CHUNK)
}

thread_local! {
    /// Spliced bursts running on this thread now (see [`BulkTurn`]).
    static BULK: Cell<usize> = const { Cell::new(0) };
    /// The buffer copy bursts read into on this thread: lent to one read and
    /// its write at a time, never across an await. A buffer per burst was a
    /// 64 KiB `malloc` and `free` per message (glibc consolidates its free
    /// lists on every free that large).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(CHUNK));
}

/// What one read, and the write that follows it at once, did.
enum Step {
    /// The reader is at end of stream.
    End,
    /// Nothing to read.
    Empty,
    /// `n` bytes read (`drained`: the reader's queue is empty now); `rest`:
    /// those the writer had no room for (or, paced, all of them).
    Read { n: usize, drained: bool, rest: Option<Vec<u8>> },
}

/// Copies what `reader` holds to `writer` through the thread's scratch buffer
/// (an idle direction holds no buffer; bytes the writer cannot take at once
/// are kept in one of their own). With `may_splice`, stops at the first read
/// that fills a chunk.
async fn copy_burst(
    reader: &TcpStream,
    writer: &TcpStream,
    chunk: usize,
    may_splice: bool,
    dir: &Direction<'_>,
    check: &(dyn Fn() -> bool + Sync),
    unyielded: &mut usize,
) -> io::Result<Burst> {
    let mut moved = 0;
    loop {
        let step = SCRATCH.with_borrow_mut(|buf| {
            // Read into uninitialised capacity: zeroing 64 KiB per read was 2%
            // of the daemon's time in the connection-rate run.
            buf.clear();
            let (n, drained) = match read_some(reader, buf, chunk) {
                Ok((0, _)) => return Ok(Step::End),
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Empty),
                Err(e) => return Err(e),
            };
            // A paced direction writes only when its pacer says.
            let written = match dir.limit {
                Some(_) => 0,
                None => send_at_once(writer, &buf[..n])?,
            };
            Ok(Step::Read { n, drained, rest: (written < n).then(|| buf[written..n].to_vec()) })
        })?;
        let (n, drained) = match step {
            Step::End => return Ok(Burst::End),
            Step::Empty => break,
            Step::Read { n, drained, rest } => {
                dir.last_ns.store(monotonic_ns(), Ordering::Relaxed);
                if let Some(rest) = rest {
                    if let Some(wait) = dir.limit.map(|l| l.reserve(n)).filter(|w| !w.is_zero()) {
                        tokio::time::sleep(wait).await;
                    }
                    write_all(writer, &rest).await?;
                }
                (n, drained)
            }
        };
        moved += n as u64;
        let full = may_splice && n == chunk;
        if full {
            // Bulk before `check` sees this chunk: a full read after a pause
            // in a bulk flow is no sign of an interactive tunnel.
            dir.bulk.store(true, Ordering::Relaxed);
            dir.bulk_seen.store(dir.last_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if moved_chunk(dir, n, check, unyielded).await {
            return Ok(Burst::Parked);
        }
        if full {
            return Ok(Burst::Full);
        }
        if drained {
            break;
        }
    }
    Ok(Burst::Drained { moved })
}

/// Reads at most `max` bytes of what `reader` holds into `buf`'s spare
/// capacity; also says whether the read emptied the socket's queue. A read
/// that leaves room did (TCP hands over everything queued, up to the size
/// asked for), and then tokio is told the socket is not readable any more,
/// as its own `poll_read` does: the next burst waits for epoll instead of
/// paying a `read` that returns `EAGAIN`, one system call less per message
/// of interactive traffic. An end of stream is never lost that way: tokio
/// keeps a hang-up's readiness.
fn read_some(reader: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<(usize, bool)> {
    let room = (buf.capacity() - buf.len()).min(max);
    let mut emptied = 0;
    // try_io clears the readiness it saw before the read when the closure
    // says WouldBlock; an event that arrives after it stays.
    let read = reader.try_io(Interest::READABLE, || match crate::sys::recv_spare(reader, buf, max)? {
        n if n > 0 && n < room => {
            emptied = n;
            Err(io::ErrorKind::WouldBlock.into())
        }
        n => Ok(n),
    });
    match read {
        Ok(n) => Ok((n, false)),
        Err(_) if emptied > 0 => Ok((emptied, true)),
        Err(e) => Err(e),
    }
}

/// Moves what `reader` holds to `writer` through `pipe`, a pipe-full at a time.
async fn splice_burst(
    reader: &TcpStream,
    writer: &TcpStream,
    pipe: &mut pipe::Lease,
    dir: &Direction<'_>,
    check: &(dyn Fn() -> bool + Sync),
    unyielded: &mut usize,
) -> io::Result<Burst> {
    let mut moved = 0;
    // Counted in BULK while moving bytes, not while waiting for a full writer.
    let mut turn = Some(BulkTurn::enter());
    // What the pipe holds while the writer is full sits outside TCP's memory
    // accounting: each fill takes no more than the writer has room for
    // (never less than a copy's chunk, what the copying relay holds).
    let sndbuf = nix::sys::socket::getsockopt(writer, nix::sys::socket::sockopt::SndBuf)?;
    loop {
        let room = sndbuf.saturating_sub(crate::sys::outq(writer)? as usize).max(CHUNK).min(share());
        let n = match reader.try_io(Interest::READABLE, || pipe.fill(reader, room)) {
            Ok(0) => return Ok(Burst::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained { moved }),
            Err(e) => return Err(e),
        };
        dir.last_ns.store(monotonic_ns(), Ordering::Relaxed);
        loop {
            match writer.try_io(Interest::WRITABLE, || pipe.drain(writer)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(turn.take());
                    writable(writer).await?;
                    turn = Some(BulkTurn::enter());
                }
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
        if moved_chunk(dir, n, check, unyielded).await {
            return Ok(Burst::Parked);
        }
    }
}

/// Books `n` bytes delivered, runs `check` (whose answer it returns: stop
/// for a park), and yields the worker thread
/// after every `YIELD_BYTES` (a chunk smaller than `CHUNK` counts as one):
/// try_read/try_write (and splice) do not count against tokio's cooperative
/// budget, so without a yield a busy pump keeps its worker and the
/// handshakes queued behind it wait. Measured (the bench's mixed run, p99 of
/// short requests beside 8 bulk flows): 226 ms without, 98 ms with tokio's
/// budget alone, 4.8 ms yielding every 64 KiB chunk but at 15% less bulk;
/// every 512 KiB keeps both. Counting small chunks as whole ones (a yield
/// every 8 messages of a ping-pong) matters too: counting their bytes only
/// (no yield at all) took the bench's 64-byte ping-pong from a p50 of 35 µs
/// to 88 µs. With more than two spliced bursts running on the thread, each
/// yields (and fills its pipe) per [`share`] instead: the mixed run's p99 went from
/// a median of 8.9-10.9 ms over nine runs to 4.0-6.6, bulk unchanged.
async fn moved_chunk(dir: &Direction<'_>, n: usize, check: &(dyn Fn() -> bool + Sync), unyielded: &mut usize) -> bool {
    dir.count.fetch_add(n as u64, Ordering::Relaxed);
    dir.last_ns.store(monotonic_ns(), Ordering::Relaxed);
    let park = check();
    *unyielded += n.max(CHUNK);
    if *unyielded >= YIELD_BYTES.min(share()) {
        *unyielded = 0;
        tokio::task::yield_now().await;
    }
    park
}

/// Waits until `sock` is readable. tokio's `TcpStream::readable` future
/// carries its own waiter (152 bytes, held by every idle tunnel's task);
/// this one leaves the waker in the socket's one reader slot, which is
/// enough here: each socket of a relay has one pump reading from it and one
/// writing to it.
async fn readable(sock: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| sock.poll_read_ready(cx)).await
}

/// Waits until `sock` has room, in its one writer slot (see [`readable`]).
async fn writable(sock: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| sock.poll_write_ready(cx)).await
}

/// Sends what `sock` has room for now, without asking tokio first: tokio
/// learns that a socket it has just registered is writable only from the
/// next `epoll_wait`, so its `try_write` refuses the first write of every
/// tunnel (and of every handshake reply) and costs a turn of the event loop
/// before it. Returns the bytes sent, 0 when there was no room (the caller
/// then waits through tokio, whose `try_write` meets `EAGAIN` itself).
pub fn send_at_once(sock: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{send, MsgFlags};
    match send(sock.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
        Ok(n) => Ok(n),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Writes all of `buf`, waiting for room as needed.
async fn write_all(writer: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match writer.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(writer).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pacer books time in proportion to bytes at the configured rate.
    #[test]
    fn rate_limit_books_time() {
        let l = RateLimit::new(8_000_000); // 1 MB/s
        assert_eq!(l.chunk(), 50_000);
        assert!(l.reserve(500_000) < Duration::from_millis(5), "the first burst goes at once");
        let wait = l.reserve(1);
        assert!(wait > Duration::from_millis(490) && wait < Duration::from_millis(510), "{wait:?}");
    }

    /// Bulk bursts on a thread share a round: up to two move whole pipes,
    /// more move less each (never below a chunk), and a burst that ends
    /// leaves the count.
    #[test]
    fn bulk_bursts_share_a_round() {
        assert_eq!(share(), ROUND_BYTES);
        let mut turns: Vec<BulkTurn> = (0..4).map(|_| BulkTurn::enter()).collect();
        assert_eq!(share(), ROUND_BYTES / 4);
        turns.pop();
        assert_eq!(share(), ROUND_BYTES / 3);
        let many: Vec<BulkTurn> = (0..1000).map(|_| BulkTurn::enter()).collect();
        assert_eq!(share(), CHUNK);
        drop(many);
        turns.truncate(1);
        assert_eq!(share(), ROUND_BYTES);
        drop(turns);
        assert_eq!(BULK.with(Cell::get), 0);
    }
}
