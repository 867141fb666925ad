//! `export`, the script that rebuilds the configuration (and is the state
//! file), and the `name=value` properties of items that `export` and the
//! print views (`control::print`) share.

use super::command::{quote, Menu};
use super::users::{format_rate, User};
use super::{format_prefix, time, AccessRule, Config, Settings};

pub fn metrics_address(s: &Settings) -> String {
    s.metrics_address.map(|a| a.to_string()).unwrap_or_default()
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The `name=value` properties of a rule in the manual's order; defaults left out
/// except `action`, which the manual always shows.
pub fn rule_props(r: &AccessRule, for_export: bool) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(a) = &r.src_address {
        p.push(format!("src-address={}", format_prefix(a)));
    }
    if let Some(v) = &r.src_port {
        p.push(format!("src-port={v}"));
    }
    if let Some(a) = &r.dst_address {
        p.push(format!("dst-address={a}"));
    }
    if let Some(v) = &r.dst_port {
        p.push(format!("dst-port={v}"));
    }
    p.push(format!("action={}", r.action));
    if for_export {
        if r.disabled {
            p.push("disabled=yes".into());
        }
        if let Some(c) = &r.comment {
            p.push(format!("comment={}", quote(c)));
        }
    }
    p
}

pub fn user_props(u: &User, for_export: bool) -> Vec<String> {
    let mut p = vec![format!("name={}", quote(&u.name))];
    if for_export && u.password.is_set() {
        p.push(format!("password-hash={}", quote(u.password.as_str())));
    }
    p.push(format!("only-one={}", yes_no(u.only_one)));
    if let Some(r) = u.rate_limit {
        p.push(format!("rate-limit={}", format_rate(r)));
    }
    if for_export {
        if u.disabled {
            p.push("disabled=yes".into());
        }
        if let Some(c) = &u.comment {
            p.push(format!("comment={}", quote(c)));
        }
    }
    p
}

/// `export`: a RouterOS script that rebuilds the configuration below `menu`.
/// The state file holds exactly this.
pub fn export(config: &Config, menu: Menu) -> String {
    let s = &config.settings;
    let mut out = String::new();
    if matches!(menu, Menu::Root | Menu::Ip | Menu::Socks) {
        out.push_str(&format!(
            "/ip socks\nset enabled={} port={} connection-idle-timeout={} max-connections={} listen-address={} data-path={} version={} auth-method={} metrics-address={} xdp-interfaces={}\n",
            yes_no(s.enabled),
            s.port,
            time::format(s.connection_idle_timeout),
            s.max_connections,
            s.listen_address,
            s.data_path,
            s.version,
            s.auth_method,
            quote(&metrics_address(s)),
            quote(&s.xdp_interfaces.join(",")),
        ));
    }
    if matches!(menu, Menu::Root | Menu::Ip | Menu::Socks | Menu::Users) {
        out.push_str("/ip socks users\n");
        for u in &config.users {
            out.push_str(&format!("add {}\n", user_props(u, true).join(" ")));
        }
    }
    if matches!(menu, Menu::Root | Menu::Ip | Menu::Socks | Menu::Access) {
        out.push_str("/ip socks access\n");
        for r in &config.access.rules {
            out.push_str(&format!("add {}\n", rule_props(r, true).join(" ")));
        }
    }
    out
}
