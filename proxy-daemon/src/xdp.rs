//! The XDP prefilter: drops TCP SYNs to the SOCKS port from source
//! prefixes that the access list denies whatever they ask for
//! ([`denied_sources`]), at the driver, before a socket exists.
//!
//! Off while `xdp-interfaces` is empty: nothing is loaded or attached. When
//! it is set, the program `proxyd_xdp` is loaded from the same BPF object as
//! the kernel data path (a second loader, with the data path's maps shrunk to
//! one entry since this one never uses them), its maps are pinned under
//! `<pin dir>/xdp/` (BTF, so `bpftool map dump pinned <pin dir>/xdp/XDP_DROPS_V4`
//! and `.../XDP_DROPS_V6` print field names), and it is attached to each listed interface in native
//! (driver) mode, else in generic (skb) mode; which one is logged and shown
//! by `ip socks print`.
//!
//! Attachments are BPF links owned by this process: a clean exit detaches
//! them and removes the pins; after `kill -9` the kernel detaches them when
//! the process's fds close, and the next start removes the stale pins.
//!
//! Changes follow the server's prepare/commit split: attaching to new
//! interfaces (and loading, when the prefilter was off) can fail and happens
//! in [`Prefilter::load`]/[`Prefilter::attach_missing`]; what they return
//! detaches again if dropped uncommitted. [`Prefilter::commit`] cannot fail:
//! it detaches interfaces that left the list, points the program at the
//! listening port, and brings the two tries (IPv4, IPv6) to the access list's
//! denied prefixes without reloading the program. It removes stale trie
//! entries before adding new ones, and if a removal ever failed it switches
//! that family off (port 0: pass all of it), so a source the new list allows
//! is never dropped. Adding fewer entries (a full trie) only drops less.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, MapError, MapInfo, PerCpuHashMap, PerCpuValues};
use aya::programs::{xdp::XdpLink, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader, Pod};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proxy_common::{
    XdpConfig, XdpDeny, XdpDrops, XdpPrefixV4, XdpPrefixV6, FLOWS_MAP, MAX_XDP_PREFIXES, PEERS_MAP, SOCKS_MAP,
    SPLICE_MAP, XDP_CONFIG_MAP, XDP_DENY_V4_MAP, XDP_DENY_V6_MAP, XDP_DROPS_V4_MAP, XDP_DROPS_V6_MAP, XDP_PROG,
};
use tracing::{error, info, warn};

use crate::bpf::{error_line, missing, Pins, BPF_OBJECT};
use crate::config::prefilter::{denied_sources, DeniedPrefix};
use crate::config::{AccessList, Settings};

/// The folder under the pin dir that holds the prefilter's pins.
pub const PIN_SUBDIR: &str = "xdp";
/// Maps pinned there.
const PINNED_MAPS: [&str; 5] = [XDP_CONFIG_MAP, XDP_DENY_V4_MAP, XDP_DROPS_V4_MAP, XDP_DENY_V6_MAP, XDP_DROPS_V6_MAP];
/// The kernel data path's maps, in the same object: created at one entry each.
const UNUSED_MAPS: [&str; 4] = [SOCKS_MAP, SPLICE_MAP, PEERS_MAP, FLOWS_MAP];
/// `BPF_NOEXIST` (linux/bpf.h): create only.
const BPF_NOEXIST: u64 = 1;

/// How the program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`).
    Native,
    /// In the generic network stack (`XDP_FLAGS_SKB_MODE`): the driver has no XDP.
    Generic,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        })
    }
}

/// One interface the program is attached to.
pub struct Attachment {
    pub mode: Mode,
    /// Dropping it detaches the program from the interface.
    _link: XdpLink,
}

/// Interfaces newly attached by [`Prefilter::attach_missing`], for [`Prefilter::commit`].
pub type NewAttachments = Vec<(String, Attachment)>;

/// What `ip socks print` shows per interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InterfaceStatus {
    pub interface: String,
    pub mode: Mode,
}

/// Drops counted for one access-list rule, summed over its prefixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RuleDrops {
    /// Prefixes of this rule in the prefilter.
    pub prefixes: usize,
    pub packets: u64,
    pub bytes: u64,
}

/// The loaded prefilter.
pub struct Prefilter {
    state: Mutex<State>,
    /// The kernel's id of the loaded program (stays the same across updates).
    prog_id: u32,
}

struct State {
    /// Keeps the program loaded.
    ebpf: Ebpf,
    config: Array<MapData, XdpConfig>,
    v4: Family<XdpPrefixV4>,
    v6: Family<XdpPrefixV6>,
    /// Interface name -> attachment.
    links: BTreeMap<String, Attachment>,
    _pins: Pins,
}

/// One address family's deny trie, its drop counters, and what the trie holds.
struct Family<P: Prefix> {
    deny: LpmTrie<MapData, P::Addr, XdpDeny>,
    drops: PerCpuHashMap<MapData, P, XdpDrops>,
    /// What the trie holds: prefix -> rule.
    installed: BTreeMap<P, u32>,
}

/// A prefix of one family as the maps hold it ([`XdpPrefixV4`],
/// [`XdpPrefixV6`]): the counters' key, and the trie's key made from it.
trait Prefix: Pod + Ord {
    /// The trie key's data: the address bytes.
    type Addr: Pod;
    /// `net` as this family's key; `None` for the other family.
    fn of(net: &IpNet) -> Option<Self>;
    fn trie_key(&self) -> Key<Self::Addr>;
    /// For messages.
    fn net(&self) -> IpNet;
}

impl Prefix for XdpPrefixV4 {
    type Addr = [u8; 4];
    fn of(net: &IpNet) -> Option<Self> {
        let IpNet::V4(n) = net else { return None };
        Some(XdpPrefixV4 { prefix_len: n.prefix_len() as u32, addr: n.network().octets() })
    }
    fn trie_key(&self) -> Key<[u8; 4]> {
        Key::new(self.prefix_len, self.addr)
    }
    fn net(&self) -> IpNet {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(self.addr), self.prefix_len as u8).unwrap_or_default())
    }
}

impl Prefix for XdpPrefixV6 {
    type Addr = [u8; 16];
    fn of(net: &IpNet) -> Option<Self> {
        let IpNet::V6(n) = net else { return None };
        Some(XdpPrefixV6 { prefix_len: n.prefix_len() as u32, addr: n.network().octets() })
    }
    fn trie_key(&self) -> Key<[u8; 16]> {
        Key::new(self.prefix_len, self.addr)
    }
    fn net(&self) -> IpNet {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(self.addr), self.prefix_len as u8).unwrap_or_default())
    }
}

impl Drop for State {
    fn drop(&mut self) {
        for (name, a) in std::mem::take(&mut self.links) {
            drop(a);
            info!(interface = %name, "XDP prefilter detached from {name}");
        }
        // `pins` unpins after this.
    }
}

impl Prefilter {
    /// Loads the program and creates and pins its maps under
    /// `<pin_root>/xdp/`, removing stale pins of a previous run there
    /// (mounting bpffs at /sys/fs/bpf if needed). Attaches nothing, matches
    /// nothing (port 0) until [`commit`](Self::commit).
    pub fn load(pin_root: &Path) -> io::Result<Prefilter> {
        if BPF_OBJECT.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "xdp-interfaces: this proxyd was built without its BPF programs (PROXYD_SKIP_EBPF=1)",
            ));
        }
        let dir = pin_root.join(PIN_SUBDIR);
        let mut pins = Pins::prepare(&dir, &PINNED_MAPS, true)?;
        let mut loader = EbpfLoader::new();
        for name in UNUSED_MAPS {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader.load(BPF_OBJECT).map_err(|e| error_line("xdp-interfaces: loading the BPF object", &e))?;
        for name in PINNED_MAPS {
            let path = dir.join(name);
            let map = ebpf.map(name).ok_or_else(|| missing("map", name))?;
            map.pin(&path).map_err(|e| {
                error_line(&format!("xdp-interfaces: pinning BPF map {name} at {}", path.display()), &e)
            })?;
            let id = MapInfo::from_pin(&path).map(|info| info.id()).ok();
            pins.record(path, id);
        }
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| missing("map", name));
        let convert = |name: &str, e: MapError| error_line(&format!("BPF map {name}"), &e);
        let config = Array::try_from(take(XDP_CONFIG_MAP)?).map_err(|e| convert(XDP_CONFIG_MAP, e))?;
        let v4 = Family::take(&mut ebpf, XDP_DENY_V4_MAP, XDP_DROPS_V4_MAP)?;
        let v6 = Family::take(&mut ebpf, XDP_DENY_V6_MAP, XDP_DROPS_V6_MAP)?;
        let program = program(&mut ebpf)?;
        program.load().map_err(|e| {
            // The verifier's whole log, for `PROXYD_LOG=debug`.
            tracing::debug!("loading {XDP_PROG}: {e:#?}");
            error_line(&format!("xdp-interfaces: loading BPF program {XDP_PROG}"), &e)
        })?;
        let prog_id = program.info().map(|i| i.id()).map_err(|e| error_line(&format!("BPF program {XDP_PROG}"), &e))?;
        // Said at info level once it is in effect (`Server::commit`): a load
        // whose attachment then fails is not news.
        tracing::debug!(pin_dir = %dir.display(), prog_id, "XDP prefilter program loaded");
        Ok(Prefilter {
            prog_id,
            state: Mutex::new(State { ebpf, config, v4, v6, links: BTreeMap::new(), _pins: pins }),
        })
    }

    /// Attaches the program to every interface of `want` it is not attached
    /// to yet: native mode, else generic. Nothing is kept if one fails; the
    /// attachments returned detach again when dropped without
    /// [`commit`](Self::commit).
    pub fn attach_missing(&self, want: &[String]) -> io::Result<NewAttachments> {
        let mut st = self.lock();
        let mut new = Vec::new();
        for name in want {
            if st.links.contains_key(name) || new.iter().any(|(n, _)| n == name) {
                continue;
            }
            let program = program(&mut st.ebpf)?;
            let attachment = attach(program, name)?;
            new.push((name.clone(), attachment));
        }
        Ok(new)
    }

    /// Makes `settings` and `access` current: detaches from interfaces no
    /// longer listed, keeps `new` attachments, sets the port and address to
    /// match, and brings the trie to the access list. Cannot fail (map
    /// errors are logged; see the module notes for why that is safe).
    pub fn commit(&self, settings: &Settings, access: &AccessList, new: NewAttachments) {
        let mut st = self.lock();
        let gone: Vec<String> = st.links.keys().filter(|n| !settings.xdp_interfaces.contains(n)).cloned().collect();
        for name in gone {
            st.links.remove(&name);
            info!(interface = %name, "XDP prefilter detached from {name}");
        }
        for (name, a) in new {
            if settings.xdp_interfaces.contains(&name) {
                st.links.insert(name, a);
            }
        }
        st.sync(settings, access);
    }

    /// The interfaces the program is attached to, and how.
    pub fn status(&self) -> Vec<InterfaceStatus> {
        let st = self.lock();
        st.links.iter().map(|(n, a)| InterfaceStatus { interface: n.clone(), mode: a.mode }).collect()
    }

    /// The kernel's id of the program (the same for the prefilter's lifetime).
    pub fn prog_id(&self) -> u32 {
        self.prog_id
    }

    /// Drops per access-list rule (summed over the rule's prefixes, IPv4 and IPv6).
    pub fn drops_by_rule(&self) -> BTreeMap<usize, RuleDrops> {
        let st = self.lock();
        let mut out: BTreeMap<usize, RuleDrops> = BTreeMap::new();
        st.v4.add_drops(&mut out);
        st.v6.add_drops(&mut out);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn sync(&mut self, settings: &Settings, access: &AccessList) {
        let denied = denied_sources(access);
        let want4 = Family::<XdpPrefixV4>::wanted(&denied);
        let want6 = Family::<XdpPrefixV6>::wanted(&denied);

        // 1. Remove what the new list does not deny (before anything is added).
        let ok4 = self.v4.remove_stale(&want4);
        let ok6 = self.v6.remove_stale(&want6);

        // 2. Match the listening port (0: pass everything). A family is off
        //    when a stale entry could not be removed, so nothing allowed is
        //    ever dropped.
        let mut config = match_config(settings);
        for (ok, port, name) in [(ok4, &mut config.port_v4, "IPv4"), (ok6, &mut config.port_v6, "IPv6")] {
            if !ok {
                *port = 0;
                error!("XDP prefilter switched off for {name} until the next access-list change");
            }
        }
        if let Err(e) = self.config.set(0, config, 0) {
            error!("XDP prefilter: cannot set the port: {e}");
        }

        // 3. Add (or re-number) what it denies; counters first.
        let added = self.v4.add(&want4) + self.v6.add(&want6);
        info!(
            prefixes_v4 = self.v4.installed.len(),
            prefixes_v6 = self.v6.installed.len(),
            added,
            port_v4 = config.port_v4,
            port_v6 = config.port_v6,
            "XDP prefilter updated"
        );
    }
}

/// What the program matches for `settings`: per family, the listening port
/// (0: the server is off, or the listener gets none of that family) and
/// address (all zeros: any). An IPv4 address (`0.0.0.0` included) gets only
/// IPv4; `::` gets both (dual stack); another IPv6 address only IPv6, unless
/// it is IPv4-mapped.
fn match_config(settings: &Settings) -> XdpConfig {
    let mut c = XdpConfig::default();
    if !settings.enabled {
        return c;
    }
    let port = settings.port as u32;
    match settings.listen_address.to_canonical() {
        IpAddr::V4(a) => (c.port_v4, c.addr_v4) = (port, a.octets()),
        IpAddr::V6(a) if a.is_unspecified() => (c.port_v4, c.port_v6) = (port, port),
        IpAddr::V6(a) => (c.port_v6, c.addr_v6) = (port, a.octets()),
    }
    c
}

impl<P: Prefix> Family<P> {
    /// Takes the family's two maps out of `ebpf`.
    fn take(ebpf: &mut Ebpf, deny: &str, drops: &str) -> io::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| missing("map", name));
        let convert = |name: &str, e: MapError| error_line(&format!("BPF map {name}"), &e);
        Ok(Family {
            deny: LpmTrie::try_from(take(deny)?).map_err(|e| convert(deny, e))?,
            drops: PerCpuHashMap::try_from(take(drops)?).map_err(|e| convert(drops, e))?,
            installed: BTreeMap::new(),
        })
    }

    /// This family's prefixes of `denied`, up to the trie's size.
    fn wanted(denied: &[DeniedPrefix]) -> BTreeMap<P, u32> {
        let mut want = BTreeMap::new();
        let mut left_out = 0usize;
        for d in denied {
            let Some(key) = P::of(&d.prefix) else { continue };
            if want.len() >= MAX_XDP_PREFIXES {
                left_out += 1;
                continue;
            }
            want.insert(key, d.rule as u32);
        }
        if left_out > 0 {
            warn!(
                "XDP prefilter: {left_out} denied prefix(es) beyond the trie's {MAX_XDP_PREFIXES} are not dropped early (the access list still refuses them)"
            );
        }
        want
    }

    /// Removes the trie entries (and their counters) that `want` does not
    /// hold; false if one could not be removed.
    fn remove_stale(&mut self, want: &BTreeMap<P, u32>) -> bool {
        let mut ok = true;
        let stale: Vec<P> = self.installed.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for key in stale {
            match self.deny.remove(&key.trie_key()) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    error!("XDP prefilter: cannot remove {} from the trie: {e}", key.net());
                    ok = false;
                    continue;
                }
            }
            let _ = self.drops.remove(&key);
            self.installed.remove(&key);
        }
        ok
    }

    /// Adds (or re-numbers) the entries of `want`, each counter before its
    /// trie entry; returns how many it wrote.
    fn add(&mut self, want: &BTreeMap<P, u32>) -> usize {
        let cpus = aya::util::nr_cpus().ok();
        let mut added = 0usize;
        for (key, rule) in want {
            if self.installed.get(key) == Some(rule) {
                continue;
            }
            if !self.installed.contains_key(key) {
                if let Some(zero) = cpus.and_then(|n| PerCpuValues::try_from(vec![XdpDrops::default(); n]).ok()) {
                    // NOEXIST: keep counts that the program made in between.
                    let _ = self.drops.insert(key, zero, BPF_NOEXIST);
                }
            }
            let trie_key = key.trie_key();
            let deny = XdpDeny { rule: *rule, prefix_len: trie_key.prefix_len() };
            match self.deny.insert(&trie_key, deny, 0) {
                Ok(()) => {
                    self.installed.insert(*key, *rule);
                    added += 1;
                }
                Err(e) => warn!("XDP prefilter: cannot add {}: {e} (the access list still refuses it)", key.net()),
            }
        }
        added
    }

    /// Adds this family's prefixes and counters to `out`, per rule.
    fn add_drops(&self, out: &mut BTreeMap<usize, RuleDrops>) {
        for (prefix, rule) in &self.installed {
            let entry = out.entry(*rule as usize).or_default();
            entry.prefixes += 1;
            if let Ok(values) = self.drops.get(prefix, 0) {
                for v in values.iter() {
                    entry.packets += v.packets;
                    entry.bytes += v.bytes;
                }
            }
        }
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn program(ebpf: &mut Ebpf) -> io::Result<&mut Xdp> {
    ebpf.program_mut(XDP_PROG)
        .ok_or_else(|| missing("program", XDP_PROG))?
        .try_into()
        .map_err(|e| error_line(&format!("BPF program {XDP_PROG}"), &e))
}

/// Native mode first, generic if the driver refuses.
fn attach(program: &mut Xdp, name: &str) -> io::Result<Attachment> {
    let native = match program.attach(name, XdpMode::Driver) {
        Ok(id) => {
            let link = program.take_link(id).map_err(|e| error_line("XDP link", &e))?;
            info!(interface = %name, mode = "native", "XDP prefilter attached to {name} in native (driver) mode");
            return Ok(Attachment { mode: Mode::Native, _link: link });
        }
        Err(aya::programs::ProgramError::UnknownInterface { .. }) => {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("xdp-interfaces: no interface named {name}")));
        }
        Err(e) => error_line("native", &e),
    };
    match program.attach(name, XdpMode::Skb) {
        Ok(id) => {
            let link = program.take_link(id).map_err(|e| error_line("XDP link", &e))?;
            info!(interface = %name, mode = "generic", "XDP prefilter attached to {name} in generic (skb) mode ({native})");
            Ok(Attachment { mode: Mode::Generic, _link: link })
        }
        Err(e) => {
            let generic = error_line("generic", &e);
            Err(io::Error::new(
                generic.kind(),
                format!("xdp-interfaces: cannot attach the XDP prefilter to {name}: {native}; {generic}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(enabled: bool, listen: &str) -> XdpConfig {
        let settings = Settings { enabled, port: 1080, listen_address: listen.parse().unwrap(), ..Settings::default() };
        match_config(&settings)
    }

    /// Each family matches only what the listener gets: an IPv4 listener no
    /// IPv6 packet and back; `::` both; off matches nothing.
    #[test]
    fn each_family_matches_what_the_listener_gets() {
        let any = XdpConfig { port_v4: 1080, port_v6: 1080, ..Default::default() };
        assert_eq!(matched(true, "::"), any);
        assert_eq!(matched(true, "0.0.0.0"), XdpConfig { port_v4: 1080, ..Default::default() });
        assert_eq!(
            matched(true, "10.0.0.1"),
            XdpConfig { port_v4: 1080, addr_v4: [10, 0, 0, 1], ..Default::default() }
        );
        assert_eq!(
            matched(true, "::ffff:10.0.0.1"),
            XdpConfig { port_v4: 1080, addr_v4: [10, 0, 0, 1], ..Default::default() }
        );
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(matched(true, "fd00::1"), XdpConfig { port_v6: 1080, addr_v6: v6.octets(), ..Default::default() });
        assert_eq!(matched(false, "::"), XdpConfig::default());
    }

    /// The counters' keys round-trip through `IpNet`, and each family takes
    /// only its own prefixes.
    #[test]
    fn prefix_keys() {
        let v6: IpNet = "fd00:1::/32".parse().unwrap();
        let k = XdpPrefixV6::of(&v6).unwrap();
        assert_eq!((k.prefix_len, k.net()), (32, v6));
        assert_eq!(k.trie_key().prefix_len(), 32);
        assert!(XdpPrefixV4::of(&v6).is_none());
        let v4: IpNet = "10.1.0.0/16".parse().unwrap();
        assert_eq!(XdpPrefixV4::of(&v4).unwrap().net(), v4);
        assert!(XdpPrefixV6::of(&v4).is_none());
    }
}
