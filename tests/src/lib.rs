//! Harness for proxyd's integration tests: it starts a real `proxyd` process per test
//! (private state file and control socket), drives it through the real CLI, and offers
//! the fixtures the tests share (free ports, a tiny HTTP server, raw SOCKS4 helpers,
//! SHA-256, running external programs with a time limit, skip rules).
//!
//! Environment:
//! - `PROXYD_BIN`: the daemon binary (default `<workspace>/target/debug/proxyd`).
//! - `PROXYD_TEST_KERNEL=1`: also run every test on the kernel data path
//!   (`=0` forces it off); see [`data_paths`].
//! - `CI`: when set, missing programs or missing root privileges fail tests instead of
//!   skipping them.

pub mod daemon;
pub mod fixtures;
pub mod hardening;
pub mod sha256;
pub mod socks;

pub use daemon::{Cli, Conn, Daemon, Options};

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The data paths every test runs on. The single place to change which paths are tested:
/// `userspace` always; `kernel` when `PROXYD_TEST_KERNEL=1`, or when running as root
/// with `CI` set (unless `PROXYD_TEST_KERNEL=0`).
pub fn data_paths() -> Vec<&'static str> {
    let kernel = match std::env::var("PROXYD_TEST_KERNEL").ok().as_deref() {
        Some("1") => true,
        Some("0") => false,
        _ => is_root() && in_ci(),
    };
    if kernel {
        vec!["userspace", "kernel"]
    } else {
        vec!["userspace"]
    }
}

/// True when the environment variable `CI` is set to anything but empty/`0`/`false`.
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

/// True when the tests run with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Skips (prints the reason, returns false) outside CI; panics in CI, where a missing
/// prerequisite must fail the run rather than hide a test.
pub fn skip_or_fail(test: &str, reason: &str) -> bool {
    if in_ci() {
        panic!("{test}: {reason} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

/// True when the kernel data path is under test; otherwise skips with a reason (fails in CI).
pub fn kernel_under_test(test: &str) -> bool {
    if data_paths().contains(&"kernel") {
        return true;
    }
    skip_or_fail(test, "the kernel data path is not under test (needs root; PROXYD_TEST_KERNEL=1 or CI)")
}

/// Returns true when running as root; otherwise skips (or fails in CI).
pub fn require_root(test: &str) -> bool {
    is_root() || skip_or_fail(test, "needs root (binds port 21)")
}

/// Finds an external program (absolute path, or a name looked up in PATH); if it is
/// missing, skips the test (or fails in CI) and returns None.
pub fn require_program(test: &str, program: &str) -> Option<PathBuf> {
    match find_program(program) {
        Some(p) => Some(p),
        None => {
            skip_or_fail(test, &format!("program `{program}` not found (apt-get install it)"));
            None
        }
    }
}

/// Checks that Debian's python (`/usr/bin/python3`) imports `module`; skips (or fails
/// in CI) when it does not.
pub fn require_python_module(test: &str, module: &str, package: &str) -> bool {
    if require_program(test, "/usr/bin/python3").is_none() {
        return false;
    }
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok || skip_or_fail(test, &format!("/usr/bin/python3 cannot import `{module}` (apt-get install {package})"))
}

/// Looks a program up like a shell would.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| is_exec(p))
}

/// A TCP port that was free on every address a moment ago: bound on
/// 0.0.0.0 with port 0 and without `SO_REUSEADDR` (which std's `bind` sets),
/// so the kernel skips ports still held by anything, even a client socket
/// in TIME_WAIT that an earlier test left (those made a later move of the
/// daemon to `listen-address=0.0.0.0` fail with "Address already in use").
pub fn free_port() -> u16 {
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd, std::ptr::addr_of!(sa).cast(), len);
        assert_eq!(rc, 0, "bind 0.0.0.0:0: {}", std::io::Error::last_os_error());
        let mut got_len = len;
        libc::getsockname(fd, std::ptr::addr_of_mut!(sa).cast(), &mut got_len);
        libc::close(fd);
        u16::from_be(sa.sin_port)
    }
}

/// `127.0.0.1:port` as a SocketAddrV4.
pub fn localhost(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns the last answer.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command with stdin closed and a time limit; kills it when the limit passes
/// (the returned Output then has no exit code, `status.code() == None`).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            eprintln!("timeout after {timeout:?}, killing: {desc}");
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// Deterministic pseudo-random bytes (xorshift64*), so transfers are checkable.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The exposition text of the metrics endpoint at `addr` (`GET /metrics`);
/// panics unless it answers 200 in Prometheus's text format.
pub fn scrape(addr: &str) -> String {
    let mut s = tcp_connect(addr.parse().expect("metrics address")).expect("connect to metrics-address");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = text(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of the sample `name` (with its labels, e.g. `x_total{a="b"}`) in
/// exposition text; panics when it is missing.
pub fn sample(text: &str, name: &str) -> u64 {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in the metrics:\n{text}"))
}

/// Connects to 127.0.0.1:port with a 5 s connect timeout and 10 s read/write timeouts.
pub fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Accepts one connection within `timeout` (None when none came).
pub fn accept_timeout(l: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    l.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + timeout;
    let got = loop {
        match l.accept() {
            Ok((s, _)) => break Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    l.set_nonblocking(false).expect("blocking");
    if let Some(s) = &got {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    got
}

/// A listener on 127.0.0.1 with a kernel-chosen port.
pub fn listen_local() -> (TcpListener, SocketAddrV4) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    (l, localhost(port))
}

/// Lossy UTF-8 of a byte slice, for messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Connects to `dst` from a chosen local address `src` (port picked by the kernel),
/// e.g. from 127.0.0.3 to act as a different loopback host.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        }
    }
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket syscalls on a descriptor we own; the descriptor is wrapped
    // in a TcpStream (which closes it) right after creation.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(SocketAddrV4::new(src, 0));
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(dst);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    }
}

/// Polls `connections print` (JSON) in a background thread and keeps every snapshot,
/// so tests can assert on rows of connections that are gone by the time they look.
pub struct ConnPoller {
    snapshots: std::sync::Arc<std::sync::Mutex<Vec<Vec<Conn>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnPoller {
    /// Starts polling every `interval`.
    pub fn start(cli: Cli, interval: Duration) -> ConnPoller {
        use std::sync::atomic::Ordering;
        let snapshots = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (snapshots.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 10 minutes of polling, even if nobody stops it.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                let out = cli.run(&["--json", "ip", "socks", "connections", "print"]);
                if out.status.success() {
                    s.lock().unwrap().push(daemon::parse_connections(&text(&out.stdout)));
                }
                std::thread::sleep(interval);
            }
        });
        ConnPoller { snapshots, stop, thread: Some(thread) }
    }

    /// Takes (and clears) the snapshots gathered so far.
    pub fn take(&self) -> Vec<Vec<Conn>> {
        std::mem::take(&mut *self.snapshots.lock().unwrap())
    }
}

impl Drop for ConnPoller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it
/// makes (and processes it starts) belong to that namespace.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
                // SAFETY: setns on a namespace fd we hold; it changes only this thread.
                let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A name part no other test (in this process or a concurrent one) uses:
/// process id, a counter and the clock's nanoseconds. For temp dirs, pin
/// dirs and network namespaces.
pub fn unique_tag() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}-{n}-{nanos:x}", std::process::id())
}
