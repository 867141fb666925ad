//! Which client sources the access list denies whatever they ask for: the
//! prefixes the XDP prefilter may drop before a socket exists.
//!
//! Before the handshake nothing but the source address is known, so a source
//! may be dropped only if every request from it (any source port, any
//! destination, any destination port) is denied. [`denied_sources`] is
//! conservative: a source is listed only when an enabled `deny` rule that
//! constrains nothing but `src-address` matches it and no earlier enabled
//! `allow` rule could match it at all. It may leave out sources that are in
//! fact always denied (e.g. by several partial deny rules); it never lists a
//! source that some request could get through with.
//!
//! Both families: IPv4 prefixes go to the prefilter's IPv4 trie, IPv6 ones to
//! its IPv6 trie. Rules compare addresses family by family (an IPv4 prefix
//! never matches an IPv6 client and back), and the daemon judges a client
//! that reaches a dual-stack listener as `::ffff:a.b.c.d` by its plain IPv4
//! address (and a rule written with a mapped prefix, `::ffff:10.0.0.0/104`,
//! is stored as its IPv4 form); so an IPv6 prefix here may cover
//! IPv4-mapped addresses that the IPv4 rules would allow, and the XDP
//! program passes every IPv4-mapped IPv6 source (Linux refuses TCP SYNs from
//! one anyway). The property test below checks the lists against
//! [`AccessList::decide`] with that in the model.

use ipnet::IpNet;

use super::{AccessList, Action};

/// One prefix the prefilter drops, with the rule that denies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeniedPrefix {
    pub prefix: IpNet,
    /// Number of the deny rule that decides for this prefix.
    pub rule: usize,
}

/// Source prefixes for which every request is denied. The prefixes do not overlap.
pub fn denied_sources(list: &AccessList) -> Vec<DeniedPrefix> {
    let mut allow_sources: Vec<IpNet> = Vec::new();
    let mut out: Vec<DeniedPrefix> = Vec::new();
    let any: [IpNet; 2] = ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
    for (i, rule) in list.rules.iter().enumerate() {
        if rule.disabled {
            continue;
        }
        let sources: Vec<IpNet> = match rule.src_address {
            Some(net) => vec![net],
            None => any.to_vec(),
        };
        match rule.action {
            // Any earlier allow rule that could match a source keeps it off the list,
            // whatever its other conditions.
            Action::Allow => allow_sources.extend(sources),
            Action::Deny => {
                let only_source = rule.src_port.is_none() && rule.dst_address.is_none() && rule.dst_port.is_none();
                if !only_source {
                    continue;
                }
                let mut pieces = sources;
                for taken in allow_sources.iter().chain(out.iter().map(|d| &d.prefix)) {
                    pieces = pieces.into_iter().flat_map(|p| subtract(p, *taken)).collect();
                }
                out.extend(pieces.into_iter().map(|prefix| DeniedPrefix { prefix, rule: i }));
            }
        }
    }
    out.sort_by_key(|d| (d.prefix.addr(), d.prefix.prefix_len()));
    out
}

/// `p` minus `q`, as prefixes.
fn subtract(p: IpNet, q: IpNet) -> Vec<IpNet> {
    if q.contains(&p) {
        return Vec::new();
    }
    if !p.contains(&q) {
        return vec![p];
    }
    // q lies strictly inside p: keep the half without q whole, split the other.
    let halves: Vec<IpNet> = p.subnets(p.prefix_len() + 1).expect("p is wider than q").collect();
    halves.into_iter().flat_map(|h| subtract(h, q)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::command::{apply, parse, split_line, Menu};
    use crate::config::{AccessRequest, Config};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    fn list(lines: &[&str]) -> AccessList {
        let mut c = Config::default();
        for l in lines {
            let (_, cmd) = parse(Menu::Access, &split_line(&format!("add {l}")).unwrap()).unwrap();
            apply(&mut c, &cmd).unwrap();
        }
        c.access
    }

    fn prefixes(l: &AccessList) -> Vec<String> {
        denied_sources(l).iter().map(|d| d.prefix.to_string()).collect()
    }

    /// The manual's FTP list denies nothing by source alone: anyone may reach high ports.
    #[test]
    fn manual_list_drops_nothing() {
        let l = list(&[
            "src-address=192.168.0.2 dst-port=21 action=allow",
            "dst-port=1024-65535 action=allow",
            "action=deny",
        ]);
        assert!(denied_sources(&l).is_empty());
    }

    /// Allow a subnet, deny the rest: everything outside the subnet is dropped.
    #[test]
    fn allow_subnet_deny_rest() {
        let l = list(&["src-address=10.0.0.0/8 action=allow", "action=deny"]);
        let p = prefixes(&l);
        assert_eq!(p.len(), 9, "{p:?}");
        assert!(p.contains(&"::/0".to_string()));
        assert!(p.contains(&"0.0.0.0/5".to_string()) && p.contains(&"11.0.0.0/8".to_string()), "{p:?}");
        assert!(!p.iter().any(|x| x.parse::<IpNet>().unwrap().contains(&"10.1.2.3".parse::<IpAddr>().unwrap())));
    }

    /// IPv6 works as IPv4: allow a /32, deny the rest; an IPv4-mapped prefix
    /// is its IPv4 form (the rule is stored so, and matches IPv4 clients).
    #[test]
    fn ipv6_prefixes() {
        let l = list(&["src-address=fd00:1::/32 action=allow", "action=deny"]);
        let p = denied_sources(&l);
        let v6: Vec<_> = p.iter().filter(|d| d.prefix.addr().is_ipv6()).collect();
        assert_eq!(v6.len(), 32, "{p:?}");
        assert!(p.iter().any(|d| d.prefix.to_string() == "0.0.0.0/0"), "{p:?}");
        assert!(!v6.iter().any(|d| d.prefix.contains(&"fd00:1::5".parse::<IpAddr>().unwrap())));
        assert!(v6.iter().any(|d| d.prefix.contains(&"fd00:2::5".parse::<IpAddr>().unwrap())));
        assert!(v6.iter().all(|d| d.rule == 1));
        assert_eq!(prefixes(&list(&["src-address=fd00::/8 action=deny"])), vec!["fd00::/8"]);
        assert_eq!(
            prefixes(&list(&["src-address=::ffff:10.0.0.0/104 action=deny"])),
            vec!["10.0.0.0/8"],
            "the IPv4 clients the rule denies are dropped as IPv4"
        );
    }

    /// A deny rule with a port condition, or a disabled one, drops nothing.
    #[test]
    fn conditional_or_disabled_deny_drops_nothing() {
        assert!(denied_sources(&list(&["src-address=1.2.3.0/24 dst-port=25 action=deny"])).is_empty());
        assert!(denied_sources(&list(&["src-address=1.2.3.0/24 action=deny disabled=yes"])).is_empty());
        assert_eq!(prefixes(&list(&["src-address=1.2.3.0/24 action=deny"])), vec!["1.2.3.0/24"]);
    }

    /// Tiny deterministic PRNG (xorshift64*), so the property test needs no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random addresses from a small space so that rules and requests collide often.
    fn addr4(r: &mut Rng) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, r.below(4) as u8, r.below(8) as u8)
    }

    /// The same for IPv6, with bits that differ in more than one of the
    /// program's 32-bit words (the second, the third and the last).
    fn addr6(r: &mut Rng) -> Ipv6Addr {
        let (a, b, c) = (r.below(2) as u16, r.below(3) as u16, r.below(8) as u16);
        Ipv6Addr::new(0xfd00, a, 0, b, 0, 0, 0, c)
    }

    /// An address of either family: IPv4, IPv6, or IPv4-mapped IPv6.
    fn addr(r: &mut Rng) -> IpAddr {
        match r.below(5) {
            0 | 1 => IpAddr::V4(addr4(r)),
            2 | 3 => IpAddr::V6(addr6(r)),
            _ => IpAddr::V6(addr4(r).to_ipv6_mapped()),
        }
    }

    /// A prefix around a random address, of a length that suits its family
    /// (for mapped addresses: 96 plus an IPv4 length).
    fn prefix(r: &mut Rng, lens4: &[u8], lens6: &[u8]) -> String {
        let a = addr(r);
        let len = match a {
            IpAddr::V4(_) => lens4[r.below(lens4.len() as u64) as usize],
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => 96 + lens4[r.below(lens4.len() as u64) as usize],
            IpAddr::V6(_) => lens6[r.below(lens6.len() as u64) as usize],
        };
        format!("{a}/{len}")
    }

    fn random_rule(r: &mut Rng) -> String {
        let mut parts = Vec::new();
        if r.below(3) > 0 {
            parts.push(format!("src-address={}", prefix(r, &[8, 22, 24, 29, 30, 32], &[8, 16, 31, 32, 64, 125, 128])));
        }
        if r.below(5) == 0 {
            parts.push(format!("src-port={}", 1000 + r.below(4)));
        }
        if r.below(4) == 0 {
            parts.push(format!("dst-address={}", prefix(r, &[24, 30, 32], &[64, 126, 128])));
        }
        if r.below(4) == 0 {
            let a = r.below(4) as u16 + 20;
            parts.push(format!("dst-port={}-{}", a, a + r.below(3) as u16));
        }
        parts.push(format!("action={}", if r.below(2) == 0 { "allow" } else { "deny" }));
        if r.below(8) == 0 {
            parts.push("disabled=yes".into());
        }
        parts.join(" ")
    }

    /// What the XDP program does with a SYN from `src` (proxy-ebpf/src/xdp.rs):
    /// an IPv4-mapped IPv6 source passes; any other source is looked up in its
    /// family's trie, which holds `denied`'s prefixes of that family.
    fn dropped_by_program(denied: &[DeniedPrefix], src: IpAddr) -> Option<&DeniedPrefix> {
        if let IpAddr::V6(a) = src {
            if a.to_ipv4_mapped().is_some() {
                return None;
            }
        }
        denied.iter().find(|d| d.prefix.contains(&src))
    }

    /// Property: no source the prefilter drops can get any request allowed,
    /// on thousands of random lists and random requests, from IPv4, IPv6 and
    /// IPv4-mapped sources (which the server judges by their IPv4 address,
    /// as its listener does: `to_canonical`), to either family.
    #[test]
    fn never_drops_a_source_the_list_would_allow() {
        let mut r = Rng(0x5eed_cafe_f00d_1234);
        let (mut dropped_v4, mut dropped_v6, mut mapped_in_v6_prefix) = (0, 0, 0);
        for _case in 0..4000 {
            let rules: Vec<String> = (0..r.below(7)).map(|_| random_rule(&mut r)).collect();
            let refs: Vec<&str> = rules.iter().map(String::as_str).collect();
            let l = list(&refs);
            let denied = denied_sources(&l);
            for _ in 0..60 {
                let wire = addr(&mut r);
                let req = AccessRequest {
                    src: SocketAddr::new(wire.to_canonical(), 1000 + r.below(5) as u16),
                    dst: SocketAddr::new(addr(&mut r), 19 + r.below(8) as u16),
                    dst_name: None,
                };
                if wire.to_canonical() != wire && denied.iter().any(|d| d.prefix.contains(&wire)) {
                    mapped_in_v6_prefix += 1;
                }
                if let Some(d) = dropped_by_program(&denied, wire) {
                    match wire {
                        IpAddr::V4(_) => dropped_v4 += 1,
                        IpAddr::V6(_) => dropped_v6 += 1,
                    }
                    let decision = l.decide(&req);
                    assert_eq!(decision.action, Action::Deny, "rules {rules:?} drop {} but allow {req:?}", d.prefix);
                    // The counted rule matches every request from the source:
                    // only an earlier (conditional) deny rule decides before it.
                    let before = decision.rule.is_some_and(|n| n <= d.rule);
                    assert!(before, "rules {rules:?}: {wire} counted for rule {} after {decision:?}", d.rule);
                }
            }
            // Prefixes never overlap.
            for (a, x) in denied.iter().enumerate() {
                for y in &denied[a + 1..] {
                    assert!(!x.prefix.contains(&y.prefix) && !y.prefix.contains(&x.prefix), "{x:?} {y:?}");
                }
            }
        }
        // The generator must exercise drops of both families, and mapped
        // sources inside denied IPv6 prefixes (which must pass).
        assert!(dropped_v4 > 1000 && dropped_v6 > 1000, "drops: IPv4 {dropped_v4}, IPv6 {dropped_v6}");
        assert!(mapped_in_v6_prefix > 100, "mapped sources in denied IPv6 prefixes: {mapped_in_v6_prefix}");
    }
}
