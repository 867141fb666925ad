//! The RouterOS command language, as far as `/ip socks` goes: menu paths,
//! commands and `name=value` arguments. [`split_line`] turns a script line
//! into words; [`parse`] turns words into a [`Command`]; [`apply`] runs a
//! configuration command against a [`Config`]. The CLI (argv words), the
//! control socket and the state file all come through here.

pub use super::render::{quote, ExportOptions};
pub use super::schema::Menu;
use super::select::{join_words, Expr};
use super::users::{parse_rate, PasswordHash, User, ROUNDS_ACCEPTED};
use super::{
    parse_prefix, AccessRule, Action, AuthMethod, Config, DataPathMode, DstMatch, PortRange, Settings,
    IDLE_TIMEOUT_RANGE, MAX_CONNECTIONS_RANGE,
};
use super::{schema, time};

/// How `print` should show things.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrintOptions {
    /// `print detail`: every property as `name=value`.
    pub detail: bool,
    /// `print count-only`: the number of rows.
    pub count_only: bool,
    /// `print interval=1s`: print again every interval until interrupted.
    pub interval: Option<std::time::Duration>,
    /// `print terse`: one line per item, every property as `name=value`.
    pub terse: bool,
    /// `print where EXPR`: only items the expression selects.
    pub filter: Option<Expr>,
    /// `access print stats`: what the XDP prefilter dropped, per rule.
    pub stats: bool,
}

/// A numbered list of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Access,
    Users,
}

impl List {
    /// Properties an item of the list takes: the schema's, and for users
    /// `password-hash`, which is how the state file keeps a password (people
    /// type `password`).
    pub fn props(self) -> Vec<&'static str> {
        let mut props = schema::property_names(self.menu());
        if self == List::Users {
            props.push("password-hash");
        }
        props
    }

    fn menu(self) -> Menu {
        match self {
            List::Access => Menu::Access,
            List::Users => Menu::Users,
        }
    }

    fn allowed(self) -> String {
        schema::property_names(self.menu()).join(", ")
    }
}

/// A property change: `name=value` sets, `!name` clears.
pub type Change = (&'static str, Option<String>);

/// Which items a command acts on: numbers as `print` shows them, or
/// `[find ...]`, evaluated against the list when the command runs (an
/// expression that selects nothing is not an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Numbers(Vec<usize>),
    Find(Expr),
}

impl Selector {
    /// The numbers of the selected items among `len`, whose properties
    /// `values(item, name)` gives (printed forms).
    pub fn resolve(&self, len: usize, values: impl Fn(usize, &str) -> Vec<String>) -> Result<Vec<usize>, CommandError> {
        match self {
            Selector::Numbers(numbers) => {
                check_items(len, numbers)?;
                Ok(numbers.clone())
            }
            Selector::Find(expr) => Ok((0..len).filter(|&i| expr.matches(&|name| values(i, name))).collect()),
        }
    }
}

/// Where `add` puts the new item and what it starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// `place-before=N`: inserted before item N (appended when `None`).
    pub before: Option<usize>,
    /// `copy-from=N`: starts as a copy of item N, then the properties given apply.
    pub copy_from: Option<usize>,
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A bare menu path: changes the current menu (scripts).
    Enter(Menu),
    /// `export` in some menu: the configuration below it as a script.
    Export(Menu, ExportOptions),
    /// `/import file=NAME`: runs a script of configuration commands as one
    /// change, all or nothing.
    Import {
        file: String,
        verbose: bool,
    },
    /// `upgrade [binary=PATH]`: a new proxyd process takes over without
    /// dropping a tunnel.
    Upgrade {
        binary: Option<String>,
    },
    SettingsPrint,
    SettingsSet(Vec<(String, String)>),
    /// `print` in a list menu or in `connections`.
    Print(Menu, PrintOptions),
    Add(List, Vec<Change>, Placement),
    Set(List, Selector, Vec<Change>),
    Remove(List, Selector),
    Enable(List, Selector),
    Disable(List, Selector),
    /// Moves the items before the item numbered `before` (to the end when `None`).
    Move(List, Selector, Option<usize>),
    /// `connections remove N`: closes live connections (not a configuration change).
    ConnectionsRemove(Selector),
}

impl Command {
    /// True when the command changes the configuration (and must be saved).
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Command::SettingsSet(_)
                | Command::Add(..)
                | Command::Set(..)
                | Command::Remove(..)
                | Command::Enable(..)
                | Command::Disable(..)
                | Command::Move(..)
        )
    }
}

/// Why a command was refused. Each names what was wrong and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no such menu: `{path}` (proxyd manages {})", schema::menu_paths())]
    UnknownMenu { path: String },
    #[error("no such command in {menu}: `{command}` (allowed: {allowed})")]
    UnknownCommand { menu: Menu, command: String, allowed: String },
    #[error("{menu} has no property `{name}` (allowed: {allowed})")]
    UnknownProperty { menu: Menu, name: String, allowed: String },
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

/// `property` (with `value`) in a command that already set `earlier`, the
/// same property or one that names the same thing.
fn given_twice(property: &str, value: &str, earlier: &str) -> CommandError {
    invalid(property, value, format!("one value, given once (with {earlier}= already in this command)"))
}

/// The body of a line that continues on the next one (RouterOS: a trailing
/// `\`), without the mark; `None` for a line that ends a command.
pub fn continued(line: &str) -> Option<&str> {
    line.trim_end().strip_suffix('\\')
}

/// The word [`split_line`] makes of a `;` outside quotes: it ends a command,
/// and another may follow on the same line (RouterOS).
pub const SEPARATOR: &str = ";";

/// The commands of a line split into words: the runs between [`SEPARATOR`]s
/// (empty ones left out).
pub fn statements(words: &[String]) -> impl Iterator<Item = &[String]> {
    words.split(|w| w == SEPARATOR).filter(|s| !s.is_empty())
}

/// Splits one script line into words: whitespace separates, `;` ends a
/// command (a [`SEPARATOR`] word), `"..."` quotes
/// (with RouterOS's escapes: `\"`, `\\`, `\n`, `\r`, `\t`, `\_` for a space,
/// `\a`, `\b`, `\f`, `\v`, and `\XX`, two upper-case hex digits, for a byte),
/// `#` at the start of a word begins a comment. A trailing `\` is a
/// continuation and is dropped by the caller.
pub fn split_line(line: &str) -> Result<Vec<String>, CommandError> {
    let unterminated = || CommandError::Usage("unterminated quote".into());
    let push = |w: &mut Vec<u8>, c: char| w.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
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
        if first == ';' {
            chars.next();
            words.push(SEPARATOR.to_owned());
            continue;
        }
        // Bytes: a `\XX` escape may be one byte of a UTF-8 character.
        let mut word = Vec::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() || c == ';' {
                break;
            }
            chars.next();
            if c != '"' {
                push(&mut word, c);
                continue;
            }
            loop {
                match chars.next().ok_or_else(unterminated)? {
                    '"' => break,
                    '\\' => {
                        let e = chars.next().ok_or_else(unterminated)?;
                        let hex = |c: char| c.to_digit(16).filter(|_| !c.is_ascii_lowercase());
                        match (hex(e), chars.peek().copied().and_then(hex)) {
                            (Some(hi), Some(lo)) => {
                                chars.next();
                                word.push((hi * 16 + lo) as u8);
                            }
                            _ => match e {
                                'n' => word.push(b'\n'),
                                'r' => word.push(b'\r'),
                                't' => word.push(b'\t'),
                                '_' => word.push(b' '),
                                'a' => word.push(0x07),
                                'b' => word.push(0x08),
                                'f' => word.push(0x0c),
                                'v' => word.push(0x0b),
                                other => push(&mut word, other),
                            },
                        }
                    }
                    other => push(&mut word, other),
                }
            }
        }
        words.push(
            String::from_utf8(word)
                .map_err(|_| CommandError::Usage("a \\XX escape does not make valid UTF-8 text".into()))?,
        );
    }
    Ok(words)
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
    if menu == Menu::Root && idx == 1 && !matches!(cmd, "export" | "import" | "upgrade") {
        menu = Menu::Socks;
    }
    let args = &words[idx..];
    // RouterOS continuation marks, when a manual line is pasted as it stands
    // (a shell makes `\...` of the next line `...`).
    let args: Vec<&str> = args.iter().map(String::as_str).filter(|a| !matches!(*a, "\\" | "\\..." | "...")).collect();
    let command = match (menu, cmd) {
        (_, "export") => Command::Export(menu, export_options(menu, &args)?),
        (Menu::Root, "import") => import_args(&args)?,
        (Menu::Root, "upgrade") => {
            let mut binary = None;
            let mut words = args.iter();
            while let Some(a) = words.next() {
                match (*a, a.split_once('=')) {
                    ("--binary", _) => binary = words.next().map(|b| b.to_string()),
                    (_, Some(("binary" | "--binary", b))) if !b.is_empty() => binary = Some(b.to_owned()),
                    _ => {
                        return Err(CommandError::Usage(format!(
                            "upgrade: unknown argument `{a}` (allowed: binary=PATH)"
                        )))
                    }
                }
            }
            Command::Upgrade { binary }
        }
        (Menu::Socks, "print") => {
            no_args(menu, "print", &args)?;
            Command::SettingsPrint
        }
        (Menu::Socks, "set") => Command::SettingsSet(settings_args(&args)?),
        (Menu::Access | Menu::Users | Menu::Connections, "print") => Command::Print(menu, print_options(menu, &args)?),
        (Menu::Connections, "remove") => {
            let (selector, rest) = take_find(menu, &args)?;
            Command::ConnectionsRemove(match selector {
                Some(s) if rest.is_empty() => s,
                Some(_) => {
                    return Err(CommandError::Usage(format!("remove takes one selection, not also `{}`", rest[0])))
                }
                None => Selector::Numbers(numbers(&rest)?),
            })
        }
        (
            Menu::Access | Menu::Users,
            verb @ ("add" | "set" | "unset" | "comment" | "remove" | "enable" | "disable" | "move"),
        ) => {
            let list = if menu == Menu::Access { List::Access } else { List::Users };
            list_command(list, verb, &args)?
        }
        (m, c) => {
            return Err(CommandError::UnknownCommand {
                menu: m,
                command: c.to_owned(),
                allowed: schema::command_names(m),
            });
        }
    };
    Ok((menu, command))
}

fn is_command(word: &str) -> bool {
    matches!(word, "print" | "set" | "add" | "remove" | "enable" | "disable" | "move" | "export" | "import" | "upgrade")
}

/// The properties a `where` or `[find ...]` in `menu` may test.
fn selectable(menu: Menu) -> Vec<&'static str> {
    schema::property_names(menu).into_iter().filter(|p| *p != "password").collect()
}

/// Takes a `[find ...]` (also `numbers=[find ...]`) out of `args`: the
/// words from one starting with `[` to the one ending with `]`.
fn take_find<'a>(menu: Menu, args: &[&'a str]) -> Result<(Option<Selector>, Vec<&'a str>), CommandError> {
    let Some(start) = args.iter().position(|a| a.starts_with('[') || a.starts_with("numbers=[")) else {
        return Ok((None, args.to_vec()));
    };
    let Some(end) = (start..args.len()).find(|&i| args[i].ends_with(']')) else {
        return Err(CommandError::Usage("`[` without `]`: write [find ...] as one selection".into()));
    };
    let mut words: Vec<&str> = args[start..=end].to_vec();
    words[0] = words[0].trim_start_matches("numbers=").trim_start_matches('[');
    let last = words.len() - 1;
    words[last] = words[last].strip_suffix(']').unwrap_or(words[last]);
    let text = join_words(&words);
    let inner = text.trim();
    let body = match inner.strip_prefix("find") {
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => rest.trim_start(),
        _ => return Err(CommandError::Usage(format!("`[{inner}]`: only [find ...] selects items"))),
    };
    let body =
        body.strip_prefix("where").filter(|r| r.is_empty() || r.starts_with(char::is_whitespace)).unwrap_or(body);
    let expr = Expr::parse(body, &selectable(menu)).map_err(|e| CommandError::Usage(format!("[find]: {e}")))?;
    let rest = args[..start].iter().chain(&args[end + 1..]).copied().collect();
    Ok((Some(Selector::Find(expr)), rest))
}

fn export_options(menu: Menu, args: &[&str]) -> Result<ExportOptions, CommandError> {
    let mut opts = ExportOptions::default();
    for a in args {
        match (*a, a.split_once('=')) {
            ("verbose", _) => opts.verbose = true,
            ("compact", _) => opts.verbose = false,
            ("terse", _) => opts.terse = true,
            ("show-sensitive", _) => opts.show_sensitive = true,
            ("hide-sensitive" | "without-paging", _) => {}
            (_, Some(("file", name))) if !name.is_empty() => opts.file = Some(name.to_owned()),
            (other, _) => {
                return Err(CommandError::Usage(format!(
                    "{menu} export: unknown argument `{other}` (allowed: compact, verbose, terse, show-sensitive, file=NAME)"
                )))
            }
        }
    }
    Ok(opts)
}

fn import_args(args: &[&str]) -> Result<Command, CommandError> {
    let (mut file, mut verbose) = (None, false);
    for a in args {
        match a.split_once('=') {
            Some(("file-name" | "file", v)) if !v.is_empty() => file = Some(v.to_owned()),
            Some(("verbose", v)) => verbose = yes_no("verbose", v)?,
            None if file.is_none() => file = Some(a.to_string()),
            _ => {
                return Err(CommandError::Usage(format!(
                    "import: unknown argument `{a}` (allowed: file=NAME, verbose=yes|no)"
                )))
            }
        }
    }
    let file = file.ok_or_else(|| CommandError::Usage("import needs file=NAME".into()))?;
    Ok(Command::Import { file, verbose })
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
    for (i, a) in args.iter().enumerate() {
        match (*a, a.split_once('=')) {
            ("detail", _) => opts.detail = true,
            ("terse", _) => opts.terse = true,
            ("count-only", _) => opts.count_only = true,
            ("stats", _) if menu == Menu::Access => opts.stats = true,
            ("without-paging" | "brief", _) => {}
            ("where", _) => {
                let text = join_words(&args[i + 1..]);
                let expr =
                    Expr::parse(&text, &selectable(menu)).map_err(|e| CommandError::Usage(format!("where: {e}")))?;
                opts.filter = Some(expr);
                break;
            }
            (_, Some(("interval", v))) => {
                let d = time::parse(v)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| invalid("interval", v, "a time such as 1s or 500ms"))?;
                opts.interval = Some(d);
            }
            (other, _) => {
                let stats = if menu == Menu::Access { "stats, " } else { "" };
                return Err(CommandError::Usage(format!(
                    "{menu} print: unknown argument `{other}` (allowed: detail, terse, count-only, {stats}interval=TIME, where EXPR, without-paging)"
                )));
            }
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

fn settings_args(args: &[&str]) -> Result<Vec<(String, String)>, CommandError> {
    let settings = schema::property_names(Menu::Socks);
    let mut out = Vec::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            let names = settings.join(", ");
            return Err(CommandError::Usage(format!("set takes name=value, not `{a}` (properties: {names})")));
        };
        if !settings.contains(&k) {
            return Err(CommandError::UnknownProperty {
                menu: Menu::Socks,
                name: k.into(),
                allowed: settings.join(", "),
            });
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(given_twice(k, v, k));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    if out.is_empty() {
        return Err(CommandError::Usage(format!("set needs properties (allowed: {})", settings.join(", "))));
    }
    Ok(out)
}

/// Parses the arguments of a list command.
fn list_command(list: List, verb: &str, args: &[&str]) -> Result<Command, CommandError> {
    let (find, args) = take_find(list.menu(), args)?;
    let args = &args[..];
    if verb == "move" {
        let mut positional = Vec::new();
        let mut dest = None;
        for a in args {
            match a.split_once('=') {
                Some(("numbers", v)) => positional.insert(0, v),
                Some(("destination", v)) => dest = Some(v),
                Some((k, _)) => {
                    return Err(CommandError::UnknownProperty {
                        menu: list.menu(),
                        name: k.into(),
                        allowed: "numbers, destination".into(),
                    })
                }
                None => positional.push(a),
            }
        }
        if dest.is_none() && positional.len() == 2 - usize::from(find.is_some()) {
            dest = positional.pop();
        }
        let selector = match find {
            Some(s) if positional.is_empty() => s,
            None if positional.len() == 1 => Selector::Numbers(numbers(&positional)?),
            _ => {
                return Err(CommandError::Usage(
                    "usage: move N|[find ...] [M] (M: the item to move before; the end when left out)".into(),
                ))
            }
        };
        let to = dest.map(number).transpose()?;
        return Ok(Command::Move(list, selector, to));
    }
    if verb == "add" {
        if find.is_some() {
            return Err(CommandError::Usage("add takes name=value properties, not [find]".into()));
        }
        let mut placement = Placement::default();
        let mut rest = Vec::new();
        for a in args {
            match a.split_once('=') {
                Some(("place-before", v)) => placement.before = Some(number(v)?),
                Some(("copy-from", v)) => placement.copy_from = Some(number(v)?),
                _ => rest.push(*a),
            }
        }
        let (items, changes) = item_args(list, &rest)?;
        if let Some(extra) = items.first() {
            return Err(CommandError::Usage(format!("add takes name=value properties, not `{extra}`")));
        }
        return Ok(Command::Add(list, changes, placement));
    }
    // RouterOS's `unset N value-name=PROP[,PROP...]` (or the names alone)
    // clears properties, as `set N !PROP` does.
    let unset: Vec<String>;
    let args: Vec<&str> = if verb == "unset" {
        let props = list.props();
        unset = args
            .iter()
            .flat_map(|a| match a.split_once('=') {
                Some(("value-name", names)) => names.split(',').map(|n| format!("!{n}")).collect(),
                None if props.contains(a) => vec![format!("!{a}")],
                _ => vec![a.to_string()],
            })
            .collect();
        unset.iter().map(String::as_str).collect()
    } else {
        args.to_vec()
    };
    let (items, changes) = item_args(list, &args)?;
    let selector = match find {
        Some(s) if items.is_empty() => s,
        Some(_) => return Err(CommandError::Usage(format!("{verb} takes one selection, not also `{}`", items[0]))),
        None => Selector::Numbers(numbers(&items)?),
    };
    Ok(match verb {
        "set" => {
            if changes.is_empty() {
                return Err(CommandError::Usage(format!("set needs properties (allowed: {})", list.allowed())));
            }
            Command::Set(list, selector, changes)
        }
        "unset" => {
            if changes.is_empty() || changes.iter().any(|(_, v)| v.is_some()) {
                return Err(CommandError::Usage(format!(
                    "usage: unset N|[find ...] value-name=NAME[,NAME...] (names: {})",
                    list.allowed()
                )));
            }
            Command::Set(list, selector, changes)
        }
        // RouterOS's `comment N comment=TEXT`: the comment alone.
        "comment" => match &changes[..] {
            [("comment", Some(_))] => Command::Set(list, selector, changes),
            _ => return Err(CommandError::Usage("usage: comment N|[find ...] comment=TEXT".into())),
        },
        _ => {
            if let Some((name, _)) = changes.first() {
                return Err(CommandError::Usage(format!("{verb} takes item numbers or [find ...], not `{name}`")));
            }
            match verb {
                "remove" => Command::Remove(list, selector),
                "enable" => Command::Enable(list, selector),
                _ => Command::Disable(list, selector),
            }
        }
    })
}

/// Splits list arguments into bare words (item numbers) and property changes.
fn item_args<'a>(list: List, args: &[&'a str]) -> Result<(Vec<&'a str>, Vec<Change>), CommandError> {
    let mut items = Vec::new();
    let mut changes = Vec::new();
    for a in args {
        let (name, value) = match a.split_once('=') {
            Some(("numbers", _)) => {
                items.push(*a);
                continue;
            }
            Some((k, v)) => (k, Some(v.to_owned())),
            None => match a.strip_prefix('!') {
                Some(k) => (k, None),
                None => {
                    items.push(*a);
                    continue;
                }
            },
        };
        let prop = list.props().into_iter().find(|p| *p == name).ok_or_else(|| CommandError::UnknownProperty {
            menu: list.menu(),
            name: name.into(),
            allowed: list.allowed(),
        })?;
        // One value per property: a second one (or a password next to a hash,
        // which one of them would silently override) is a typing error.
        let same =
            |p: &str| p == prop || matches!((p, prop), ("password", "password-hash") | ("password-hash", "password"));
        if let Some((other, _)) = changes.iter().find(|(p, _): &&Change| same(p)) {
            let shown = if prop == "password" { "(hidden)" } else { value.as_deref().unwrap_or("") };
            return Err(given_twice(prop, shown, other));
        }
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

/// An item of a numbered list.
trait Item: Default {
    /// Sets one property from its text (`None`: back to the default), checking it.
    fn set(&mut self, prop: &str, value: Option<&str>) -> Result<(), CommandError>;
    fn set_disabled(&mut self, disabled: bool);
    /// A property's printed value, empty when not set (what `where` tests).
    fn value(&self, prop: &str) -> String;
}

impl Item for AccessRule {
    fn set(&mut self, prop: &str, value: Option<&str>) -> Result<(), CommandError> {
        let addr = |v: &str| {
            parse_prefix(v)
                .ok_or_else(|| invalid(prop, v, "an address a.b.c.d or prefix a.b.c.d/0..32 (IPv6: x::y/0..128)"))
        };
        let port = |v: &str| {
            v.parse::<PortRange>().map_err(|_| invalid(prop, v, "a port 0..65535 or a range N-M with N <= M"))
        };
        match (prop, value) {
            ("src-address", v) => self.src_address = v.map(addr).transpose()?,
            ("dst-address", v) => {
                self.dst_address = v
                    .map(|v| {
                        DstMatch::parse(v)
                            .ok_or_else(|| invalid(prop, v, "an address, a prefix a.b.c.d/0..32, or a domain name"))
                    })
                    .transpose()?
            }
            ("src-port", v) => self.src_port = v.map(port).transpose()?,
            ("dst-port", v) => self.dst_port = v.map(port).transpose()?,
            ("action", None | Some("allow")) => self.action = Action::Allow,
            ("action", Some("deny")) => self.action = Action::Deny,
            ("action", Some(v)) => return Err(invalid(prop, v, "allow, deny")),
            ("disabled", v) => self.disabled = v.map(|v| yes_no(prop, v)).transpose()?.unwrap_or(false),
            ("comment", v) => self.comment = v.filter(|c| !c.is_empty()).map(str::to_owned),
            _ => unreachable!("item_args checked the property"),
        }
        Ok(())
    }

    fn set_disabled(&mut self, disabled: bool) {
        self.disabled = disabled;
    }

    fn value(&self, prop: &str) -> String {
        super::render::rule_value(self, prop)
    }
}

impl Item for User {
    fn set(&mut self, prop: &str, value: Option<&str>) -> Result<(), CommandError> {
        match (prop, value) {
            ("name", Some(v)) if !v.is_empty() && v.len() <= 255 => self.name = v.to_owned(),
            ("name", v) => return Err(invalid(prop, v.unwrap_or(""), "a name of 1..255 bytes")),
            ("password", Some(v)) if v.len() <= 255 => self.password = PasswordHash::new(v.as_bytes()),
            ("password", Some(_)) => return Err(invalid(prop, "(hidden)", "a password of at most 255 bytes")),
            ("password" | "password-hash", None) => self.password = PasswordHash::default(),
            ("password-hash", Some(v)) => {
                self.password = PasswordHash::parse(v).ok_or_else(|| {
                    let (lo, hi) = (ROUNDS_ACCEPTED.start(), ROUNDS_ACCEPTED.end());
                    invalid(prop, v, format!("a hash as `export` prints it, of {lo} to {hi} PBKDF2 rounds"))
                })?
            }
            ("only-one", v) => self.only_one = v.map(|v| yes_no(prop, v)).transpose()?.unwrap_or(false),
            ("rate-limit", None) => self.rate_limit = None,
            ("rate-limit", Some(v)) => {
                self.rate_limit = parse_rate(v)
                    .ok_or_else(|| invalid(prop, v, "bits per second, e.g. 8M, 512k, 64000; 0 for none"))?
            }
            ("disabled", v) => self.disabled = v.map(|v| yes_no(prop, v)).transpose()?.unwrap_or(false),
            ("comment", v) => self.comment = v.filter(|c| !c.is_empty()).map(str::to_owned),
            _ => unreachable!("item_args checked the property"),
        }
        Ok(())
    }

    fn set_disabled(&mut self, disabled: bool) {
        self.disabled = disabled;
    }

    fn value(&self, prop: &str) -> String {
        super::render::user_value(self, prop)
    }
}

fn check_items(list_len: usize, items: &[usize]) -> Result<(), CommandError> {
    match items.iter().find(|&&n| n >= list_len) {
        Some(&n) => Err(CommandError::NoSuchItem(n)),
        None => Ok(()),
    }
}

/// Runs a list command on `items`.
fn apply_list<T: Item + Clone>(items: &mut Vec<T>, command: &Command) -> Result<(), CommandError> {
    let select =
        |items: &Vec<T>, selector: &Selector| selector.resolve(items.len(), |i, name| vec![items[i].value(name)]);
    match command {
        Command::Add(_, changes, placement) => {
            check_items(items.len(), placement.copy_from.as_slice())?;
            if let Some(b) = placement.before.filter(|b| *b > items.len()) {
                return Err(CommandError::NoSuchItem(b));
            }
            let mut item = placement.copy_from.map(|n| items[n].clone()).unwrap_or_default();
            for (prop, value) in changes {
                item.set(prop, value.as_deref())?;
            }
            items.insert(placement.before.unwrap_or(items.len()), item);
        }
        Command::Set(_, selector, changes) => {
            for n in select(items, selector)? {
                for (prop, value) in changes {
                    items[n].set(prop, value.as_deref())?;
                }
            }
        }
        Command::Remove(_, selector) => {
            for n in select(items, selector)?.into_iter().rev() {
                items.remove(n);
            }
        }
        Command::Enable(_, selector) | Command::Disable(_, selector) => {
            let disabled = matches!(command, Command::Disable(..));
            for n in select(items, selector)? {
                items[n].set_disabled(disabled);
            }
        }
        Command::Move(_, selector, before) => {
            let numbers = select(items, selector)?;
            if let Some(b) = before {
                if *b > items.len() {
                    return Err(CommandError::NoSuchItem(*b));
                }
            }
            // Take the moved items out, then insert them before the item that
            // had number `before` (which may itself have shifted down).
            let before_item = before.filter(|b| *b < items.len() && !numbers.contains(b));
            let mut moved = Vec::new();
            let mut kept = Vec::new();
            let mut anchor = None;
            for (i, r) in items.drain(..).enumerate() {
                if numbers.contains(&i) {
                    moved.push(r);
                } else {
                    if Some(i) == before_item {
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
            *items = kept;
        }
        _ => unreachable!("apply_list gets list commands"),
    }
    Ok(())
}

/// Applies a configuration-changing command to `config`; on error `config`
/// is left as it was.
pub fn apply(config: &mut Config, command: &Command) -> Result<(), CommandError> {
    let mut new = config.clone();
    apply_in_place(&mut new, command)?;
    *config = new;
    Ok(())
}

fn apply_in_place(config: &mut Config, command: &Command) -> Result<(), CommandError> {
    match command {
        Command::SettingsSet(pairs) => {
            for (k, v) in pairs {
                set_setting(&mut config.settings, k, v)?;
            }
            // Checked after all pairs, so `set version=5 auth-method=password` works in one go.
            if config.settings.auth_method == AuthMethod::Password && config.settings.version < 5 {
                let (property, value) = match pairs.iter().rev().find(|(k, _)| k == "version" || k == "auth-method") {
                    Some((k, v)) => (k.as_str(), v.as_str()),
                    None => ("auth-method", "password"),
                };
                return Err(invalid(
                    property,
                    value,
                    "auth-method=password needs version=5 (SOCKS4 has no password login)",
                ));
            }
            Ok(())
        }
        Command::Add(List::Access, ..)
        | Command::Set(List::Access, ..)
        | Command::Remove(List::Access, _)
        | Command::Enable(List::Access, _)
        | Command::Disable(List::Access, _)
        | Command::Move(List::Access, ..) => apply_list(&mut config.access.rules, command),
        Command::Add(List::Users, ..)
        | Command::Set(List::Users, ..)
        | Command::Remove(List::Users, _)
        | Command::Enable(List::Users, _)
        | Command::Disable(List::Users, _)
        | Command::Move(List::Users, ..) => {
            apply_list(&mut config.users, command)?;
            check_users(&config.users)
        }
        _ => Err(CommandError::Usage("not a configuration change".into())),
    }
}

/// Every user has a unique name.
fn check_users(users: &[User]) -> Result<(), CommandError> {
    for (i, u) in users.iter().enumerate() {
        if u.name.is_empty() {
            return Err(invalid("name", "", "a name is needed (add name=... password=...)"));
        }
        if users[..i].iter().any(|o| o.name == u.name) {
            return Err(invalid("name", &u.name, "a name no other user has"));
        }
    }
    Ok(())
}

fn set_setting(s: &mut Settings, k: &str, v: &str) -> Result<(), CommandError> {
    match k {
        "enabled" => s.enabled = yes_no(k, v)?,
        "port" => {
            s.port = match v.parse::<u16>() {
                Ok(p) if p >= 1 => p,
                _ => return Err(invalid(k, v, "1..65535")),
            }
        }
        "connection-idle-timeout" => {
            let (lo, hi) = IDLE_TIMEOUT_RANGE;
            let allowed =
                format!("a time from {} to {} (e.g. 30s, 2m, 1h, 1d2h3m4s)", time::format(lo), time::format(hi));
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
            s.listen_address =
                v.parse().map_err(|_| invalid(k, v, "an IPv4 or IPv6 address, e.g. 0.0.0.0, 127.0.0.1, ::"))?
        }
        "data-path" => s.data_path = v.parse::<DataPathMode>().map_err(|_| invalid(k, v, DataPathMode::ALLOWED))?,
        "vrf" => s.vrf = super::parse_vrf(v).ok_or_else(|| invalid(k, v, super::VRF_ALLOWED))?,
        "version" => {
            s.version = match v {
                "4" => 4,
                "5" => 5,
                _ => return Err(invalid(k, v, "4 (SOCKS4/4a only), 5 (SOCKS5 and SOCKS4)")),
            }
        }
        "auth-method" => {
            s.auth_method = match v {
                "none" => AuthMethod::None,
                "password" => AuthMethod::Password,
                _ => return Err(invalid(k, v, "none, password")),
            }
        }
        "metrics-address" => {
            s.metrics_address =
                match v {
                    "" | "none" => None,
                    _ => Some(v.parse().map_err(|_| {
                        invalid(k, v, "ADDRESS:PORT (e.g. 127.0.0.1:9180, [::1]:9180), or empty for off")
                    })?),
                }
        }
        "xdp-interfaces" => {
            let names: Vec<String> = v.split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect();
            let valid =
                |n: &String| n.len() <= 15 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
            if let Some(bad) = names.iter().find(|n| !valid(n)) {
                return Err(invalid(
                    k,
                    bad,
                    "interface names (at most 15 characters) separated by commas, or empty for off",
                ));
            }
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            if unique.len() != names.len() {
                return Err(invalid(k, v, "each interface once"));
            }
            s.xdp_interfaces = names;
        }
        _ => unreachable!("settings_args checked the names"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[find where EXPR]` and `print where EXPR` select exactly what a
    /// straightforward filter over the rules' fields selects, for random
    /// lists and random expressions (atoms, `and`, `or`, `not`, parentheses).
    #[test]
    fn selection_matches_a_plain_filter() {
        struct Rng(u64);
        impl Rng {
            fn below(&mut self, n: u64) -> u64 {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (self.0 >> 33) % n
            }
        }
        type Pred = Box<dyn Fn(&AccessRule) -> bool>;
        fn atom(r: &mut Rng) -> (String, Pred) {
            let port = |a: &AccessRule| a.dst_port.map(|p| p.to_string());
            let first =
                |a: &AccessRule| a.dst_port.map(|p| p.to_string().split('-').next().unwrap().parse::<u64>().unwrap());
            match r.below(8) {
                0 => ("action=deny".into(), Box::new(|a: &AccessRule| a.action == Action::Deny)),
                1 => ("action!=deny".into(), Box::new(|a: &AccessRule| a.action != Action::Deny)),
                2 => ("disabled".into(), Box::new(|a: &AccessRule| a.disabled)),
                3 => ("!disabled".into(), Box::new(|a: &AccessRule| !a.disabled)),
                4 => ("dst-port=21".into(), Box::new(move |a: &AccessRule| port(a).as_deref() == Some("21"))),
                5 => ("dst-port>1000".into(), Box::new(move |a: &AccessRule| first(a).is_some_and(|p| p > 1000))),
                6 => (
                    "comment~\"^c[12]\"".into(),
                    Box::new(|a: &AccessRule| a.comment.as_deref().is_some_and(|c| c == "c1" || c == "c2")),
                ),
                _ => (
                    "src-address=10.0.0.0/8".into(),
                    Box::new(|a: &AccessRule| a.src_address.is_some_and(|n| n.to_string() == "10.0.0.0/8")),
                ),
            }
        }
        fn expr(r: &mut Rng, depth: u32) -> (String, Pred) {
            if depth == 0 || r.below(3) == 0 {
                return atom(r);
            }
            let (a, pa) = expr(r, depth - 1);
            let (b, pb) = expr(r, depth - 1);
            match r.below(3) {
                0 => (format!("({a}) and ({b})"), Box::new(move |x: &AccessRule| pa(x) && pb(x))),
                1 => (format!("({a}) or ({b})"), Box::new(move |x: &AccessRule| pa(x) || pb(x))),
                _ => (format!("not ({a})"), Box::new(move |x: &AccessRule| !pa(x))),
            }
        }
        let mut rng = Rng(7);
        for round in 0..300 {
            let mut c = Config::default();
            for _ in 0..rng.below(12) {
                let mut line = String::from("ip socks access add");
                line += [" action=deny", " action=allow"][rng.below(2) as usize];
                line += ["", " dst-port=21", " dst-port=1024-65535", " dst-port=80", " dst-port=2000"]
                    [rng.below(5) as usize];
                line += ["", " src-address=10.0.0.0/8", " src-address=192.168.0.2"][rng.below(3) as usize];
                line += ["", " disabled=yes"][rng.below(2) as usize];
                line += ["", " comment=c1", " comment=c2", " comment=c3"][rng.below(4) as usize];
                let (_, cmd) = parse(Menu::Root, &split_line(&line).unwrap()).unwrap();
                apply(&mut c, &cmd).unwrap();
            }
            let (text, pred) = expr(&mut rng, 3);
            let want: Vec<AccessRule> = c.access.rules.iter().filter(|r| !pred(r)).cloned().collect();
            let line = format!("/ip socks access remove [find where {text}]");
            let (_, cmd) = parse(Menu::Root, &split_line(&line).unwrap()).unwrap_or_else(|e| panic!("{line}: {e}"));
            let mut after = c.clone();
            apply(&mut after, &cmd).unwrap();
            assert_eq!(after.access.rules, want, "round {round}: {line}");
            // `print where` selects the complement of what stayed.
            let (_, cmd) = parse(Menu::Access, &split_line(&format!("print where {text}")).unwrap()).unwrap();
            let Command::Print(_, opts) = cmd else { panic!() };
            let selector = Selector::Find(opts.filter.unwrap());
            let picked = selector
                .resolve(c.access.rules.len(), |i, name| {
                    vec![super::super::render::rule_value(&c.access.rules[i], name)]
                })
                .unwrap();
            let plain: Vec<usize> = (0..c.access.rules.len()).filter(|&i| pred(&c.access.rules[i])).collect();
            assert_eq!(picked, plain, "round {round}: {text}");
        }
    }
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
        assert_eq!(
            parse(Menu::Root, &w("ip socks set enabled=yes")).unwrap().1,
            Command::SettingsSet(vec![("enabled".into(), "yes".into())])
        );
        assert_eq!(parse(Menu::Root, &w("ip socks print")).unwrap().1, Command::SettingsPrint);
        assert_eq!(
            parse(Menu::Root, &w("/ip socks access print")).unwrap().1,
            Command::Print(Menu::Access, PrintOptions::default())
        );
        assert_eq!(
            parse(Menu::Root, &w("ip socks access print stats")).unwrap().1,
            Command::Print(Menu::Access, PrintOptions { stats: true, ..Default::default() })
        );
        assert!(parse(Menu::Root, &w("ip socks users print stats")).is_err());
        assert_eq!(
            parse(Menu::Root, &w("ip socks connections print")).unwrap().1,
            Command::Print(Menu::Connections, PrintOptions::default())
        );
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
        // The same pasted after the program name in a shell, which makes `\...` `...`.
        assert_eq!(
            parse(Menu::Access, &w("add src-address=192.168.0.2 dst-port=21 ... action=allow")).unwrap().1,
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
        let e = run(&mut Config::default(), "set auth-method=password").unwrap_err();
        assert!(e.to_string().contains("auth-method") && e.to_string().contains("version=5"), "{e}");
        let mut c = Config::default();
        run(&mut c, "set version=5 auth-method=password").unwrap();
        assert!(run(&mut c, "set version=4").unwrap_err().to_string().contains("version"));
        let e = run(&mut Config::default(), "access add colour=red").unwrap_err();
        assert!(e.to_string().contains("colour") && e.to_string().contains("src-address"));
    }

    /// add/set/remove/enable/disable/move change the list as RouterOS does.
    #[test]
    fn access_list_editing() {
        let mut c = Config::default();
        for r in ["action=allow comment=a", "action=allow comment=b", "action=allow comment=c", "action=deny comment=d"]
        {
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

    /// Users: names are unique, passwords are checked but never printed.
    #[test]
    fn users_list() {
        let mut c = Config::default();
        run(&mut c, "users add name=alice password=s3cret").unwrap();
        let e = run(&mut c, "users add name=alice password=other").unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        assert!(run(&mut c, "users add password=x").is_err());
        assert!(run(&mut c, "users add name=bob rate-limit=fast").unwrap_err().to_string().contains("rate-limit"));
        run(&mut c, "users add name=bob rate-limit=512k only-one=yes").unwrap();
        assert!(c.users[0].password.verify(b"s3cret"));
        assert_eq!(c.users[1].rate_limit, Some(512_000));
        let printed = crate::control::print::users(&c, &Default::default());
        assert_eq!(printed, "Flags: X - disabled\n0 name=alice only-one=no\n1 name=bob only-one=yes rate-limit=512k\n");
        run(&mut c, "users set 0 password=new").unwrap();
        assert!(c.users[0].password.verify(b"new") && !c.users[0].password.verify(b"s3cret"));
        run(&mut c, "users disable 1").unwrap();
        run(&mut c, "users remove 0").unwrap();
        assert_eq!(c.users.len(), 1);
        assert!(c.users[0].disabled);
    }

    /// RouterOS's `unset` and `comment` commands: `set N !NAME` and `set N comment=`.
    #[test]
    fn unset_and_comment_commands() {
        let mut c = Config::default();
        run(&mut c, "access add src-address=10.0.0.0/8 dst-port=22 action=deny comment=old").unwrap();
        run(&mut c, "access unset 0 value-name=comment,dst-port").unwrap();
        let r = &c.access.rules[0];
        assert!(r.comment.is_none() && r.dst_port.is_none() && r.src_address.is_some(), "{r:?}");
        run(&mut c, "access unset [find action=deny] src-address").unwrap();
        assert!(c.access.rules[0].src_address.is_none());
        run(&mut c, "access comment 0 comment=\"ssh out\"").unwrap();
        assert_eq!(c.access.rules[0].comment.as_deref(), Some("ssh out"));
        let before = c.clone();
        for bad in [
            "access unset 0",
            "access unset 0 comment=x",
            "access unset 0 value-name=nosuch",
            "access comment 0 action=allow",
        ] {
            assert!(run(&mut c, bad).is_err(), "{bad}");
        }
        assert_eq!(c, before, "a refused command changed something");
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
        // `;` ends a command, with or without spaces around it.
        let words = split_line("/ip socks access;add action=deny ; print").unwrap();
        assert_eq!(words, ["/ip", "socks", "access", ";", "add", "action=deny", ";", "print"]);
        assert_eq!(statements(&words).count(), 3);
        // RouterOS escapes: hex bytes (upper case; `\a`, `\b`, `\f` are letters),
        // UTF-8 made of them, `\_` for a space.
        let one = |line: &str| split_line(line).unwrap().remove(0);
        assert_eq!(one(r#""\41\42\_\$x""#), "AB $x");
        assert_eq!(one(r#""\C3\A9t""#), "ét");
        assert_eq!(one(r#""\a\b\f\r""#), "\u{7}\u{8}\u{c}\r");
        assert_eq!(one(r#""\4a""#), "4a", "lower-case: `\\4` then `a`");
        assert!(split_line(r#""\FF""#).is_err(), "not UTF-8");
        for v in ["bell\u{7}", "cr\rlf\n", "\u{1}"] {
            assert_eq!(one(&quote(v)), v, "{:?}", quote(v));
        }
    }

    /// An exported configuration parses back to the same configuration.
    #[test]
    fn export_round_trips() {
        let mut c = Config::default();
        run(&mut c, "set enabled=yes port=1081 connection-idle-timeout=1h30m max-connections=5000").unwrap();
        run(&mut c, "access add src-address=192.168.0.2 dst-port=21 action=allow comment=\"ftp client\"").unwrap();
        run(&mut c, "access add dst-port=1024-65535 action=allow disabled=yes").unwrap();
        run(&mut c, "access add action=deny").unwrap();
        run(&mut c, "access add dst-address=example.com src-address=2001:db8::/32 action=deny").unwrap();
        run(&mut c, "set version=5 auth-method=password").unwrap();
        run(&mut c, "users add name=alice password=s3cret only-one=yes rate-limit=8M comment=\"first user\"").unwrap();
        let script = render::export(&c, Menu::Root, &ExportOptions::state_file());
        assert!(!script.contains("s3cret"), "{script}");
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
