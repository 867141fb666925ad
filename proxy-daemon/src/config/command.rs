//! The RouterOS command language, as far as `/ip socks` goes: menu paths,
//! commands and `name=value` arguments. [`split_line`] turns a script line
//! into words; [`parse`] turns words into a [`Command`]; [`apply`] runs a
//! configuration command against a [`Config`]. The CLI (argv words), the
//! control socket and the state file all come through here.

use std::fmt;

use super::time;
use super::{
    parse_prefix, AccessRule, Action, Config, DataPathMode, PortRange, IDLE_TIMEOUT_RANGE,
    MAX_CONNECTIONS_RANGE,
};

/// A menu of the command tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Menu {
    Root,
    Ip,
    Socks,
    Access,
    Connections,
}

impl Menu {
    fn child(self, name: &str) -> Option<Menu> {
        match (self, name) {
            (_, "ip") => Some(Menu::Ip),
            (Menu::Ip, "socks") => Some(Menu::Socks),
            (Menu::Socks, "access") => Some(Menu::Access),
            (Menu::Socks, "connections") => Some(Menu::Connections),
            (m, "..") => Some(m.parent()),
            _ => None,
        }
    }

    fn parent(self) -> Menu {
        match self {
            Menu::Root | Menu::Ip => Menu::Root,
            Menu::Socks => Menu::Ip,
            Menu::Access | Menu::Connections => Menu::Socks,
        }
    }
}

impl fmt::Display for Menu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Menu::Root => "/",
            Menu::Ip => "/ip",
            Menu::Socks => "/ip socks",
            Menu::Access => "/ip socks access",
            Menu::Connections => "/ip socks connections",
        })
    }
}

/// How `print` should show things.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrintOptions {
    /// `print detail`: every property as `name=value`.
    pub detail: bool,
}

/// A property change: `name=value` sets, `!name` clears.
pub type Change = (RuleProp, Option<String>);

/// Access-rule properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleProp {
    SrcAddress,
    SrcPort,
    DstAddress,
    DstPort,
    Action,
    Disabled,
    Comment,
}

impl RuleProp {
    const ALL: &'static str = "src-address, src-port, dst-address, dst-port, action, disabled, comment";

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "src-address" => Self::SrcAddress,
            "src-port" => Self::SrcPort,
            "dst-address" => Self::DstAddress,
            "dst-port" => Self::DstPort,
            "action" => Self::Action,
            "disabled" => Self::Disabled,
            "comment" => Self::Comment,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SrcAddress => "src-address",
            Self::SrcPort => "src-port",
            Self::DstAddress => "dst-address",
            Self::DstPort => "dst-port",
            Self::Action => "action",
            Self::Disabled => "disabled",
            Self::Comment => "comment",
        }
    }
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A bare menu path: changes the current menu (scripts).
    Enter(Menu),
    /// `export` in some menu: the configuration below it as a script.
    Export(Menu),
    SettingsPrint,
    SettingsSet(Vec<(String, String)>),
    AccessPrint(PrintOptions),
    AccessAdd(Vec<Change>),
    AccessSet(Vec<usize>, Vec<Change>),
    AccessRemove(Vec<usize>),
    AccessEnable(Vec<usize>),
    AccessDisable(Vec<usize>),
    /// Moves the items before the item numbered `before` (to the end when `None`).
    AccessMove(Vec<usize>, Option<usize>),
    ConnectionsPrint(PrintOptions),
}

impl Command {
    /// True when the command changes the configuration (and must be saved).
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Command::SettingsSet(_)
                | Command::AccessAdd(_)
                | Command::AccessSet(..)
                | Command::AccessRemove(_)
                | Command::AccessEnable(_)
                | Command::AccessDisable(_)
                | Command::AccessMove(..)
        )
    }
}

/// Why a command was refused. Each names what was wrong and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no such menu: `{path}` (proxyd manages /ip socks, /ip socks access and /ip socks connections)")]
    UnknownMenu { path: String },
    #[error("no such command in {menu}: `{command}` (allowed: {allowed})")]
    UnknownCommand { menu: Menu, command: String, allowed: &'static str },
    #[error("{menu} has no property `{name}` (allowed: {allowed})")]
    UnknownProperty { menu: Menu, name: String, allowed: &'static str },
    #[error("invalid value for {property}: `{value}` (allowed: {allowed})")]
    InvalidValue { property: String, value: String, allowed: String },
    #[error("no such item: {0}")]
    NoSuchItem(usize),
    #[error("{0}")]
    Usage(String),
}

impl CommandError {
    /// Exit status for the CLI: 2 for a command that is not understood at all, 1 for a refused one.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::UnknownMenu { .. } | CommandError::UnknownCommand { .. } | CommandError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn invalid(property: &str, value: &str, allowed: impl Into<String>) -> CommandError {
    CommandError::InvalidValue { property: property.into(), value: value.into(), allowed: allowed.into() }
}

/// Splits one script line into words: whitespace separates, `"..."` quotes
/// (with `\"`, `\\`, `\n`, `\t` escapes), `#` at the start of a word begins a
/// comment. A trailing `\` is a continuation and is dropped by the caller.
pub fn split_line(line: &str) -> Result<Vec<String>, CommandError> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        if first == '#' {
            break;
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            if c == '"' {
                loop {
                    match chars.next() {
                        None => return Err(CommandError::Usage("unterminated quote".into())),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => word.push('\n'),
                            Some('t') => word.push('\t'),
                            Some(e) => word.push(e),
                            None => return Err(CommandError::Usage("unterminated quote".into())),
                        },
                        Some(o) => word.push(o),
                    }
                }
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// Quotes a value for a script when it needs it.
pub fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/,+@".contains(c));
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
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Parses `words` typed in menu `at`. Leading words that name menus move
/// through the tree (`/ip socks access`, `ip socks`, `..`, `/ip/socks/access`);
/// the next word is the command. Returns the menu the command ran in, so a
/// script line of only a path changes the current menu.
pub fn parse(at: Menu, words: &[String]) -> Result<(Menu, Command), CommandError> {
    let mut menu = at;
    let mut idx = 0;
    let mut found = None;
    'path: while idx < words.len() {
        let mut w = words[idx].as_str();
        idx += 1;
        if let Some(stripped) = w.strip_prefix('/') {
            menu = Menu::Root;
            w = stripped;
        }
        let segs: Vec<&str> = w.split('/').filter(|s| !s.is_empty()).collect();
        for (i, seg) in segs.iter().enumerate() {
            if let Some(m) = menu.child(seg) {
                menu = m;
                continue;
            }
            if i + 1 == segs.len() && (is_command(seg) || !matches!(menu, Menu::Root | Menu::Ip)) {
                found = Some(*seg);
                break 'path;
            }
            return Err(CommandError::UnknownMenu { path: format!("{menu} {seg}").replace("/ ", "/") });
        }
    }
    let Some(cmd) = found else {
        return Ok((menu, Command::Enter(menu)));
    };
    // proxyd's only service is /ip socks: a bare `set enabled=yes` or `print`
    // typed at the top means that menu (the manual's `ip socks>` prompt).
    if menu == Menu::Root && idx == 1 && cmd != "export" {
        menu = Menu::Socks;
    }
    let args = &words[idx..];
    // RouterOS continuation marks, when a manual line is pasted as it stands.
    let args: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "\\" && *a != "\\...").collect();
    let command = match (menu, cmd) {
        (_, "export") => {
            no_args(menu, "export", &args)?;
            Command::Export(menu)
        }
        (Menu::Socks, "print") => {
            no_args(menu, "print", &args)?;
            Command::SettingsPrint
        }
        (Menu::Socks, "set") => Command::SettingsSet(settings_args(&args)?),
        (Menu::Access, "print") => Command::AccessPrint(print_options(menu, &args)?),
        (Menu::Access, "add") => {
            let (items, changes) = rule_args(&args)?;
            if !items.is_empty() {
                return Err(CommandError::Usage(format!("add takes name=value properties, not `{}`", items[0])));
            }
            Command::AccessAdd(changes)
        }
        (Menu::Access, "set") => {
            let (items, changes) = rule_args(&args)?;
            let items = numbers(&items)?;
            if changes.is_empty() {
                return Err(CommandError::Usage(format!("set needs properties (allowed: {})", RuleProp::ALL)));
            }
            Command::AccessSet(items, changes)
        }
        (Menu::Access, "remove" | "enable" | "disable") => {
            let items = numbers(&args)?;
            match cmd {
                "remove" => Command::AccessRemove(items),
                "enable" => Command::AccessEnable(items),
                _ => Command::AccessDisable(items),
            }
        }
        (Menu::Access, "move") => {
            let mut positional = Vec::new();
            let mut dest = None;
            for a in &args {
                match a.split_once('=') {
                    Some(("numbers", v)) => positional.insert(0, v),
                    Some(("destination", v)) => dest = Some(v),
                    Some((k, _)) => {
                        return Err(CommandError::UnknownProperty { menu, name: k.into(), allowed: "numbers, destination" })
                    }
                    None => positional.push(a),
                }
            }
            if dest.is_none() && positional.len() == 2 {
                dest = positional.pop();
            }
            if positional.len() != 1 {
                return Err(CommandError::Usage("usage: move N [M] (M: the item to move before; the end when left out)".into()));
            }
            let from = numbers(&positional)?;
            let to = dest.map(|d| number(d)).transpose()?;
            Command::AccessMove(from, to)
        }
        (Menu::Connections, "print") => Command::ConnectionsPrint(print_options(menu, &args)?),
        (m, c) => {
            let allowed = match m {
                Menu::Socks => "set, print, export",
                Menu::Access => "add, set, remove, move, enable, disable, print, export",
                Menu::Connections => "print",
                Menu::Root | Menu::Ip => "export, or the menu ip socks",
            };
            return Err(CommandError::UnknownCommand { menu: m, command: c.to_owned(), allowed });
        }
    };
    Ok((menu, command))
}

fn is_command(word: &str) -> bool {
    matches!(word, "print" | "set" | "add" | "remove" | "enable" | "disable" | "move" | "export")
}

fn no_args(menu: Menu, cmd: &str, args: &[&str]) -> Result<(), CommandError> {
    let args: Vec<_> = args.iter().filter(|a| **a != "without-paging").collect();
    match args.first() {
        None => Ok(()),
        Some(a) => Err(CommandError::Usage(format!("{menu} {cmd} takes no argument `{a}`"))),
    }
}

fn print_options(menu: Menu, args: &[&str]) -> Result<PrintOptions, CommandError> {
    let mut opts = PrintOptions::default();
    for a in args {
        match *a {
            "detail" => opts.detail = true,
            "without-paging" | "brief" => {}
            other => return Err(CommandError::Usage(format!("{menu} print: unknown argument `{other}` (allowed: detail, without-paging)"))),
        }
    }
    Ok(opts)
}

fn number(s: &str) -> Result<usize, CommandError> {
    s.parse().map_err(|_| CommandError::Usage(format!("`{s}` is not an item number (see print)")))
}

/// Item numbers: `0`, `0,2,5`, or several words.
fn numbers(args: &[&str]) -> Result<Vec<usize>, CommandError> {
    let mut out = Vec::new();
    for a in args {
        let list = a.strip_prefix("numbers=").unwrap_or(a);
        for n in list.split(',').filter(|s| !s.is_empty()) {
            out.push(number(n)?);
        }
    }
    if out.is_empty() {
        return Err(CommandError::Usage("an item number is needed (see print)".into()));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

const SETTINGS: &str = "enabled, port, connection-idle-timeout, max-connections, listen-address, data-path";

fn settings_args(args: &[&str]) -> Result<Vec<(String, String)>, CommandError> {
    let mut out = Vec::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            return Err(CommandError::Usage(format!("set takes name=value, not `{a}` (properties: {SETTINGS})")));
        };
        if !SETTINGS.split(", ").any(|s| s == k) {
            return Err(CommandError::UnknownProperty { menu: Menu::Socks, name: k.into(), allowed: SETTINGS });
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    if out.is_empty() {
        return Err(CommandError::Usage(format!("set needs properties (allowed: {SETTINGS})")));
    }
    Ok(out)
}

/// Splits rule arguments into bare words (item numbers) and property changes.
fn rule_args<'a>(args: &[&'a str]) -> Result<(Vec<&'a str>, Vec<Change>), CommandError> {
    let mut items = Vec::new();
    let mut changes = Vec::new();
    for a in args {
        let (name, value) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => match a.strip_prefix('!') {
                Some(k) => (k, None),
                None => {
                    items.push(*a);
                    continue;
                }
            },
        };
        if name == "numbers" {
            items.push(*a);
            continue;
        }
        let prop = RuleProp::from_name(name).ok_or_else(|| CommandError::UnknownProperty {
            menu: Menu::Access,
            name: name.into(),
            allowed: RuleProp::ALL,
        })?;
        changes.push((prop, value));
    }
    Ok((items, changes))
}

fn yes_no(property: &str, v: &str) -> Result<bool, CommandError> {
    match v {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(invalid(property, v, "yes, no")),
    }
}

/// Sets one rule property from its text, checking it.
fn set_rule_prop(rule: &mut AccessRule, prop: RuleProp, value: Option<&str>) -> Result<(), CommandError> {
    let name = prop.name();
    let addr = |v: &str| parse_prefix(v).ok_or_else(|| invalid(name, v, "an IPv4 address a.b.c.d or prefix a.b.c.d/0..32"));
    let port = |v: &str| v.parse::<PortRange>().map_err(|_| invalid(name, v, "a port 0..65535 or a range N-M with N <= M"));
    match (prop, value) {
        (RuleProp::SrcAddress, v) => rule.src_address = v.map(addr).transpose()?,
        (RuleProp::DstAddress, v) => rule.dst_address = v.map(addr).transpose()?,
        (RuleProp::SrcPort, v) => rule.src_port = v.map(port).transpose()?,
        (RuleProp::DstPort, v) => rule.dst_port = v.map(port).transpose()?,
        (RuleProp::Action, None) => rule.action = Action::Allow,
        (RuleProp::Action, Some("allow")) => rule.action = Action::Allow,
        (RuleProp::Action, Some("deny")) => rule.action = Action::Deny,
        (RuleProp::Action, Some(v)) => return Err(invalid(name, v, "allow, deny")),
        (RuleProp::Disabled, None) => rule.disabled = false,
        (RuleProp::Disabled, Some(v)) => rule.disabled = yes_no(name, v)?,
        (RuleProp::Comment, v) => rule.comment = v.filter(|c| !c.is_empty()).map(str::to_owned),
    }
    Ok(())
}

fn check_items(list_len: usize, items: &[usize]) -> Result<(), CommandError> {
    match items.iter().find(|&&n| n >= list_len) {
        Some(&n) => Err(CommandError::NoSuchItem(n)),
        None => Ok(()),
    }
}

/// Applies a configuration-changing command to `config`. On error `config`
/// may be partly changed: callers apply to a copy and keep it only on success.
pub fn apply(config: &mut Config, command: &Command) -> Result<(), CommandError> {
    let rules = &mut config.access.rules;
    match command {
        Command::SettingsSet(pairs) => {
            let s = &mut config.settings;
            for (k, v) in pairs {
                match k.as_str() {
                    "enabled" => s.enabled = yes_no(k, v)?,
                    "port" => {
                        s.port = match v.parse::<u16>() {
                            Ok(p) if p >= 1 => p,
                            _ => return Err(invalid(k, v, "1..65535")),
                        }
                    }
                    "connection-idle-timeout" => {
                        let (lo, hi) = IDLE_TIMEOUT_RANGE;
                        let allowed = format!("a time from {} to {} (e.g. 30s, 2m, 1h, 1d2h3m4s)", time::format(lo), time::format(hi));
                        s.connection_idle_timeout = match time::parse(v) {
                            Some(d) if d >= lo && d <= hi => d,
                            _ => return Err(invalid(k, v, allowed)),
                        }
                    }
                    "max-connections" => {
                        let (lo, hi) = MAX_CONNECTIONS_RANGE;
                        s.max_connections = match v.parse::<u32>() {
                            Ok(n) if n >= lo && n <= hi => n,
                            _ => return Err(invalid(k, v, format!("{lo}..{hi}"))),
                        }
                    }
                    "listen-address" => {
                        s.listen_address = v.parse().map_err(|_| invalid(k, v, "an IPv4 or IPv6 address, e.g. 0.0.0.0 or 127.0.0.1"))?
                    }
                    "data-path" => {
                        s.data_path = v.parse::<DataPathMode>().map_err(|_| invalid(k, v, DataPathMode::ALLOWED))?
                    }
                    _ => unreachable!("settings_args checked the names"),
                }
            }
        }
        Command::AccessAdd(changes) => {
            let mut rule = AccessRule::default();
            for (prop, value) in changes {
                set_rule_prop(&mut rule, *prop, value.as_deref())?;
            }
            rules.push(rule);
        }
        Command::AccessSet(items, changes) => {
            check_items(rules.len(), items)?;
            for &n in items {
                for (prop, value) in changes {
                    set_rule_prop(&mut rules[n], *prop, value.as_deref())?;
                }
            }
        }
        Command::AccessRemove(items) => {
            check_items(rules.len(), items)?;
            for &n in items.iter().rev() {
                rules.remove(n);
            }
        }
        Command::AccessEnable(items) | Command::AccessDisable(items) => {
            check_items(rules.len(), items)?;
            let disabled = matches!(command, Command::AccessDisable(_));
            for &n in items {
                rules[n].disabled = disabled;
            }
        }
        Command::AccessMove(items, before) => {
            check_items(rules.len(), items)?;
            if let Some(b) = before {
                if *b > rules.len() {
                    return Err(CommandError::NoSuchItem(*b));
                }
            }
            // Take the moved rules out, then insert them before the rule that
            // had number `before` (which may itself have shifted down).
            let before_rule = before.filter(|b| *b < rules.len() && !items.contains(b));
            let mut moved = Vec::new();
            let mut kept = Vec::new();
            let mut anchor = None;
            for (i, r) in rules.drain(..).enumerate() {
                if items.contains(&i) {
                    moved.push(r);
                } else {
                    if Some(i) == before_rule {
                        anchor = Some(kept.len());
                    }
                    kept.push(r);
                }
            }
            let at = match (before, anchor) {
                (_, Some(a)) => a,
                // Moving before one of the moved items itself: keep its place.
                (Some(b), None) if *b < kept.len() + moved.len() => (*b).min(kept.len()),
                _ => kept.len(),
            };
            kept.splice(at..at, moved);
            *rules = kept;
        }
        _ => return Err(CommandError::Usage("not a configuration change".into())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::render;

    fn w(line: &str) -> Vec<String> {
        split_line(line).unwrap()
    }

    fn run(config: &mut Config, line: &str) -> Result<(), CommandError> {
        let (_, cmd) = parse(Menu::Socks, &w(line))?;
        apply(config, &cmd)
    }

    /// The manual's commands, with their menu path, parse to the expected commands.
    #[test]
    fn manual_commands_parse() {
        assert_eq!(parse(Menu::Root, &w("ip socks set enabled=yes")).unwrap().1, Command::SettingsSet(vec![("enabled".into(), "yes".into())]));
        assert_eq!(parse(Menu::Root, &w("ip socks print")).unwrap().1, Command::SettingsPrint);
        assert_eq!(parse(Menu::Root, &w("/ip socks access print")).unwrap().1, Command::AccessPrint(PrintOptions::default()));
        assert_eq!(parse(Menu::Root, &w("ip socks connections print")).unwrap().1, Command::ConnectionsPrint(PrintOptions::default()));
        assert_eq!(parse(Menu::Root, &w("/ip/socks/access print")).unwrap().0, Menu::Access);
        // Inside /ip socks, as the prompt `ip socks>` shows.
        assert_eq!(parse(Menu::Socks, &w("set enabled=yes")).unwrap().0, Menu::Socks);
        assert_eq!(parse(Menu::Socks, &w("access add action=deny")).unwrap().0, Menu::Access);
        assert_eq!(parse(Menu::Access, &w(".. print")).unwrap().1, Command::SettingsPrint);
        // A manual line pasted with its continuation marks.
        assert_eq!(
            parse(Menu::Access, &w("add src-address=192.168.0.2 dst-port=21 \\ \\... action=allow")).unwrap().1,
            parse(Menu::Access, &w("add src-address=192.168.0.2 dst-port=21 action=allow")).unwrap().1
        );
    }

    /// Menus and commands that do not exist are usage errors (exit 2).
    #[test]
    fn unknown_menus_and_commands() {
        let e = parse(Menu::Root, &w("ip firewall nat print")).unwrap_err();
        assert!(matches!(e, CommandError::UnknownMenu { .. }), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = parse(Menu::Root, &w("ip socks frobnicate")).unwrap_err();
        assert!(matches!(e, CommandError::UnknownCommand { .. }), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    /// Bad values name the property and what is allowed, exit 1, and change nothing.
    #[test]
    fn bad_values_are_refused() {
        for (line, prop) in [
            ("set port=0", "port"),
            ("set port=65536", "port"),
            ("set max-connections=0", "max-connections"),
            ("set max-connections=1000001", "max-connections"),
            ("set enabled=maybe", "enabled"),
            ("set connection-idle-timeout=2x", "connection-idle-timeout"),
            ("access add action=maybe", "action"),
            ("access add src-address=1.2.3.4/33", "src-address"),
            ("access add dst-port=9-1", "dst-port"),
            ("set data-path=fast", "data-path"),
        ] {
            let mut c = Config::default();
            let e = run(&mut c, line).unwrap_err();
            assert_eq!(e.exit_code(), 1, "{line}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(prop) && msg.contains("allowed"), "{line}: {msg}");
        }
        let e = run(&mut Config::default(), "access add colour=red").unwrap_err();
        assert!(e.to_string().contains("colour") && e.to_string().contains("src-address"));
    }

    /// add/set/remove/enable/disable/move change the list as RouterOS does.
    #[test]
    fn access_list_editing() {
        let mut c = Config::default();
        for r in ["action=allow comment=a", "action=allow comment=b", "action=allow comment=c", "action=deny comment=d"] {
            run(&mut c, &format!("access add {r}")).unwrap();
        }
        let names = |c: &Config| c.access.rules.iter().map(|r| r.comment.clone().unwrap()).collect::<String>();
        run(&mut c, "access move 0 2").unwrap();
        assert_eq!(names(&c), "bacd");
        run(&mut c, "access move 3 0").unwrap();
        assert_eq!(names(&c), "dbac");
        run(&mut c, "access move 0").unwrap();
        assert_eq!(names(&c), "bacd");
        run(&mut c, "access move numbers=2 destination=1").unwrap();
        assert_eq!(names(&c), "bcad");
        run(&mut c, "access disable 1,2").unwrap();
        assert!(c.access.rules[1].disabled && c.access.rules[2].disabled);
        run(&mut c, "access enable 2").unwrap();
        assert!(!c.access.rules[2].disabled);
        run(&mut c, "access set 0 dst-port=80 src-address=10.0.0.0/8").unwrap();
        assert_eq!(c.access.rules[0].dst_port, Some(PortRange { first: 80, last: 80 }));
        run(&mut c, "access set 0 !dst-port").unwrap();
        assert_eq!(c.access.rules[0].dst_port, None);
        run(&mut c, "access remove 0,3").unwrap();
        assert_eq!(names(&c), "ca");
        assert_eq!(run(&mut c, "access remove 5"), Err(CommandError::NoSuchItem(5)));
    }

    /// Quoted values survive split_line and quote() round-trips.
    #[test]
    fn quoting_round_trips() {
        for v in ["plain", "two words", "quote\"and\\slash", "", "tab\there"] {
            let line = format!("add comment={}", quote(v));
            assert_eq!(split_line(&line).unwrap(), vec!["add".to_string(), format!("comment={v}")]);
        }
        assert_eq!(split_line("add action=deny # trailing comment").unwrap().len(), 2);
        assert!(split_line("add comment=\"open").is_err());
    }

    /// An exported configuration parses back to the same configuration.
    #[test]
    fn export_round_trips() {
        let mut c = Config::default();
        run(&mut c, "set enabled=yes port=1081 connection-idle-timeout=1h30m max-connections=5000").unwrap();
        run(&mut c, "access add src-address=192.168.0.2 dst-port=21 action=allow comment=\"ftp client\"").unwrap();
        run(&mut c, "access add dst-port=1024-65535 action=allow disabled=yes").unwrap();
        run(&mut c, "access add action=deny").unwrap();
        let script = render::export(&c, Menu::Root);
        let mut back = Config::default();
        let mut menu = Menu::Root;
        for line in script.lines() {
            let words = split_line(line).unwrap();
            if words.is_empty() {
                continue;
            }
            let (m, cmd) = parse(menu, &words).unwrap();
            match cmd {
                Command::Enter(m) => menu = m,
                cmd => {
                    let _ = m;
                    apply(&mut back, &cmd).unwrap()
                }
            }
        }
        assert_eq!(back, c);
    }
}
