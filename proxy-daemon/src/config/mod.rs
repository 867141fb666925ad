//! The configuration: `/ip socks` settings and the ordered access list, the
//! RouterOS command language that changes and prints them ([`command`]), and
//! the state file that keeps them ([`store`]). One parser serves the CLI, the
//! control socket and the state file.

pub mod command;
pub mod prefilter;
pub mod render;
pub mod schema;
pub mod select;
pub mod store;
pub mod time;
pub mod users;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

/// Which data path tunnels use (`data-path` setting and `run --data-path`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathMode {
    /// Kernel when it can load, else the userspace relay.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl DataPathMode {
    pub const ALLOWED: &'static str = "auto, kernel, userspace";
}

impl FromStr for DataPathMode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            _ => Err(()),
        }
    }
}

impl fmt::Display for DataPathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// The `/ip socks` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Whether the listener accepts clients.
    pub enabled: bool,
    /// TCP port of the listener.
    pub port: u16,
    /// A connection with no byte in either direction for this long is closed.
    pub connection_idle_timeout: Duration,
    /// Most simultaneous client connections, handshaking ones included.
    pub max_connections: u32,
    /// Address the listener binds (beyond the manual).
    pub listen_address: IpAddr,
    /// Data path for new tunnels (beyond the manual).
    pub data_path: DataPathMode,
    /// Highest SOCKS version served: 4 (SOCKS4/4a only) or 5 (SOCKS5 and SOCKS4).
    pub version: u8,
    /// SOCKS5 authentication: none, or username/password against `/ip socks users`.
    pub auth_method: AuthMethod,
    /// RouterOS v7's `vrf`: [`VRF_MAIN`] (no binding), or the Linux VRF or
    /// interface the listener and every outgoing socket are bound to.
    pub vrf: String,
    /// Where the Prometheus endpoint listens; off when `None` (beyond the manual).
    pub metrics_address: Option<SocketAddr>,
    /// Interfaces the XDP prefilter is attached to; empty: off (beyond the manual).
    pub xdp_interfaces: Vec<String>,
}

/// The `auth-method` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    #[default]
    None,
    Password,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
        })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enabled: false,
            port: 1080,
            connection_idle_timeout: Duration::from_secs(120),
            max_connections: 200,
            listen_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            data_path: DataPathMode::Auto,
            version: 4,
            auth_method: AuthMethod::None,
            vrf: VRF_MAIN.to_owned(),
            metrics_address: None,
            xdp_interfaces: Vec::new(),
        }
    }
}

impl Settings {
    /// The device sockets are bound to (`SO_BINDTODEVICE`); `None` for `vrf=main`.
    pub fn vrf_device(&self) -> Option<&str> {
        (self.vrf != VRF_MAIN).then_some(self.vrf.as_str())
    }
}

/// `vrf=main`: the main routing table, no binding (RouterOS's default VRF).
pub const VRF_MAIN: &str = "main";
/// What `vrf` takes, as errors explain it.
pub const VRF_ALLOWED: &str = "main, or the name of an existing VRF or interface (at most 15 characters)";

/// Checks the form of a `vrf` value: `main`, or a name Linux accepts for a
/// device (1..15 bytes, not `.` or `..`, no `/`, `:` or white space).
/// Whether that device exists is the server's question (it may appear
/// later: a state file naming it still loads).
pub fn parse_vrf(s: &str) -> Option<String> {
    let valid = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    valid.then(|| s.to_owned())
}

/// Ranges of the settings, used both to check and to explain.
pub const MAX_CONNECTIONS_RANGE: (u32, u32) = (1, 1_000_000);
pub const IDLE_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(7 * 86_400));

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// A TCP port or an inclusive range `N-M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl FromStr for PortRange {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let num = |t: &str| -> Result<u16, ()> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            t.parse().map_err(|_| ())
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if first > last {
            return Err(());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Parses an address or prefix (`a.b.c.d`, `a.b.c.d/len`, `2001:db8::/32`),
/// normalised to the network (as RouterOS does). An IPv4-mapped address
/// (`::ffff:10.0.0.1`, `::ffff:10.0.0.0/104`) is its IPv4 form: clients and
/// destinations are judged as plain IPv4, so the mapped form never matched.
pub fn parse_prefix(s: &str) -> Option<IpNet> {
    let (addr, len) = match s.split_once('/') {
        Some((addr, len)) => {
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (addr.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?))
        }
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let net = match addr {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, len.unwrap_or(32)).ok()?),
        IpAddr::V6(a) => match (a.to_ipv4_mapped(), len.unwrap_or(128)) {
            (Some(v4), len @ 96..=128) => IpNet::V4(Ipv4Net::new(v4, len - 96).ok()?),
            (_, len) => IpNet::V6(ipnet::Ipv6Net::new(a, len).ok()?),
        },
    };
    Some(net.trunc())
}

/// What `dst-address` matches: an address prefix, or a domain name that
/// SOCKS5 clients ask for by name (exact, case-insensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DstMatch {
    Net(IpNet),
    Domain(String),
}

impl DstMatch {
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(net) = parse_prefix(s) {
            return Some(DstMatch::Net(net));
        }
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.contains(|c: char| c.is_ascii_alphabetic())
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        valid.then_some(DstMatch::Domain(name))
    }

    fn matches(&self, req: &AccessRequest) -> bool {
        match self {
            DstMatch::Net(n) => n.contains(&req.dst.ip()),
            DstMatch::Domain(d) => {
                req.dst_name.is_some_and(|name| name.strip_suffix('.').unwrap_or(name).eq_ignore_ascii_case(d))
            }
        }
    }
}

impl fmt::Display for DstMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DstMatch::Net(n) => f.write_str(&format_prefix(n)),
            DstMatch::Domain(d) => f.write_str(d),
        }
    }
}

/// Prints a prefix; a host prefix prints as the bare address, as in the manual.
pub fn format_prefix(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// One access-list rule. A property left out matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessRule {
    pub src_address: Option<IpNet>,
    pub src_port: Option<PortRange>,
    pub dst_address: Option<DstMatch>,
    pub dst_port: Option<PortRange>,
    pub action: Action,
    pub disabled: bool,
    pub comment: Option<String>,
}

/// What the access list is asked about: the client and the requested
/// destination (for SOCKS4a and SOCKS5 names, the resolved address, and the
/// name the client asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRequest<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub dst_name: Option<&'a str>,
}

impl AccessRule {
    pub fn matches(&self, req: &AccessRequest) -> bool {
        self.src_address.is_none_or(|n| n.contains(&req.src.ip()))
            && self.src_port.is_none_or(|p| p.contains(req.src.port()))
            && self.dst_address.as_ref().is_none_or(|d| d.matches(req))
            && self.dst_port.is_none_or(|p| p.contains(req.dst.port()))
    }
}

/// The outcome of [`AccessList::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The rule that decided, or `None` when no rule matched (allow).
    pub rule: Option<usize>,
}

/// The ordered access list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessList {
    pub rules: Vec<AccessRule>,
}

impl AccessList {
    /// The first enabled rule that matches decides; no match allows (RouterOS).
    pub fn decide(&self, req: &AccessRequest) -> Decision {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| !r.disabled && r.matches(req))
            .map(|(i, r)| Decision { action: r.action, rule: Some(i) })
            .unwrap_or(Decision { action: Action::Allow, rule: None })
    }

    /// Decides a request for a destination *name* before it is resolved, when
    /// that is possible: every rule up to the deciding one either fails on the
    /// client's address, the port or the name, or needs no destination address.
    /// `None` when a rule that tests the destination address comes first (then
    /// resolve and [`AccessList::decide`] per address). Denying by name this
    /// way never sends a DNS query for a denied name.
    pub fn decide_by_name(&self, src: SocketAddr, dst_port: u16, name: &str) -> Option<Decision> {
        let probe = AccessRequest {
            src,
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), dst_port),
            dst_name: Some(name),
        };
        for (i, r) in self.rules.iter().enumerate().filter(|(_, r)| !r.disabled) {
            let other_fields = r.src_address.is_none_or(|n| n.contains(&src.ip()))
                && r.src_port.is_none_or(|p| p.contains(src.port()))
                && r.dst_port.is_none_or(|p| p.contains(dst_port));
            if !other_fields {
                continue;
            }
            match &r.dst_address {
                None => return Some(Decision { action: r.action, rule: Some(i) }),
                Some(d @ DstMatch::Domain(_)) => {
                    if d.matches(&probe) {
                        return Some(Decision { action: r.action, rule: Some(i) });
                    }
                }
                Some(DstMatch::Net(_)) => return None,
            }
        }
        Some(Decision { action: Action::Allow, rule: None })
    }

    /// True when some request from anywhere to anywhere is allowed by an
    /// unconditional rule or by default: an open proxy.
    pub fn is_open(&self) -> bool {
        for r in self.rules.iter().filter(|r| !r.disabled) {
            let unconditional =
                r.src_address.is_none() && r.src_port.is_none() && r.dst_address.is_none() && r.dst_port.is_none();
            if unconditional {
                return r.action == Action::Allow;
            }
        }
        true
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub settings: Settings,
    pub access: AccessList,
    pub users: Vec<users::User>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(src: &str, dst: &str) -> AccessRequest<'static> {
        AccessRequest { src: src.parse().unwrap(), dst: dst.parse().unwrap(), dst_name: None }
    }

    fn rule(src: Option<&str>, dst_port: Option<&str>, action: Action) -> AccessRule {
        AccessRule {
            src_address: src.map(|s| parse_prefix(s).unwrap()),
            dst_port: dst_port.map(|p| p.parse().unwrap()),
            action,
            ..Default::default()
        }
    }

    /// The manual's FTP rules: the client may reach port 21, anyone the high ports, nothing else.
    #[test]
    fn manual_ftp_rules_decide() {
        let list = AccessList {
            rules: vec![
                rule(Some("192.168.0.2"), Some("21"), Action::Allow),
                rule(None, Some("1024-65535"), Action::Allow),
                rule(None, None, Action::Deny),
            ],
        };
        assert_eq!(
            list.decide(&req("192.168.0.2:1238", "10.5.8.8:21")),
            Decision { action: Action::Allow, rule: Some(0) }
        );
        assert_eq!(
            list.decide(&req("192.168.0.3:1238", "10.5.8.8:21")),
            Decision { action: Action::Deny, rule: Some(2) }
        );
        assert_eq!(list.decide(&req("192.168.0.3:1238", "10.5.8.8:3423")).action, Action::Allow);
        assert_eq!(list.decide(&req("192.168.0.2:1238", "10.5.8.8:80")).action, Action::Deny);
        assert!(!list.is_open());
    }

    /// Disabled rules are skipped; an empty list allows and counts as open.
    #[test]
    fn disabled_rules_and_default() {
        let mut deny_all = rule(None, None, Action::Deny);
        deny_all.disabled = true;
        let list = AccessList { rules: vec![deny_all] };
        assert_eq!(list.decide(&req("1.2.3.4:1", "5.6.7.8:80")), Decision { action: Action::Allow, rule: None });
        assert!(list.is_open());
        assert!(AccessList::default().is_open());
    }

    /// Prefixes normalise to their network and print like the manual.
    #[test]
    fn prefixes() {
        assert_eq!(format_prefix(&parse_prefix("192.168.0.2").unwrap()), "192.168.0.2");
        assert_eq!(format_prefix(&parse_prefix("192.168.0.7/24").unwrap()), "192.168.0.0/24");
        assert_eq!(parse_prefix("1.2.3.4/33"), None);
        assert_eq!(parse_prefix("1.2.3.4/"), None);
        assert_eq!(parse_prefix("1.2.3"), None);
        assert!(parse_prefix("0.0.0.0/0").unwrap().contains(&"9.9.9.9".parse::<IpAddr>().unwrap()));
    }

    /// IPv6 prefixes and domain names work as dst-address.
    #[test]
    fn ipv6_and_domains() {
        assert_eq!(format_prefix(&parse_prefix("2001:db8::1/32").unwrap()), "2001:db8::/32");
        assert_eq!(format_prefix(&parse_prefix("::1").unwrap()), "::1");
        // IPv4-mapped addresses are their IPv4 form (clients are judged as plain IPv4).
        assert_eq!(format_prefix(&parse_prefix("::ffff:127.0.0.1").unwrap()), "127.0.0.1");
        assert_eq!(format_prefix(&parse_prefix("::ffff:10.1.2.3/104").unwrap()), "10.0.0.0/8");
        assert_eq!(format_prefix(&parse_prefix("::ffff:0:0/96").unwrap()), "0.0.0.0/0");
        assert_eq!(format_prefix(&parse_prefix("::ffff:0:0/95").unwrap()), "::fffe:0:0/95");
        let rule =
            AccessRule { dst_address: DstMatch::parse("Example.COM."), action: Action::Deny, ..Default::default() };
        let list = AccessList { rules: vec![rule] };
        let mut r = req("127.0.0.1:1", "93.184.216.34:80");
        assert_eq!(list.decide(&r).action, Action::Allow);
        r.dst_name = Some("example.com");
        assert_eq!(list.decide(&r).action, Action::Deny);
        assert_eq!(DstMatch::parse("1.2.3.4/33"), None);
        assert_eq!(DstMatch::parse("bad name"), None);
        assert_eq!(DstMatch::parse("999"), None);
    }

    /// A name rule decides before resolution; an address rule in front defers to resolution.
    #[test]
    fn decide_by_name() {
        let deny_name =
            AccessRule { dst_address: DstMatch::parse("blocked.test"), action: Action::Deny, ..Default::default() };
        let list = AccessList { rules: vec![deny_name.clone()] };
        let src: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(list.decide_by_name(src, 80, "blocked.test").map(|d| d.action), Some(Action::Deny));
        assert_eq!(list.decide_by_name(src, 80, "other.test"), Some(Decision { action: Action::Allow, rule: None }));
        let by_addr =
            AccessRule { dst_address: DstMatch::parse("10.0.0.0/8"), action: Action::Allow, ..Default::default() };
        let list = AccessList { rules: vec![by_addr, deny_name] };
        assert_eq!(list.decide_by_name(src, 80, "blocked.test"), None);
    }

    /// `vrf` takes `main` or a Linux device name; `main` binds nothing.
    /// Whether the device exists is not the parser's question.
    #[test]
    fn vrf_values() {
        use crate::config::command::{apply, parse, split_line, Menu};
        assert_eq!(Settings::default().vrf, "main");
        assert_eq!(Settings::default().vrf_device(), None);
        for ok in ["main", "lo", "vrf-blue", "eth0.100", "a234567890abcde", "br@x"] {
            assert_eq!(parse_vrf(ok).as_deref(), Some(ok));
        }
        for bad in ["", ".", "..", "a/b", "eth0:1", "two words", "a2345678901234567", "tab\there"] {
            assert_eq!(parse_vrf(bad), None, "{bad:?}");
        }
        let mut c = Config::default();
        let (_, cmd) = parse(Menu::Socks, &split_line("set vrf=nosuch0").unwrap()).unwrap();
        apply(&mut c, &cmd).unwrap();
        assert_eq!(c.settings.vrf_device(), Some("nosuch0"));
        let (_, cmd) = parse(Menu::Socks, &split_line("set port=1081 vrf=a/b").unwrap()).unwrap();
        let e = apply(&mut c, &cmd).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("vrf") && e.to_string().contains("allowed: main"), "{e}");
        assert_eq!((c.settings.port, c.settings.vrf.as_str()), (1080, "nosuch0"), "a refused set changed something");
    }

    /// Ports parse as N or N-M with N <= M.
    #[test]
    fn port_ranges() {
        assert_eq!("21".parse(), Ok(PortRange { first: 21, last: 21 }));
        assert_eq!("1024-65535".parse(), Ok(PortRange { first: 1024, last: 65535 }));
        assert_eq!("9-1".parse::<PortRange>(), Err(()));
        assert_eq!("65536".parse::<PortRange>(), Err(()));
        assert_eq!("-1".parse::<PortRange>(), Err(()));
        assert_eq!("1-".parse::<PortRange>(), Err(()));
    }
}
