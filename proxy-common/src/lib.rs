//! Types and names shared by the BPF programs (`proxy-ebpf`) and the daemon.
//!
//! Everything here is `#![no_std]` so the BPF crate can use it; the `user`
//! feature adds the `aya::Pod` impls the daemon needs to read the maps.
//! Map value types are `#[repr(C)]` with no padding: the kernel and userspace
//! see the same bytes, and BTF names each field for `bpftool map dump`.
#![no_std]

/// Per-socket counters of the bytes the verdict program redirected *from*
/// that socket (i.e. what the socket's peer on the wire sent through proxyd).
/// Keyed by the receiving socket's cookie in [`FLOWS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Payload bytes received on this socket and redirected to its peer.
    pub bytes: u64,
    /// Number of skbs the verdict program handled for this socket.
    pub packets: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last skb; 0 if none yet.
    pub last_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: `FlowStats` is `#[repr(C)]`, made only of `u64`s (no padding, no
// pointers), and every bit pattern is a valid value.
unsafe impl aya::Pod for FlowStats {}

/// Sockhash of redirect targets, keyed by socket cookie (`u64`); no program is
/// attached to it. Both sockets of a pair enter it before either enters
/// [`SPLICE_MAP`], so the verdict never redirects to a socket that is not ready.
pub const SOCKS_MAP: &str = "SOCKS";
/// Sockhash with the stream verdict attached, keyed by socket cookie (`u64`):
/// a socket in it has its received bytes counted and redirected.
pub const SPLICE_MAP: &str = "SPLICE";
/// Peer map: socket cookie -> the cookie of the socket its bytes go to (`u64 -> u64`).
pub const PEERS_MAP: &str = "PEERS";
/// Flow map (BTF-typed): socket cookie -> [`FlowStats`].
pub const FLOWS_MAP: &str = "FLOWS";
/// The `sk_skb` stream verdict program.
pub const VERDICT_PROG: &str = "proxyd_verdict";

/// Default capacity of each map, in sockets (two per tunnel): 32768 tunnels.
/// The loader can set another size (`max_entries`) at load time. Hash and
/// sockhash entries are allocated on insert; only the bucket array (16 bytes
/// per entry, so 1 MiB per map here) is allocated up front.
pub const MAX_SOCKETS: usize = 65_536;
