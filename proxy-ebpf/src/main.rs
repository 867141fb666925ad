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
//! A lookup miss passes the skb up to the socket itself (`SK_PASS`): never
//! drop data. Only empty skbs (a bare FIN) are dropped.
//!
//! The same object carries the XDP prefilter ([`xdp`]), loaded separately.
#![no_std]
#![no_main]

mod xdp;

use aya_ebpf::{
    bindings::{sk_action, BPF_F_NO_PREALLOC},
    btf_maps::HashMap,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{btf_map, map, stream_verdict},
    maps::{RingBuf, SockHash},
    programs::SkBuffContext,
    EbpfContext as _,
};
use aya_log_ebpf::debug;
use proxy_common::{Event, FlowStats, Splice, EVENTS_BYTES, EVENT_LOW, EVENT_OVER, MAX_SOCKETS};

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

/// Events for userspace: a window running low, a window overrun.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

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
    if let Some(flow) = FLOWS.get_ptr_mut(cookie) {
        // SAFETY: the pointer comes from a successful lookup and stays valid
        // for this program run (RCU). Only this socket's receive path writes
        // this entry, and it runs serialized under the socket lock, so the
        // read-modify-writes do not race another writer; userspace only reads.
        unsafe {
            (*flow).bytes += len;
            (*flow).packets += 1;
            (*flow).last_ns = bpf_ktime_get_ns();
            if (*flow).bytes >= splice.low && (*flow).asked != splice.low {
                (*flow).asked = splice.low;
                tell(cookie, EVENT_LOW);
            }
            if (*flow).bytes > splice.limit && (*flow).over != splice.limit {
                (*flow).over = splice.limit;
                tell(cookie, EVENT_OVER);
            }
        }
    }
    Ok(sk_action::SK_PASS)
}

/// Queues an event for userspace; a full ring loses it, which only delays
/// userspace until the next event or its own timer.
fn tell(cookie: u64, kind: u64) {
    let _ = EVENTS.output::<Event>(Event { cookie, kind }, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
