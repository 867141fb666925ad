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
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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
    fn addr(r: &mut Rng) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, r.below(4) as u8, r.below(8) as u8)
    }

    fn random_rule(r: &mut Rng) -> String {
        let mut parts = Vec::new();
        if r.below(3) > 0 {
            parts.push(format!("src-address={}/{}", addr(r), [8, 22, 24, 29, 30, 32][r.below(6) as usize]));
        }
        if r.below(5) == 0 {
            parts.push(format!("src-port={}", 1000 + r.below(4)));
        }
        if r.below(4) == 0 {
            parts.push(format!("dst-address={}/{}", addr(r), [24, 30, 32][r.below(3) as usize]));
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

    /// Property: no source the prefilter drops can get any request allowed,
    /// on thousands of random lists and random requests.
    #[test]
    fn never_drops_a_source_the_list_would_allow() {
        let mut r = Rng(0x5eed_cafe_f00d_1234);
        let mut dropped_some = 0;
        for _case in 0..3000 {
            let rules: Vec<String> = (0..r.below(7)).map(|_| random_rule(&mut r)).collect();
            let refs: Vec<&str> = rules.iter().map(String::as_str).collect();
            let l = list(&refs);
            let denied = denied_sources(&l);
            for _ in 0..60 {
                let req = AccessRequest {
                    src: SocketAddr::new(IpAddr::V4(addr(&mut r)), 1000 + r.below(5) as u16),
                    dst: SocketAddr::new(IpAddr::V4(addr(&mut r)), 19 + r.below(8) as u16),
                    dst_name: None,
                };
                let dropped = denied.iter().find(|d| d.prefix.contains(&req.src.ip()));
                if let Some(d) = dropped {
                    dropped_some += 1;
                    let decision = l.decide(&req);
                    assert_eq!(decision.action, Action::Deny, "rules {rules:?} drop {} but allow {req:?}", d.prefix);
                }
            }
            // Prefixes never overlap.
            for (a, x) in denied.iter().enumerate() {
                for y in &denied[a + 1..] {
                    assert!(!x.prefix.contains(&y.prefix) && !y.prefix.contains(&x.prefix), "{x:?} {y:?}");
                }
            }
        }
        assert!(dropped_some > 1000, "the generator must exercise drops, got {dropped_some}");
    }
}
