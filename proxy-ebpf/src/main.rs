//! proxyd's kernel side: the `sk_skb` stream verdict that splices a socket pair.
//!
//! Every skb received on a socket in [`SPLICE`] is counted into that socket's
//! [`FLOWS`] entry (bytes, packets, last-activity time) and redirected to the
//! egress of its peer (the cookie in [`PEERS`]), looked up in [`SOCKS`].
//! Userspace fills the maps in this order: `PEERS`, `FLOWS`, `SOCKS` (both
//! sockets), then `SPLICE` (both sockets), and removes in the reverse order, so
//! the redirect target is always present while a socket is spliced.
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
    maps::SockHash,
    programs::SkBuffContext,
    EbpfContext as _,
};
use aya_log_ebpf::debug;
use proxy_common::{FlowStats, MAX_SOCKETS};

/// Redirect targets (program-less), keyed by socket cookie.
#[map(name = "SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS as u32, 0);

/// Spliced sockets (the verdict is attached here), keyed by socket cookie.
#[map(name = "SPLICE")]
static SPLICE: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS as u32, 0);

/// Socket cookie -> cookie of the socket its bytes are redirected to.
#[btf_map(name = "PEERS")]
static PEERS: HashMap<u64, u64, MAX_SOCKETS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Socket cookie -> what was received on it and redirected (see [`FlowStats`]).
#[btf_map(name = "FLOWS")]
static FLOWS: HashMap<u64, FlowStats, MAX_SOCKETS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

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
    // SAFETY: PEERS values are plain u64s, copied out at once.
    let Some(&peer) = (unsafe { PEERS.get(cookie) }) else {
        debug!(ctx, "proxyd: no peer for socket {}, passing", cookie);
        return Err(sk_action::SK_PASS);
    };
    if SOCKS.redirect_skb(ctx, peer, 0) != sk_action::SK_PASS as i64 {
        // Expected only while a pair is being torn down.
        debug!(
            ctx,
            "proxyd: peer {} of socket {} not in the sockhash, passing", peer, cookie
        );
        return Err(sk_action::SK_PASS);
    }
    if let Some(flow) = FLOWS.get_ptr_mut(cookie) {
        // SAFETY: the pointer comes from a successful lookup and stays valid
        // for this program run (RCU). Only this socket's receive path writes
        // this entry, and it runs serialized under the socket lock, so the
        // read-modify-write is not racing another writer; userspace only reads.
        unsafe {
            (*flow).bytes += len;
            (*flow).packets += 1;
            (*flow).last_ns = bpf_ktime_get_ns();
        }
    }
    Ok(sk_action::SK_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
