//! The systems under test (proxyd, danted) as child processes, and what
//! /proc and `ss` say about them.

use std::collections::HashMap;
use std::fs::{self, File};
use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A proxy the bench started, with its log.
pub struct Proxy {
    pub child: Child,
    pub pid: i32,
    pub addr: SocketAddrV4,
    pub pin_dir: Option<PathBuf>,
    /// What the proxy said about itself (proxyd: the `data-path:` line).
    pub path_check: String,
    /// Whether the load generator speaks SOCKS5 to it (else SOCKS4).
    pub socks5: bool,
    /// proxyd's binary and control socket (for `proxyd upgrade`).
    pub control: Option<(PathBuf, PathBuf)>,
    /// After an upgrade: the new process (not this bench's child).
    pub adopted: Option<i32>,
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

/// Waits until `addr` accepts a TCP connection (or the process exits).
fn wait_port(child: &mut Child, addr: SocketAddrV4, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait()? {
            bail!("exited ({st}) before listening: {}", tail(log, 4));
        }
        if TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr} after 15 s: {}", tail(log, 4));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port on 127.0.0.1 free for a proxy to listen on. Chosen below the ephemeral
/// range: after a connection-rate run, tens of thousands of TIME_WAIT sockets
/// on 127.0.0.1 can exhaust that range for a minute, and `bind(127.0.0.1:0)`
/// then fails with EADDRINUSE.
pub fn free_port() -> Result<u16> {
    const FIRST: u16 = 12_000;
    const COUNT: u16 = 20_000;
    let start = (std::process::id() as u64
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos() as u64)
        % u64::from(COUNT);
    for i in 0..COUNT {
        let port = FIRST + ((start as u16).wrapping_add(i) % COUNT);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(l.local_addr()?.port());
        }
    }
    bail!("no free port on 127.0.0.1 between {FIRST} and {}", FIRST + COUNT - 1)
}

fn proxyd_cli(bin: &Path, control: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!("`proxyd {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Proxy {
    /// `proxyd upgrade`: a new process takes everything over; from then on
    /// this handle follows it (its PID, and stopping it). Returns the time
    /// the command took.
    pub fn upgrade(&mut self) -> Result<Duration> {
        let Some((bin, control)) = self.control.clone() else { bail!("not a proxyd") };
        let t = Instant::now();
        proxyd_cli(&bin, &control, &["upgrade"])?;
        let took = t.elapsed();
        let _ = self.child.wait();
        let needle = control.to_string_lossy().into_owned();
        let old = self.pid;
        let new = fs::read_dir("/proc")?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid != old && cmdline.contains(&needle) && cmdline.contains(" run")).then_some(pid)
        });
        let new = new.context("no proxyd after the upgrade")?;
        self.adopted = Some(new);
        self.pid = new;
        Ok(took)
    }

    /// Starts `proxyd run --data-path <path>` and enables it on a free port.
    /// Fails (with the reason) when it cannot start or runs another path.
    pub fn proxyd(bin: &Path, work: &Path, logs: &Path, path: &str, socks5: bool) -> Result<Proxy> {
        let name = if socks5 { format!("{path}-socks5") } else { path.to_string() };
        let dir = work.join(format!("proxyd-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let log = logs.join(format!("proxyd-{name}.log"));
        let control = dir.join("control.sock");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/proxyd-bench-{}-{name}", std::process::id()));
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--state")
            .arg(dir.join("config.rsc"))
            .arg("--control")
            .arg(&control)
            .args(["--data-path", path])
            .arg("--bpf-pin-dir")
            .arg(&pin_dir)
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(&log)?);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id() as i32;
        let mut p = Proxy {
            child,
            pid,
            addr: SocketAddrV4::new([127, 0, 0, 1].into(), 0),
            pin_dir: Some(pin_dir),
            path_check: String::new(),
            socks5,
            control: Some((bin.to_path_buf(), control.clone())),
            adopted: None,
        };
        let r = (|| -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(st) = p.child.try_wait()? {
                    bail!("`proxyd run --data-path {path}` exited ({st}): {}", tail(&log, 3));
                }
                if control.exists() && proxyd_cli(bin, &control, &["ip", "socks", "print"]).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no control socket after 20 s: {}", tail(&log, 3));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let port = free_port()?;
            p.addr.set_port(port);
            proxyd_cli(
                bin,
                &control,
                &[
                    "ip",
                    "socks",
                    "set",
                    "enabled=yes",
                    &format!("port={port}"),
                    "listen-address=127.0.0.1",
                    "max-connections=20000",
                    "connection-idle-timeout=1h",
                    if socks5 { "version=5" } else { "version=4" },
                ],
            )?;
            let print = proxyd_cli(bin, &control, &["ip", "socks", "print"])?;
            let line = print.lines().find(|l| l.trim_start().starts_with("data-path")).unwrap_or("").trim().to_string();
            // `auto` loads the kernel path and decides per tunnel.
            let in_use = if path == "auto" { "kernel" } else { path };
            if !line.contains(&format!("in use: {in_use}")) {
                bail!("asked for data-path {path}, `ip socks print` says `{line}`");
            }
            p.path_check = format!(
                "asked for `--data-path {path}`; `proxyd ip socks print` says `{line}` (log: {})",
                log.display()
            );
            wait_port(&mut p.child, p.addr, &log)
        })();
        match r {
            Ok(()) => Ok(p),
            Err(e) => {
                p.stop();
                Err(e)
            }
        }
    }

    /// Starts danted (foreground) with a SOCKS4 loopback configuration.
    pub fn dante(work: &Path, logs: &Path) -> Result<Proxy> {
        let dir = work.join("dante");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let log = logs.join("danted.log");
        let _ = fs::remove_file(&log);
        let conf = dir.join("danted.conf");
        fs::write(
            &conf,
            format!(
                "# written by cargo xtask bench\nlogoutput: {}\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
                 socksmethod: none\nclientmethod: none\nuser.privileged: root\nuser.unprivileged: root\n\
                 client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
                 socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: bind connect bindreply }}\n",
                log.display()
            ),
        )?;
        let out = logs.join("danted.out");
        let mut cmd = Command::new("danted");
        cmd.arg("-f").arg(&conf).stdin(Stdio::null()).stdout(File::create(&out)?).stderr(File::create(&out)?);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("cannot start danted (is dante-server installed? `cargo xtask setup`)")?;
        let mut p = Proxy::peer(child, port, false, &log)?;
        let v = Command::new("danted")
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
            .unwrap_or_default();
        p.path_check = format!(
            "{} from Debian, SOCKS4 on 127.0.0.1 (config written by the bench; log: {})",
            v.split(" Copyright").next().unwrap_or("").trim().trim_end_matches('.'),
            log.display()
        );
        Ok(p)
    }

    /// A peer proxy (not proxyd) just spawned to listen on 127.0.0.1:`port`,
    /// once it does; stopped if it exits first or does not within 15 s (`log`
    /// is its log, quoted then).
    fn peer(child: Child, port: u16, socks5: bool, log: &Path) -> Result<Proxy> {
        let pid = child.id() as i32;
        let mut p = Proxy {
            child,
            pid,
            addr: SocketAddrV4::new([127, 0, 0, 1].into(), port),
            pin_dir: None,
            path_check: String::new(),
            socks5,
            control: None,
            adopted: None,
        };
        if let Err(e) = wait_port(&mut p.child, p.addr, log) {
            p.stop();
            return Err(e);
        }
        Ok(p)
    }

    /// Starts microsocks (Debian's small SOCKS5 server: one thread per client)
    /// on a free loopback port.
    pub fn microsocks(logs: &Path) -> Result<Proxy> {
        let port = free_port()?;
        let log = logs.join("microsocks.log");
        let mut cmd = Command::new("microsocks");
        cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(&log)?);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("cannot start microsocks (is it installed? `cargo xtask setup`)")?;
        let mut p = Proxy::peer(child, port, true, &log)?;
        p.path_check =
            format!("microsocks from Debian, SOCKS5 without authentication on {} (log: {})", p.addr, log.display());
        Ok(p)
    }

    /// SIGTERM, then SIGKILL after 5 s; the whole process tree.
    pub fn stop(&mut self) {
        let tree = tree_pids(self.pid);
        // SAFETY: signals to processes this bench started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let gone = match self.adopted {
                // Not our child: gone when /proc says so.
                Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
                None => self.child.try_wait().ok().flatten().is_some(),
            };
            if gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = self.adopted.take() {
            // SAFETY: the process this bench's proxyd handed over to.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in tree {
            if pid != self.pid && Path::new(&format!("/proc/{pid}")).exists() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(d) = self.pin_dir.take() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// `pid` and all its descendants.
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if let Some(f) = stat_fields(pid) {
                if let Some(ppid) = f.get(1).and_then(|s| s.parse::<i32>().ok()) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name (index 0 = state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(String::from).collect())
}

pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds (user + system, reaped children included) of a process tree.
pub fn tree_cpu_secs(root: i32) -> f64 {
    let mut ticks = 0u64;
    for pid in tree_pids(root) {
        if let Some(f) = stat_fields(pid) {
            for i in 11..=14 {
                ticks += f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    ticks as f64 / clk_tck()
}

/// CPU seconds (user + system, all threads) of one process, children excluded.
pub fn proc_cpu_secs(pid: i32) -> f64 {
    stat_fields(pid).map_or(0.0, |f| {
        (11..=12).map(|i| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)).sum::<u64>() as f64 / clk_tck()
    })
}

pub fn threads(pid: i32) -> u64 {
    stat_fields(pid).and_then(|f| f.get(17).and_then(|s| s.parse().ok())).unwrap_or(0)
}

fn status_kib(pid: i32, file: &str, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// (VmRSS summed, Pss summed, open fds summed, processes) over a process tree, KiB.
pub fn tree_mem(root: i32) -> (u64, u64, u64, usize) {
    let pids = tree_pids(root);
    let (mut rss, mut pss, mut fds) = (0, 0, 0);
    for &pid in &pids {
        rss += status_kib(pid, "status", "VmRSS:");
        pss += status_kib(pid, "smaps_rollup", "Pss:");
        fds += fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    }
    (rss, pss, fds, pids.len())
}

/// What the open fds of a process tree are: kind -> count ("socket",
/// "anon_inode:[eventfd]", "pipe", "file", ...), most frequent first.
pub fn fd_kinds(root: i32) -> Vec<(String, u64)> {
    let mut m: HashMap<String, u64> = HashMap::new();
    for pid in tree_pids(root) {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for e in rd.flatten() {
            let t = fs::read_link(e.path()).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            let kind = if t.starts_with("socket:") {
                "socket".to_string()
            } else if t.starts_with("pipe:") {
                "pipe".to_string()
            } else if t.starts_with("anon_inode:") {
                t
            } else {
                "file".to_string()
            };
            *m.entry(kind).or_default() += 1;
        }
    }
    let mut v: Vec<(String, u64)> = m.into_iter().collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    v
}

/// Machine CPU from /proc/stat, seconds over all CPUs: (busy, total, irq + softirq).
pub fn machine_cpu() -> (f64, f64, f64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or("");
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let irq = v.get(5).copied().unwrap_or(0) + v.get(6).copied().unwrap_or(0);
    ((total - idle) as f64 / clk_tck(), total as f64 / clk_tck(), irq as f64 / clk_tck())
}

/// One established TCP socket of a watched process, from `ss -tnmi`.
#[derive(Debug, Default, Clone)]
pub struct Sock {
    pub local: String,
    /// Bytes queued: receive (r) and send (t); buffer sizes rb and tb (skmem).
    pub r: u64,
    pub rb: u64,
    pub t: u64,
    pub tb: u64,
}

/// The established TCP sockets of the given processes.
pub fn socket_info(pids: &[i32]) -> Vec<Sock> {
    let Ok(out) = Command::new("ss").args(["-tnmpiH", "state", "established"]).output() else { return vec![] };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut res = Vec::new();
    let mut cur: Option<Sock> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            res.extend(cur.take());
            if pids.iter().any(|p| line.contains(&format!("pid={p},"))) {
                let f: Vec<&str> = line.split_whitespace().collect();
                cur = Some(Sock { local: f.get(2).unwrap_or(&"?").to_string(), ..Default::default() });
            }
        }
        if let Some(c) = cur.as_mut() {
            for tok in line.split_whitespace() {
                if let Some(inner) = tok.strip_prefix("skmem:(") {
                    for k in inner.trim_end_matches(')').split(',') {
                        let num = |p: &str| k.strip_prefix(p).and_then(|v| v.parse::<u64>().ok());
                        if let Some(v) = num("rb") {
                            c.rb = v;
                        } else if let Some(v) = num("tb") {
                            c.tb = v;
                        } else if let Some(v) = num("r") {
                            c.r = v;
                        } else if let Some(v) = num("t") {
                            c.t = v;
                        }
                    }
                }
            }
        }
    }
    res.extend(cur.take());
    res
}

/// TcpExt ListenOverflows + ListenDrops (machine-wide counters).
pub fn listen_drops() -> u64 {
    let s = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let vals: Vec<&str> = lines[1].split_whitespace().collect();
    names
        .iter()
        .zip(&vals)
        .filter(|(n, _)| **n == "ListenOverflows" || **n == "ListenDrops")
        .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
        .max()
        .unwrap_or(0)
}

/// Threads summed over a process tree, and the number of processes.
pub fn tree_threads(root: i32) -> (u64, usize) {
    let pids = tree_pids(root);
    (pids.iter().map(|&p| threads(p)).sum(), pids.len())
}
