//! The state file: the configuration as the `export` script, read at start-up
//! with the same parser as the CLI, and rewritten atomically (temporary file,
//! fsync, rename, fsync of the folder) before a change is acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::command::{apply, continued, parse, split_line, statements, Command, CommandError, ExportOptions, Menu};
use super::{render, Config};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}:{line}: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: CommandError,
    },
    #[error("{path}:{line}: `{text}` is not a configuration command")]
    NotAChange { path: PathBuf, line: usize, text: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads the state file; a missing file is the default configuration.
pub fn load(path: &Path) -> Result<Config, StoreError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(source) => return Err(StoreError::Io { op: "read", path: path.into(), source }),
    };
    parse_script(&text, path)
}

/// Runs a script of configuration commands on the default configuration.
pub fn parse_script(text: &str, path: &Path) -> Result<Config, StoreError> {
    run_script(text, path, Config::default(), &mut |_, _| {})
}

/// Runs a script of configuration commands on `config`, all or nothing:
/// the first line that does not parse or apply is the error (with its line
/// number), and the caller's configuration is untouched then. `ran` sees
/// each command line that ran, with its number (`import verbose=yes`).
pub fn run_script(
    text: &str,
    path: &Path,
    start: Config,
    ran: &mut dyn FnMut(usize, &str),
) -> Result<Config, StoreError> {
    // A byte-order mark (an editor's UTF-8 "with BOM") is not part of the first line.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut config = start;
    let mut menu = Menu::Root;
    let mut pending: Vec<String> = Vec::new();
    let mut first_line = 0;
    // The last line, when it said that more follows.
    let mut dangling = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |source| StoreError::Parse { path: path.into(), line: line_no, source };
        if pending.is_empty() {
            first_line = line_no;
        }
        let (body, continues) = match continued(raw) {
            Some(b) => (b, true),
            None => (raw, false),
        };
        pending.extend(split_line(body).map_err(err)?);
        dangling = continues.then_some(line_no);
        if continues || pending.is_empty() {
            continue;
        }
        let line_words = std::mem::take(&mut pending);
        for words in statements(&line_words) {
            let err = |source| StoreError::Parse { path: path.into(), line: first_line, source };
            // A command with a path runs there but does not move the script.
            match parse(menu, words).map_err(err)?.1 {
                Command::Enter(m) => menu = m,
                cmd if cmd.is_change() => {
                    apply(&mut config, &cmd).map_err(err)?;
                    ran(first_line, &words.join(" "));
                }
                _ => {
                    return Err(StoreError::NotAChange { path: path.into(), line: first_line, text: words.join(" ") });
                }
            }
        }
    }
    if let Some(line) = dangling {
        // A command cut short: running what came before the `\` would apply
        // something other than what was written.
        let source = CommandError::Usage("the script ends in a continued line (a trailing `\\`)".into());
        return Err(StoreError::Parse { path: path.into(), line, source });
    }
    Ok(config)
}

/// Writes the configuration so that a crash at any point leaves either the old
/// or the new file, never a torn one.
pub fn save(path: &Path, config: &Config) -> Result<(), StoreError> {
    let io_err = |op, source| StoreError::Io { op, path: path.into(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| io_err("create the folder of", e))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let body = format!(
        "# proxyd configuration: RouterOS script, rewritten on every change\n{}",
        render::export(config, Menu::Root, &ExportOptions::state_file())
    );
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("create", e))?;
        f.write_all(body.as_bytes()).map_err(|e| io_err("write", e))?;
        f.sync_all().map_err(|e| io_err("fsync", e))?;
    }
    fs::rename(&tmp, path).map_err(|e| io_err("rename into place", e))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io_err("fsync the folder of", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("proxyd-store-{}-{:?}", std::process::id(), std::thread::current().id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// What save writes, load reads back unchanged.
    #[test]
    fn save_then_load() {
        let dir = tmpdir();
        let path = dir.join("config.rsc");
        let mut c = Config::default();
        c.settings.enabled = true;
        c.access.rules.push(Default::default());
        save(&path, &c).unwrap();
        assert_eq!(load(&path).unwrap(), c);
        fs::remove_dir_all(dir).unwrap();
    }

    /// `vrf` is saved with the settings and loads back, also when no such
    /// device exists now (a VRF may appear after proxyd starts: the server,
    /// not the state file, finds out).
    #[test]
    fn vrf_is_saved_and_loads_without_its_device() {
        let dir = tmpdir().join("vrf");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.rsc");
        let mut c = Config::default();
        c.settings.vrf = "nosuch-vrf0".into();
        save(&path, &c).unwrap();
        assert!(fs::read_to_string(&path).unwrap().contains(" vrf=nosuch-vrf0 "));
        assert_eq!(load(&path).unwrap(), c);
        fs::remove_dir_all(dir).unwrap();
    }

    /// A missing file is the default configuration.
    #[test]
    fn missing_file_is_default() {
        assert_eq!(load(Path::new("/nonexistent/proxyd/config.rsc")).unwrap(), Config::default());
    }

    /// A broken line stops the load with its line number.
    #[test]
    fn broken_line_is_reported_with_its_number() {
        let script = "# comment\n/ip socks\nset enabled=yes\n/ip socks access\nadd action=allow\nadd dst-port=9-1\n";
        let e = parse_script(script, Path::new("config.rsc")).unwrap_err();
        assert!(e.to_string().starts_with("config.rsc:6: invalid value for dst-port"), "{e}");
        let e = parse_script("/ip socks\nprint\n", Path::new("c")).unwrap_err();
        assert!(e.to_string().starts_with("c:2:"), "{e}");
    }

    /// Continuation lines join, as in RouterOS scripts.
    /// A script saved "UTF-8 with BOM" reads as without.
    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_line() {
        let c = parse_script("\u{feff}/ip socks set port=19332\n", Path::new("c")).unwrap();
        assert_eq!(c.settings.port, 19332);
    }

    #[test]
    fn a_script_ending_in_a_continued_line_is_refused() {
        let e = parse_script("/ip socks\nset port=19330\nset port=19331 \\\n", Path::new("c")).unwrap_err();
        assert!(e.to_string().starts_with("c:3: "), "{e}");
        assert!(e.to_string().contains("continued line"), "{e}");
    }

    #[test]
    fn continuation_lines() {
        let c = parse_script(
            "/ip socks access add src-address=192.168.0.2 dst-port=21 \\\n    action=deny\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(c.access.rules.len(), 1);
        assert_eq!(c.access.rules[0].action, super::super::Action::Deny);
    }
}
