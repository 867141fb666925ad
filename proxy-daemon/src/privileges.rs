//! Least privilege after start-up: the daemon keeps only the capabilities it
//! needs while it runs and drops every other one, from every set, for good.
//!
//! Kept ([`KEPT`]), when the process has them:
//! - `CAP_NET_BIND_SERVICE`: `ip socks set port=N` may rebind below 1024 at any time;
//! - `CAP_BPF`: creating the kernel data path's maps and loading its program
//!   (at start, and again when `data-path` changes at run time);
//! - `CAP_NET_ADMIN`: loading a networking (`sk_skb`) program, and
//!   `SO_SNDBUFFORCE`/`SO_RCVBUFFORCE` on spliced sockets;
//! - `CAP_PERFMON`: the verdict reads the receiving socket's `copied_seq`
//!   (`bpf_skc_to_tcp_sock`, which the verifier offers only with it) to cut
//!   retransmitted bytes the socket already delivered (see `proxy-ebpf`).
//!
//! Verified on Linux 6.18 (`setpriv --bounding-set -all,+net_bind_service,+bpf,+net_admin,+perfmon`):
//! the kernel data path loads, pins, splices and updates its maps (sockhash,
//! peers, flows) at run time with exactly these four. Not needed and dropped:
//! `CAP_SYS_ADMIN` (map
//! updates through an fd the daemon holds need no capability; only mounting
//! bpffs does, so with capabilities dropped the daemon relies on bpffs being
//! mounted at `/sys/fs/bpf`, as systemd does).
//!
//! Capabilities belong to a thread, not to the process: `capset(2)` changes the
//! calling thread only. [`drop_privileges`] must therefore run before any
//! other thread exists (before the tokio runtime is built); threads started
//! later inherit the reduced sets. It refuses to run otherwise.
//!
//! Besides the effective, permitted and inheritable sets it clears the ambient
//! set, shrinks the bounding set (when it holds `CAP_SETPCAP`, which it drops
//! last) and sets `no_new_privs`, so nothing the process could ever execute
//! gets more than what is kept.

use std::io;

/// `CAP_NET_BIND_SERVICE` (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_NET_ADMIN`.
const CAP_NET_ADMIN: u32 = 12;
/// `CAP_SETPCAP`: needed to shrink the bounding set.
const CAP_SETPCAP: u32 = 8;
/// `CAP_PERFMON`.
const CAP_PERFMON: u32 = 38;
/// `CAP_BPF`.
const CAP_BPF: u32 = 39;

/// The capabilities the daemon keeps while it runs, with their names for the log.
pub const KEPT: [(u32, &str); 4] = [
    (CAP_NET_BIND_SERVICE, "cap_net_bind_service"),
    (CAP_NET_ADMIN, "cap_net_admin"),
    (CAP_PERFMON, "cap_perfmon"),
    (CAP_BPF, "cap_bpf"),
];

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Other threads exist: they would keep every capability.
    #[error(
        "cannot drop capabilities: {threads} threads are running and capabilities are per thread \
         (drop them before the runtime starts)"
    )]
    ThreadsRunning { threads: usize },
    /// A system call failed.
    #[error("cannot drop capabilities: {op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (bits 0..31, 32..63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The three 64-bit capability sets of the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sets {
    effective: u64,
    permitted: u64,
    inheritable: u64,
}

/// Drops every capability but [`KEPT`] from the calling (only) thread, for good,
/// and logs what it kept. Must run before any other thread starts.
pub fn drop_privileges() -> Result<(), PrivilegeError> {
    let threads = thread_count().map_err(|source| PrivilegeError::Sys { op: "reading /proc/self/task", source })?;
    if threads > 1 {
        return Err(PrivilegeError::ThreadsRunning { threads });
    }
    let before = capget().map_err(|source| PrivilegeError::Sys { op: "capget", source })?;
    let want: u64 = KEPT.iter().fold(0, |m, (cap, _)| m | bit(*cap));
    let keep = want & before.permitted;

    // The bounding set first: shrinking it needs CAP_SETPCAP, dropped below.
    if before.effective & bit(CAP_SETPCAP) != 0 {
        for cap in 0..=last_cap() {
            if keep & bit(cap) == 0 {
                prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0)
                    .map_err(|source| PrivilegeError::Sys { op: "prctl(PR_CAPBSET_DROP)", source })?;
            }
        }
    }
    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0)
        .map_err(|source| PrivilegeError::Sys { op: "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", source })?;
    capset(Sets { effective: keep, permitted: keep, inheritable: 0 })
        .map_err(|source| PrivilegeError::Sys { op: "capset", source })?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0)
        .map_err(|source| PrivilegeError::Sys { op: "prctl(PR_SET_NO_NEW_PRIVS)", source })?;

    let after = capget().map_err(|source| PrivilegeError::Sys { op: "capget", source })?;
    if after.effective != keep || after.permitted != keep {
        return Err(PrivilegeError::Sys {
            op: "checking the result",
            source: io::Error::other(format!(
                "effective {:#x}, permitted {:#x}, wanted {keep:#x}",
                after.effective, after.permitted
            )),
        });
    }
    let names: Vec<&str> = KEPT.iter().filter(|(cap, _)| keep & bit(*cap) != 0).map(|(_, name)| *name).collect();
    let missing: Vec<&str> = KEPT.iter().filter(|(cap, _)| keep & bit(*cap) == 0).map(|(_, name)| *name).collect();
    tracing::info!(
        kept = %if names.is_empty() { "none".to_string() } else { names.join(",") },
        "dropped all other capabilities"
    );
    if !missing.is_empty() && before.permitted != 0 {
        tracing::info!(
            "started without {}: the kernel data path or ports below 1024 may be unavailable",
            missing.join(",")
        );
    }
    Ok(())
}

fn bit(cap: u32) -> u64 {
    1u64 << cap
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`).
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the prctl options used here (PR_CAPBSET_DROP, PR_CAP_AMBIENT,
    // PR_SET_NO_NEW_PRIVS) take integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn capget() -> io::Result<Sets> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with a version-3 header reads the header and writes
    // exactly two `__user_cap_data_struct`s, which `data` holds.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| (hi as u64) << 32 | lo as u64;
    Ok(Sets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

fn capset(sets: Sets) -> io::Result<()> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    let (e, eh) = split(sets.effective);
    let (p, ph) = split(sets.permitted);
    let (i, ih) = split(sets.inheritable);
    let data = [
        CapData { effective: e, permitted: p, inheritable: i },
        CapData { effective: eh, permitted: ph, inheritable: ih },
    ];
    // SAFETY: capset(2) with a version-3 header reads the header and exactly
    // two `__user_cap_data_struct`s from `data`; pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading this thread's sets works and the split/join of the two words round-trips.
    #[test]
    fn capget_reads_sets() {
        let s = capget().expect("capget");
        assert_eq!(s.effective & !s.permitted, 0, "effective must be a subset of permitted");
    }

    /// Dropping is refused while other threads run (the test harness has several).
    #[test]
    fn refuses_with_threads() {
        let t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(500)));
        match drop_privileges() {
            Err(PrivilegeError::ThreadsRunning { threads }) => assert!(threads > 1),
            other => panic!("expected ThreadsRunning, got {other:?}"),
        }
        t.join().unwrap();
    }
}
