//! Helpers for the hardening tests: what `/proc` says about the daemon (memory, open
//! files, limits, capabilities of every thread), many client sockets without running
//! out of ports, an RAII network namespace whose address never answers, and a lock
//! that keeps the heavy tests of one file from running at the same time.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Held by each heavy test of a test binary so they do not run concurrently (they
/// count the daemon's files and memory, and share this process's 20,000 open files).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// One `Name:` line of `/proc/PID/status` (e.g. `VmRSS`), without the name.
pub fn status_field(pid: u32, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let v = status_field(pid, "VmRSS").unwrap_or_else(|| panic!("no VmRSS for pid {pid}"));
    v.trim_end_matches("kB").trim().parse().expect("VmRSS number")
}

/// Number of open file descriptors of a process (`/proc/PID/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}")).count()
}

/// The soft and hard `Max open files` of a process (`/proc/PID/limits`).
pub fn nofile_limits(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = s.lines().find(|l| l.starts_with("Max open files")).expect("Max open files line");
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

/// The capability sets of one thread, from `/proc/PID/task/TID/status`.
#[derive(Clone, Debug)]
pub struct ThreadCaps {
    /// Thread id.
    pub tid: String,
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` as bit masks.
    pub inh: u64,
    pub prm: u64,
    pub eff: u64,
    pub bnd: u64,
    pub amb: u64,
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
}

/// The capability sets of every thread of `pid` (capabilities are per thread).
pub fn thread_caps(pid: u32) -> Vec<ThreadCaps> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read task dir") {
        let tid = t.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in task {tid} status"))
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).expect("hex mask");
        out.push(ThreadCaps {
            inh: mask("CapInh"),
            prm: mask("CapPrm"),
            eff: mask("CapEff"),
            bnd: mask("CapBnd"),
            amb: mask("CapAmb"),
            no_new_privs: field("NoNewPrivs") == "1",
            tid,
        });
    }
    out
}

/// Capability names for a mask, for messages (`cap_bpf,cap_net_admin,...`).
pub fn cap_names(mask: u64) -> String {
    const NAMES: [&str; 41] = [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "kill",
        "setgid",
        "setuid",
        "setpcap",
        "linux_immutable",
        "net_bind_service",
        "net_broadcast",
        "net_admin",
        "net_raw",
        "ipc_lock",
        "ipc_owner",
        "sys_module",
        "sys_rawio",
        "sys_chroot",
        "sys_ptrace",
        "sys_pacct",
        "sys_admin",
        "sys_boot",
        "sys_nice",
        "sys_resource",
        "sys_time",
        "sys_tty_config",
        "mknod",
        "lease",
        "audit_write",
        "audit_control",
        "setfcap",
        "mac_override",
        "mac_admin",
        "syslog",
        "wake_alarm",
        "block_suspend",
        "audit_read",
        "perfmon",
        "bpf",
        "checkpoint_restore",
    ];
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| NAMES.get(b).map_or_else(|| format!("cap_{b}"), |n| format!("cap_{n}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Sets `SO_LINGER {on, 0}`: closing the socket then sends a reset, not a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a descriptor `s` owns, with a correctly sized linger struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// The `i`-th of several loopback source addresses (127.0.1.1, 127.0.1.2, ...), so
/// tens of thousands of connections to one port do not run out of ephemeral ports.
pub fn loopback_source(i: usize, of: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, 1 + (i % of.max(1)) as u8)
}

/// Runs `ip ARGS` (optionally inside netns `ns`), panicking with its output on failure.
fn ip(ns: Option<&str>, args: &[&str]) {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["netns", "exec", ns, "ip"]);
    }
    cmd.args(args);
    let out = crate::run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(out.status.success(), "{cmd:?} failed: {}", crate::text(&out.stderr));
}

/// A network namespace joined to this one by a veth pair, owned by one test and
/// removed on drop. The far end has no address and forwarding is off in a new
/// namespace, so packets to [`BlackholeNs::dead_addr`] are dropped without an ICMP
/// or a reset: a destination that never answers.
pub struct BlackholeNs {
    name: String,
    veth: String,
    /// An address routed into the namespace where nothing answers.
    pub dead_addr: Ipv4Addr,
}

impl BlackholeNs {
    /// Creates the namespace, or returns None after skip_or_fail when not root or
    /// `ip` is missing. Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking),
    /// only on the veth pair this test creates.
    pub fn create(test: &str) -> Option<BlackholeNs> {
        if !crate::is_root() {
            crate::skip_or_fail(test, "needs root (creates a network namespace)");
            return None;
        }
        crate::require_program(test, "ip")?;
        // Unique per process and per test of this process (tests run concurrently).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (std::process::id() % 1000) * 10 + n % 10;
        let name = format!("proxyd-hard-{id}");
        let veth = format!("pxh{id}a");
        let peer = format!("pxh{id}b");
        // A leftover of an earlier killed run with the same pid: remove it first.
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let third = (id % 250) as u8; // two tests may share it: the address only has to be dead
        let ns = BlackholeNs { name: name.clone(), veth: veth.clone(), dead_addr: Ipv4Addr::new(198, 18, third, 2) };
        ip(None, &["netns", "add", &name]);
        ip(None, &["link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &name]);
        ip(Some(&name), &["link", "set", &peer, "address", "02:00:5e:00:53:02"]);
        ip(Some(&name), &["link", "set", &peer, "up"]);
        ip(None, &["addr", "add", &format!("198.18.{third}.1/30"), "dev", &veth]);
        ip(None, &["link", "set", &veth, "up"]);
        // A permanent neighbour: the SYNs really leave through the veth (no ARP wait
        // that would fail early with EHOSTUNREACH).
        ip(
            None,
            &[
                "neigh",
                "replace",
                &ns.dead_addr.to_string(),
                "lladdr",
                "02:00:5e:00:53:02",
                "dev",
                &veth,
                "nud",
                "permanent",
            ],
        );
        Some(ns)
    }

    /// `dead_addr:port`.
    pub fn dead(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.dead_addr, port)
    }
}

impl Drop for BlackholeNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A port on 127.0.0.1 that refuses connections and stays so while the returned
/// socket lives: bound but not listening, so no other socket of the test can take it.
pub fn refusing_port() -> (std::os::fd::OwnedFd, SocketAddrV4) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket/bind/getsockname on a descriptor wrapped in an OwnedFd at once,
    // with correctly sized sockaddr_in buffers.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let mut sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
            sin_zero: [0; 8],
        };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let p = &mut sa as *mut libc::sockaddr_in as *mut libc::sockaddr;
        assert_eq!(libc::bind(owned.as_raw_fd(), p, len), 0, "bind");
        assert_eq!(libc::getsockname(owned.as_raw_fd(), p, &mut len), 0, "getsockname");
        let port = u16::from_be(sa.sin_port);
        (owned, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
    }
}
