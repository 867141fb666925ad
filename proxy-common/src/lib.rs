//! Types and names shared by the BPF programs (`proxy-ebpf`) and the daemon.
//!
//! Everything here is `#![no_std]` so the BPF crate can use it; the `user`
//! feature adds the `aya::Pod` impls the daemon needs to read the maps.
//! Map value types are `#[repr(C)]` with no padding: the kernel and userspace
//! see the same bytes, and BTF names each field for `bpftool map dump`.
#![no_std]

/// Per-socket counters of the bytes the verdict program redirected *from*
/// that socket (i.e. what the socket's peer on the wire sent through proxyd),
/// written only by the program. Keyed by the receiving socket's cookie in
/// [`FLOWS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Payload bytes received on this socket and redirected to its peer.
    pub bytes: u64,
    /// Number of skbs the verdict program handled for this socket.
    pub packets: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last skb; 0 if none yet.
    pub last_ns: u64,
    /// The [`Splice::low`] mark for which an [`EVENT_LOW`] was sent.
    pub asked: u64,
    /// The [`Splice::limit`] mark for which an [`EVENT_OVER`] was sent, or
    /// [`BROKEN`] once the verdict had to drop bytes of this socket.
    pub over: u64,
}

/// [`FlowStats::over`] of a socket whose stream has a gap: the verdict had to
/// drop an skb it could not cut ([`EVENT_BROKEN`]). The mark stays, and every
/// later skb of the socket is dropped too (and the event told again), so no
/// byte after the gap reaches the peer, and userspace, which checks the mark
/// before it passes a FIN on or moves the tunnel to the relay, resets the
/// tunnel even if no event found room in the ring. (A mark in an existing
/// field: the pinned map's value keeps its size, so an upgrade adopts it.)
pub const BROKEN: u64 = u64::MAX - 1;

/// Value of [`PEERS_MAP`], written only by userspace (whole values, so the
/// program always reads one consistent version): where a socket's bytes go,
/// and the window userspace granted for them.
///
/// The verdict always redirects (a passed skb would have to be read back
/// through the psock, which this kernel was seen to duplicate); the window
/// only decides when it calls userspace: at `low` ([`EVENT_LOW`]: time to
/// look at the peer and grant more) and past `limit` ([`EVENT_OVER`]: the
/// peer did not keep up; userspace takes the socket off the splice, so its
/// bytes wait in its own receive queue and TCP's window closes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Splice {
    /// Cookie of the socket the bytes are redirected to.
    pub peer: u64,
    /// Bytes ([`FlowStats::bytes`]) granted: past it, an [`EVENT_OVER`].
    pub limit: u64,
    /// When `FlowStats::bytes` reaches this, an [`EVENT_LOW`].
    pub low: u64,
}

/// What the program tells userspace through [`EVENTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// Cookie of the receiving socket.
    pub cookie: u64,
    /// [`EVENT_LOW`], [`EVENT_OVER`] or [`EVENT_BROKEN`].
    pub kind: u64,
}

/// The socket's redirected bytes reached [`Splice::low`]: time to grant more.
pub const EVENT_LOW: u64 = 1;
/// The socket's redirected bytes passed [`Splice::limit`]: the peer is behind.
pub const EVENT_OVER: u64 = 2;
/// The verdict had to drop an skb (it could not cut off a retransmission's
/// old head): the stream has a gap, so the tunnel must be reset (see [`BROKEN`]).
pub const EVENT_BROKEN: u64 = 3;

/// The verdict's read-only global of fault-injection bits (0 in service; the
/// loader sets it from `PROXYD_BPF_FAULTS` for tests).
pub const FAULTS_GLOBAL: &str = "FAULTS";
/// Fault: no [`EVENT_BROKEN`] is told, as if the ring were always full.
pub const FAULT_RING_FULL: u32 = 1;
/// The verdict's read-only global of the most bytes it cuts off one skb
/// (`u32::MAX` in service: only its own step bound applies; tests lower it
/// to make a cut fail, which in service takes an overlap beyond 640 KiB).
pub const CUT_MAX_GLOBAL: &str = "CUT_MAX";

#[cfg(feature = "user")]
// SAFETY: `FlowStats` is `#[repr(C)]`, made only of `u64`s (no padding, no
// pointers), and every bit pattern is a valid value.
unsafe impl aya::Pod for FlowStats {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Splice {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Event {}

/// Sockhash of redirect targets, keyed by socket cookie (`u64`); no program is
/// attached to it. Both sockets of a pair enter it before either enters
/// [`SPLICE_MAP`], so the verdict never redirects to a socket that is not ready.
pub const SOCKS_MAP: &str = "SOCKS";
/// Sockhash with the stream verdict attached, keyed by socket cookie (`u64`):
/// a socket in it has its received bytes counted and redirected.
pub const SPLICE_MAP: &str = "SPLICE";
/// Peer map: socket cookie -> [`Splice`] (the peer's cookie and the window), BTF.
pub const PEERS_MAP: &str = "PEERS";
/// Ring buffer of [`Event`]s from the verdict to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Size of [`EVENTS_MAP`] in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Flow map (BTF-typed): socket cookie -> [`FlowStats`].
pub const FLOWS_MAP: &str = "FLOWS";
/// Per-CPU array of two `u64`s: skbs whose head the verdict cut off because
/// the socket had already delivered it (a retransmission overlapping what was
/// received), and the bytes cut ([`CUT_SKBS`], [`CUT_BYTES`]). Not pinned:
/// each process counts its own.
pub const CUTS_MAP: &str = "CUTS";
/// Index of the skb count in [`CUTS_MAP`].
pub const CUT_SKBS: u32 = 0;
/// Index of the byte count in [`CUTS_MAP`].
pub const CUT_BYTES: u32 = 1;
/// The `sk_skb` stream verdict program.
pub const VERDICT_PROG: &str = "proxyd_verdict";

/// Default capacity of each map, in sockets (two per tunnel): 32768 tunnels.
/// The loader can set another size (`max_entries`) at load time. Hash and
/// sockhash entries are allocated on insert; only the bucket array (16 bytes
/// per entry, so 1 MiB per map here) is allocated up front.
pub const MAX_SOCKETS: usize = 65_536;

// --- XDP prefilter (`proxyd_xdp`) ------------------------------------------
//
// The prefilter drops TCP SYNs to the SOCKS port from source prefixes that
// the access list denies whatever they ask. One trie and one counter map per
// address family, with the same value types: IPv4 keys `[u8; 4]`
// ([`XdpPrefixV4`]), IPv6 keys `[u8; 16]` ([`XdpPrefixV6`]).

/// What the XDP program matches, in [`XDP_CONFIG_MAP`] (an array of one).
/// Each family has its own port, so one can be off while the other matches
/// (a listener bound to an IPv4 address gets no IPv6 packet, and back).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpConfig {
    /// The listening TCP port for IPv4 (host byte order); 0: pass all IPv4.
    pub port_v4: u32,
    /// The listening IPv4 address (network byte order); all zeros: any
    /// destination address (the listener is bound to the unspecified address).
    pub addr_v4: [u8; 4],
    /// The listening TCP port for IPv6 (host byte order); 0: pass all IPv6.
    pub port_v6: u32,
    /// The listening IPv6 address (network byte order); all zeros: any.
    pub addr_v6: [u8; 16],
}

/// Value of the deny tries [`XDP_DENY_V4_MAP`] and [`XDP_DENY_V6_MAP`] (key:
/// `{prefix_len: u32, addr: [u8; 4 or 16]}`, the LPM trie key layout): the
/// access-list rule that denies the prefix, and the prefix length, so the
/// program can find the prefix's drop counter (the trie returns the value,
/// not the matching key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpDeny {
    /// Number of the access-list rule that decides for this prefix.
    pub rule: u32,
    /// Length of the prefix this entry was inserted with.
    pub prefix_len: u32,
}

/// Key of the drop counters [`XDP_DROPS_V4_MAP`]: a prefix of the IPv4 deny
/// trie, with the host bits of `addr` cleared.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpPrefixV4 {
    pub prefix_len: u32,
    /// Network byte order.
    pub addr: [u8; 4],
}

/// Key of the drop counters [`XDP_DROPS_V6_MAP`]: a prefix of the IPv6 deny
/// trie, with the host bits of `addr` cleared.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpPrefixV6 {
    pub prefix_len: u32,
    /// Network byte order.
    pub addr: [u8; 16],
}

/// Per-CPU drop counters of one prefix (value of [`XDP_DROPS_V4_MAP`] and
/// [`XDP_DROPS_V6_MAP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpDrops {
    /// Packets dropped.
    pub packets: u64,
    /// Their bytes, from the Ethernet header on.
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, made only of integers and byte arrays with no padding
// (4 + 4 + 4 + 16, 4 + 4, 4 + 4, 4 + 16, 8 + 8 bytes), every bit pattern valid.
unsafe impl aya::Pod for XdpConfig {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for XdpDeny {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for XdpPrefixV4 {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for XdpPrefixV6 {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for XdpDrops {}

/// The XDP prefilter program.
pub const XDP_PROG: &str = "proxyd_xdp";
/// Array of one [`XdpConfig`] (BTF).
pub const XDP_CONFIG_MAP: &str = "XDP_CONFIG";
/// LPM trie: IPv4 source prefix -> [`XdpDeny`] (BTF).
pub const XDP_DENY_V4_MAP: &str = "XDP_DENY_V4";
/// Per-CPU hash: [`XdpPrefixV4`] -> [`XdpDrops`] (BTF).
pub const XDP_DROPS_V4_MAP: &str = "XDP_DROPS_V4";
/// LPM trie: IPv6 source prefix -> [`XdpDeny`] (BTF).
pub const XDP_DENY_V6_MAP: &str = "XDP_DENY_V6";
/// Per-CPU hash: [`XdpPrefixV6`] -> [`XdpDrops`] (BTF).
pub const XDP_DROPS_V6_MAP: &str = "XDP_DROPS_V6";
/// Most prefixes each deny trie (and its counters) holds, per family.
/// Prefixes beyond it are left out, which only drops less (the access list
/// still decides).
pub const MAX_XDP_PREFIXES: usize = 16_384;
