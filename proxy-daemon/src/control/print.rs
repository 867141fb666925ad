//! How things print for people and scripts: the manual's layouts
//! (`enabled: yes`, `Flags: X - disabled`, numbered rows, `# SRC-ADDRESS ...`
//! tables) and their JSON. The views that show runtime state (the data path
//! in use, the XDP prefilter's drops) live here, above `config`, so that
//! `config` depends on nothing above it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::config::command::{quote, PrintOptions};
use crate::config::render::{metrics_address, rule_props, rule_value, user_props, user_value, yes_no};
use crate::config::{format_prefix, schema, time, Config, DataPathMode, Settings};
use crate::datapath::DataPathKind;
use crate::xdp::{InterfaceStatus, RuleDrops};

/// `/ip socks print`: the manual's four lines in its order, then proxyd's own.
/// `active`: the data path new tunnels take; `running`: the mode `run
/// --data-path` runs instead of the saved `data-path`, if it does.
pub fn settings(s: &Settings, active: Option<DataPathKind>, running: Option<DataPathMode>) -> String {
    let mut out = format!(
        "enabled: {}\nport: {}\nconnection-idle-timeout: {}\nmax-connections: {}\nlisten-address: {}\n",
        yes_no(s.enabled),
        s.port,
        time::format(s.connection_idle_timeout),
        s.max_connections,
        s.listen_address,
    );
    let overridden = running.map(|m| format!("running {m} from `run --data-path`; ")).unwrap_or_default();
    match active {
        Some(kind) => out.push_str(&format!("data-path: {} ({overridden}in use: {kind})\n", s.data_path)),
        None => out.push_str(&format!("data-path: {}\n", s.data_path)),
    }
    out.push_str(&format!("version: {}\nauth-method: {}\nvrf: {}\n", s.version, s.auth_method, s.vrf));
    for (name, value) in [("metrics-address", metrics_address(s)), ("xdp-interfaces", s.xdp_interfaces.join(","))] {
        // No trailing blank after an empty value.
        out.push_str(&format!("{}\n", format!("{name}: {value}").trim_end()));
    }
    out
}

pub fn settings_json(s: &Settings, active: Option<DataPathKind>, running: Option<DataPathMode>) -> Value {
    json!({
        "enabled": s.enabled,
        "port": s.port,
        "connection-idle-timeout": time::format(s.connection_idle_timeout),
        "connection-idle-timeout-secs": s.connection_idle_timeout.as_secs_f64(),
        "max-connections": s.max_connections,
        "listen-address": s.listen_address.to_string(),
        "data-path": s.data_path,
        "data-path-in-use": active,
        "data-path-running": running.unwrap_or(s.data_path),
        "version": s.version,
        "auth-method": s.auth_method,
        "vrf": s.vrf,
        "metrics-address": s.metrics_address.map(|a| a.to_string()),
        "xdp-interfaces": s.xdp_interfaces,
    })
}

/// `/ip socks access print`: a flags line, then numbered rules; a disabled rule
/// carries `X`, a comment stands on its own `;;;` line above its rule.
/// With `where`, only the selected rules, under their own numbers; `detail`
/// shows every property, `terse` one line per rule with the comment inline.
pub fn access(config: &Config, opts: &PrintOptions) -> String {
    let rules = &config.access.rules;
    let rows: Vec<_> = selected(rules.len(), opts, |i, name| rule_value(&rules[i], name))
        .into_iter()
        .map(|i| {
            let r = &rules[i];
            let props = match (opts.detail, opts.terse) {
                (false, false) => rule_props(r, false),
                _ => every_prop(schema::Menu::Access, opts.terse, |n| rule_value(r, n)),
            };
            (i, r.disabled, r.comment.as_deref(), props)
        })
        .collect();
    flagged_list(&rows, opts.terse)
}

/// The item numbers `print` shows: all, or those its `where` selects.
pub fn selected(len: usize, opts: &PrintOptions, value: impl Fn(usize, &str) -> String) -> Vec<usize> {
    match &opts.filter {
        Some(expr) => (0..len).filter(|&i| expr.matches(&|name| vec![value(i, name)])).collect(),
        None => (0..len).collect(),
    }
}

/// Every property of a menu's item as `name=value` (`detail`, `terse`);
/// `disabled` is the flag, and the comment stands apart unless `terse`.
fn every_prop(menu: schema::Menu, terse: bool, value: impl Fn(&str) -> String) -> Vec<String> {
    schema::property_names(menu)
        .into_iter()
        .filter(|p| *p != "password" && *p != "disabled" && (terse || *p != "comment"))
        .map(|p| format!("{p}={}", quote(&value(p))))
        .collect()
}

/// `/ip socks access print stats`: each rule with what the XDP prefilter
/// dropped for it (summed over its prefixes; only unconditional `deny` rules
/// have prefixes). `drops` is `None` while the prefilter is off.
pub fn access_stats(config: &Config, drops: Option<&BTreeMap<usize, RuleDrops>>) -> String {
    let mut out = String::from("Flags: X - disabled\n");
    let rows: Vec<Vec<String>> = config
        .access
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let d = drops.map(|m| m.get(&i).copied().unwrap_or_default());
            let n = |f: fn(&RuleDrops) -> u64| d.as_ref().map_or_else(|| "-".to_string(), |d| f(d).to_string());
            vec![
                if r.disabled { "X".into() } else { String::new() },
                r.src_address.as_ref().map(format_prefix).unwrap_or_default(),
                r.action.to_string(),
                n(|d| d.prefixes as u64),
                n(|d| d.packets),
                n(|d| d.bytes),
            ]
        })
        .collect();
    out.push_str(&table(&["", "SRC-ADDRESS", "ACTION", "XDP-PREFIXES", "XDP-PACKETS", "XDP-BYTES"], &rows));
    if drops.is_none() {
        out.push_str("XDP prefilter off (xdp-interfaces is empty): nothing is dropped before the handshake\n");
    }
    out
}

pub fn access_stats_json(config: &Config, drops: Option<&BTreeMap<usize, RuleDrops>>) -> Value {
    let mut rows = access_json(config, &PrintOptions::default());
    if let Value::Array(items) = &mut rows {
        for (i, item) in items.iter_mut().enumerate() {
            let d = drops.map(|m| m.get(&i).copied().unwrap_or_default());
            item["xdp-prefixes"] = json!(d.map(|d| d.prefixes));
            item["xdp-packets"] = json!(d.map(|d| d.packets));
            item["xdp-bytes"] = json!(d.map(|d| d.bytes));
        }
    }
    rows
}

pub fn access_json(config: &Config, opts: &PrintOptions) -> Value {
    let rules = &config.access.rules;
    let rows: Vec<Value> = selected(rules.len(), opts, |i, name| rule_value(&rules[i], name))
        .into_iter()
        .map(|i| (i, &rules[i]))
        .map(|(i, r)| {
            json!({
                "number": i,
                "src-address": r.src_address.as_ref().map(format_prefix),
                "src-port": r.src_port.map(|p| p.to_string()),
                "dst-address": r.dst_address.as_ref().map(|d| d.to_string()),
                "dst-port": r.dst_port.map(|p| p.to_string()),
                "action": r.action,
                "disabled": r.disabled,
                "comment": r.comment,
            })
        })
        .collect();
    Value::Array(rows)
}

/// The `xdp-attached: IFACE (MODE), ...` line under `/ip socks print`.
pub fn xdp_attached(status: &[InterfaceStatus]) -> String {
    let list: Vec<String> = status.iter().map(|s| format!("{} ({})", s.interface, s.mode)).collect();
    format!("xdp-attached: {}\n", list.join(", "))
}

/// `/ip socks users print`: like the access list; the password never shows.
pub fn users(config: &Config, opts: &PrintOptions) -> String {
    let users = &config.users;
    let rows: Vec<_> = selected(users.len(), opts, |i, name| user_value(&users[i], name))
        .into_iter()
        .map(|i| {
            let u = &users[i];
            let props = match (opts.detail, opts.terse) {
                (false, false) => user_props(u, false),
                _ => every_prop(schema::Menu::Users, opts.terse, |n| user_value(u, n)),
            };
            (i, u.disabled, u.comment.as_deref(), props)
        })
        .collect();
    flagged_list(&rows, opts.terse)
}

pub fn users_json(config: &Config, opts: &PrintOptions) -> Value {
    let users = &config.users;
    Value::Array(
        selected(users.len(), opts, |i, name| user_value(&users[i], name))
            .into_iter()
            .map(|i| (i, &users[i]))
            .map(|(i, u)| {
                json!({
                    "number": i,
                    "name": u.name,
                    "only-one": u.only_one,
                    "rate-limit": u.rate_limit,
                    "disabled": u.disabled,
                    "comment": u.comment,
                })
            })
            .collect(),
    )
}

/// Numbered items with the `X` flag; a comment on its own `;;;` line above
/// (terse: no header, one line per item).
fn flagged_list(rows: &[(usize, bool, Option<&str>, Vec<String>)], terse: bool) -> String {
    let mut out = String::new();
    if !terse {
        out.push_str("Flags: X - disabled\n");
    }
    let width = rows.iter().map(|r| r.0).max().unwrap_or(0).to_string().len();
    for (i, disabled, comment, props) in rows {
        let flag = if *disabled { " X" } else { "" };
        if terse {
            out.push_str(&format!("{i:>width$}{flag} {}\n", props.join(" ")));
        } else if let Some(c) = comment {
            // A comment with line breaks: each line on a `;;;` line of its own.
            for (n, line) in c.split('\n').enumerate() {
                match n {
                    0 => out.push_str(&format!("{i:>width$}{flag} ;;; {line}\n")),
                    _ => out.push_str(&format!("{:>width$}{} ;;; {line}\n", "", " ".repeat(flag.len()))),
                }
            }
            out.push_str(&format!("{:>width$}{} {}\n", "", " ".repeat(flag.len()), props.join(" ")));
        } else {
            out.push_str(&format!("{i:>width$}{flag} {}\n", props.join(" ")));
        }
    }
    out
}

/// Lays out rows as a table with a `#` column, padded like RouterOS prints.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let numbered: Vec<(usize, Vec<String>)> = rows.iter().cloned().enumerate().collect();
    numbered_table(header, &numbered)
}

/// [`table`] with each row's own number (a `where` keeps the numbers).
pub fn numbered_table(header: &[&str], rows: &[(usize, Vec<String>)]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for (_, row) in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let num_width = rows.iter().map(|r| r.0).max().unwrap_or(0).to_string().len();
    let line = |num: &str, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = format!("{num:>num_width$}");
        for (cell, w) in cells.zip(&widths) {
            l.push(' ');
            l.push_str(&format!("{cell:<w$}"));
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line("#", &mut header.iter().copied());
    for (i, row) in rows {
        out.push_str(&line(&i.to_string(), &mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::command::{apply, parse, split_line, Menu};

    fn configured(lines: &[&str]) -> Config {
        let mut c = Config::default();
        for l in lines {
            let (_, cmd) = parse(Menu::Root, &split_line(l).unwrap()).unwrap();
            apply(&mut c, &cmd).unwrap();
        }
        c
    }

    /// `ip socks print` after `set enabled=yes` starts with the manual's four lines.
    #[test]
    fn settings_print_matches_manual() {
        let c = configured(&["ip socks set enabled=yes"]);
        let out = settings(&c.settings, None, None);
        assert!(
            out.starts_with("enabled: yes\nport: 1080\nconnection-idle-timeout: 2m\nmax-connections: 200\n"),
            "{out}"
        );
    }

    /// `vrf` prints after `auth-method`, in JSON too (`main` by default).
    #[test]
    fn settings_print_vrf() {
        let out = settings(&Config::default().settings, None, None);
        assert!(out.contains("auth-method: none\nvrf: main\nmetrics-address"), "{out}");
        let c = configured(&["ip socks set vrf=vrf-blue"]);
        assert!(settings(&c.settings, None, None).contains("\nvrf: vrf-blue\n"));
        assert_eq!(settings_json(&c.settings, None, None)["vrf"], "vrf-blue");
    }

    /// `access print` after the manual's three rules prints the manual's lines.
    #[test]
    fn access_print_matches_manual() {
        let c = configured(&[
            "ip socks access add src-address=192.168.0.2 dst-port=21 action=allow",
            "ip socks access add dst-port=1024-65535 action=allow",
            "ip socks access add action=deny",
        ]);
        assert_eq!(
            access(&c, &PrintOptions::default()),
            "Flags: X - disabled\n0 src-address=192.168.0.2 dst-port=21 action=allow\n1 dst-port=1024-65535 action=allow\n2 action=deny\n"
        );
    }

    /// Disabled rules show X; comments stand above their rule.
    #[test]
    fn access_print_flags_and_comments() {
        let c = configured(&["ip socks access add action=deny disabled=yes comment=\"block all\""]);
        assert_eq!(access(&c, &PrintOptions::default()), "Flags: X - disabled\n0 X ;;; block all\n    action=deny\n");
        // A comment with a line break keeps the layout: a `;;;` line per line.
        let c = configured(&["ip socks access add action=deny disabled=yes comment=\"block\\nall\""]);
        assert_eq!(
            access(&c, &PrintOptions::default()),
            "Flags: X - disabled\n0 X ;;; block\n    ;;; all\n    action=deny\n"
        );
    }

    /// `access print stats` lists drops per rule, or `-` while the prefilter is off.
    #[test]
    fn access_stats_layout() {
        let c =
            configured(&["ip socks access add src-address=10.0.0.0/8 action=allow", "ip socks access add action=deny"]);
        let mut m = BTreeMap::new();
        m.insert(1, RuleDrops { prefixes: 8, packets: 3, bytes: 180 });
        let on = access_stats(&c, Some(&m));
        assert_eq!(
            on,
            "Flags: X - disabled\n#  SRC-ADDRESS ACTION XDP-PREFIXES XDP-PACKETS XDP-BYTES\n0  10.0.0.0/8  allow  0            0           0\n1              deny   8            3           180\n"
        );
        let off = access_stats(&c, None);
        assert!(off.contains("XDP prefilter off"), "{off}");
        let j = access_stats_json(&c, Some(&m));
        assert_eq!(j[1]["xdp-packets"], 3);
        assert_eq!(j[0]["xdp-packets"], 0);
        assert!(access_stats_json(&c, None)[1]["xdp-packets"].is_null());
    }

    /// Tables pad columns and number rows from 0.
    #[test]
    fn table_layout() {
        let t = table(&["SRC-ADDRESS", "TX"], &[vec!["192.168.0.2:3242".into(), "4847".into()]]);
        assert_eq!(t, "# SRC-ADDRESS      TX\n0 192.168.0.2:3242 4847\n");
    }
}
