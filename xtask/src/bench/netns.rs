//! The bench's own network namespace: every process of a run (the echo
//! servers, the proxies, the load generator, `ss`, `iperf3`) lives in a new
//! namespace with only its loopback device, entered before any of them starts.
//!
//! A connection-rate run leaves tens of thousands of sockets in TIME_WAIT for a
//! minute. In the host's namespace they pile up from one run to the next (the
//! table's limit, 131,072 here, was reached after a few partial runs), hold the
//! ports that Dante's upstream sockets bind (it then refuses clients with 91)
//! and those of whatever runs next on the machine. In a namespace of its own a
//! run starts from an empty table, and the kernel frees what it left when its
//! last process exits. Needs CAP_SYS_ADMIN; without it the run stays in the
//! caller's namespace and says so.

use std::io;
use std::os::fd::FromRawFd;

/// Where this run's sockets live.
pub enum Netns {
    /// A namespace of this run's own.
    Own,
    /// The caller's namespace: entering a new one failed.
    Shared(String),
}

impl Netns {
    /// One line for the report.
    pub fn describe(&self) -> String {
        match self {
            Netns::Own => "a network namespace of its own (loopback only)".into(),
            Netns::Shared(why) => format!("the caller's network namespace ({why})"),
        }
    }
}

/// Moves this process into a new network namespace and brings its loopback
/// up. Call it while the process has one thread: a namespace is a thread's,
/// and only threads and children started afterwards inherit it.
pub fn enter() -> Netns {
    match unshare_and_up() {
        Ok(()) => Netns::Own,
        Err(e) => Netns::Shared(format!("cannot enter a new one: {e}")),
    }
}

fn unshare_and_up() -> io::Result<()> {
    let home = std::fs::File::open("/proc/self/ns/net")?;
    // SAFETY: plain system calls on values this function owns.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    loopback_up().inspect_err(|_| {
        // Back to the caller's namespace: one without loopback serves nothing.
        // SAFETY: `home` is an open namespace descriptor.
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&home), libc::CLONE_NEWNET) };
    })
}

/// Sets `IFF_UP` on `lo` (which gives it 127.0.0.1/8 and the local routes).
fn loopback_up() -> io::Result<()> {
    let err = |e: io::Error| io::Error::new(e.kind(), format!("bringing up lo in the new namespace: {e}"));
    // SAFETY: plain system calls; the descriptor is owned at once, `ifreq`
    // is plain data, zeroed, with a NUL-terminated name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let _owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(())
}
