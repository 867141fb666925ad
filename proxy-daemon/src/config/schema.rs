//! What the command language offers, described once: menus, their commands
//! and properties, with allowed values, defaults and a line of help each.
//! `--help`, the console's tab completion, the shell completions and the man
//! page are all generated from these tables, and the parser in
//! [`super::command`] takes its menu, command and property names from them.

use std::fmt;

/// A menu of the command tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Menu {
    Root,
    Ip,
    Socks,
    Access,
    Connections,
    Users,
}

impl Menu {
    /// The menu `name` leads to from here (`..` goes up; `ip` works from anywhere).
    pub fn child(self, name: &str) -> Option<Menu> {
        match name {
            ".." => Some(self.parent()),
            "ip" => Some(Menu::Ip),
            _ => MENUS.iter().map(|m| m.menu).find(|m| *m != Menu::Root && m.parent() == self && m.name() == name),
        }
    }

    /// The last word of the menu's path (empty for the root).
    pub fn name(self) -> &'static str {
        match self {
            Menu::Root => "",
            Menu::Ip => "ip",
            Menu::Socks => "socks",
            Menu::Access => "access",
            Menu::Connections => "connections",
            Menu::Users => "users",
        }
    }

    pub fn parent(self) -> Menu {
        match self {
            Menu::Root | Menu::Ip => Menu::Root,
            Menu::Socks => Menu::Ip,
            Menu::Access | Menu::Connections | Menu::Users => Menu::Socks,
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
            Menu::Users => "/ip socks users",
        })
    }
}

/// One menu of the command tree.
pub struct MenuDef {
    pub menu: Menu,
    pub summary: &'static str,
    pub commands: &'static [CommandDef],
    pub properties: &'static [PropDef],
}

/// A command of a menu.
pub struct CommandDef {
    pub name: &'static str,
    pub usage: &'static str,
    pub summary: &'static str,
}

/// A property a menu's commands take.
pub struct PropDef {
    pub name: &'static str,
    pub values: &'static str,
    pub default: &'static str,
    pub summary: &'static str,
}

const EXPORT: CommandDef = CommandDef {
    name: "export",
    usage: "export [compact|verbose|terse] [show-sensitive] [file=NAME]",
    summary: "the configuration below this menu as a script (compact: only what differs from the defaults)",
};

const UPGRADE: CommandDef = CommandDef {
    name: "upgrade",
    usage: "upgrade [binary=PATH]",
    summary: "start the new binary (this one by default) and hand it every socket and tunnel; none is dropped",
};

const IMPORT: CommandDef = CommandDef {
    name: "import",
    usage: "import file=NAME [verbose=yes]",
    summary: "run a script of these commands as one change: every line checked first, all or nothing",
};

pub const MENUS: &[MenuDef] = &[
    MenuDef {
        menu: Menu::Root,
        summary: "proxyd's command tree; its only service is /ip socks",
        commands: &[EXPORT, IMPORT, UPGRADE],
        properties: &[],
    },
    MenuDef { menu: Menu::Ip, summary: "IP services", commands: &[EXPORT], properties: &[] },
    MenuDef {
        menu: Menu::Socks,
        summary: "the SOCKS server's settings",
        commands: &[
            CommandDef {
                name: "set",
                usage: "set NAME=VALUE...",
                summary: "change settings (applied at once, saved before the command returns)",
            },
            CommandDef { name: "print", usage: "print", summary: "show the settings and the data path in use" },
            EXPORT,
        ],
        properties: &[
            PropDef {
                name: "enabled",
                values: "yes | no",
                default: "no",
                summary: "whether the server accepts clients",
            },
            PropDef { name: "port", values: "1..65535", default: "1080", summary: "TCP port to listen on" },
            PropDef {
                name: "connection-idle-timeout",
                values: "1s..1w (30s, 2m, 1h, 1d2h3m4s)",
                default: "2m",
                summary: "close connections idle this long in both directions",
            },
            PropDef {
                name: "max-connections",
                values: "1..1000000",
                default: "200",
                summary: "most simultaneous connections, handshaking ones included",
            },
            PropDef {
                name: "listen-address",
                values: "IPv4 or IPv6 address (:: for both)",
                default: "0.0.0.0",
                summary: "address to listen on",
            },
            PropDef {
                name: "data-path",
                values: "auto | kernel | userspace",
                default: "auto",
                summary: "what moves tunnel bytes: the BPF sockhash or the userspace relay",
            },
            PropDef {
                name: "version",
                values: "4 | 5",
                default: "4",
                summary: "4: SOCKS4/4a only; 5: SOCKS5 and SOCKS4",
            },
            PropDef {
                name: "auth-method",
                values: "none | password",
                default: "none",
                summary: "SOCKS5 login: none, or username/password from /ip socks users",
            },
            PropDef {
                name: "vrf",
                values: "main | VRF or interface name",
                default: "main",
                summary: "the VRF (or interface) the server listens in and connects through",
            },
            PropDef {
                name: "metrics-address",
                values: "ADDRESS:PORT, or empty",
                default: "off",
                summary: "where Prometheus scrapes /metrics",
            },
            PropDef {
                name: "xdp-interfaces",
                values: "NAME[,NAME...], or empty",
                default: "off",
                summary: "interfaces whose XDP prefilter drops sources the access list always denies",
            },
        ],
    },
    MenuDef {
        menu: Menu::Access,
        summary: "ordered allow/deny rules; the first enabled match decides, no match allows",
        commands: &[
            CommandDef {
                name: "add",
                usage: "add [place-before=N] [copy-from=N] NAME=VALUE...",
                summary: "add a rule (at the end, or before rule N; copy-from starts from rule N)",
            },
            CommandDef {
                name: "set",
                usage: "set N[,N...]|[find ...] NAME=VALUE... | !NAME",
                summary: "change rules (!NAME clears a property)",
            },
            CommandDef {
                name: "unset",
                usage: "unset N[,N...]|[find ...] value-name=NAME[,NAME...]",
                summary: "clear properties of rules (as set N !NAME)",
            },
            CommandDef {
                name: "comment",
                usage: "comment N[,N...]|[find ...] comment=TEXT",
                summary: "set rules' comment",
            },
            CommandDef { name: "remove", usage: "remove N[,N...]|[find ...]", summary: "delete rules" },
            CommandDef {
                name: "move",
                usage: "move N|[find ...] [M]",
                summary: "put the rules before rule M (at the end without M)",
            },
            CommandDef { name: "enable", usage: "enable N[,N...]|[find ...]", summary: "enable rules" },
            CommandDef { name: "disable", usage: "disable N[,N...]|[find ...]", summary: "disable rules" },
            CommandDef {
                name: "print",
                usage: "print [detail|terse] [count-only] [stats] [where EXPR]",
                summary: "list the rules; `stats`: what the XDP prefilter dropped per rule",
            },
            EXPORT,
        ],
        properties: &[
            PropDef {
                name: "src-address",
                values: "address or prefix (a.b.c.d/len, x::y/len)",
                default: "any",
                summary: "the client's address",
            },
            PropDef { name: "src-port", values: "N or N-M", default: "any", summary: "the client's port" },
            PropDef {
                name: "dst-address",
                values: "address, prefix or domain name",
                default: "any",
                summary: "the requested destination (a name matches SOCKS5 requests by name)",
            },
            PropDef { name: "dst-port", values: "N or N-M", default: "any", summary: "the requested port" },
            PropDef { name: "action", values: "allow | deny", default: "allow", summary: "what a match does" },
            PropDef { name: "disabled", values: "yes | no", default: "no", summary: "a disabled rule is skipped" },
            PropDef { name: "comment", values: "text", default: "", summary: "a note shown above the rule" },
        ],
    },
    MenuDef {
        menu: Menu::Users,
        summary: "SOCKS5 accounts for auth-method=password",
        commands: &[
            CommandDef {
                name: "add",
                usage: "add [place-before=N] [copy-from=N] name=NAME password=PASSWORD [NAME=VALUE...]",
                summary: "add a user",
            },
            CommandDef { name: "set", usage: "set N[,N...]|[find ...] NAME=VALUE...", summary: "change users" },
            CommandDef {
                name: "unset",
                usage: "unset N[,N...]|[find ...] value-name=NAME[,NAME...]",
                summary: "clear properties of users",
            },
            CommandDef {
                name: "comment",
                usage: "comment N[,N...]|[find ...] comment=TEXT",
                summary: "set users' comment",
            },
            CommandDef { name: "remove", usage: "remove N[,N...]|[find ...]", summary: "delete users" },
            CommandDef { name: "enable", usage: "enable N[,N...]|[find ...]", summary: "enable users" },
            CommandDef { name: "disable", usage: "disable N[,N...]|[find ...]", summary: "disable users" },
            CommandDef {
                name: "print",
                usage: "print [detail|terse] [count-only] [where EXPR]",
                summary: "list users (never their passwords)",
            },
            EXPORT,
        ],
        properties: &[
            PropDef { name: "name", values: "1..255 bytes", default: "", summary: "the login name (unique)" },
            PropDef { name: "password", values: "up to 255 bytes", default: "", summary: "kept only as a salted hash" },
            PropDef {
                name: "only-one",
                values: "yes | no",
                default: "no",
                summary: "at most one connection at a time",
            },
            PropDef {
                name: "rate-limit",
                values: "bits/s: 8M, 512k, 64000; 0 = none",
                default: "none",
                summary: "pace each direction of the user's tunnels",
            },
            PropDef { name: "disabled", values: "yes | no", default: "no", summary: "a disabled user cannot log in" },
            PropDef { name: "comment", values: "text", default: "", summary: "a note" },
        ],
    },
    MenuDef {
        menu: Menu::Connections,
        summary: "live connections: src, dst, tx (client to destination), rx, type",
        commands: &[
            CommandDef {
                name: "print",
                usage: "print [detail|terse] [count-only] [interval=TIME] [where EXPR]",
                summary: "list connections",
            },
            CommandDef { name: "remove", usage: "remove N[,N...]|[find ...]", summary: "close connections" },
        ],
        properties: &[
            PropDef { name: "src-address", values: "address[:port]", default: "", summary: "the client" },
            PropDef {
                name: "dst-address",
                values: "address[:port]",
                default: "",
                summary: "the destination (BIND: the peer)",
            },
            PropDef {
                name: "tx",
                values: "bytes",
                default: "",
                summary: "bytes from the client towards the destination",
            },
            PropDef {
                name: "rx",
                values: "bytes",
                default: "",
                summary: "bytes from the destination towards the client",
            },
            PropDef {
                name: "type",
                values: "unknown | out | in | udp",
                default: "",
                summary: "handshaking, CONNECT, BIND, UDP ASSOCIATE",
            },
            PropDef { name: "user", values: "name", default: "", summary: "the SOCKS5 user" },
            PropDef {
                name: "path",
                values: "kernel | userspace",
                default: "",
                summary: "what moves the tunnel's bytes right now",
            },
        ],
    },
];

/// The definition of `menu`.
pub fn menu(menu: Menu) -> &'static MenuDef {
    MENUS.iter().find(|m| m.menu == menu).expect("every menu is described")
}

/// Names of the menus directly below `menu`.
pub fn submenus(menu: Menu) -> Vec<&'static str> {
    MENUS.iter().filter(|m| m.menu != Menu::Root && m.menu.parent() == menu).map(|m| m.menu.name()).collect()
}

/// The names of a menu's commands, as its errors list them.
pub fn command_names(menu: Menu) -> String {
    let mut names: Vec<&str> = self::menu(menu).commands.iter().map(|c| c.name).collect();
    names.extend(submenus(menu));
    names.join(", ")
}

/// The property names of a menu, in the order the manual lists them.
pub fn property_names(menu: Menu) -> Vec<&'static str> {
    self::menu(menu).properties.iter().map(|p| p.name).collect()
}

/// Every menu path, as `no such menu` lists them.
pub fn menu_paths() -> String {
    MENUS.iter().filter(|m| !m.properties.is_empty()).map(|m| m.menu.to_string()).collect::<Vec<_>>().join(", ")
}

/// The overview under `proxyd --help`: every menu with its commands and
/// properties (the man page's `COMMANDS` section says the same at length).
pub fn overview() -> String {
    let mut out = String::from("Commands (RouterOS style, sent to the running daemon):\n");
    for def in MENUS {
        let path = def.menu.to_string();
        let words = path.trim_start_matches('/');
        for c in def.commands {
            let line = format!("proxyd {words}{}{}", if words.is_empty() { "" } else { " " }, c.usage);
            out.push_str(&format!("  {line:<58} {}\n", c.summary));
        }
    }
    for def in MENUS.iter().filter(|m| !m.properties.is_empty()) {
        out.push_str(&format!("\n{} properties:\n", def.menu));
        for p in def.properties {
            out.push_str(&format!("  {:<24} {}\n", p.name, p.values));
        }
    }
    out
}

/// `--help` text for a menu.
pub fn help(menu_def: &MenuDef) -> String {
    let mut out = format!("{} — {}\n", menu_def.menu, menu_def.summary);
    let subs = submenus(menu_def.menu);
    if !subs.is_empty() {
        out.push_str(&format!("\nMenus: {}\n", subs.join(", ")));
    }
    if !menu_def.commands.is_empty() {
        out.push_str("\nCommands:\n");
        for c in menu_def.commands {
            out.push_str(&format!("  {:<44} {}\n", c.usage, c.summary));
        }
    }
    if !menu_def.properties.is_empty() {
        out.push_str("\nProperties:\n");
        for p in menu_def.properties {
            let default = if p.default.is_empty() { String::new() } else { format!(" (default {})", p.default) };
            out.push_str(&format!("  {:<24} {}{default}\n  {:<24} {}\n", p.name, p.summary, "", p.values));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::command::{parse, List};

    /// Every menu the parser knows is described, and every list property the
    /// parser takes is listed (and nothing else).
    #[test]
    fn schema_matches_the_parser() {
        for m in [Menu::Root, Menu::Ip, Menu::Socks, Menu::Access, Menu::Connections, Menu::Users] {
            let _ = menu(m);
        }
        for (list, m) in [(List::Access, Menu::Access), (List::Users, Menu::Users)] {
            let described: Vec<&str> = menu(m).properties.iter().map(|p| p.name).collect();
            let parsed: Vec<&str> = list.props().iter().copied().filter(|p| *p != "password-hash").collect();
            assert_eq!(described, parsed, "{m}");
        }
        // Every described command parses in its menu (with a plausible argument).
        for def in MENUS {
            for c in def.commands {
                let words: Vec<String> = match c.name {
                    "set" if def.menu == Menu::Socks => vec!["set".into(), "port=1080".into()],
                    "set" => vec!["set".into(), "0".into(), "comment=x".into()],
                    "add" if def.menu == Menu::Users => vec!["add".into(), "name=a".into()],
                    "add" => vec!["add".into(), "action=deny".into()],
                    "remove" | "enable" | "disable" | "move" => vec![c.name.into(), "0".into()],
                    "unset" => vec!["unset".into(), "0".into(), "value-name=comment".into()],
                    "comment" => vec!["comment".into(), "0".into(), "comment=x".into()],
                    "import" => vec!["import".into(), "file=x".into()],
                    "upgrade" => vec!["upgrade".into()],
                    other => vec![other.into()],
                };
                parse(def.menu, &words).unwrap_or_else(|e| panic!("{} {}: {e}", def.menu, c.name));
            }
        }
        // Settings: every described property is accepted by `set`.
        for p in menu(Menu::Socks).properties {
            let words = vec!["set".to_string(), format!("{}=x", p.name)];
            assert!(parse(Menu::Socks, &words).is_ok(), "{}", p.name);
        }
    }

    /// Help names the commands and properties of the menu.
    #[test]
    fn help_lists_commands_and_properties() {
        let h = help(menu(Menu::Access));
        assert!(
            h.contains("move N|[find ...] [M]") && h.contains("src-address") && h.contains("first enabled match"),
            "{h}"
        );
    }
}
