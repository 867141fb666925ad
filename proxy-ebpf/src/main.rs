//! proxyd's kernel side: the `sk_skb` stream verdict that splices a socket pair.
//!
//! Every skb received on a socket in [`SPLICE`] is counted into that socket's
//! [`FLOWS`] entry and, within the window userspace granted in [`PEERS`],
//! redirected to the egress of its peer (looked up in [`SOCKS`]).
//! Userspace fills the maps in this order: `PEERS`, `FLOWS`, `SOCKS` (both
//! sockets), then `SPLICE` (both sockets), and removes in the reverse order, so
//! the redirect target is always present while a socket is spliced.
//!
//! Backpressure. A redirect queues the skb on the peer's psock with no limit
//! and outside TCP's memory accounting, so userspace grants each socket a
//! window ([`Splice`]) and the program calls it through [`EVENTS`]: at the
//! window's low mark ([`EVENT_LOW`]: userspace grants more while the peer
//! keeps up) and past its limit ([`EVENT_OVER`]: userspace takes the socket
//! off the splice, so its bytes wait in its own, accounted, receive queue).
//! Each mark is told once, and counts as told only once its event is in the
//! ring; userspace listens before the pair enters the maps.
//! A lookup miss passes the skb up to the socket itself (`SK_PASS`): never
//! drop data. Only empty skbs are dropped (a bare FIN, or one whose every byte
//! the socket had delivered already), and those of a stream with a gap (below).
//!
//! Bytes already delivered. The kernel hands the verdict whole skbs and, after a
//! redirect, advances the socket's `copied_seq` by the skb's whole length; an
//! skb that starts before `copied_seq` (TCP queues a retransmission that
//! overlaps received bytes whole, and a stress test found whole delivered skbs
//! queued again after a promotion) would reach the peer a second time. So
//! the program cuts off whatever lies before the socket's `copied_seq` first
//! ([`already_read`]) and drops an skb that held nothing else once it is empty
//! (the kernel does not move `copied_seq` for an empty one); the offset of that
//! field in the kernel's `struct tcp_sock` comes from the kernel's BTF
//! ([`TCP_COPIED_SEQ`]). An skb it cannot cut must be dropped whole, a gap:
//! the socket's `FLOWS` entry is marked [`BROKEN`] and userspace told
//! ([`EVENT_BROKEN`]); from then on the socket's skbs are dropped and the
//! event told again, and userspace resets the tunnel on the event or, should
//! every event have found the ring full, when it next reads the entry.
//!
//! The same object carries the XDP prefilter ([`xdp`]), loaded separately.
#![no_std]
#![no_main]

mod xdp;

use aya_ebpf::{
    bindings::{sk_action, BPF_F_NO_PREALLOC},
    btf_maps::HashMap,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skc_to_tcp_sock},
    macros::{btf_map, map, stream_verdict},
    maps::{PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
    EbpfContext as _,
};
use aya_log_ebpf::debug;
use proxy_common::{
    Event, FlowStats, Splice, BROKEN, CUT_BYTES, CUT_SKBS, EVENTS_BYTES, EVENT_BROKEN, EVENT_LOW, EVENT_OVER,
    FAULT_RING_FULL, MAX_SOCKETS,
};

/// Redirect targets (program-less), keyed by socket cookie.
#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS as u32, 0);

/// Spliced sockets (the verdict is attached here), keyed by socket cookie.
#[map(name = "SPLICE")]
static SPLICE: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS as u32, 0);

/// Socket cookie -> its peer and window (see [`Splice`]); written by userspace.
#[btf_map(name = "PEERS")]
static PEERS: HashMap<u64, Splice, MAX_SOCKETS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Socket cookie -> what was received on it (see [`FlowStats`]); written here.
#[btf_map(name = "FLOWS")]
static FLOWS: HashMap<u64, FlowStats, MAX_SOCKETS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Retransmitted heads cut off (see the module docs): skbs and bytes.
#[map(name = "CUTS")]
static CUTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Events for userspace: a window running low, a window overrun.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Byte offset of `copied_seq` in the running kernel's `struct tcp_sock`,
/// set by the loader from `/sys/kernel/btf/vmlinux` (read-only data: the
/// verifier sees a constant). 0 (never a valid offset) disables the check.
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ: u32 = 0;

/// Fault-injection bits (`FAULT_*`), set by the loader for tests only; 0 (the
/// verifier sees the constant and prunes the branch) in service.
#[unsafe(no_mangle)]
static FAULTS: u32 = 0;

/// Most bytes cut off one skb besides [`trim`]'s own bound; lowered by the
/// loader for tests only (a failing cut in service needs 640 KiB of overlap).
#[unsafe(no_mangle)]
static CUT_MAX: u32 = u32::MAX;

/// Most bytes one call of `bpf_skb_adjust_room` removes from an `sk_skb`.
const TRIM_STEP: u32 = 0xfff;
/// Most calls [`trim`] makes: 160 steps, 640 KiB. An overlap is at most one
/// skb, but TCP coalesces the skbs of its receive queue into one of up to
/// `MAX_SKB_FRAGS` fragments of up to 32 KiB each (skbs of 327,415 bytes
/// overlapping by up to 205 KiB were seen here on loopback), far beyond 64 KiB.
const TRIM_STEPS: usize = 160;

#[stream_verdict]
pub fn proxyd_verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN: redirecting it would make the peer's psock backlog send
        // 0 bytes, which it takes for a broken pipe (EPIPE on the peer socket,
        // transmission stopped). The FIN itself is seen by userspace through
        // the socket state, and an empty skb carries nothing to lose.
        return Ok(sk_action::SK_DROP);
    }
    // SAFETY: the helper only reads the skb's socket; `as_ptr` is this
    // program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The socket's counters, looked up once: the pointer stays valid for this
    // program run (RCU). Only this socket's receive path writes the entry, and
    // it runs serialized under the socket lock, so the read-modify-writes
    // below do not race another writer; userspace only reads.
    let flow = FLOWS.get_ptr_mut(cookie);
    // SAFETY: see `flow`; FLOWS values are plain integers.
    if flow.is_some_and(|f| unsafe { (*f).over } == BROKEN) {
        // Past a gap: nothing more reaches the peer, and userspace is told
        // again (the first event may have found the ring full).
        tell_broken(cookie);
        return Err(sk_action::SK_DROP);
    }
    let old = already_read(ctx).min(len);
    if old > 0 {
        if old > u64::from(read_only(&CUT_MAX)) || trim(ctx, old as u32).is_err() {
            // The skb must go (its head would repeat) and its new bytes with
            // it: the stream has a gap. The mark stops every later skb and
            // makes userspace reset the tunnel, with or without the event.
            debug!(ctx, "proxyd: socket {} cannot cut {} of {} bytes; broken", cookie, old, len);
            if let Some(f) = flow {
                // SAFETY: see `flow`.
                unsafe { (*f).over = BROKEN };
            }
            tell_broken(cookie);
            return Err(sk_action::SK_DROP);
        }
        count_cut(old);
        debug!(ctx, "proxyd: socket {} received {} bytes again, cut off", cookie, old);
        if old == len {
            // Nothing new (the socket had delivered all of it): dropped
            // empty, so the kernel does not move `copied_seq` for it.
            return Ok(sk_action::SK_DROP);
        }
    }
    let len = len - old;
    // SAFETY: PEERS values are plain integers; userspace replaces whole
    // elements (RCU), so the copy taken here is one consistent version.
    let Some(&splice) = (unsafe { PEERS.get(cookie) }) else {
        debug!(ctx, "proxyd: no peer for socket {}, passing", cookie);
        return Err(sk_action::SK_PASS);
    };
    if SOCKS.redirect_skb(ctx, splice.peer, 0) != sk_action::SK_PASS as i64 {
        // Expected only while a pair is being torn down.
        debug!(ctx, "proxyd: peer {} of socket {} not in the sockhash, passing", splice.peer, cookie);
        return Err(sk_action::SK_PASS);
    }
    if let Some(flow) = flow {
        // SAFETY: see `flow`.
        unsafe {
            (*flow).bytes += len;
            (*flow).packets += 1;
            (*flow).last_ns = bpf_ktime_get_ns();
            // A mark counts as told only once its event is in the ring: with
            // the ring full, the next skb tells again (one event per mark).
            if (*flow).bytes >= splice.low && (*flow).asked != splice.low && tell(cookie, EVENT_LOW) {
                (*flow).asked = splice.low;
            }
            if (*flow).bytes > splice.limit && (*flow).over != splice.limit && tell(cookie, EVENT_OVER) {
                (*flow).over = splice.limit;
            }
        }
    }
    Ok(sk_action::SK_PASS)
}

/// How many bytes at the head of this skb the socket has already delivered
/// (a retransmission that overlaps what was received): `copied_seq` minus
/// the skb's first sequence number (`TCP_SKB_CB(skb)->seq`, which an
/// `sk_skb` program reads as `cb[0]`), when positive.
fn already_read(ctx: &SkBuffContext) -> u64 {
    // SAFETY: a read of this program's read-only data.
    let offset = unsafe { core::ptr::read_volatile(&TCP_COPIED_SEQ) };
    if offset == 0 {
        return 0;
    }
    // SAFETY: `skb` is this program's context; the verifier types `sk` as a
    // socket pointer that may be null, checked by the helper's own null check.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: the helper checks that `sk` is a TCP socket (null otherwise).
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return 0;
    }
    // SAFETY: `offset` is a `u32` field of `struct tcp_sock` (from the
    // kernel's BTF); the verifier checks the access against that BTF.
    let copied = unsafe { core::ptr::read_volatile(tp.cast::<u8>().add(offset as usize).cast::<u32>()) };
    let seq = ctx.skb.cb()[0];
    let ahead = copied.wrapping_sub(seq) as i32;
    if ahead > 0 {
        ahead as u64
    } else {
        0
    }
}

/// Adds one cut of `bytes` to [`CUTS`].
fn count_cut(bytes: u64) {
    for (index, add) in [(CUT_SKBS, 1), (CUT_BYTES, bytes)] {
        if let Some(n) = CUTS.get_ptr_mut(index) {
            // SAFETY: this CPU's slot, valid for the program run. (A run in
            // process context preempted by one in softirq could lose an
            // increment: a statistic, so no atomic.)
            unsafe { *n += add };
        }
    }
}

/// Removes `bytes` from the head of the skb, `TRIM_STEP` at a time, at most
/// [`TRIM_STEPS`] times (bounded for the verifier). More fails, and the
/// tunnel is reset.
fn trim(ctx: &SkBuffContext, mut bytes: u32) -> Result<(), i64> {
    for _ in 0..TRIM_STEPS {
        if bytes == 0 {
            return Ok(());
        }
        let step = bytes.min(TRIM_STEP);
        ctx.skb.adjust_room(-(step as i32), 0, 0)?;
        bytes -= step;
    }
    if bytes == 0 {
        Ok(())
    } else {
        Err(-1)
    }
}

/// Queues an event for userspace; false when the ring is full (the event
/// is lost: a window mark is then told again on the next skb).
fn tell(cookie: u64, kind: u64) -> bool {
    EVENTS.output::<Event>(Event { cookie, kind }, 0).is_ok()
}

/// Tells userspace that `cookie`'s stream has a gap (see [`BROKEN`]).
fn tell_broken(cookie: u64) {
    if read_only(&FAULTS) & FAULT_RING_FULL == 0 {
        let _ = tell(cookie, EVENT_BROKEN);
    }
}

/// One of this program's read-only globals, as the loader set it.
fn read_only(global: &'static u32) -> u32 {
    // SAFETY: a read of this program's read-only data (volatile: the
    // compiler must not fold in the object's default).
    unsafe { core::ptr::read_volatile(global) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
