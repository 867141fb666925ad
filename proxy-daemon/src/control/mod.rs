//! The control socket: how `proxyd ip socks ...` reaches the running daemon.
//! The CLI is thin: it sends its words as they are, and the daemon parses
//! them with the one command parser, runs them, and answers with the text to
//! print and the exit status. [`Controller`] runs commands; changes are saved
//! to the state file before they are acknowledged.
//!
//! Wire format: one JSON line each way. Request `{"words":[...],"json":false}`,
//! answer `{"exit":0,"stdout":"...","stderr":"..."}`.

pub mod client;
pub mod print;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::command::{apply, parse, Command, CommandError, Menu};
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
}

impl Controller {
    pub fn new(server: Arc<Server>, state_path: PathBuf) -> Self {
        Controller { server, state_path, changes: tokio::sync::Mutex::new(()) }
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
            Command::Print(_, opts) if opts.count_only => {
                let n = match command {
                    Command::Print(Menu::Access, _) => config.access.rules.len(),
                    Command::Print(Menu::Users, _) => config.users.len(),
                    _ => {
                        self.server.shared.registry.rows().into_iter().filter(|r| row_matches(r, &opts.filters)).count()
                    }
                };
                out(format!("{n}\n"), serde_json::json!(n))
            }
            Command::ConnectionsRemove(numbers) => match self.server.shared.registry.cancel_rows(numbers) {
                Ok(()) => Response::ok(String::new()),
                Err(n) => Response::err(1, format!("no such item: {n} (see connections print)")),
            },
            Command::Export(menu) => Response::ok(render::export(&config, *menu)),
            Command::SettingsPrint => {
                let xdp = self.server.prefilter_status();
                let mut text = print::settings(&config.settings, active);
                let mut value = print::settings_json(&config.settings, active);
                if !config.settings.xdp_interfaces.is_empty() {
                    text.push_str(&print::xdp_attached(&xdp));
                }
                value["xdp-attached"] = serde_json::to_value(&xdp).unwrap_or_default();
                out(text, value)
            }
            Command::Print(Menu::Access, opts) if opts.stats => {
                let drops = self.server.prefilter_drops();
                out(print::access_stats(&config, drops.as_ref()), print::access_stats_json(&config, drops.as_ref()))
            }
            Command::Print(Menu::Access, _) => out(print::access(&config), print::access_json(&config)),
            Command::Print(Menu::Users, _) => out(print::users(&config), print::users_json(&config)),
            Command::Print(_, opts) => {
                let rows: Vec<_> =
                    self.server.shared.registry.rows().into_iter().filter(|r| row_matches(r, &opts.filters)).collect();
                let dst =
                    |r: &crate::server::registry::Row| r.dst_address.map_or_else(|| "-".into(), |d| d.to_string());
                let text = if opts.detail {
                    let mut s = String::new();
                    for (i, r) in rows.iter().enumerate() {
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
                    let with_user = rows.iter().any(|r| r.user.is_some());
                    let cells: Vec<Vec<String>> = rows
                        .iter()
                        .map(|r| {
                            let mut c = vec![r.src_address.to_string(), dst(r), r.tx.to_string(), r.rx.to_string()];
                            if with_user {
                                c.push(r.user.clone().unwrap_or_default());
                            }
                            c
                        })
                        .collect();
                    let header: &[&str] = if with_user {
                        &["SRC-ADDRESS", "DST-ADDRESS", "TX", "RX", "USER"]
                    } else {
                        &["SRC-ADDRESS", "DST-ADDRESS", "TX", "RX"]
                    };
                    print::table(header, &cells)
                };
                out(text, serde_json::to_value(&rows).unwrap())
            }
            change => self.change(change).await,
        };
        if let Command::Print(_, opts) = &command {
            response.repeat_ms = opts.interval.map(|d| d.as_millis() as u64);
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
        if new == *current {
            return Response::ok(String::new());
        }
        let prepared = match self.server.prepare(&new.settings) {
            Ok(p) => p,
            Err(e) => return Response::err(1, e),
        };
        if let Err(e) = store::save(&self.state_path, &new) {
            tracing::error!("{e}");
            return Response::err(1, format!("not saved, nothing changed: {e}"));
        }
        let mut stderr = String::new();
        if new.settings.enabled && !current.settings.enabled && new.access.is_open() {
            let warning = "warning: the access list allows any client to any destination: this is an open proxy. \
                           Add rules, e.g. `ip socks access add src-address=192.168.0.0/24` then `ip socks access add action=deny`.";
            tracing::warn!("{warning}");
            stderr = format!("{warning}\n");
        }
        self.server.commit(new, prepared);
        Response { exit: 0, stderr, ..Default::default() }
    }
}

/// Whether a connection row passes `where name=value ...` (addresses match
/// with or without their port).
fn row_matches(r: &crate::server::registry::Row, filters: &[(String, String)]) -> bool {
    let addr =
        |a: Option<std::net::SocketAddr>, v: &str| a.is_some_and(|a| a.to_string() == v || a.ip().to_string() == v);
    filters.iter().all(|(k, v)| match k.as_str() {
        "src-address" => addr(Some(r.src_address), v),
        "dst-address" => addr(r.dst_address, v),
        "tx" => r.tx.to_string() == *v,
        "rx" => r.rx.to_string() == *v,
        "type" => r.kind.as_str() == v,
        "user" => r.user.as_deref() == Some(v.as_str()),
        _ => false,
    })
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
        let (stream, _) = match listener.accept().await {
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
