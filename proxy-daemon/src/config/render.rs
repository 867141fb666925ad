//! `export`, the script that rebuilds the configuration (and is the state
//! file), and the `name=value` properties of items that `export` and the
//! print views (`control::print`) share.

use super::schema::Menu;
use super::users::{format_rate, User};
use super::{format_prefix, time, AccessRule, Config, Settings};

/// How `export` writes the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// `export verbose`: every value, defaults too (the default is compact:
    /// only what differs from the defaults).
    pub verbose: bool,
    /// `export terse`: the menu path on every line, one line per item.
    pub terse: bool,
    /// `export show-sensitive`: the stored password hashes too.
    pub show_sensitive: bool,
    /// `export file=NAME`: written to `NAME.rsc` instead of printed.
    pub file: Option<String>,
}

impl ExportOptions {
    /// What the state file holds: every value, the password hashes, one line per item.
    pub fn state_file() -> Self {
        ExportOptions { verbose: true, terse: false, show_sensitive: true, file: None }
    }
}

/// Quotes a value for a script when it needs it.
pub fn quote(value: &str) -> String {
    let plain = !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/,+@".contains(c));
    if plain {
        return value.to_owned();
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Other control characters as RouterOS's `\XX` (upper-case hex).
            c if c.is_ascii_control() => out.push_str(&format!("\\{:02X}", c as u8)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

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

/// Every setting as `(name, value)` in the schema's order, values as a
/// script writes them (quoted where needed).
pub fn settings_pairs(s: &Settings) -> Vec<(&'static str, String)> {
    vec![
        ("enabled", yes_no(s.enabled).to_string()),
        ("port", s.port.to_string()),
        ("connection-idle-timeout", time::format(s.connection_idle_timeout)),
        ("max-connections", s.max_connections.to_string()),
        ("listen-address", s.listen_address.to_string()),
        ("data-path", s.data_path.to_string()),
        ("version", s.version.to_string()),
        ("auth-method", s.auth_method.to_string()),
        ("vrf", quote(&s.vrf)),
        ("metrics-address", quote(&metrics_address(s))),
        ("xdp-interfaces", quote(&s.xdp_interfaces.join(","))),
    ]
}

/// A rule's property as `print` and `where` see it; empty when not set.
pub fn rule_value(r: &AccessRule, prop: &str) -> String {
    match prop {
        "src-address" => r.src_address.as_ref().map(format_prefix).unwrap_or_default(),
        "src-port" => r.src_port.map(|p| p.to_string()).unwrap_or_default(),
        "dst-address" => r.dst_address.as_ref().map(|d| d.to_string()).unwrap_or_default(),
        "dst-port" => r.dst_port.map(|p| p.to_string()).unwrap_or_default(),
        "action" => r.action.to_string(),
        "disabled" => yes_no(r.disabled).into(),
        "comment" => r.comment.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// A user's property as `print` and `where` see it (never the password).
pub fn user_value(u: &User, prop: &str) -> String {
    match prop {
        "name" => u.name.clone(),
        "only-one" => yes_no(u.only_one).into(),
        "rate-limit" => u.rate_limit.map(format_rate).unwrap_or_default(),
        "disabled" => yes_no(u.disabled).into(),
        "comment" => u.comment.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// `export`: a RouterOS script that rebuilds the configuration below `menu`.
/// Compact by default (settings that differ from the defaults; items with
/// their set properties), `verbose` with every value; `terse` puts the menu
/// path on every line. Password hashes only with `show_sensitive`.
pub fn export(config: &Config, menu: Menu, opts: &ExportOptions) -> String {
    let mut out = String::new();
    let mut section = |path: &str, lines: Vec<String>| {
        if lines.is_empty() {
            return;
        }
        if !opts.terse {
            out.push_str(&format!("{path}\n"));
        }
        for line in lines {
            if opts.terse {
                out.push_str(&format!("{path} {line}\n"));
            } else {
                out.push_str(&format!("{line}\n"));
            }
        }
    };
    if matches!(menu, Menu::Root | Menu::Ip | Menu::Socks) {
        let defaults = settings_pairs(&Settings::default());
        let pairs: Vec<String> = settings_pairs(&config.settings)
            .into_iter()
            .zip(defaults)
            .filter(|(now, default)| opts.verbose || now != default)
            .map(|((name, value), _)| format!("{name}={value}"))
            .collect();
        let line = if pairs.is_empty() { vec![] } else { vec![format!("set {}", pairs.join(" "))] };
        section("/ip socks", line);
    }
    if matches!(menu, Menu::Root | Menu::Ip | Menu::Socks | Menu::Users) {
        let lines = config.users.iter().map(|u| format!("add {}", user_export(u, opts).join(" "))).collect();
        section("/ip socks users", lines);
    }
    if matches!(menu, Menu::Root | Menu::Ip | Menu::Socks | Menu::Access) {
        let lines = config.access.rules.iter().map(|r| format!("add {}", rule_export(r, opts).join(" "))).collect();
        section("/ip socks access", lines);
    }
    out
}

fn rule_export(r: &AccessRule, opts: &ExportOptions) -> Vec<String> {
    let mut p = rule_props(r, true);
    if opts.verbose && !r.disabled {
        let at = p.iter().position(|x| x.starts_with("comment=")).unwrap_or(p.len());
        p.insert(at, "disabled=no".into());
    }
    p
}

fn user_export(u: &User, opts: &ExportOptions) -> Vec<String> {
    let mut p = user_props(u, true);
    if !opts.show_sensitive {
        p.retain(|x| !x.starts_with("password-hash="));
    }
    if !opts.verbose {
        p.retain(|x| x != "only-one=no");
    }
    if opts.verbose && !u.disabled {
        let at = p.iter().position(|x| x.starts_with("comment=")).unwrap_or(p.len());
        p.insert(at, "disabled=no".into());
    }
    p
}
