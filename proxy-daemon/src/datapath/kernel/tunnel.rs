//! One tunnel's life on the kernel data path: relayed at first (under
//! `auto`), promoted into the maps once it proves to be interactive (bulk
//! stays on the relay's `splice(2)` lane, which serves it better), spliced with a
//! window that follows the peer, demoted back to the relay when a peer falls
//! behind, and closed without loss.
//!
//! Promotion. Under [`Policy::Auto`] the tunnel starts on the userspace relay
//! ([`relay`]); once [`PROMOTE`] fires (50 ms of traffic with no bulk) the
//! relay stops between chunks and hands the sockets back. [`Policy::Always`] splices at once. The
//! hand-over then moves, in userspace, whatever must precede the spliced
//! stream (the client's early bytes, bytes already queued) and the pair
//! enters the maps.
//!
//! Backpressure. A redirected skb waits on the peer's psock outside TCP's
//! memory accounting, so each direction has a window (see
//! `proxy_common::Splice`) that keeps what is in flight towards a socket —
//! its send queue (`SIOCOUTQ`) plus the redirected bytes that have not
//! reached it yet — within [`Shared::queue_cap`], the kernel's `tcp_wmem`
//! maximum: what the relay lets a send queue hold. The verdict asks for more
//! at half the window (`EV_LOW`); the task grants what the peer has room
//! for, or looks again later while it has none. Past the window (`EV_OVER`)
//! with no room, the direction gets a grace of up to [`GRACE_MAX`] from a
//! budget shared by the whole daemon ([`Shared::grace_budget`], 256 MiB), so
//! a bulk tunnel whose peer is only briefly behind catches up without a
//! demotion, while many stalled peers at once exhaust the budget and are
//! demoted at their window; past its grace, a peer is behind and the tunnel
//! is demoted.
//!
//! Demotion. The verdict keeps redirecting until the socket leaves `SPLICE`,
//! and taking it out while skbs arrive can lose one (the kernel drops an skb
//! whose verdict program went away mid-read), so demotion brakes first: both
//! sockets' receive buffers drop to the minimum, which closes TCP's window on
//! the senders (a zero window on loopback, one segment per round trip on a
//! path with a smaller MSS). Once neither socket has received a byte for
//! [`QUIET`] (or two round trips), both leave `SPLICE`, get receive buffers of
//! half the in-flight cap, and the relay takes over (the senders learn of the
//! open window at their next zero-window probe). Each relayed
//! direction starts only once every byte already redirected towards its
//! writer has entered that socket's send queue, so the order holds. Under
//! `kernel` the relay promotes the tunnel again (after [`REPROMOTE`]'s bytes,
//! doubling per demotion) when the peer keeps up; each stay in the maps is
//! an epoch with fresh entries. Under `auto` a demoted tunnel stays on the
//! relay: every demotion costs its senders a zero-window probe, and the
//! relay paces a sender to a slower peer without one. Nothing is ever passed
//! up through the psock: reading such bytes back was seen to deliver an skb
//! twice on this kernel (6.18).
//!
//! Close without loss while spliced. The verdict does not forward a FIN, and
//! the kernel frees whatever is still queued in a socket's psock when the
//! socket leaves the map or closes. So when socket A reports `EPOLLRDHUP`
//! (its peer sent FIN), the task waits until its partner B has had every
//! byte acknowledged that was ever written to it: `TCP_INFO.tcpi_bytes_acked(B)`
//! must reach what userspace wrote to B before splicing plus A's flow
//! counter, and `SIOCOUTQ(B)` must be 0. Only then is B's write half shut.
//! Each direction is handled alone, so half-close works both ways.
//!
//! While spliced the sockets are out of tokio's reactor: the shared
//! edge-triggered epoll set ([`super::hangup`]) asks only for
//! `EPOLLRDHUP`/`EPOLLHUP`/`EPOLLERR` and carries the verdict's events, so
//! userspace is not woken for every skb the kernel moves.
//!
//! Parking (an upgrade, `datapath::park`). On the relay the tunnel parks
//! like any relayed one; while spliced it stops watching and leaves the pair
//! in the maps with its FIN/shut state; the new process's task watches it
//! from there (`Start::Spliced`), first looking at both windows, since the
//! verdict may have asked for more meanwhile. A braking tunnel parks once on
//! the relay.
//!
//! If the pair cannot enter the maps (a side already closed its write half,
//! so the socket is no longer `ESTABLISHED`; or the maps are full) the tunnel
//! stays on the relay, with the same counters. A pair whose hand-over never
//! finds both queues empty (a sender pouring faster than its reader) goes to
//! the relay with the re-promotion rule, as after a demotion.

use std::io;
use std::net::{Shutdown, TcpStream as StdTcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt, SetSockOpt};
use proxy_common::{FlowStats as MapFlow, Splice, BROKEN};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::hangup::{Registration, EV_BROKEN, EV_LOW, EV_OVER};
use super::shared::{KernelFlow, Shared};
use crate::bpf::error_line;
use crate::datapath::park::{Park, Parked, ParkedState};
use crate::datapath::userspace::{park_relayed, relay, Promote, RelayEnd, RelayOptions};
use crate::datapath::{monotonic_ns, reset_on_close, FlowSource};
use crate::sys::{self, EV_ERR, EV_HUP, EV_RDHUP};

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
/// The smallest window worth granting; below it the task re-checks later.
const MIN_GRANT: u64 = 256 * 1024;
/// Most grace one direction takes from the daemon's budget (see `Grace`).
const GRACE_MAX: u64 = 64 << 20;
/// How long braked sockets must receive nothing before they leave `SPLICE`.
const QUIET: Duration = Duration::from_millis(10);
/// How often a braking tunnel looks at its counters and its peer's room.
const BRAKE_POLL: Duration = Duration::from_millis(2);

/// When `auto` promotes a relayed tunnel: once it has lived 50 ms and moves
/// a byte while neither direction is moving bulk (interactive: spliced, many
/// such tunnels answer more messages with less CPU each, and a blocking far
/// end answers sooner). Bulk stays on the relay, whose `splice(2)` lane moves
/// it as fast with less stalling than the sockhash, paced by TCP itself; short
/// request/response tunnels (most connections) end before 50 ms and never
/// pay for entering and leaving the maps. See docs/kernel-data-path.md for
/// the measurements behind this.
pub(super) const PROMOTE: Promote = Promote { bytes: u64::MAX, age: Some(Duration::from_millis(50)) };
/// When a demoted tunnel goes back into the maps (under `kernel`): its peer
/// kept up with the relay for this much more, doubled at each further
/// demotion of the tunnel up to [`REPROMOTE_MAX_DOUBLINGS`] times (16 MiB to
/// 1 GiB). A peer that stays behind then costs a zero-window stall per
/// gigabyte rather than per 16 MiB: one flow to the bench's epoll sink moved
/// 14.2 Gbit/s against 3.5 (medians of 6, two alternating rounds), eight 21.2
/// against 20.5.
pub(super) const REPROMOTE: Promote = Promote { bytes: 16 << 20, age: None };
const REPROMOTE_MAX_DOUBLINGS: u32 = 6;
/// Never promote again.
const STAY: Promote = Promote { bytes: u64::MAX, age: None };

/// When a tunnel enters the sockhash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// `data-path=auto`: start on the relay, promote once interactive.
    Auto,
    /// `data-path=kernel`: splice at once.
    Always,
}

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

impl Spliced {
    /// The same pair seen through duplicated descriptors, for the checks
    /// that run while tokio owns the sockets (the relay after a demotion).
    fn view(socks: &[TcpStream; 2], cookies: [u64; 2], written_before: [u64; 2]) -> io::Result<Spliced> {
        let dup = |s: &TcpStream| s.as_fd().try_clone_to_owned().map(StdTcpStream::from);
        Ok(Spliced { socks: [dup(&socks[0])?, dup(&socks[1])?], cookies, written_before })
    }
}

/// Why the watch ended.
enum End {
    /// Both directions closed by FIN.
    Clean,
    /// The idle reaper or shutdown cancelled the tunnel.
    Cancelled,
    /// This socket was reset (or failed); the other one gets a RST too.
    Reset(usize),
    /// The verdict had to drop bytes received on this socket (its `FLOWS`
    /// entry is [`BROKEN`]): the stream has a gap, so both get a RST.
    Broken(usize),
    /// A syscall failed.
    Failed(io::Error),
    /// A peer fell behind: the tunnel braked and moves to the relay.
    Demote,
    /// An upgrade asked the tunnel to park (it stays in the maps), with the
    /// FINs received and write halves shut so far.
    Parked { fin: [bool; 2], shut: [bool; 2] },
}

/// Where a tunnel task starts.
pub(super) enum Start {
    /// A new pair from the handshake, with the client's early bytes.
    Fresh { client: TcpStream, upstream: TcpStream, early: Vec<u8> },
    /// A relayed tunnel another process parked, with the directions that
    /// had ended (a half-closed tunnel stays on the relay).
    Relayed { socks: [TcpStream; 2], ended: [bool; 2] },
    /// A spliced tunnel another process parked (still in the maps): its
    /// sockets, cookies, the bytes written to each before the splice, and
    /// the FINs received and write halves shut so far.
    Spliced { socks: [StdTcpStream; 2], cookies: [u64; 2], written_before: [u64; 2], fin: [bool; 2], shut: [bool; 2] },
}

/// A tunnel's life (its connection's task runs it): owns the pair until both
/// sockets are closed, or until it parks (an upgrade; see `datapath::park`).
#[allow(clippy::manual_async_fn, reason = "an `async fn` stores its arguments twice (rustc #62958)")]
pub(super) fn run(
    shared: Arc<Shared>,
    flow: Arc<KernelFlow>,
    start: Start,
    cancel: CancellationToken,
    policy: Policy,
    park: Arc<Park>,
) -> impl std::future::Future<Output = ()> {
    // An async block, not an `async fn`: that would keep a second copy of
    // each argument in the future (rustc #62958), which every tunnel holds.
    async move {
        let (mut socks, mut early, mut resumed) = match start {
            Start::Fresh { client, upstream, early } => (Some([client, upstream]), Some(early), None),
            Start::Relayed { socks, ended } if ended.contains(&true) => {
                // Boxed, like every path a tunnel rarely takes: the future's size
                // is its largest state's, held by every tunnel for its whole life.
                return Box::pin(relay_to_end(&flow, socks, &cancel, &park, ended)).await;
            }
            Start::Relayed { socks, .. } => (Some(socks), None, None),
            Start::Spliced { socks, cookies, written_before, fin, shut } => {
                (None, None, Some((Spliced { socks, cookies, written_before }, fin, shut)))
            }
        };
        // The last epoch's pair while its bytes drain towards the relay's writers.
        let mut demoted: Option<(Spliced, u64)> = None;
        // A tunnel taken over while this process's verdict is not attached yet
        // relays until it is (then `kernel` splices it at the next promotion).
        let waits = !shared.attached.load(Ordering::Acquire) && socks.is_some();
        let mut rule = (policy == Policy::Auto || waits).then_some(PROMOTE);
        // Demotions so far (each makes the next promotion under `kernel` wait longer).
        let mut demotions = 0u32;
        loop {
            let mut closing = None;
            let (spliced, registration) = match resumed.take() {
                Some((sp, fin, shut)) => {
                    closing = Some((fin, shut));
                    (sp, None)
                }
                None => {
                    let Some(mut pair) = socks.take() else { return };
                    if let Some(rule) = rule {
                        let early = early.take().unwrap_or_default();
                        let opts = RelayOptions { promote: Some(rule), park: Some(&park), ..Default::default() };
                        let end = match &demoted {
                            Some((sp, _)) => {
                                let gates = [
                                    drain_gate(&shared, sp, UPSTREAM, CLIENT),
                                    drain_gate(&shared, sp, CLIENT, UPSTREAM),
                                ];
                                relay(&mut pair, early, &flow.user, &cancel, gates, opts).await
                            }
                            None => relay(&mut pair, early, &flow.user, &cancel, open_gates(), opts).await,
                        };
                        if let Some((sp, held)) = demoted.take() {
                            shared.grace_budget.fetch_add(held, Ordering::AcqRel);
                            // Closed, or both gates opened: every byte of the epoch left the psocks.
                            flow.freeze();
                            shared.maps.leave(sp.cookies);
                        }
                        let ended = match end {
                            RelayEnd::Closed => return,
                            RelayEnd::Stopped { ended } => ended,
                        };
                        if park.requested() {
                            return park_relayed(&park, pair, flow.snapshot(), ended);
                        }
                        if !shared.attached.load(Ordering::Acquire) {
                            // No verdict to splice with yet: relay on (another
                            // promotion period).
                            socks = Some(pair);
                            continue;
                        }
                        shared.promotions.fetch_add(1, Ordering::Relaxed);
                    }
                    let [client, upstream] = &mut pair;
                    // After the relay there is nothing to hand over: it stopped with both
                    // receive queues drained, and what arrived since are whole skbs.
                    let from_relay = rule.is_some();
                    let handed_over = if from_relay {
                        Ok(HandOver::Ready)
                    } else {
                        let early = early.take().unwrap_or_default();
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return,
                            // Boxed so its buffers' state does not stay in the long-lived task.
                            done = Box::pin(hand_over(&flow, client, upstream, early, shared.busy_hand_over)) => done,
                        }
                    };
                    match handed_over {
                        Ok(HandOver::Ready) => {}
                        Ok(HandOver::Closed) => {
                            debug!(tunnel = flow.id(), "cannot splice (a side closed); relaying in userspace");
                            return Box::pin(relay_to_end(&flow, pair, &cancel, &park, [false; 2])).await;
                        }
                        Ok(HandOver::Busy) => {
                            // The relay stops only with its readers drained (or
                            // unread), so it splices the pair at a later quiet moment.
                            debug!(tunnel = flow.id(), "a side never went quiet; relaying until it does");
                            rule = Some(REPROMOTE);
                            socks = Some(pair);
                            continue;
                        }
                        Err(e) => {
                            // A side failed (typically reset): the other one gets a RST
                            // too, as on the relay and while spliced, not a clean FIN.
                            debug!(tunnel = flow.id(), "handing over queued bytes: {e}; resetting both sides");
                            return reset_on_close(&pair);
                        }
                    }
                    let Some((spliced, registration)) = Box::pin(enter(&shared, &flow, pair, &cancel, &park)).await
                    else {
                        return;
                    };
                    (spliced, Some(registration))
                }
            };
            // Grace bytes the directions hold from the daemon's budget (past their
            // window, no room yet): given back when the peer has room again, or
            // once a demoted tunnel's psocks have drained (or it ended).
            let mut grace = Grace { shared: &shared, held: [0; 2] };
            let end = watch(&shared, &spliced, registration, &mut grace, &cancel, &park, closing).await;
            if let End::Demote = end {
                shared.demotions.fetch_add(1, Ordering::Relaxed);
                debug!(tunnel = flow.id(), counters = ?flow.snapshot(), "a peer fell behind: demoting to the relay");
                unsplice(&shared, &spliced, &[CLIENT, UPSTREAM]);
                for sock in &spliced.socks {
                    set_receive_buffer(sock, shared.queue_cap / 4);
                }
                // A gap the verdict left must not reach the relay, which
                // would carry on after it.
                if let Some(side) = broken_side(&shared, &spliced) {
                    flow.freeze();
                    shared.maps.leave(spliced.cookies);
                    return reset_broken(flow.id(), &spliced, side);
                }
                flow.spliced.store(false, Ordering::Relaxed);
                let Spliced { socks: std_socks, cookies, written_before } = spliced;
                let view = to_tokio(std_socks).and_then(|s| Ok((Spliced::view(&s, cookies, written_before)?, s)));
                match view {
                    Ok((view, tokio_socks)) => {
                        socks = Some(tokio_socks);
                        demoted = Some((view, grace.into_held()));
                    }
                    Err(e) => {
                        flow.freeze();
                        shared.maps.leave(cookies);
                        return warn!(tunnel = flow.id(), "cannot relay: {e}");
                    }
                }
                // `auto` leaves a tunnel whose peer fell behind on the relay, where
                // TCP paces the sender without stalls; `kernel` splices it again
                // once the peer keeps up.
                rule = Some(match policy {
                    Policy::Auto => STAY,
                    Policy::Always => {
                        let bytes = REPROMOTE.bytes << demotions.min(REPROMOTE_MAX_DOUBLINGS);
                        Promote { bytes, ..REPROMOTE }
                    }
                });
                demotions += 1;
                continue;
            }
            if let End::Parked { fin, shut } = end {
                // The pair stays in the maps; the new process watches it.
                drop(grace);
                debug!(tunnel = flow.id(), "parked while spliced");
                let (kernel_done, user) = (flow.done_epochs(), flow.user.snapshot());
                let Spliced { socks, cookies, written_before } = spliced;
                let state = ParkedState::Kernel {
                    cookies,
                    written_before,
                    kernel_done,
                    user_tx: user.tx,
                    user_rx: user.rx,
                    last_ns: flow.snapshot().last_activity_ns,
                    fin,
                    shut,
                };
                return park.put(Parked { socks, state });
            }
            // A tunnel that would close with FINs must not have a gap.
            unsplice(&shared, &spliced, &[CLIENT, UPSTREAM]);
            let end = match end {
                End::Clean | End::Cancelled | End::Failed(_) => broken_side(&shared, &spliced).map_or(end, End::Broken),
                end => end,
            };
            flow.freeze();
            shared.maps.leave(spliced.cookies);
            match end {
                End::Clean => debug!(tunnel = flow.id(), "closed by both sides"),
                End::Cancelled => debug!(tunnel = flow.id(), "cancelled"),
                End::Reset(side) => {
                    debug!(tunnel = flow.id(), "{} side reset; resetting the other", side_name(side));
                    reset_on_close(std::slice::from_ref(&spliced.socks[1 - side]));
                }
                End::Broken(side) => reset_broken(flow.id(), &spliced, side),
                End::Failed(e) => warn!(tunnel = flow.id(), "closing tunnel: {e}"),
                End::Demote | End::Parked { .. } => unreachable!("handled above"),
            }
            // Dropping `spliced` closes both sockets.
            return;
        }
    }
}

/// Takes the pair out of tokio's reactor and into the maps, watched by the
/// shared hangup set from before it enters them; on failure it is relayed to
/// its end here and `None` is returned.
///
/// The order matters: the verdict runs from the moment the pair is in the
/// maps, and a fast sender takes it past half its first window within
/// microseconds. The events it raises then are edge-triggered (one per
/// mark), so one raised before the tunnel listens is lost for good, and the
/// epoch runs with no window: found in the bench's one-flow run under
/// `kernel`, 2.8 GB in flight after a promotion (test:
/// `a_reader_that_falls_behind_bounds_what_is_in_flight`).
async fn enter(
    shared: &Shared,
    flow: &KernelFlow,
    socks: [TcpStream; 2],
    cancel: &CancellationToken,
    park: &Park,
) -> Option<(Spliced, Registration)> {
    let cookies = match flow.cookies(&socks) {
        Ok(cookies) => cookies,
        Err(e) => {
            debug!("cannot read the sockets' cookies ({e}); relaying in userspace");
            relay_to_end(flow, socks, cancel, park, [false; 2]).await;
            return None;
        }
    };
    let id = cookies[0];
    // Leave tokio's reactor: from now on the kernel moves the bytes.
    let [client, upstream] = socks;
    let socks = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => [c, u],
        (Err(e), _) | (_, Err(e)) => {
            warn!(tunnel = id, "cannot take the sockets out of the reactor: {e}");
            return None;
        }
    };
    for sock in &socks {
        tune_socket(sock, shared.queue_cap);
    }
    let registration = match shared.hangups.register(&socks, cookies) {
        Ok(r) => r,
        Err(e) => {
            debug!(tunnel = id, "cannot watch the pair ({e}); relaying in userspace");
            relay_std(flow, socks, cancel, park).await;
            return None;
        }
    };
    let failed = match splice(shared, socks, cookies) {
        Ok(spliced) => {
            flow.enter_maps();
            // (Fields are evaluated only when the line is logged: the counters
            // say what the relay moved before a promotion.)
            debug!(tunnel = id, upstream = cookies[1], counters = ?flow.snapshot(), "spliced");
            return Some((spliced, registration));
        }
        Err(failed) => failed,
    };
    // The relay carries the tunnel from here and closes its sockets: the
    // registration goes first, while they are still this tunnel's.
    drop(registration);
    match failed {
        SpliceError::Nothing(e, socks) => {
            debug!(tunnel = id, "cannot splice ({e}); relaying in userspace");
            relay_std(flow, socks, cancel, park).await;
            None
        }
        SpliceError::Half(e, spliced) => {
            debug!(tunnel = id, "cannot splice the client side ({e}); relaying in userspace");
            flow.enter_maps();
            match unsplice_half(shared, flow, &spliced, cancel).await {
                Some(side) => reset_broken(id, &spliced, side),
                None => relay_std(flow, spliced.socks, cancel, park).await,
            }
            None
        }
    }
}

/// A gate of the relay (see [`relay`]).
type Gate<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send + 'a>>;

/// Gates that are open at once (nothing to wait for before relaying).
fn open_gates() -> [Gate<'static>; 2] {
    [Box::pin(std::future::ready(Ok(()))), Box::pin(std::future::ready(Ok(())))]
}

/// Opens when every byte the verdict redirected from `from` has entered
/// `to`'s send queue, so that the relay's writes to `to` come after them;
/// `to`'s send buffer then goes back to what the relay lets it hold.
fn drain_gate<'a>(shared: &'a Shared, sp: &'a Spliced, from: usize, to: usize) -> Gate<'a> {
    Box::pin(async move {
        let mut delay = DRAIN_POLL_MIN;
        loop {
            let counted = shared.maps.flow(sp.cookies[from]).ok_or_else(|| io::Error::other("flow entry vanished"))?;
            if written_total(&sp.socks[to])?.saturating_sub(sp.written_before[to]) >= counted.bytes {
                set_send_buffer(&sp.socks[to], shared.queue_cap / 2);
                return Ok(());
            }
            if sys::tcp_info(&sp.socks[to])?.state == TCP_CLOSE {
                return Err(io::Error::from(io::ErrorKind::ConnectionReset));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(DRAIN_POLL_MAX);
        }
    })
}

/// Relays `socks` until the tunnel ends (the sockets close on return) or
/// parks; `ended`: directions that already ended (a resumed tunnel).
async fn relay_to_end(
    flow: &KernelFlow,
    mut socks: [TcpStream; 2],
    cancel: &CancellationToken,
    park: &Park,
    ended: [bool; 2],
) {
    let opts = RelayOptions { park: Some(park), ended, ..Default::default() };
    if let RelayEnd::Stopped { ended } = relay(&mut socks, Vec::new(), &flow.user, cancel, open_gates(), opts).await {
        park_relayed(park, socks, flow.snapshot(), ended);
    }
}

/// Relays sockets that already left tokio's reactor.
async fn relay_std(flow: &KernelFlow, socks: [StdTcpStream; 2], cancel: &CancellationToken, park: &Park) {
    match to_tokio(socks) {
        Ok(socks) => relay_to_end(flow, socks, cancel, park, [false; 2]).await,
        Err(e) => warn!(tunnel = flow.id(), "cannot relay: {e}"),
    }
}

fn to_tokio([client, upstream]: [StdTcpStream; 2]) -> io::Result<[TcpStream; 2]> {
    Ok([TcpStream::from_std(client)?, TcpStream::from_std(upstream)?])
}

/// Bytes moved per direction per round of [`hand_over`] (bounds its memory).
const HAND_OVER_CHUNK: usize = 1 << 20;
/// Rounds of [`hand_over`] before a pair that never goes quiet goes to the relay.
const HAND_OVER_ROUNDS: usize = 64;

/// How [`hand_over`] ended.
enum HandOver {
    /// Both receive queues were empty in the same round: the pair may enter the maps.
    Ready,
    /// A side's FIN was already seen: such a socket can no longer enter a
    /// sockhash, so the pair is relayed to its end.
    Closed,
    /// A side kept sending for [`HAND_OVER_ROUNDS`] rounds: the pair is
    /// relayed, and spliced once the relay has moved [`REPROMOTE`]'s bytes and
    /// finds its readers drained (as after a demotion: once the reader keeps up).
    Busy,
}

/// Moves, in userspace, what must precede the spliced stream: the client's
/// early bytes, then whatever either socket has already received, until
/// both receive queues are empty in the same round (so that no partly read
/// skb is left for the verdict: the kernel hands it whole skbs and would
/// send the part already read again). Memory is bounded by
/// [`HAND_OVER_CHUNK`] per direction.
/// `busy`: the test fault that ends it as [`HandOver::Busy`] after its first round.
async fn hand_over(
    flow: &KernelFlow,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut to_upstream: Vec<u8>,
    busy: bool,
) -> io::Result<HandOver> {
    use tokio::io::AsyncWriteExt;
    let mut to_client = Vec::new();
    for round in 0.. {
        let from_client = read_queued(client, &mut to_upstream, HAND_OVER_CHUNK)?;
        let from_upstream = read_queued(upstream, &mut to_client, HAND_OVER_CHUNK)?;
        // Counted when taken on (like the verdict counts before it redirects).
        flow.add_user(to_upstream.len() as u64, to_client.len() as u64);
        upstream.write_all(&to_upstream).await?;
        client.write_all(&to_client).await?;
        to_upstream.clear();
        to_client.clear();
        match (from_client, from_upstream) {
            (Queue::Eof, _) | (_, Queue::Eof) => return Ok(HandOver::Closed),
            _ if busy => return Ok(HandOver::Busy),
            (Queue::Empty, Queue::Empty) => return Ok(HandOver::Ready),
            _ if round >= HAND_OVER_ROUNDS => return Ok(HandOver::Busy),
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
fn written_total(sock: &impl AsFd) -> io::Result<u64> {
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

/// The window for bytes received on `from`, given what is in flight
/// towards its peer `to`: `None` while the peer has no room worth granting.
fn window(cap: u64, sp: &Spliced, from: usize, counted: &MapFlow) -> io::Result<Option<Splice>> {
    let to = 1 - from;
    let written = written_total(&sp.socks[to])?.saturating_sub(sp.written_before[to]);
    let backlog = counted.bytes.saturating_sub(written);
    let in_flight = u64::from(sys::outq(&sp.socks[to])?) + backlog;
    let room = cap.saturating_sub(in_flight);
    Ok((room >= MIN_GRANT.min(cap)).then(|| Splice {
        peer: sp.cookies[to],
        limit: counted.bytes + room,
        low: counted.bytes + room / 2,
    }))
}

/// Puts the pair into the maps (order: see the module docs of `kernel`),
/// then makes the verdict look at bytes that arrived meanwhile.
fn splice(shared: &Shared, socks: [StdTcpStream; 2], cookies: [u64; 2]) -> Result<Spliced, SpliceError> {
    let written_before = match (written_total(&socks[CLIENT]), written_total(&socks[UPSTREAM])) {
        (Ok(c), Ok(u)) => [c, u],
        (Err(e), _) | (_, Err(e)) => return Err(SpliceError::Nothing(e, socks)),
    };
    let fds = [socks[CLIENT].as_raw_fd() as u32, socks[UPSTREAM].as_raw_fd() as u32];
    let spliced = Spliced { socks, cookies, written_before };
    // `asked`/`over` start at a mark no window uses, so the first crossing of
    // any mark (0 included: a peer with no room at all) raises its event.
    let fresh = MapFlow { last_ns: monotonic_ns(), asked: u64::MAX, over: u64::MAX, ..MapFlow::default() };
    let windows = [CLIENT, UPSTREAM].map(|from| {
        window(shared.queue_cap, &spliced, from, &fresh)
            .ok()
            .flatten()
            .unwrap_or(Splice { peer: cookies[1 - from], ..Splice::default() })
    });
    if let Err(e) = shared.maps.enter(cookies, fds, windows, fresh) {
        shared.maps.leave(cookies);
        return Err(SpliceError::Nothing(error_line("inserting into the BPF maps", &e), spliced.socks));
    }
    let client_in = shared.maps.splice_in(cookies[CLIENT], fds[CLIENT]);
    // Bytes that arrived since `hand_over` wait in the receive queues as
    // whole skbs; the verdict runs on the next data-ready event. Setting
    // SO_RCVLOWAT raises one now (tcp_set_rcvlowat calls tcp_data_ready).
    kick(&spliced.socks[UPSTREAM]);
    match client_in {
        Ok(()) => {
            kick(&spliced.socks[CLIENT]);
            Ok(spliced)
        }
        Err(e) => Err(SpliceError::Half(error_line("inserting into the BPF maps", &e), spliced)),
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
/// client has acknowledged those bytes, then leaves the maps. Returns the
/// side whose stream the verdict broke (the pair must not be relayed on).
async fn unsplice_half(shared: &Shared, flow: &KernelFlow, sp: &Spliced, cancel: &CancellationToken) -> Option<usize> {
    unsplice(shared, sp, &[UPSTREAM]);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut delay = DRAIN_POLL_MIN;
    while !matches!(drained(shared, sp, UPSTREAM, CLIENT), Ok(true) | Err(_))
        && Instant::now() < deadline
        && !cancel.is_cancelled()
    {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(DRAIN_POLL_MAX);
    }
    let broken = broken_side(shared, sp);
    flow.freeze();
    shared.maps.leave(sp.cookies);
    broken
}

/// Waits for FIN/RST on both sockets, keeps each direction's window
/// following its peer, and closes each direction without loss. A pair that
/// entered the maps here comes with its `registration` (see [`enter`]); one
/// taken over from another process registers now and looks at both windows
/// first.
async fn watch(
    shared: &Shared,
    sp: &Spliced,
    registration: Option<Registration>,
    grace: &mut Grace<'_>,
    cancel: &CancellationToken,
    park: &Park,
    closing: Option<([bool; 2], [bool; 2])>,
) -> End {
    let registration = match registration.map_or_else(|| shared.hangups.register(&sp.socks, sp.cookies), Ok) {
        Ok(r) => r,
        Err(e) => return End::Failed(e),
    };
    let waiter = &registration.waiter;
    // FIN received on socket i.
    let mut fin = [false; 2];
    // Write half of socket i shut (the direction towards i is done).
    let mut shut = [false; 2];
    // When to look again at the room of a direction whose peer had none.
    let mut recheck: [Option<(Instant, Duration)>; 2] = [None; 2];
    // Set while the tunnel brakes before its demotion.
    let mut brake: Option<Brake> = None;
    // A tunnel taken over from another process (`closing`: its FINs and
    // shut write halves so far) may have asked for more already: both
    // directions' windows are looked at once at the start.
    if let Some((f, s)) = closing {
        (fin, shut) = (f, s);
        recheck = [Some((Instant::now(), DRAIN_POLL_MIN)); 2];
    }
    let mut delay = DRAIN_POLL_MIN;
    loop {
        let now = Instant::now();
        if let Some(b) = &mut brake {
            match b.check(shared, sp, now) {
                Ok(false) => {}
                Ok(true) => return End::Demote,
                Err(end) => return end,
            }
        }
        for side in [CLIENT, UPSTREAM] {
            let bits = waiter.take(side);
            let due = recheck[side].is_some_and(|(at, _)| at <= now);
            if bits == 0 && !due {
                continue;
            }
            tracing::trace!(tunnel = sp.cookies[CLIENT], "{} side: events {bits:#x}", side_name(side));
            if bits & EV_BROKEN != 0 {
                return End::Broken(side);
            }
            if bits & EV_ERR != 0 {
                return End::Reset(side);
            }
            if bits & (EV_RDHUP | EV_HUP) != 0 && !fin[side] {
                debug!(tunnel = sp.cookies[CLIENT], "FIN from the {} side", side_name(side));
                fin[side] = true;
            }
            if (bits & (EV_LOW | EV_OVER) != 0 || due) && !fin[side] && brake.is_none() {
                let no_room = |recheck: &mut Option<(Instant, Duration)>| {
                    let wait = recheck.map_or(DRAIN_POLL_MIN, |(_, d)| (d * 2).min(DRAIN_POLL_MAX));
                    *recheck = Some((now + wait, wait));
                };
                match grant(shared, sp, side) {
                    Ok(true) => {
                        recheck[side] = None;
                        grace.give_back(side);
                    }
                    Ok(false) => no_room(&mut recheck[side]),
                    Err(End::Demote) if grace.held[side] == 0 && grace.take(side) => {
                        // Past the window with no room: a grace from the
                        // daemon's budget lets a peer that is only briefly
                        // behind catch up without a demotion.
                        if let Err(end) = extend(shared, sp, side, grace.held[side]) {
                            return end;
                        }
                        no_room(&mut recheck[side]);
                    }
                    Err(End::Demote) => {
                        debug!(
                            tunnel = sp.cookies[CLIENT],
                            "the {} side's peer is behind: braking",
                            side_name(1 - side)
                        );
                        recheck[side] = None;
                        match Brake::apply(shared, sp, now) {
                            Ok(b) => brake = Some(b),
                            Err(end) => return end,
                        }
                    }
                    Err(end) => return end,
                }
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
                            debug!(tunnel = sp.cookies[CLIENT], "shutdown of the {} side: {e}", side_name(to));
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
        let braking = brake.as_ref().map(|_| now + BRAKE_POLL);
        let next_check = recheck.iter().flatten().map(|&(at, _)| at).chain(braking).min();
        // A braking tunnel parks once it is on the relay.
        let parkable = brake.is_none();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return End::Cancelled,
            _ = park.wait(), if parkable => return End::Parked { fin, shut },
            _ = waiter.notify.notified() => {}
            _ = tokio::time::sleep(delay), if draining => delay = (delay * 2).min(DRAIN_POLL_MAX),
            _ = tokio::time::sleep_until(next_check.unwrap_or(now)), if next_check.is_some() => {}
        }
    }
}

/// A tunnel on its way to the relay (see the module docs).
struct Brake {
    /// `FLOWS` bytes of both sides when last seen, and when they last moved.
    seen: [u64; 2],
    moved: Instant,
    /// How long both must stay still.
    quiet: Duration,
}

impl Brake {
    /// Closes both receive windows.
    fn apply(shared: &Shared, sp: &Spliced, now: Instant) -> Result<Brake, End> {
        let mut rtt = 0;
        for sock in &sp.socks {
            set_receive_buffer(sock, 0);
            rtt = rtt.max(sys::tcp_info(sock).map_err(End::Failed)?.rtt_us);
        }
        let seen = Self::counted(shared, sp)?;
        let quiet = QUIET.max(Duration::from_micros(u64::from(rtt) * 2));
        Ok(Brake { seen, moved: now, quiet })
    }

    fn counted(shared: &Shared, sp: &Spliced) -> Result<[u64; 2], End> {
        Ok([counted(shared, sp, CLIENT)?.bytes, counted(shared, sp, UPSTREAM)?.bytes])
    }

    /// Whether nothing arrived for long enough: the sockets can leave `SPLICE`.
    fn check(&mut self, shared: &Shared, sp: &Spliced, now: Instant) -> Result<bool, End> {
        let seen = Self::counted(shared, sp)?;
        if seen != self.seen {
            self.seen = seen;
            self.moved = now;
        }
        Ok(now.duration_since(self.moved) >= self.quiet)
    }
}

/// Grace bytes taken from [`Shared::grace_budget`] by one tunnel's directions.
struct Grace<'a> {
    shared: &'a Shared,
    held: [u64; 2],
}

impl Grace<'_> {
    /// Takes up to [`GRACE_MAX`] from the budget for `side`; false when the
    /// budget has less than [`MIN_GRANT`] left (many peers are behind at once).
    fn take(&mut self, side: usize) -> bool {
        let budget = &self.shared.grace_budget;
        let got = budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= MIN_GRANT).then(|| left - left.min(GRACE_MAX))
            })
            .map_or(0, |left| left.min(GRACE_MAX));
        self.held[side] = got;
        got > 0
    }

    /// What is held, kept out of the budget past this `Grace` (a demoted
    /// tunnel gives it back once its psocks have drained).
    fn into_held(mut self) -> u64 {
        std::mem::take(&mut self.held).iter().sum()
    }

    fn give_back(&mut self, side: usize) {
        self.shared.grace_budget.fetch_add(std::mem::take(&mut self.held[side]), Ordering::AcqRel);
    }
}

impl Drop for Grace<'_> {
    fn drop(&mut self) {
        self.give_back(CLIENT);
        self.give_back(UPSTREAM);
    }
}

/// The grace window of the direction from `from`: `grace` bytes past what was
/// redirected so far, with a low mark halfway there to look again.
fn extend(shared: &Shared, sp: &Spliced, from: usize, grace: u64) -> Result<(), End> {
    let counted = counted(shared, sp, from)?;
    let w = Splice { peer: sp.cookies[1 - from], limit: counted.bytes + grace, low: counted.bytes + grace / 2 };
    shared.maps.set_splice(sp.cookies[from], &w).map_err(End::Failed)
}

/// Raises the window of the direction from `from` when its peer has room;
/// false when it has none: the caller looks again later, or demotes the
/// tunnel once the window is used up.
fn grant(shared: &Shared, sp: &Spliced, from: usize) -> Result<bool, End> {
    let counted = counted(shared, sp, from)?;
    match window(shared.queue_cap, sp, from, &counted).map_err(End::Failed)? {
        Some(w) => {
            shared.maps.set_splice(sp.cookies[from], &w).map_err(End::Failed)?;
            Ok(true)
        }
        // No room, and the verdict is past what was granted: the peer is behind.
        None if shared.maps.splice_of(sp.cookies[from]).is_none_or(|w| counted.bytes >= w.limit) => Err(End::Demote),
        None => Ok(false),
    }
}

/// What the verdict counted for the bytes received on `side`, or why the
/// tunnel must end: the entry is gone, or marked [`BROKEN`] (the verdict
/// dropped bytes: whether or not its event reached the ring, the FIN is
/// never passed on after a gap, nor the tunnel relayed on).
fn counted(shared: &Shared, sp: &Spliced, side: usize) -> Result<MapFlow, End> {
    match shared.maps.flow(sp.cookies[side]) {
        Some(f) if f.over == BROKEN => Err(End::Broken(side)),
        Some(f) => Ok(f),
        None => Err(End::Failed(io::Error::other("flow entry vanished from the map"))),
    }
}

/// Takes the `sides`' sockets from under the verdict. TCP_INFO takes each
/// socket's lock, so a verdict run still in progress finishes first: the
/// `FLOWS` entries read next are final.
fn unsplice(shared: &Shared, sp: &Spliced, sides: &[usize]) {
    for &side in sides {
        shared.maps.splice_out(sp.cookies[side]);
        let _ = sys::tcp_info(&sp.socks[side]);
    }
}

/// The side whose stream the verdict broke (see [`counted`]), if any.
fn broken_side(shared: &Shared, sp: &Spliced) -> Option<usize> {
    [CLIENT, UPSTREAM].into_iter().find(|&side| shared.maps.flow(sp.cookies[side]).is_some_and(|f| f.over == BROKEN))
}

/// Resets both sockets of a pair whose stream from `side` has a gap (they
/// close when the caller drops them).
fn reset_broken(id: u64, sp: &Spliced, side: usize) {
    debug!(tunnel = id, "the verdict dropped bytes from the {} side (a gap): resetting both sides", side_name(side));
    reset_on_close(&sp.socks);
}

/// Whether every byte received on `from` has been acknowledged by `to`'s peer.
fn drained(shared: &Shared, sp: &Spliced, from: usize, to: usize) -> Result<bool, End> {
    // TCP_INFO takes `from`'s socket lock: any receive processing still
    // running on it (the FIN may be seen before the verdict ran on the
    // segment that carried it) finishes first, so the counter read next is final.
    sys::tcp_info(&sp.socks[from]).map_err(End::Failed)?;
    let counted = counted(shared, sp, from)?;
    let info = sys::tcp_info(&sp.socks[to]).map_err(End::Failed)?;
    if info.state == TCP_CLOSE {
        debug!(tunnel = sp.cookies[CLIENT], "the {} side is closed", side_name(to));
        return Err(End::Reset(to));
    }
    let target = sp.written_before[to] + counted.bytes;
    if info.bytes_acked < target {
        return Ok(false);
    }
    Ok(sys::outq(&sp.socks[to]).map_err(End::Failed)? == 0)
}

/// Socket options for a spliced socket; failures only cost performance.
///
/// The send buffer is forced to twice the in-flight cap (`SO_SNDBUFFORCE`
/// doubles the value, for the kernel's bookkeeping): the window already keeps
/// a send queue within the cap, and a psock that finds its peer's send
/// buffer full backs off for a whole jiffy, which is what made small buffers
/// slow. The receive buffer is left to autotuning: redirected skbs leave it
/// at once, and held ones must close TCP's window at the usual size.
fn tune_socket(sock: &StdTcpStream, cap: u64) {
    if let Err(e) = sock.set_nodelay(true) {
        debug!("TCP_NODELAY: {e}");
    }
    set_send_buffer(sock, cap);
}

/// Sets `SO_SNDBUF` (the kernel doubles `bytes`).
fn set_send_buffer(sock: &StdTcpStream, bytes: u64) {
    set_buffer(sock, sockopt::SndBufForce, sockopt::SndBuf, bytes);
}

/// Sets `SO_RCVBUF` (the kernel doubles `bytes`; 0 gives its minimum).
fn set_receive_buffer(sock: &StdTcpStream, bytes: u64) {
    set_buffer(sock, sockopt::RcvBufForce, sockopt::RcvBuf, bytes);
}

fn set_buffer<F, P>(sock: &StdTcpStream, force: F, plain: P, bytes: u64)
where
    F: SetSockOpt<Val = usize>,
    P: SetSockOpt<Val = usize>,
{
    let bytes = bytes.min(i32::MAX as u64 / 2) as usize;
    // The FORCE variant passes net.core.[rw]mem_max (needs CAP_NET_ADMIN,
    // which loading BPF programs needs too); fall back to the capped one.
    if setsockopt(sock, force, &bytes).is_err() {
        if let Err(e) = setsockopt(sock, plain, &bytes) {
            debug!("socket buffer {bytes}: {e}");
        }
    }
}
