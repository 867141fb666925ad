//! One spliced tunnel's life: send the client's early bytes (and whatever
//! either socket already holds) in userspace, enter the maps, watch both
//! sockets for FIN/RST, close without loss, leave the maps.
//!
//! Close without loss. The verdict program does not forward a FIN, and the
//! kernel frees whatever is still queued in a socket's psock when the socket
//! leaves the map or closes. So when socket A reports `EPOLLRDHUP` (its peer
//! sent FIN), the task waits until its partner B has had every byte
//! acknowledged that was ever written to it: `TCP_INFO.tcpi_bytes_acked(B)`
//! must reach what userspace wrote to B before splicing (measured at splice
//! time) plus A's flow counter, and `SIOCOUTQ(B)` must be 0. Only then is B's
//! write half shut. Each direction is handled alone, so half-close works both
//! ways; the pair leaves the maps and is closed when both directions are
//! done, on RST/error (the other side is reset too), or on cancel.
//!
//! The sockets leave tokio's reactor once spliced: the daemon's shared
//! edge-triggered epoll set ([`super::hangup`]) asks only for
//! `EPOLLRDHUP`/`EPOLLHUP`/`EPOLLERR`, so userspace is not woken for every
//! skb the kernel moves, and a tunnel costs no descriptor beyond its sockets.
//!
//! If the pair cannot enter the maps (a side already closed its write half,
//! so the socket is no longer `ESTABLISHED`; or the maps are full) the tunnel
//! is relayed through userspace instead, with the same counters.

use std::io;
use std::net::{Shutdown, TcpStream as StdTcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use proxy_common::FlowStats as MapFlow;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::sys::{self, EV_ERR, EV_HUP, EV_RDHUP};
use super::{error_line, monotonic_ns, KernelFlow, Shared};

/// Index of the client socket in the per-tunnel arrays.
const CLIENT: usize = 0;
/// Index of the upstream socket.
const UPSTREAM: usize = 1;
/// `tcpi_state` of a closed (reset) socket.
const TCP_CLOSE: u8 = 7;
/// How often a draining direction rechecks its acknowledgements, at first
/// and at most (doubling in between: quick on loopback, cheap on slow peers).
const DRAIN_POLL_MIN: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(50);

/// A pair in the maps.
struct Spliced {
    /// Indexed by `CLIENT`/`UPSTREAM`.
    socks: [StdTcpStream; 2],
    cookies: [u64; 2],
    /// Bytes userspace wrote to each socket before splicing (the SOCKS reply
    /// to the client, the early bytes to the upstream, ...): the offset of
    /// the flow counters against `tcpi_bytes_acked`.
    written_before: [u64; 2],
}

/// Why the watch ended.
enum End {
    /// Both directions closed by FIN.
    Clean,
    /// The idle reaper or shutdown cancelled the tunnel.
    Cancelled,
    /// This socket was reset (or failed); the other one gets a RST too.
    Reset(usize),
    /// A syscall failed.
    Failed(io::Error),
}

/// The tunnel task: owns the pair until both sockets are closed.
pub(super) async fn run(
    shared: Arc<Shared>,
    flow: Arc<KernelFlow>,
    mut client: TcpStream,
    mut upstream: TcpStream,
    early: Vec<u8>,
    cancel: CancellationToken,
) {
    let id = flow.client;
    let handed_over = tokio::select! {
        biased;
        _ = cancel.cancelled() => return,
        // Boxed so its buffers' state does not stay in the long-lived task.
        done = Box::pin(hand_over(&shared, &flow, &mut client, &mut upstream, early)) => done,
    };
    match handed_over {
        Ok(false) => {}
        Ok(true) => {
            debug!(
                tunnel = id,
                "cannot splice (a side closed, or never went quiet); relaying in userspace"
            );
            flow.freeze();
            return Box::pin(relay(&flow, [client, upstream], cancel)).await;
        }
        Err(e) => {
            debug!(tunnel = id, "handing over queued bytes: {e}");
            return;
        }
    }
    // Leave tokio's reactor: from now on the kernel moves the bytes.
    let socks = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => [c, u],
        (Err(e), _) | (_, Err(e)) => {
            warn!(
                tunnel = id,
                "cannot take the sockets out of the reactor: {e}"
            );
            return;
        }
    };
    let cookies = [flow.client, flow.upstream];
    let spliced = match splice(&shared, socks, cookies) {
        Ok(spliced) => spliced,
        Err(SpliceError::Nothing(e, socks)) => {
            debug!(tunnel = id, "cannot splice ({e}); relaying in userspace");
            flow.freeze();
            return relay_std(&flow, socks, cancel).await;
        }
        Err(SpliceError::Half(e, spliced)) => {
            debug!(
                tunnel = id,
                "cannot splice the client side ({e}); relaying in userspace"
            );
            unsplice_half(&shared, &flow, &spliced, &cancel).await;
            return relay_std(&flow, spliced.socks, cancel).await;
        }
    };
    debug!(tunnel = id, upstream = flow.upstream, "spliced");

    let end = watch(&shared, &spliced, &cancel).await;
    flow.freeze();
    shared.maps.leave(cookies);
    match end {
        End::Clean => debug!(tunnel = id, "closed by both sides"),
        End::Cancelled => debug!(tunnel = id, "cancelled"),
        End::Reset(side) => {
            let other = 1 - side;
            debug!(
                tunnel = id,
                "{} side reset; resetting the other",
                side_name(side)
            );
            if let Err(e) = sys::set_linger_zero(&spliced.socks[other]) {
                debug!(tunnel = id, "SO_LINGER: {e}");
            }
        }
        End::Failed(e) => warn!(tunnel = id, "closing tunnel: {e}"),
    }
    // Dropping `spliced` closes both sockets.
}

/// Bytes moved per direction per round of [`hand_over`] (bounds its memory).
const HAND_OVER_CHUNK: usize = 1 << 20;
/// Rounds of [`hand_over`] before a pair that never goes quiet is relayed instead.
const HAND_OVER_ROUNDS: usize = 64;

/// Moves, in userspace, what must precede the spliced stream: the client's
/// early bytes, then whatever either socket has already received, until
/// both receive queues are empty in the same round (so that no partly read
/// skb is left for the verdict: the kernel hands it whole skbs and would
/// send the part already read again). Memory is bounded by
/// [`HAND_OVER_CHUNK`] per direction.
/// Returns true when the pair cannot be spliced: a side's FIN was already
/// seen (such a socket can no longer enter a sockhash), or a side kept
/// sending for [`HAND_OVER_ROUNDS`] rounds. Such a pair is relayed instead.
async fn hand_over(
    shared: &Shared,
    flow: &KernelFlow,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut to_upstream: Vec<u8>,
) -> io::Result<bool> {
    let queued = shared.hand_over_queued.load(std::sync::atomic::Ordering::Relaxed);
    let mut to_client = Vec::new();
    for round in 0.. {
        let (mut from_client, mut from_upstream) = (Queue::Empty, Queue::Empty);
        if queued {
            from_client = read_queued(client, &mut to_upstream, HAND_OVER_CHUNK)?;
            from_upstream = read_queued(upstream, &mut to_client, HAND_OVER_CHUNK)?;
        }
        // Counted when taken on (like the verdict counts before it redirects).
        flow.add_user(to_upstream.len() as u64, to_client.len() as u64);
        upstream.write_all(&to_upstream).await?;
        client.write_all(&to_client).await?;
        to_upstream.clear();
        to_client.clear();
        match (from_client, from_upstream) {
            (Queue::Eof, _) | (_, Queue::Eof) => return Ok(true),
            (Queue::Empty, Queue::Empty) => return Ok(false),
            _ if round >= HAND_OVER_ROUNDS => {
                debug!("a side kept sending while the pair was being spliced");
                return Ok(true);
            }
            _ => {}
        }
    }
    unreachable!("the loop returns")
}

/// What [`read_queued`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    /// The receive queue is empty.
    Empty,
    /// End of stream.
    Eof,
    /// `limit` bytes were read and more may wait.
    More,
}

/// Appends what `sock` holds right now to `buf`, up to `limit` bytes,
/// without waiting (and without tokio's readiness cache).
fn read_queued(sock: &TcpStream, buf: &mut Vec<u8>, limit: usize) -> io::Result<Queue> {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, MsgFlags};
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < limit {
        let room = (limit - buf.len()).min(chunk.len());
        match recv(sock.as_raw_fd(), &mut chunk[..room], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Ok(Queue::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(Errno::EAGAIN) => return Ok(Queue::Empty),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Queue::More)
}

fn side_name(side: usize) -> &'static str {
    if side == CLIENT {
        "client"
    } else {
        "upstream"
    }
}

/// Bytes ever written to `sock`, acknowledged or still queued; valid while
/// only this process writes to it. `bytes_acked` is read on both sides of
/// `SIOCOUTQ` so that an ACK arriving in between cannot skew the sum.
fn written_total(sock: &StdTcpStream) -> io::Result<u64> {
    loop {
        let before = sys::tcp_info(sock)?.bytes_acked;
        let queued = sys::outq(sock)?;
        let after = sys::tcp_info(sock)?.bytes_acked;
        if before == after {
            return Ok(after + u64::from(queued));
        }
    }
}

/// Why a pair could not be spliced, and what is left to undo.
enum SpliceError {
    /// Nothing is in the maps (and no byte was redirected).
    Nothing(io::Error, [StdTcpStream; 2]),
    /// The upstream socket is spliced but the client socket could not be:
    /// the verdict may already have redirected bytes towards the client.
    Half(io::Error, Spliced),
}

/// Puts the pair into the maps (order: see the module docs of `kernel`),
/// then makes the verdict look at bytes that arrived meanwhile.
fn splice(
    shared: &Shared,
    socks: [StdTcpStream; 2],
    cookies: [u64; 2],
) -> Result<Spliced, SpliceError> {
    let written_before = match (
        written_total(&socks[CLIENT]),
        written_total(&socks[UPSTREAM]),
    ) {
        (Ok(c), Ok(u)) => [c, u],
        (Err(e), _) | (_, Err(e)) => return Err(SpliceError::Nothing(e, socks)),
    };
    let fds = [
        socks[CLIENT].as_raw_fd() as u32,
        socks[UPSTREAM].as_raw_fd() as u32,
    ];
    let fresh = MapFlow {
        bytes: 0,
        packets: 0,
        last_ns: monotonic_ns(),
    };
    if let Err(e) = shared.maps.enter(cookies, fds, fresh) {
        shared.maps.leave(cookies);
        return Err(SpliceError::Nothing(
            error_line("inserting into the BPF maps", &e),
            socks,
        ));
    }
    let client_in = shared.maps.splice_in(cookies[CLIENT], fds[CLIENT]);
    let spliced = Spliced {
        socks,
        cookies,
        written_before,
    };
    // Bytes that arrived since `hand_over` wait in the receive queues as
    // whole skbs; the verdict runs on the next data-ready event. Setting
    // SO_RCVLOWAT raises one now (tcp_set_rcvlowat calls tcp_data_ready).
    kick(&spliced.socks[UPSTREAM]);
    match client_in {
        Ok(()) => {
            kick(&spliced.socks[CLIENT]);
            Ok(spliced)
        }
        Err(e) => Err(SpliceError::Half(
            error_line("inserting into the BPF maps", &e),
            spliced,
        )),
    }
}

/// Lets the verdict run on bytes already queued on `sock` (see `splice`).
fn kick(sock: &StdTcpStream) {
    if let Err(e) = sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1) {
        debug!("SO_RCVLOWAT: {e}");
    }
}

/// Undoes a half splice without losing what was already redirected to the
/// client: stops the upstream's verdict, waits (a bounded time) until the
/// client has acknowledged those bytes, then leaves the maps.
async fn unsplice_half(
    shared: &Shared,
    flow: &KernelFlow,
    sp: &Spliced,
    cancel: &CancellationToken,
) {
    shared.maps.splice_out(sp.cookies[UPSTREAM]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut delay = DRAIN_POLL_MIN;
    while !matches!(drained(shared, sp, UPSTREAM, CLIENT), Ok(true) | Err(_))
        && tokio::time::Instant::now() < deadline
        && !cancel.is_cancelled()
    {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(DRAIN_POLL_MAX);
    }
    flow.freeze();
    shared.maps.leave(sp.cookies);
}

/// Waits for FIN/RST on both sockets and closes each direction without loss.
async fn watch(shared: &Shared, sp: &Spliced, cancel: &CancellationToken) -> End {
    let registration = match shared.hangups.register(&sp.socks) {
        Ok(r) => r,
        Err(e) => return End::Failed(e),
    };
    let waiter = &registration.waiter;
    // FIN received on socket i.
    let mut fin = [false; 2];
    // Write half of socket i shut (the direction towards i is done).
    let mut shut = [false; 2];
    let mut delay = DRAIN_POLL_MIN;
    loop {
        for side in [CLIENT, UPSTREAM] {
            let bits = waiter.take(side);
            if bits == 0 {
                continue;
            }
            tracing::trace!(
                tunnel = sp.cookies[CLIENT],
                "{} side: epoll events {bits:#x}",
                side_name(side)
            );
            if bits & EV_ERR != 0 {
                return End::Reset(side);
            }
            if bits & (EV_RDHUP | EV_HUP) != 0 && !fin[side] {
                debug!(
                    tunnel = sp.cookies[CLIENT],
                    "FIN from the {} side",
                    side_name(side)
                );
                fin[side] = true;
            }
        }
        for from in [CLIENT, UPSTREAM] {
            let to = 1 - from;
            if !fin[from] || shut[to] {
                continue;
            }
            match drained(shared, sp, from, to) {
                Ok(true) => {
                    if let Err(e) = sp.socks[to].shutdown(Shutdown::Write) {
                        if e.kind() != io::ErrorKind::NotConnected {
                            debug!(
                                tunnel = sp.cookies[CLIENT],
                                "shutdown of the {} side: {e}",
                                side_name(to)
                            );
                            return End::Reset(to);
                        }
                    }
                    shut[to] = true;
                    delay = DRAIN_POLL_MIN;
                }
                Ok(false) => {}
                Err(end) => return end,
            }
        }
        if shut[CLIENT] && shut[UPSTREAM] {
            return End::Clean;
        }
        let draining = (0..2).any(|from| fin[from] && !shut[1 - from]);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return End::Cancelled,
            _ = waiter.notify.notified() => {}
            _ = tokio::time::sleep(delay), if draining => delay = (delay * 2).min(DRAIN_POLL_MAX),
        }
    }
}

/// Whether every byte received on `from` has been acknowledged by `to`'s peer.
fn drained(shared: &Shared, sp: &Spliced, from: usize, to: usize) -> Result<bool, End> {
    // TCP_INFO takes `from`'s socket lock: any receive processing still
    // running on it (the FIN may be seen before the verdict ran on the
    // segment that carried it) finishes first, so the counter read next is final.
    sys::tcp_info(&sp.socks[from]).map_err(End::Failed)?;
    let counted = shared.maps.flow(sp.cookies[from]);
    let Some(counted) = counted else {
        return Err(End::Failed(io::Error::other(
            "flow entry vanished from the map",
        )));
    };
    let info = sys::tcp_info(&sp.socks[to]).map_err(End::Failed)?;
    if info.state == TCP_CLOSE {
        debug!(
            tunnel = sp.cookies[CLIENT],
            "the {} side is closed",
            side_name(to)
        );
        return Err(End::Reset(to));
    }
    let target = sp.written_before[to] + counted.bytes;
    if info.bytes_acked < target {
        return Ok(false);
    }
    Ok(sys::outq(&sp.socks[to]).map_err(End::Failed)? == 0)
}

/// Relays sockets that already left tokio's reactor (see [`relay`]).
async fn relay_std(flow: &KernelFlow, socks: [StdTcpStream; 2], cancel: CancellationToken) {
    let [client, upstream] = socks;
    match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
        (Ok(c), Ok(u)) => relay(flow, [c, u], cancel).await,
        (Err(e), _) | (_, Err(e)) => warn!(tunnel = flow.client, "cannot relay: {e}"),
    }
}

/// Moves the bytes through userspace, for a pair that could not be spliced
/// (the counters are then kept by `flow` alone).
async fn relay(flow: &KernelFlow, socks: [TcpStream; 2], cancel: CancellationToken) {
    let [client, upstream] = socks;
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut upstream_rd, mut upstream_wr) = upstream.into_split();
    let to_upstream = copy_counted(&mut client_rd, &mut upstream_wr, |n| flow.add_user(n, 0));
    let to_client = copy_counted(&mut upstream_rd, &mut client_wr, |n| flow.add_user(0, n));
    let failed = tokio::select! {
        biased;
        _ = cancel.cancelled() => false,
        both = async { tokio::try_join!(to_upstream, to_client) } => match both {
            Ok(_) => false,
            Err(e) => {
                debug!(tunnel = flow.client, "relay ended: {e}");
                true
            }
        },
    };
    if failed {
        // A reset (or error) on one side resets the other, as when spliced.
        // (`forget`: dropping a write half would send a FIN first.)
        for sock in [client_rd.as_ref(), upstream_rd.as_ref()] {
            let _ = sys::set_linger_zero(sock);
        }
        client_wr.forget();
        upstream_wr.forget();
    }
}

/// Copies until EOF, then shuts the writer's write half (half-close).
async fn copy_counted(
    reader: &mut (impl AsyncRead + Unpin),
    writer: &mut (impl AsyncWrite + Unpin),
    count: impl Fn(u64),
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buf[..n]).await?;
        count(n as u64);
    }
}
