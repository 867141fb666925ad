//! A `proxyd run` child process per test (RAII) and the CLI client that talks to it.

use crate::{free_port, run_with_timeout, text, wait_until};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a CLI command may take before the test gives up on it.
const CLI_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the daemon may take to create its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The `proxyd` binary under test: `PROXYD_BIN`, else `<workspace>/target/debug/proxyd`.
pub fn proxyd_bin() -> PathBuf {
    let p = match std::env::var_os("PROXYD_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/proxyd"),
    };
    if !p.is_file() {
        panic!(
            "proxyd binary not found at {}: run `cargo build -p proxy-daemon` first \
             (or `cargo xtask test`, which builds it), or set PROXYD_BIN",
            p.display()
        );
    }
    p
}

/// The CLI client bound to one daemon's control socket; cheap to clone into threads.
#[derive(Clone, Debug)]
pub struct Cli {
    /// The proxyd binary.
    pub bin: PathBuf,
    /// The daemon's control socket.
    pub control: PathBuf,
}

impl Cli {
    /// Runs `proxyd --control SOCKET <args...>` (time-limited) and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--control").arg(&self.control).args(args);
        run_with_timeout(&mut cmd, CLI_TIMEOUT)
    }

    /// Runs a command that must succeed (exit 0) and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`proxyd {}` failed ({:?})\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The active connections, from `--json ip socks connections print`.
    pub fn connections(&self) -> Vec<Conn> {
        let out = self.ok(&["--json", "ip", "socks", "connections", "print"]);
        parse_connections(&out)
    }
}

/// One row of `--json ip socks connections print`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conn {
    /// Client address `ip:port`.
    pub src: String,
    /// Destination address `ip:port`; empty while the handshake has not named one
    /// (the daemon prints JSON `null` then).
    pub dst: String,
    /// Bytes client -> destination.
    pub tx: u64,
    /// Bytes destination -> client.
    pub rx: u64,
    /// `unknown`, `out` or `in`.
    pub kind: String,
    /// What moves its bytes now (`kernel` or `userspace`); empty during the handshake.
    pub path: String,
}

/// Parses the JSON array printed by `--json ip socks connections print`.
pub fn parse_connections(json: &str) -> Vec<Conn> {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .unwrap_or_else(|e| panic!("connections print --json is not JSON ({e}): {json:?}"));
    let arr = v.as_array().unwrap_or_else(|| panic!("connections JSON is not an array: {json}"));
    arr.iter()
        .map(|o| {
            let s = |k: &str| {
                o.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_else(|| panic!("connection row lacks string {k:?}: {o}"))
                    .to_string()
            };
            let n = |k: &str| {
                o.get(k).and_then(|x| x.as_u64()).unwrap_or_else(|| panic!("connection row lacks number {k:?}: {o}"))
            };
            let dst = if o.get("dst-address").is_some_and(|x| x.is_null()) { String::new() } else { s("dst-address") };
            let path = o.get("path").and_then(|x| x.as_str()).unwrap_or_default().to_string();
            Conn { src: s("src-address"), dst, tx: n("tx"), rx: n("rx"), kind: s("type"), path }
        })
        .collect()
}

/// A running `proxyd run` with a private temp dir (state file, control socket, log).
/// Dropping it stops the daemon (SIGTERM, then SIGKILL) and waits for it; when the
/// test is panicking it prints the daemon's stderr and keeps the dir for inspection.
pub struct Daemon {
    /// The data path it was started with (`userspace`, `kernel`, `auto`).
    pub data_path: String,
    /// The private directory holding state and control socket.
    pub dir: PathBuf,
    /// The state file.
    pub state: PathBuf,
    /// CLI client for this daemon.
    pub cli: Cli,
    /// The SOCKS port set by [`Daemon::enable`], if any.
    pub port: Option<u16>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
    pin_dir: Option<PathBuf>,
    options: Options,
}

/// Extra ways to start `proxyd run` (see [`Daemon::start_with`]); kept across restarts.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Arguments appended after `proxyd run ...` (e.g. `--shutdown-grace 2s`).
    pub args: Vec<String>,
    /// Environment variables for the daemon (e.g. `PROXYD_LOG=trace`).
    pub env: Vec<(String, String)>,
    /// Soft `RLIMIT_NOFILE` the daemon starts with (the hard limit is inherited).
    pub nofile_soft: Option<u64>,
}

impl Daemon {
    /// Starts a daemon on `data_path` in a fresh temp dir and waits for its control socket.
    pub fn start(data_path: &str) -> Daemon {
        Daemon::start_with(data_path, Options::default())
    }

    /// Like [`Daemon::start`], with extra arguments, environment or a lower open-files limit.
    pub fn start_with(data_path: &str, options: Options) -> Daemon {
        let tag = crate::unique_tag();
        let dir = std::env::temp_dir().join(format!("proxyd-test-{tag}"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let pin_dir = (data_path != "userspace").then(|| PathBuf::from(format!("/sys/fs/bpf/proxyd-test-{tag}")));
        let mut d = Daemon {
            data_path: data_path.to_string(),
            state: dir.join("config.rsc"),
            cli: Cli { bin: proxyd_bin(), control: dir.join("control.sock") },
            dir,
            port: None,
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            pin_dir,
            options,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.cli.control);
        let mut cmd = Command::new(&self.cli.bin);
        cmd.arg("run")
            .arg("--state")
            .arg(&self.state)
            .arg("--control")
            .arg(&self.cli.control)
            .arg("--data-path")
            .arg(&self.data_path);
        if let Some(p) = &self.pin_dir {
            cmd.arg("--bpf-pin-dir").arg(p);
        }
        cmd.args(&self.options.args);
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        if let Some(soft) = self.options.nofile_soft {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls: getrlimit/setrlimit.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.env_remove("PROXYD_CONTROL").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut err = child.stderr.take().unwrap();
        let log = self.log.clone();
        log.lock().unwrap().extend_from_slice(format!("--- proxyd run ({}) started ---\n", self.data_path).as_bytes());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.cli.control.exists() {
                break;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("proxyd run exited during start-up ({st}); stderr:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                panic!(
                    "proxyd did not create its control socket {} within {START_TIMEOUT:?}; stderr:\n{}",
                    self.cli.control.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the daemon wrote on stderr so far (all its runs).
    pub fn log(&self) -> String {
        text(&self.log.lock().unwrap())
    }

    /// Runs a CLI command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli.run(args)
    }

    /// Runs a CLI command that must exit 0 and returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        self.cli.ok(args)
    }

    /// Runs `proxyd console` against this daemon with `input` on its stdin
    /// (no history file) until it exits, or kills it after [`CLI_TIMEOUT`].
    pub fn console(&self, input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(&self.cli.bin)
            .arg("--control")
            .arg(&self.cli.control)
            .arg("console")
            .env("PROXYD_HISTORY", "")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxyd console");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let deadline = Instant::now() + CLI_TIMEOUT;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    }

    /// `export ARGS` without its header line (`# <date> by proxyd <version>`,
    /// which changes every second), so two exports compare by content.
    pub fn export(&self, args: &str) -> String {
        let line = format!("export {args}");
        let out = self.cmd(line.trim_end());
        match out.split_once('\n') {
            Some((header, rest)) if header.starts_with("# ") && header.contains(" by proxyd ") => rest.to_owned(),
            _ => panic!("`{line}` has no header line:\n{out}"),
        }
    }

    /// Like [`Daemon::cli_ok`], with the words of one command line split at spaces:
    /// `d.cmd("ip socks access add action=deny")`.
    pub fn cmd(&self, line: &str) -> String {
        let args: Vec<&str> = line.split(' ').collect();
        self.cli_ok(&args)
    }

    /// `ip socks set enabled=yes port=<free> listen-address=127.0.0.1` plus `extra`
    /// settings; waits until the port accepts and returns the SOCKS address.
    pub fn enable(&mut self, extra: &[&str]) -> SocketAddr {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        if let Err(e) = self.try_enable("127.0.0.1", port, extra, &[addr]) {
            panic!("`ip socks set enabled=yes port={port}` failed: {e}");
        }
        addr
    }

    /// `ip socks set enabled=yes port=<port> listen-address=<listen>` plus `extra`;
    /// on success waits until every address in `accepts` takes connections (panics
    /// if one does not); on refusal returns the CLI's stderr.
    pub fn try_enable(
        &mut self,
        listen: &str,
        port: u16,
        extra: &[&str],
        accepts: &[SocketAddr],
    ) -> Result<(), String> {
        let port_arg = format!("port={port}");
        let listen_arg = format!("listen-address={listen}");
        let mut args = vec!["ip", "socks", "set", "enabled=yes", &port_arg, &listen_arg];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        if !out.status.success() {
            return Err(text(&out.stderr));
        }
        self.port = Some(port);
        for addr in accepts {
            let up = wait_until(Duration::from_secs(5), || {
                TcpStream::connect_timeout(addr, Duration::from_millis(500)).is_ok()
            });
            assert!(up, "proxyd does not accept on {addr} after `ip socks set enabled=yes`; stderr:\n{}", self.log());
        }
        // Let the daemon drop the probe connections before tests count connections.
        wait_until(Duration::from_secs(2), || self.cli.connections().is_empty());
        Ok(())
    }

    /// The SOCKS address set by [`Daemon::enable`].
    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port.expect("call enable() first")).parse().unwrap()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    /// The BPF pin dir passed with `--bpf-pin-dir` (None on the userspace path).
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Sends `signal` to the daemon without waiting.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own (not yet reaped) child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Waits up to `timeout` for the daemon to exit; returns its status (and forgets
    /// the child) or None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGTERM and waits (10 s, then SIGKILL) for the daemon to exit; returns
    /// whether it exited by itself with status 0.
    pub fn stop(&mut self) -> bool {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` (e.g. SIGINT) and waits like [`Daemon::stop`].
    pub fn stop_with(&mut self, signal: i32) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.log
                    .lock()
                    .unwrap()
                    .extend_from_slice(b"--- test harness: signal ignored for 10 s, sent SIGKILL ---\n");
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the daemon (no clean-up chance) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.log.lock().unwrap().extend_from_slice(b"--- test harness: SIGKILL ---\n");
        }
    }

    /// Starts the daemon again on the same state file and control socket.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            assert!(self.stop(), "proxyd did not exit cleanly on SIGTERM; stderr:\n{}", self.log());
        }
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "==== proxyd ({} data path) stderr, dir {} kept ====\n{}\n==== end of proxyd stderr ====",
                self.data_path,
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if let Some(p) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
