//! `proxyd console`: an interactive shell in RouterOS style.
//!
//! The prompt shows the current menu (`[root@host] /ip socks access> `). A
//! line that is only a menu path (`/ip socks`, `access`, `..`, `/`) changes the
//! menu; any other line goes to the daemon over the control socket with the
//! current menu path in front, exactly as `proxyd /ip socks access print`
//! would, and its answer is printed. Tab completes menus, commands, property
//! names (`name=`) and listed values from [`schema`]; history is kept in
//! memory and in `~/.proxyd_history` (`PROXYD_HISTORY` names another file;
//! empty: none). `?` or `help` prints the menu's help; `quit`, `exit` or
//! Ctrl-D leaves. The console parses nothing itself beyond menu paths: the
//! daemon owns the language.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{CompletionType, Config, Editor, Helper};

use crate::config::command::{continued, parse, split_line, statements, Command, Menu};
use crate::config::schema;
use crate::control::client;
use crate::sys::{self, SIGINT_SEEN};

/// Lines the console answers itself (besides menu paths).
const LOCAL: &[&str] = &["quit", "exit", "help", "?"];

/// Runs the console on `socket` until `quit` or end of input. Returns the exit status.
pub fn run(socket: &Path, json: bool) -> i32 {
    let config = Config::builder()
        .completion_type(CompletionType::List)
        .auto_add_history(false)
        .max_history_size(1000)
        .map(|b| b.build())
        .unwrap_or_default();
    let mut editor: Editor<ConsoleHelper, DefaultHistory> = match Editor::with_config(config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("proxyd console: cannot open the terminal: {e}");
            return 1;
        }
    };
    let menu = std::rc::Rc::new(std::cell::Cell::new(Menu::Root));
    editor.set_helper(Some(ConsoleHelper { menu: menu.clone() }));
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    sys::catch_sigint();
    if std::os::unix::net::UnixStream::connect(socket).is_err() {
        eprintln!(
            "proxyd console: proxyd is not answering on {} yet (is `proxyd run` running? --control sets the socket)",
            socket.display()
        );
    }
    println!("proxyd {} console: Tab completes, `?` shows the menu's help, `quit` leaves.", env!("CARGO_PKG_VERSION"));
    let who = format!("{}@{}", user_name(), host_name());
    let mut status = 0;
    // The start of a command whose line ended in `\` (RouterOS continuation),
    // run only once a line ends it.
    let mut pending = String::new();
    'lines: loop {
        let prompt = if pending.is_empty() { prompt(&who, menu.get()) } else { "\\... ".to_string() };
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                pending.clear();
                continue;
            }
            Err(ReadlineError::Eof) => {
                if !pending.is_empty() {
                    eprintln!("the input ended in a continued line (a trailing `\\`): not run");
                    status = 1;
                }
                break;
            }
            Err(e) => {
                eprintln!("proxyd console: {e}");
                status = 1;
                break;
            }
        };
        let trimmed = line.trim();
        if let Some(body) = continued(trimmed) {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + trimmed;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(trimmed);
        let line_words = match split_line(trimmed) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        for words in statements(&line_words) {
            match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                ["quit" | "exit"] => break 'lines,
                ["?" | "help"] => {
                    print!("{}", schema::help(schema::menu(menu.get())));
                    continue;
                }
                _ => {}
            }
            if let Ok((_, Command::Enter(m))) = parse(menu.get(), words) {
                menu.set(m);
                continue;
            }
            execute(socket, menu.get(), words.to_vec(), json);
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    status
}

/// `[user@host] /ip socks access> `; RouterOS shows the top as `[user@host] > `.
pub fn prompt(who: &str, menu: Menu) -> String {
    match menu {
        Menu::Root => format!("[{who}] > "),
        m => format!("[{who}] {m}> "),
    }
}

/// The words sent to the daemon for `words` typed in `menu`: the menu path in
/// front (none at the top, where a bare `print` means `/ip socks print`, as
/// on the command line).
pub fn request_words(menu: Menu, words: Vec<String>) -> Vec<String> {
    if menu == Menu::Root {
        return words;
    }
    let mut out: Vec<String> = menu.to_string().split_whitespace().map(str::to_owned).collect();
    out.extend(words);
    out
}

/// Sends one command and prints the answer; `print interval=...` repeats until Ctrl-C.
fn execute(socket: &Path, menu: Menu, words: Vec<String>, json: bool) {
    let words = request_words(menu, words);
    SIGINT_SEEN.store(false, Ordering::SeqCst);
    for round in 0.. {
        let resp = match client::send(socket, words.clone(), json) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        };
        let repeat = resp.repeat_ms.filter(|_| resp.exit == 0);
        if repeat.is_some() {
            client::new_round(round);
        }
        print!("{}", resp.stdout);
        eprint!("{}", resp.stderr);
        let Some(ms) = repeat else { return };
        println!("-- refreshing every {ms} ms; Ctrl-C stops --");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            if SIGINT_SEEN.swap(false, Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if SIGINT_SEEN.swap(false, Ordering::SeqCst) {
            return;
        }
    }
}

/// `PROXYD_HISTORY` (empty: no file), else `~/.proxyd_history`.
fn history_file() -> Option<PathBuf> {
    match std::env::var_os("PROXYD_HISTORY") {
        Some(p) if p.is_empty() => None,
        Some(p) => Some(PathBuf::from(p)),
        None => std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".proxyd_history")),
    }
}

fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "admin".into())
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "proxyd".into())
}

/// The line editor's helper: completion from the schema, for the current menu.
struct ConsoleHelper {
    menu: std::rc::Rc<std::cell::Cell<Menu>>,
}

impl Completer for ConsoleHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &rustyline::Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, words) = complete(self.menu.get(), &line[..pos]);
        let pairs = words.into_iter().map(|w| Pair { display: w.trim_end().to_owned(), replacement: w }).collect();
        Ok((start, pairs))
    }
}

impl Hinter for ConsoleHelper {
    type Hint = String;
}
impl Highlighter for ConsoleHelper {}
impl Validator for ConsoleHelper {}
impl Helper for ConsoleHelper {}

/// Completes the last word of `before` (the line up to the cursor) typed in
/// `menu`. Returns where the completed word starts and the candidates; a
/// candidate that finishes a word ends with a space, a property with `=`.
pub fn complete(menu: Menu, before: &str) -> (usize, Vec<String>) {
    let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
    let partial = &before[start..];
    let previous: Vec<&str> = before[..start].split_whitespace().collect();
    let (menu, command) = walk(menu, &previous);
    let mut out: Vec<String> = Vec::new();
    match command {
        None => {
            // A path inside one word: `/ip/so`, `../acc`.
            let (base, seg_start, seg) = match partial.rfind('/') {
                Some(i) => {
                    let dir = &partial[..i + 1];
                    let (m, cmd) = walk(menu, &[dir]);
                    if cmd.is_some() {
                        return (start, vec![]);
                    }
                    (m, start + i + 1, &partial[i + 1..])
                }
                None => (menu, start, partial),
            };
            for s in schema::submenus(base) {
                out.push(format!("{s} "));
            }
            if seg_start == start {
                for c in schema::menu(base).commands {
                    out.push(format!("{} ", c.name));
                }
                if base != Menu::Root {
                    out.push(".. ".into());
                }
                if previous.is_empty() {
                    out.extend(LOCAL.iter().filter(|l| **l != "?").map(|l| format!("{l} ")));
                }
            }
            out.retain(|c| c.starts_with(seg));
            out.sort();
            out.dedup();
            return (seg_start, out);
        }
        Some(cmd) => {
            if let Some((name, value)) = partial.split_once('=') {
                // A listed value: `action=al` -> `allow`.
                if let Some(p) = schema::menu(menu).properties.iter().find(|p| p.name == name) {
                    for v in listed_values(p.values) {
                        if v.starts_with(value) {
                            out.push(format!("{v} "));
                        }
                    }
                }
                return (start + name.len() + 1, out);
            }
            out = arguments(menu, cmd);
            let given: Vec<&str> = previous.iter().filter_map(|w| w.split_once('=').map(|(k, _)| k)).collect();
            out.retain(|c| c.starts_with(partial) && !given.iter().any(|g| c.strip_suffix('=') == Some(*g)));
        }
    }
    (start, out)
}

/// What can follow `command` in `menu`, from its usage line: keywords
/// (`detail `, `interval=`) and, when it takes `NAME=VALUE`, the menu's properties.
pub fn arguments(menu: Menu, command: &str) -> Vec<String> {
    let def = schema::menu(menu);
    let Some(c) = def.commands.iter().find(|c| c.name == command) else { return vec![] };
    let mut out = Vec::new();
    for token in c.usage.split(|ch: char| ch.is_whitespace() || "[]|".contains(ch)).skip(1) {
        let token = token.trim_end_matches("...");
        let (word, takes_value) = match token.split_once('=') {
            Some((k, _)) => (k, true),
            None => (token, false),
        };
        if word.is_empty() || !word.chars().all(|ch| ch.is_ascii_lowercase() || ch == '-') {
            continue;
        }
        out.push(match (word, takes_value) {
            ("find", _) => "[find ".to_string(),
            (_, true) => format!("{word}="),
            (_, false) => format!("{word} "),
        });
    }
    // `where EXPR` (and `[find ...]`) test the menu's properties.
    if c.usage.contains("NAME=VALUE") || c.usage.contains("where EXPR") {
        out.extend(def.properties.iter().map(|p| format!("{}=", p.name)));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|w| seen.insert(w.clone()));
    out
}

/// Values a property lists as alternatives (`yes | no`), when they are plain words.
pub fn listed_values(values: &str) -> Vec<&str> {
    let parts: Vec<&str> = values.split('|').map(str::trim).collect();
    if parts.len() < 2
        || !parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return vec![];
    }
    parts
}

/// Follows the menu words of `words` from `menu`; stops at the first word
/// that is not a menu (the command), which it returns.
fn walk<'a>(menu: Menu, words: &[&'a str]) -> (Menu, Option<&'a str>) {
    let mut menu = menu;
    for w in words {
        let rest = match w.strip_prefix('/') {
            Some(r) => {
                menu = Menu::Root;
                r
            }
            None => w,
        };
        for seg in rest.split('/').filter(|s| !s.is_empty()) {
            match child(menu, seg) {
                Some(m) => menu = m,
                None => return (menu, Some(seg)),
            }
        }
    }
    (menu, None)
}

/// The menu `name` below `menu` (`..` is the one above), as the schema lists them.
fn child(menu: Menu, name: &str) -> Option<Menu> {
    if name == ".." {
        return match parse(menu, &["..".to_string()]) {
            Ok((_, Command::Enter(m))) => Some(m),
            _ => None,
        };
    }
    if !schema::submenus(menu).contains(&name) {
        return None;
    }
    match parse(menu, &[name.to_string()]) {
        Ok((_, Command::Enter(m))) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(menu: Menu, line: &str) -> Vec<String> {
        complete(menu, line).1
    }

    /// Menus complete from anywhere, as words and inside a `/a/b` path.
    #[test]
    fn completes_menus() {
        assert_eq!(complete(Menu::Root, "/ip socks acc"), (10, vec!["access ".to_string()]));
        assert_eq!(words(Menu::Access, "/ip so"), vec!["socks "]);
        assert_eq!(complete(Menu::Root, "/ip/socks/co"), (10, vec!["connections ".to_string()]));
        assert_eq!(words(Menu::Socks, "u"), vec!["users "]);
        assert!(words(Menu::Access, "").contains(&".. ".to_string()));
        assert!(words(Menu::Root, "").contains(&"ip ".to_string()));
    }

    /// Commands of the current menu, then their properties and listed values.
    #[test]
    fn completes_commands_properties_and_values() {
        assert_eq!(words(Menu::Access, "mo"), vec!["move "]);
        assert_eq!(words(Menu::Access, "add act"), vec!["action="]);
        assert_eq!(complete(Menu::Access, "add action=d"), (11, vec!["deny ".to_string()]));
        assert_eq!(words(Menu::Socks, "set data-path=k"), vec!["kernel "]);
        assert_eq!(words(Menu::Root, "/ip socks set max-c"), vec!["max-connections="]);
        // Already given properties are not offered again.
        assert!(!words(Menu::Access, "add action=deny ").contains(&"action=".to_string()));
        let print = words(Menu::Connections, "print ");
        for w in ["detail ", "count-only ", "interval=", "where ", "dst-address="] {
            assert!(print.contains(&w.to_string()), "{w} in {print:?}");
        }
        assert_eq!(words(Menu::Access, "remove "), vec!["[find "]);
        let print = words(Menu::Access, "print ");
        for w in ["terse ", "where ", "action="] {
            assert!(print.contains(&w.to_string()), "{w} in {print:?}");
        }
        assert!(words(Menu::Access, "add ").contains(&"place-before=".to_string()));
        assert!(words(Menu::Root, "imp").contains(&"import ".to_string()));
    }

    /// Every property of every menu that takes NAME=VALUE is offered by some command.
    #[test]
    fn every_property_is_completed() {
        for def in schema::MENUS {
            for p in def.properties {
                let offered =
                    def.commands.iter().any(|c| arguments(def.menu, c.name).contains(&format!("{}=", p.name)));
                assert!(offered, "{} {}", def.menu, p.name);
            }
        }
    }

    /// The prompt shows the menu; the menu path goes in front of the words sent.
    #[test]
    fn prompt_and_request() {
        assert_eq!(prompt("admin@h", Menu::Access), "[admin@h] /ip socks access> ");
        assert_eq!(prompt("admin@h", Menu::Root), "[admin@h] > ");
        let w = request_words(Menu::Access, vec!["print".into()]);
        assert_eq!(w, ["/ip", "socks", "access", "print"]);
        assert!(matches!(parse(Menu::Root, &w), Ok((Menu::Access, Command::Print(..)))));
        assert_eq!(request_words(Menu::Root, vec!["print".into()]), ["print"]);
    }
}
