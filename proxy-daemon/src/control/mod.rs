//! The control socket: how `proxyd ip socks ...` reaches the running daemon.
//! The CLI is thin: it sends its words as they are, and the daemon parses
//! them with the one command parser, runs them, and answers with the text to
//! print and the exit status. [`Controller`] runs commands; changes are saved
//! to the state file before they are acknowledged.
//!
//! Wire format: one JSON line each way. Request `{"words":[...],"json":false}`,
//! answer `{"exit":0,"stdout":"...","stderr":"..."}`.

pub mod client;
pub mod declarative;
pub mod print;

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::command::{apply, parse, Command, CommandError, ExportOptions, Menu, PrintOptions};
use crate::config::{render, store};
use crate::server::Server;

/// Longest request line accepted on the control socket.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub words: Vec<String>,
    #[serde(default)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub exit: i32,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    /// `print interval=...`: the client asks again after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_ms: Option<u64>,
}

impl Response {
    fn ok(stdout: String) -> Self {
        Response { exit: 0, stdout, ..Default::default() }
    }
    fn err(exit: i32, msg: impl std::fmt::Display) -> Self {
        Response { exit, stderr: format!("{msg}\n"), ..Default::default() }
    }
}

impl From<CommandError> for Response {
    fn from(e: CommandError) -> Self {
        Response::err(e.exit_code(), e)
    }
}

/// Runs commands against the server's configuration; one change at a time.
pub struct Controller {
    server: Arc<Server>,
    state_path: PathBuf,
    /// Serialises changes so each is saved before the next one starts.
    changes: tokio::sync::Mutex<()>,
    /// A second descriptor of the control socket, for `upgrade`.
    socket: Option<std::os::fd::OwnedFd>,
    /// Stops [`serve`] (a new process serves the socket after an upgrade).
    stop: tokio_util::sync::CancellationToken,
    /// Set when an upgrade handed everything over: the process exits.
    pub upgraded: tokio_util::sync::CancellationToken,
    /// `proxyd run --config FILE`: the configuration lives in that file;
    /// changes through the control socket are refused, nothing is saved.
    declarative: Option<PathBuf>,
}

impl Controller {
    pub fn new(server: Arc<Server>, state_path: PathBuf, socket: Option<std::os::fd::OwnedFd>) -> Self {
        Controller {
            server,
            state_path,
            changes: tokio::sync::Mutex::new(()),
            socket,
            stop: Default::default(),
            upgraded: Default::default(),
            declarative: None,
        }
    }

    /// The configuration lives in `file` (`proxyd run --config FILE`).
    pub fn declarative(mut self, file: PathBuf) -> Self {
        self.declarative = Some(file);
        self
    }

    /// Makes `config` (a new version of the `--config` file) current as one
    /// change; with `enforce`, closes open tunnels its access list denies.
    pub async fn apply_declarative(&self, config: crate::config::Config, enforce: bool) -> Response {
        let _one_at_a_time = self.changes.lock().await;
        let current = self.server.config();
        let response = self.commit_config(&current, config, false);
        if response.exit == 0 && enforce {
            let config = self.server.config();
            for row in self.server.shared.registry.rows() {
                let Some(dst) = row.dst_address else { continue };
                let request = crate::config::AccessRequest { src: row.src_address, dst, dst_name: None };
                if config.access.decide(&request).action == crate::config::Action::Deny {
                    self.server.shared.registry.cancel_where(row.src_address);
                }
            }
        }
        response
    }

    /// A new version of the `--config` file was refused: logged, counted.
    pub fn reload_failed(&self, why: &str) {
        tracing::error!("configuration not reloaded, the running one stays: {why}");
        self.server.shared.metrics.config_reload_failed();
    }

    /// Runs one command given as words, as typed after `proxyd`.
    pub async fn execute(&self, words: &[String], json: bool) -> Response {
        let (_, command) = match parse(Menu::Root, words) {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let config = self.server.config();
        let active = Some(self.server.datapath_kind());
        let out = |text: String, value: serde_json::Value| {
            Response::ok(if json { format!("{}\n", serde_json::to_string_pretty(&value).unwrap()) } else { text })
        };
        let mut response = match &command {
            Command::Enter(menu) => Response::err(2, format!("{menu}: a command is needed (e.g. print)")),
            Command::Print(menu, opts) if opts.count_only => {
                let n = match menu {
                    Menu::Access => print::access_json(&config, opts).as_array().map_or(0, Vec::len),
                    Menu::Users => print::users_json(&config, opts).as_array().map_or(0, Vec::len),
                    _ => self.connections(opts).len(),
                };
                out(format!("{n}\n"), serde_json::json!(n))
            }
            Command::ConnectionsRemove(selector) => {
                let rows = self.server.shared.registry.rows();
                let numbers = match selector.resolve(rows.len(), |i, name| row_values(&rows[i], name)) {
                    Ok(n) => n,
                    Err(e) => return Response::err(1, format!("{e} (see connections print)")),
                };
                match self.server.shared.registry.cancel_rows(&numbers) {
                    Ok(()) => Response::ok(String::new()),
                    Err(n) => Response::err(1, format!("no such item: {n} (see connections print)")),
                }
            }
            Command::Export(menu, opts) => self.export(&config, *menu, opts),
            Command::SettingsPrint => {
                let xdp = self.server.prefilter_status();
                // `run --data-path` running another mode than the saved one.
                let running = Some(self.server.data_path_mode()).filter(|m| *m != config.settings.data_path);
                let mut text = print::settings(&config.settings, active, running);
                let mut value = print::settings_json(&config.settings, active, running);
                if !config.settings.xdp_interfaces.is_empty() {
                    text.push_str(&print::xdp_attached(&xdp));
                }
                value["xdp-attached"] = serde_json::to_value(&xdp).unwrap_or_default();
                if let Some(e) = self.server.unapplied() {
                    text.push_str(&format!("not-in-effect: {e} (any `set` tries again)\n"));
                    value["not-in-effect"] = e.into();
                }
                out(text, value)
            }
            Command::Print(Menu::Access, opts) if opts.stats => {
                let drops = self.server.prefilter_drops();
                out(print::access_stats(&config, drops.as_ref()), print::access_stats_json(&config, drops.as_ref()))
            }
            Command::Print(Menu::Access, opts) => out(print::access(&config, opts), print::access_json(&config, opts)),
            Command::Print(Menu::Users, opts) => out(print::users(&config, opts), print::users_json(&config, opts)),
            Command::Print(_, opts) => {
                let rows = self.connections(opts);
                let dst =
                    |r: &crate::server::registry::Row| r.dst_address.map_or_else(|| "-".into(), |d| d.to_string());
                let text = if opts.detail || opts.terse {
                    let mut s = String::new();
                    for (i, r) in &rows {
                        s.push_str(&format!(
                            "{i} src-address={} dst-address={} tx={} rx={} type={}",
                            r.src_address,
                            dst(r),
                            r.tx,
                            r.rx,
                            r.kind.as_str()
                        ));
                        if let Some(u) = &r.user {
                            s.push_str(&format!(" user={u}"));
                        }
                        if let Some(path) = r.path {
                            s.push_str(&format!(" path={path}"));
                        }
                        s.push('\n');
                    }
                    s
                } else {
                    // The manual's columns; USER only when some client logged in (SOCKS5).
                    let with_user = rows.iter().any(|(_, r)| r.user.is_some());
                    let cells: Vec<(usize, Vec<String>)> = rows
                        .iter()
                        .map(|(i, r)| {
                            let mut c = vec![r.src_address.to_string(), dst(r), r.tx.to_string(), r.rx.to_string()];
                            if with_user {
                                c.push(r.user.clone().unwrap_or_default());
                            }
                            (*i, c)
                        })
                        .collect();
                    let header: &[&str] = if with_user {
                        &["SRC-ADDRESS", "DST-ADDRESS", "TX", "RX", "USER"]
                    } else {
                        &["SRC-ADDRESS", "DST-ADDRESS", "TX", "RX"]
                    };
                    print::numbered_table(header, &cells)
                };
                let rows: Vec<_> = rows.into_iter().map(|(_, r)| r).collect();
                out(text, serde_json::to_value(&rows).unwrap())
            }
            cmd if self.declarative.is_some() && (cmd.is_change() || matches!(cmd, Command::Import { .. })) => {
                let file = self.declarative.as_ref().map(|f| f.display().to_string()).unwrap_or_default();
                Response::err(
                    1,
                    format!("the configuration lives in {file} (proxyd run --config): change it there; it is applied when the file changes"),
                )
            }
            Command::Import { file, verbose } => self.import(file, *verbose).await,
            Command::Upgrade { binary } => self.upgrade(binary.clone()).await,
            change => self.change(change).await,
        };
        if let Command::Print(_, opts) = &command {
            response.repeat_ms = opts.interval.map(|d| d.as_millis() as u64);
        }
        response
    }

    /// The connections `print` shows, with their numbers (all, or those its
    /// `where` selects).
    fn connections(&self, opts: &PrintOptions) -> Vec<(usize, crate::server::registry::Row)> {
        let rows = self.server.shared.registry.rows();
        rows.into_iter()
            .enumerate()
            .filter(|(_, r)| opts.filter.as_ref().is_none_or(|expr| expr.matches(&|name| row_values(r, name))))
            .collect()
    }

    /// `export`: the script, with RouterOS's header line; `file=NAME` writes
    /// `NAME.rsc` (a relative name is under the state file's folder).
    fn export(&self, config: &crate::config::Config, menu: Menu, opts: &ExportOptions) -> Response {
        let text = format!(
            "# {} by proxyd {}\n{}",
            crate::config::time::utc_now(),
            env!("CARGO_PKG_VERSION"),
            render::export(config, menu, opts)
        );
        let Some(name) = &opts.file else { return Response::ok(text) };
        let path = self.script_path(name);
        match std::fs::write(&path, text) {
            Ok(()) => Response::ok(String::new()),
            Err(e) => Response::err(1, format!("export: cannot write {}: {e}", path.display())),
        }
    }

    /// `upgrade`: a new proxyd takes everything over (see `crate::upgrade`).
    /// Changes wait meanwhile, so none is lost between the two processes.
    async fn upgrade(&self, binary: Option<String>) -> Response {
        let _no_changes_meanwhile = self.changes.lock().await;
        let Some(socket) = &self.socket else {
            return Response::err(1, "upgrade: this proxyd has no control socket to hand over");
        };
        let handover =
            crate::upgrade::Handover { server: &self.server, control: socket.as_fd(), stop_control: &self.stop };
        match crate::upgrade::hand_over(handover, binary.map(PathBuf::from)).await {
            Ok(summary) => {
                tracing::info!("{summary}; exiting");
                self.upgraded.cancel();
                Response::ok(format!("{summary}\n"))
            }
            Err(reason) => Response::err(1, reason),
        }
    }

    /// `NAME`, or `NAME.rsc`, under the state file's folder unless absolute.
    fn script_path(&self, name: &str) -> PathBuf {
        let file = if name.ends_with(".rsc") { name.to_owned() } else { format!("{name}.rsc") };
        let dir = self.state_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dir.join(file)
    }

    /// `/import file=NAME`: every line parsed and applied to a copy first;
    /// a bad line is reported with its number and nothing changes.
    async fn import(&self, file: &str, verbose: bool) -> Response {
        let _one_at_a_time = self.changes.lock().await;
        let current = self.server.config();
        let path = self.script_path(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => return Response::err(1, format!("import: cannot read {}: {e}", path.display())),
        };
        let mut log = String::new();
        let ran = &mut |line: usize, words: &str| log.push_str(&format!("#{line}: {words}\n"));
        let new = match store::run_script(&text, &path, (*current).clone(), ran) {
            Ok(c) => c,
            Err(e) => return Response::err(1, format!("import failed, nothing changed: {e}")),
        };
        let mut response = self.commit_config(&current, new, false);
        if verbose && response.exit == 0 {
            response.stdout = log;
        }
        response
    }

    /// Applies a change: check, prepare what can fail, save, then make it current.
    async fn change(&self, command: &Command) -> Response {
        let _one_at_a_time = self.changes.lock().await;
        let current = self.server.config();
        let mut new = (*current).clone();
        if let Err(e) = apply(&mut new, command) {
            return e.into();
        }
        let names_data_path =
            matches!(command, Command::SettingsSet(pairs) if pairs.iter().any(|(k, _)| k == "data-path"));
        self.commit_config(&current, new, names_data_path)
    }

    /// Makes `new` the configuration in place of `current` (the caller holds
    /// the change lock): prepare what can fail, save, then commit.
    /// `names_data_path`: the change is a `set data-path=` (see [`Server::prepare`]).
    fn commit_config(
        &self,
        current: &crate::config::Config,
        new: crate::config::Config,
        names_data_path: bool,
    ) -> Response {
        let ends_override = names_data_path && new.settings.data_path != self.server.data_path_mode();
        if new == *current && self.server.unapplied().is_none() && !ends_override {
            return Response::ok(String::new());
        }
        let prepared = match self.server.prepare(&new.settings, names_data_path) {
            Ok(p) => p,
            Err(e) => return Response::err(1, e),
        };
        if self.declarative.is_none() {
            if let Err(e) = store::save(&self.state_path, &new) {
                tracing::error!("{e}");
                return Response::err(1, format!("not saved, nothing changed: {e}"));
            }
        }
        let stderr = warnings(current, &new).into_iter().map(|w| format!("warning: {w}\n")).collect();
        self.server.commit(new, prepared);
        Response { exit: 0, stderr, ..Default::default() }
    }
}

/// What a change that is accepted should still tell the operator (and the
/// log): an open proxy just enabled, a user added that cannot log in.
fn warnings(current: &crate::config::Config, new: &crate::config::Config) -> Vec<String> {
    let mut out = Vec::new();
    if new.settings.enabled && !current.settings.enabled && new.access.is_open() {
        out.push(
            "the access list allows any client to any destination: this is an open proxy. \
             Add rules, e.g. `ip socks access add src-address=192.168.0.0/24` then `ip socks access add action=deny`."
                .to_owned(),
        );
    }
    let locked_out = |u: &crate::config::users::User| !u.disabled && !u.password.is_set();
    for u in new.users.iter().filter(|u| locked_out(u)) {
        if !current.users.iter().any(|c| c.name == u.name && locked_out(c)) {
            out.push(format!(
                "user {name} has no password and cannot log in until one is set: `ip socks users set [find name={name}] password=...`",
                name = crate::config::command::quote(&u.name)
            ));
        }
    }
    for w in &out {
        tracing::warn!("{w}");
    }
    out
}

/// A connection's property as `print` and `where` see it; an address also
/// matches without its port.
fn row_values(r: &crate::server::registry::Row, name: &str) -> Vec<String> {
    let addr = |a: Option<std::net::SocketAddr>| a.map_or_else(Vec::new, |a| vec![a.to_string(), a.ip().to_string()]);
    match name {
        "src-address" => addr(Some(r.src_address)),
        "dst-address" => addr(r.dst_address),
        "tx" => vec![r.tx.to_string()],
        "rx" => vec![r.rx.to_string()],
        "type" => vec![r.kind.as_str().to_owned()],
        "user" => r.user.iter().cloned().collect(),
        "path" => r.path.iter().map(|p| p.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// Fails when a running proxyd answers on the control socket `path`. `run`
/// checks this before it loads anything, so a second daemon started by
/// mistake leaves the first one's listener and BPF pins alone.
pub fn ensure_not_running(path: &Path) -> io::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another proxyd is running on this control socket", path.display()),
        ));
    }
    Ok(())
}

/// Binds the control socket (mode 0600) at `path`, replacing a stale one.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        ensure_not_running(path)?;
        std::fs::remove_file(path)?;
    }
    // Bind and listen under a private name, restrict it, then rename it into
    // place: the path appears only once it accepts connections (a client that
    // sees the file never gets ECONNREFUSED) and never with looser permissions.
    let mut staging = path.as_os_str().to_owned();
    staging.push(".new");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = std::os::unix::net::UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Serves the control socket until the process ends.
pub async fn serve(listener: UnixListener, controller: Arc<Controller>) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        let accepted = tokio::select! {
            _ = controller.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // The socket file is 0600; check the peer too, in case it was loosened.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
            other => {
                tracing::warn!(cred = ?other.map(|c| c.uid()).ok(), "control connection refused: not root");
                continue;
            }
        }
        let controller = controller.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &controller).await {
                tracing::debug!(error = %e, "control connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, controller: &Controller) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_REQUEST as u64));
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => controller.execute(&req.words, req.json).await,
        Err(e) => Response::err(2, format!("bad control request: {e}")),
    };
    let mut body = serde_json::to_string(&response).map_err(io::Error::other)?;
    body.push('\n');
    w.write_all(body.as_bytes()).await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket path appears already listening and 0600, with no staging name left
    /// behind; a second bind on a live socket is refused and leaves it working.
    #[tokio::test]
    async fn bind_places_a_listening_private_socket() {
        let dir = std::env::temp_dir().join(format!("proxyd-bind-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.join("control.sock.new").exists());
        std::os::unix::net::UnixStream::connect(&path).expect("listening as soon as it exists");
        let err = bind(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        std::os::unix::net::UnixStream::connect(&path).expect("still listening");
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
