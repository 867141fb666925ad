//! The XDP prefilter: drops TCP SYNs to the SOCKS port from source prefixes
//! that the access list denies whatever they ask for, before the kernel
//! allocates an skb or a socket for them.
//!
//! Per packet: Ethernet (one optional 802.1Q/802.1ad tag), then by EtherType
//! IPv4 or IPv6; anything else passes. A TCP SYN (without ACK) to
//! [`XDP_CONFIG`]'s port for that family (and its address, unless that is
//! all zeros) has its source looked up in the family's deny trie
//! ([`XDP_DENY_V4`], [`XDP_DENY_V6`]); a hit is dropped and counted in the
//! family's counters ([`XDP_DROPS_V4`], [`XDP_DROPS_V6`]) under the matching
//! prefix. Everything else passes untouched, including whatever cannot be
//! parsed, non-first IPv4 fragments, IPv6 packets with extension headers
//! before TCP (the fixed header's next header must be TCP: walking the chain
//! would cost a loop for packets that no ordinary client sends to open a
//! connection), and IPv4-mapped IPv6 sources (`::ffff:a.b.c.d`: the daemon
//! judges a client by its plain IPv4 address, and Linux refuses TCP SYNs
//! from such sources anyway).
//!
//! Every read is bounds-checked: packet bytes are copied out with
//! `bpf_xdp_load_bytes`, which fails (and the packet passes) when the bytes
//! are not all there. The helper also keeps the program free of variable
//! packet-pointer arithmetic, which the verifier refuses to a loader without
//! `CAP_PERFMON` (the prefilter needs only `CAP_BPF` and `CAP_NET_ADMIN`).

use aya_ebpf::{
    bindings::{xdp_action, xdp_md, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{lpm_trie::Key, Array, LpmTrie, PerCpuHashMap},
    helpers::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext as _,
};
use proxy_common::{XdpConfig, XdpDeny, XdpDrops, XdpPrefixV4, XdpPrefixV6, MAX_XDP_PREFIXES};

/// What to match: the listening port and address per family. Index 0 only.
#[btf_map(name = "XDP_CONFIG")]
static XDP_CONFIG: Array<XdpConfig, 1> = Array::new();

/// Denied IPv4 source prefixes -> the rule that denies them.
#[btf_map(name = "XDP_DENY_V4")]
static XDP_DENY_V4: LpmTrie<[u8; 4], XdpDeny, MAX_XDP_PREFIXES> = LpmTrie::new();

/// Drops per denied IPv4 prefix, per CPU.
#[btf_map(name = "XDP_DROPS_V4")]
static XDP_DROPS_V4: Drops<XdpPrefixV4> = PerCpuHashMap::new();

/// Denied IPv6 source prefixes -> the rule that denies them.
#[btf_map(name = "XDP_DENY_V6")]
static XDP_DENY_V6: LpmTrie<[u8; 16], XdpDeny, MAX_XDP_PREFIXES> = LpmTrie::new();

/// Drops per denied IPv6 prefix, per CPU.
#[btf_map(name = "XDP_DROPS_V6")]
static XDP_DROPS_V6: Drops<XdpPrefixV6> = PerCpuHashMap::new();

type Drops<K> = PerCpuHashMap<K, XdpDrops, MAX_XDP_PREFIXES, { BPF_F_NO_PREALLOC as usize }>;

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn proxyd_xdp(ctx: XdpContext) -> u32 {
    match try_prefilter(&ctx) {
        Some(action) => action,
        None => xdp_action::XDP_PASS,
    }
}

/// `None`: not ours or not parseable; pass.
#[inline(always)]
fn try_prefilter(ctx: &XdpContext) -> Option<u32> {
    let mut proto = be16(load::<[u8; 2]>(ctx, 12)?);
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(load::<[u8; 2]>(ctx, ETH_HLEN + 2)?);
        l3 += 4;
    }
    match proto {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => None,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: u32) -> Option<u32> {
    let cfg = XDP_CONFIG.get(0)?;
    if cfg.port_v4 == 0 {
        return None;
    }
    let ip = load::<[u8; 20]>(ctx, l3)?;
    let ihl = ((ip[0] & 0x0f) as u32) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP {
        return None;
    }
    // Fragment offset != 0: no TCP header here.
    if be16([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    if cfg.addr_v4 != [0; 4] && dst != cfg.addr_v4 {
        return None;
    }
    if !syn_to(load::<[u8; 14]>(ctx, l3 + ihl)?, cfg.port_v4) {
        return None;
    }
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let deny = XDP_DENY_V4.get(&Key::new(32, src))?;
    // The counter's key: the prefix, host bits cleared.
    let net = u32::from_be_bytes(src) & mask32(deny.prefix_len);
    count_drop(ctx, &XDP_DROPS_V4, XdpPrefixV4 { prefix_len: deny.prefix_len, addr: net.to_be_bytes() });
    Some(xdp_action::XDP_DROP)
}

/// The fixed IPv6 header, addresses as 32-bit words in memory order (so the
/// program compares and masks whole words, not bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u32; 4],
    dst: [u32; 4],
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: u32) -> Option<u32> {
    let cfg = XDP_CONFIG.get(0)?;
    if cfg.port_v6 == 0 {
        return None;
    }
    let ip = load::<Ipv6Hdr>(ctx, l3)?;
    // Next header other than TCP (an extension header included): pass.
    if ip.version_class_flow[0] >> 4 != 6 || ip.next_header != IPPROTO_TCP {
        return None;
    }
    let want = words(cfg.addr_v6);
    if want != [0; 4] && ip.dst != want {
        return None;
    }
    if !syn_to(load::<[u8; 14]>(ctx, l3 + size_of::<Ipv6Hdr>() as u32)?, cfg.port_v6) {
        return None;
    }
    // ::ffff:0:0/96, IPv4-mapped: see the module notes.
    if ip.src[0] == 0 && ip.src[1] == 0 && ip.src[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        return None;
    }
    let mut key = XdpPrefixV6 { prefix_len: 128, addr: bytes(ip.src) };
    let deny = XDP_DENY_V6.get(as_trie_key(&key))?;
    // The counter's key: the prefix, host bits cleared word by word.
    let mut net = ip.src;
    for (i, w) in net.iter_mut().enumerate() {
        *w &= mask32(deny.prefix_len.saturating_sub(32 * i as u32)).to_be();
    }
    key.prefix_len = deny.prefix_len;
    key.addr = bytes(net);
    count_drop(ctx, &XDP_DROPS_V6, key);
    Some(xdp_action::XDP_DROP)
}

/// Whether a TCP header (its first 14 bytes: ports, sequence numbers, data
/// offset, flags) is a connection request (SYN without ACK) to `port`. Only
/// those are dropped: the ACKs and data of a tunnel set up before its source
/// became denied pass, so the tunnel lives on (access-list changes apply to
/// the next request), and a stray segment gets the kernel's RST as before.
#[inline(always)]
fn syn_to(tcp: [u8; 14], port: u32) -> bool {
    be16([tcp[2], tcp[3]]) as u32 == port && tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// An IPv6 address's bytes as words in memory order, as [`Ipv6Hdr`] has them.
#[inline(always)]
fn words(b: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Words in memory order as an IPv6 address's bytes.
#[inline(always)]
fn bytes(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, and every bit pattern is valid for both. (Built
    // byte by byte, the key would cost sixteen stores instead of four.)
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}

/// The top `len` bits of 32 set (`len` >= 32: all), without shifting by 32.
#[inline(always)]
fn mask32(len: u32) -> u32 {
    if len == 0 {
        0
    } else if len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - len)
    }
}

/// The counters' key as the trie's key: both are `{prefix_len: u32, addr}`.
#[inline(always)]
fn as_trie_key(k: &XdpPrefixV6) -> &Key<[u8; 16]> {
    const _: () = assert!(size_of::<XdpPrefixV6>() == size_of::<Key<[u8; 16]>>());
    // SAFETY: `Key` is `repr(C, packed)` {u32, [u8; 16]} (alignment 1) and
    // `XdpPrefixV6` is `repr(C)` {u32, [u8; 16]} without padding: the same
    // 20 bytes, any bit pattern valid, and the borrow keeps `k` alive.
    unsafe { &*(k as *const XdpPrefixV6 as *const Key<[u8; 16]>) }
}

#[inline(always)]
fn count_drop<K>(ctx: &XdpContext, drops: &Drops<K>, key: K) {
    // SAFETY: the helper only reads this program's own context.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.as_ptr() as *mut xdp_md) };
    match drops.get_ptr_mut(&key) {
        // SAFETY: a per-CPU slot from a successful lookup, valid for this run
        // (RCU); only this CPU writes it while this program runs on it.
        Some(p) => unsafe {
            (*p).packets += 1;
            (*p).bytes += len;
        },
        None => {
            // Userspace creates the entry with the trie entry; this covers a
            // counter removed under us. Losing a count is fine, a drop is not.
            let _ = drops.insert(&key, XdpDrops { packets: 1, bytes: len }, BPF_NOEXIST as u64);
        }
    }
}

/// Copies a `T` (plain integers and byte arrays: any bit pattern is valid)
/// out of the packet from `offset`; `None` if the packet is shorter.
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, offset: u32) -> Option<T> {
    // Not zeroed: a zeroing loop would be pointer arithmetic the verifier
    // refuses without CAP_PERFMON; the helper takes uninitialized memory.
    let mut buf = core::mem::MaybeUninit::<T>::uninit();
    let len = size_of::<T>() as u32;
    // SAFETY: `buf` is a stack buffer of exactly `len` bytes; the helper
    // checks `offset + len` against the packet and fails otherwise.
    let rc = unsafe { bpf_xdp_load_bytes(ctx.as_ptr() as *mut xdp_md, offset, buf.as_mut_ptr() as *mut _, len) };
    // SAFETY: on success the helper wrote all `len` bytes, and every bit
    // pattern is a valid `T` (callers load only integers and byte arrays).
    (rc == 0).then(|| unsafe { buf.assume_init() })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}
