//! The XDP prefilter: drops TCP SYNs to the SOCKS port from source
//! prefixes that the access list denies whatever they ask for, before the
//! kernel allocates an skb or a socket for them.
//!
//! Per packet: Ethernet (one optional 802.1Q/802.1ad tag), then by EtherType
//! IPv4 (handled) or anything else (passed; IPv6 gets its own trie and
//! counters next to the IPv4 ones, with the same value types). For an IPv4
//! TCP SYN (without ACK) to [`XDP_CONFIG`]'s port (and address, unless that is 0.0.0.0), the source
//! is looked up in [`XDP_DENY_V4`]; a hit is dropped and counted in
//! [`XDP_DROPS_V4`] under the matching prefix. Everything else, including
//! whatever cannot be parsed and non-first fragments, passes untouched.
//! Every read is bounds-checked: packet bytes are copied out with
//! `bpf_xdp_load_bytes`, which fails (and the packet passes) when the bytes
//! are not all there. The helper also keeps the program free of variable
//! packet-pointer arithmetic, which the verifier refuses to a loader without
//! `CAP_PERFMON` (the daemon keeps only `CAP_BPF` and `CAP_NET_ADMIN`).

use aya_ebpf::{
    bindings::{xdp_action, xdp_md, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{lpm_trie::Key, Array, LpmTrie, PerCpuHashMap},
    helpers::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext as _,
};
use proxy_common::{XdpConfig, XdpDeny, XdpDrops, XdpPrefixV4, MAX_XDP_PREFIXES};

/// What to match: the listening port and address. Index 0 only.
#[btf_map(name = "XDP_CONFIG")]
static XDP_CONFIG: Array<XdpConfig, 1> = Array::new();

/// Denied IPv4 source prefixes -> the rule that denies them.
#[btf_map(name = "XDP_DENY_V4")]
static XDP_DENY_V4: LpmTrie<[u8; 4], XdpDeny, MAX_XDP_PREFIXES> = LpmTrie::new();

/// Drops per denied prefix, per CPU.
#[btf_map(name = "XDP_DROPS_V4")]
static XDP_DROPS_V4: PerCpuHashMap<XdpPrefixV4, XdpDrops, MAX_XDP_PREFIXES, { BPF_F_NO_PREALLOC as usize }> =
    PerCpuHashMap::new();

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
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
    let mut proto = be16(load::<2>(ctx, 12)?);
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = be16(load::<2>(ctx, ETH_HLEN + 2)?);
        l3 += 4;
    }
    match proto {
        ETH_P_IP => ipv4(ctx, l3),
        // ETH_P_IPV6 => ipv6(ctx, l3): a second trie keyed by [u8; 16].
        _ => None,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: u32) -> Option<u32> {
    let cfg = XDP_CONFIG.get(0)?;
    if cfg.port == 0 {
        return None;
    }
    let ip = load::<20>(ctx, l3)?;
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
    if !syn_to(load::<14>(ctx, l3 + ihl)?, cfg.port) {
        return None;
    }
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let deny = XDP_DENY_V4.get(&Key::new(32, src))?;
    count_drop(ctx, src, deny.prefix_len);
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

#[inline(always)]
fn count_drop(ctx: &XdpContext, src: [u8; 4], prefix_len: u32) {
    // SAFETY: the helper only reads this program's own context.
    let len = unsafe { bpf_xdp_get_buff_len(ctx.as_ptr() as *mut xdp_md) };
    let host = u32::from_be_bytes(src);
    let mask = if prefix_len == 0 {
        0
    } else if prefix_len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix_len)
    };
    let key = XdpPrefixV4 { prefix_len, addr: (host & mask).to_be_bytes() };
    match XDP_DROPS_V4.get_ptr_mut(key) {
        // SAFETY: a per-CPU slot from a successful lookup, valid for this run
        // (RCU); only this CPU writes it while this program runs on it.
        Some(p) => unsafe {
            (*p).packets += 1;
            (*p).bytes += len;
        },
        None => {
            // Userspace creates the entry with the trie entry; this covers a
            // counter removed under us. Losing a count is fine, a drop is not.
            let _ = XDP_DROPS_V4.insert(key, XdpDrops { packets: 1, bytes: len }, BPF_NOEXIST as u64);
        }
    }
}

/// Copies `N` packet bytes from `offset`; `None` if the packet is shorter.
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: u32) -> Option<[u8; N]> {
    // Not zeroed: a zeroing loop would be pointer arithmetic the verifier
    // refuses without CAP_PERFMON; the helper takes uninitialized memory.
    let mut buf = core::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: `buf` is a stack buffer of exactly `N` bytes; the helper
    // checks `offset + N` against the packet and fails otherwise.
    let rc = unsafe { bpf_xdp_load_bytes(ctx.as_ptr() as *mut xdp_md, offset, buf.as_mut_ptr() as *mut _, N as u32) };
    // SAFETY: on success the helper wrote all `N` bytes.
    (rc == 0).then(|| unsafe { buf.assume_init() })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}
