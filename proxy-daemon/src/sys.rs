//! The raw Linux calls proxyd makes that neither std, tokio nor nix wrap
//! safely: socket cookies, `TCP_INFO`, `SIOCOUTQ`, `recv` into uninitialised
//! capacity, socket options by number, `SO_LINGER` 0, a private epoll set
//! (and handing fds to tokio's reactor), map element commands that need no
//! `&mut` (so the maps are shared by all tunnels without a lock), the
//! console's SIGINT flag, and a file read into a mapping of its own.
//!
//! With `privileges` (capabilities), this is the only module allowed
//! `unsafe` (the crate root denies it elsewhere). Every `unsafe` block has
//! its SAFETY argument; callers get safe functions over `AsFd` and over maps
//! whose key and value sizes aya checked when it opened them.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, SockHash};
use aya::Pod;
use aya_log::EbpfLogger;
use nix::sys::epoll::{EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The kernel's 64-bit identifier of a socket (`SO_COOKIE`): the sockhash key.
pub fn socket_cookie(sock: &impl AsFd) -> io::Result<u64> {
    cookie_at(sock.as_fd().as_raw_fd())
}

/// The cookie of whatever socket descriptor number `fd` names right now
/// (`EBADF` or `ENOTSOCK` when none).
fn cookie_at(fd: std::os::fd::RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie`/`len` are valid for writes of the size passed; the
    // kernel checks the descriptor number (a closed one fails, EBADF).
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The `TCP_INFO` fields the close logic needs.
#[derive(Clone, Copy, Debug)]
pub struct TcpInfo {
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1, `TCP_CLOSE` = 7, ...).
    pub state: u8,
    /// `tcpi_bytes_acked`: every byte the peer has acknowledged so far.
    pub bytes_acked: u64,
    /// `tcpi_rtt`: smoothed round-trip time, in microseconds.
    pub rtt_us: u32,
}

/// Reads `TCP_INFO`. The kernel takes the socket lock for it, so the call
/// also waits for any receive processing running on the socket right now.
pub fn tcp_info(sock: &impl AsFd) -> io::Result<TcpInfo> {
    // SAFETY: `tcp_info` is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info`/`len` are valid for writes of the size passed; the
    // kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // `tcpi_bytes_acked` exists since Linux 4.1; an older kernel returns a
    // shorter struct and the field would read as 0, which `len` catches.
    let needed = mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + mem::size_of::<u64>();
    if (len as usize) < needed {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TCP_INFO has no tcpi_bytes_acked"));
    }
    Ok(TcpInfo { state: info.tcpi_state, bytes_acked: info.tcpi_bytes_acked, rtt_us: info.tcpi_rtt })
}

/// `SIOCOUTQ`: bytes in the send queue not yet acknowledged by the peer.
pub fn outq(sock: &impl AsFd) -> io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int to the pointer given.
    let rc = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u32)
}

/// `recv(2)` of at most `max` bytes into `buf`'s spare capacity (nothing is
/// zeroed first); returns the bytes read, which now extend `buf` (0: end of
/// stream).
pub fn recv_spare(sock: &impl AsFd, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: recv writes at most `len` bytes into `spare`, memory `buf` owns
    // and does not read while uninitialised.
    let n = unsafe { libc::recv(sock.as_fd().as_raw_fd(), spare.as_mut_ptr().cast(), len, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// The core the calling thread runs on now (`sched_getcpu(3)`).
pub fn current_cpu() -> Option<i32> {
    // SAFETY: no arguments; returns a CPU number or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    (cpu >= 0).then_some(cpu)
}

/// Sets an `int` socket option.
pub fn setsockopt_int(sock: &impl AsFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option value is a valid c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `SO_LINGER {on, 0}` so that closing the socket sends a RST.
pub fn set_linger_zero(sock: &impl AsFd) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: the option value is a valid `linger` of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A private epoll set (nix's) whose events carry a caller's token; the
/// tunnels watch for FIN/RST only, without a wake-up per received skb.
pub struct Epoll {
    epoll: nix::sys::epoll::Epoll,
}

/// Event bits as epoll reports them.
pub const EV_RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const EV_HUP: u32 = libc::EPOLLHUP as u32;
pub const EV_ERR: u32 = libc::EPOLLERR as u32;

impl Epoll {
    pub fn new() -> io::Result<Self> {
        Ok(Epoll { epoll: nix::sys::epoll::Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)? })
    }

    /// Watches `sock` for `EPOLLRDHUP` (edge-triggered; `EPOLLHUP` and
    /// `EPOLLERR` are always reported), tagged with `token`.
    pub fn watch_hangup(&self, sock: &impl AsFd, token: u64) -> io::Result<()> {
        Ok(self.epoll.add(sock, EpollEvent::new(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET, token))?)
    }

    /// Watches `fd` for readability (level-triggered), tagged with `token`.
    pub fn watch_readable(&self, fd: &impl AsFd, token: u64) -> io::Result<()> {
        Ok(self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))?)
    }

    /// Stops watching the socket `cookie` that was watched as `fd`, if `fd`
    /// still names it. Epoll deletes by number, and a socket closed since has
    /// left the set by itself while its number may already belong to a socket
    /// another thread watches: deleting that one would lose its hang-ups
    /// (seen: a tunnel relayed to its end after a failed splice dropped its
    /// registration after closing its sockets, and the next tunnel, given
    /// the same numbers on the other shard, never saw its client's FIN).
    /// The check cannot race: only the caller closes its own socket.
    pub fn unwatch_socket(&self, fd: std::os::fd::RawFd, cookie: u64) -> io::Result<()> {
        if cookie_at(fd)? != cookie {
            return Ok(());
        }
        // SAFETY: EPOLL_CTL_DEL reads no memory (the event argument may be
        // null); both arguments are plain descriptor numbers.
        let rc = unsafe { libc::epoll_ctl(self.epoll.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Collects pending events without blocking, as `(token, events)`.
    pub fn drain(&self) -> io::Result<Vec<(u64, u32)>> {
        const N: usize = 64;
        let mut events = [EpollEvent::empty(); N];
        let mut out = Vec::new();
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            out.extend(events[..n].iter().map(|e| (e.data(), e.events().bits() as u32)));
            if n < N {
                return Ok(out);
            }
        }
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.epoll.0.as_raw_fd()
    }
}

/// Registers an [`Epoll`] set with tokio's reactor (readable interest).
pub fn async_epoll(epoll: Epoll) -> io::Result<AsyncFd<Epoll>> {
    // SAFETY: `Epoll` owns its fd (an `OwnedFd`) and `as_raw_fd` always
    // returns that fd, which stays open until the `AsyncFd` drops the `Epoll`.
    Ok(unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }?)
}

/// Registers aya-log's ring buffer reader with tokio's reactor.
pub fn async_logger<T>(logger: EbpfLogger<T>) -> io::Result<AsyncFd<EbpfLogger<T>>> {
    // SAFETY: the logger owns its ring buffer map fd and `as_raw_fd` always
    // returns it; it stays open until the `AsyncFd` drops the logger.
    Ok(unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }?)
}

/// The `union bpf_attr` member of the map element commands (lookup, update,
/// delete): `map_fd`, `key`, `value`, `flags`, passed with exactly this size.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A map opened through aya's typed wrappers, which checked its key and
/// value sizes against the kernel's map: the element commands below take
/// only keys and values of those types.
pub trait CheckedMap {
    type Key: Pod;
    type Value: Pod;
    fn map_fd(&self) -> BorrowedFd<'_>;
}

impl<K: Pod, V: Pod> CheckedMap for BpfHashMap<MapData, K, V> {
    type Key = K;
    type Value = V;
    fn map_fd(&self) -> BorrowedFd<'_> {
        self.map().fd().as_fd()
    }
}

/// A sockhash's value is the socket's fd (`u32`) on update.
impl<K: Pod> CheckedMap for SockHash<MapData, K> {
    type Key = K;
    type Value = u32;
    fn map_fd(&self) -> BorrowedFd<'_> {
        self.fd().as_fd()
    }
}

/// `bpf(2)` on one map element. Maps are shared between threads without a
/// lock: each element command is atomic in the kernel.
fn map_elem<M: CheckedMap>(cmd: u32, map: &M, key: &M::Key, value: u64, flags: u64) -> io::Result<()> {
    let key = key as *const M::Key as u64;
    let mut attr = MapElemAttr { map_fd: map.map_fd().as_raw_fd() as u32, _pad: 0, key, value, flags };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for the element
    // commands, of the size passed; `key` (and `value`, when set) point to
    // live buffers of `M::Key`/`M::Value` for the whole call, which are the
    // map's key and value sizes (aya checked them when it opened the map).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            &mut attr as *mut MapElemAttr,
            mem::size_of::<MapElemAttr>() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;

/// Sets `map[key] = value` (`flags`: `BPF_ANY` 0, `BPF_NOEXIST` 1, ...).
/// For a sockhash the value is the socket's fd as a `u32`.
pub fn map_update<M: CheckedMap>(map: &M, key: &M::Key, value: &M::Value, flags: u64) -> io::Result<()> {
    map_elem(BPF_MAP_UPDATE_ELEM, map, key, value as *const M::Value as u64, flags)
}

/// Removes `map[key]`; a missing key is `ErrorKind::NotFound`.
pub fn map_delete<M: CheckedMap>(map: &M, key: &M::Key) -> io::Result<()> {
    map_elem(BPF_MAP_DELETE_ELEM, map, key, 0, 0)
}

/// `map[key]`, or `None` when the key is missing.
pub fn map_lookup<M: CheckedMap>(map: &M, key: &M::Key) -> io::Result<Option<M::Value>> {
    // SAFETY: `Pod` types are valid for any bit pattern, all zeros included.
    let mut value: M::Value = unsafe { mem::zeroed() };
    match map_elem(BPF_MAP_LOOKUP_ELEM, map, key, &mut value as *mut M::Value as u64, 0) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Set by SIGINT once [`catch_sigint`] ran.
pub static SIGINT_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    SIGINT_SEEN.store(true, Ordering::SeqCst);
}

/// Makes SIGINT set [`SIGINT_SEEN`] instead of ending the process (the
/// console's `print interval=...` stops on Ctrl-C).
pub fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (close-on-exec): each
/// send is one message, with the descriptors it carries.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    Ok(socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?)
}

/// Lets `fd` survive `exec` (for the one descriptor a child inherits).
pub fn inheritable(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// Sends one message with `fds` attached (`SCM_RIGHTS`).
pub fn send_with_fds(sock: &impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [std::io::IoSlice::new(bytes)];
    let n = sendmsg::<UnixAddr>(sock.as_fd().as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if n != bytes.len() {
        return Err(io::Error::other("hand-over message truncated"));
    }
    Ok(())
}

/// Receives one message (up to `buf.len()` bytes) and the descriptors it
/// carries, which the caller then owns. `Ok((0, []))` is the peer's close.
pub fn recv_with_fds(sock: &impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    // SCM_MAX_FD: the most one message can carry (a listener group's sockets
    // ride with the offer).
    let mut space = nix::cmsg_space!([i32; 253]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(sock.as_fd().as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("hand-over message truncated"));
    }
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing
                // else owns it.
                fds.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Takes ownership of descriptor `fd`, inherited from the parent process
/// that named it (`PROXYD_HANDOVER_FD`); it must be an open socket.
pub fn take_inherited(fd: i32) -> io::Result<OwnedFd> {
    use nix::sys::stat::{fstat, SFlag};
    let st = fstat(fd)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(io::Error::other("not a socket"));
    }
    // SAFETY: the parent passed this open descriptor (checked just above)
    // for this process to own, and nothing else here has taken it.
    let owned = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    Ok(owned)
}

/// Registers a descriptor this process owns with tokio's reactor (readable
/// and writable interest).
pub fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns its descriptor and `as_raw_fd` always returns
    // it; it stays open until the `AsyncFd` drops it.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }?)
}

/// A file's contents in an anonymous mapping of their own, unmapped on drop:
/// a large file read once (the kernel's BTF, 5 MB) leaves nothing behind
/// on the heap, which glibc would keep.
pub struct OffHeapFile {
    ptr: *mut u8,
    len: usize,
    filled: usize,
}

impl OffHeapFile {
    pub fn read(path: &str) -> io::Result<OffHeapFile> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty"));
        }
        // SAFETY: a fresh private anonymous mapping; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut mapped = OffHeapFile { ptr: ptr.cast(), len, filled: 0 };
        while mapped.filled < len {
            // SAFETY: the mapping is `len` bytes, writable, and only ours.
            let rest = unsafe { std::slice::from_raw_parts_mut(mapped.ptr.add(mapped.filled), len - mapped.filled) };
            match file.read(rest) {
                Ok(0) => break,
                Ok(n) => mapped.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(mapped)
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `filled` bytes of the mapping were written by `read`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.filled) }
    }
}

impl Drop for OffHeapFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `read`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxyd_tests::{accept_timeout, listen_local, tcp_connect};
    use std::net::{SocketAddrV4, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn connected(l: &TcpListener, at: SocketAddrV4) -> (TcpStream, TcpStream) {
        let c = tcp_connect(at.into()).expect("connect");
        (c, accept_timeout(l, Duration::from_secs(5)).expect("accept"))
    }

    /// A registration dropped after its socket closed must not stop watching
    /// the socket that was given the same number since (a tunnel lost its
    /// client's FIN that way).
    #[test]
    fn unwatch_leaves_a_reused_number_to_its_new_socket() {
        let (l, at) = listen_local();
        let epoll = Epoll::new().unwrap();
        let (old, _old_peer) = connected(&l, at);
        let (new, new_peer) = connected(&l, at);
        let old_cookie = socket_cookie(&old).unwrap();
        let number = OwnedFd::from(old);
        epoll.watch_hangup(&number, 1).unwrap();
        // The old socket closes (leaving the set) and its number names the
        // new one, in one step: no other thread of the test can take it.
        nix::unistd::dup2(new.as_raw_fd(), number.as_raw_fd()).unwrap();
        epoll.watch_hangup(&number, 2).unwrap();

        epoll.unwatch_socket(number.as_raw_fd(), old_cookie).unwrap();
        drop(new_peer);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while seen.is_empty() && Instant::now() < deadline {
            seen = epoll.drain().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen.len(), 1, "the new socket's FIN: {seen:?}");
        assert_eq!(seen[0].0, 2);
        assert_ne!(seen[0].1 & EV_RDHUP, 0, "events {:#x}", seen[0].1);

        // Its own cookie does unwatch it: a second attempt finds nothing to delete.
        let new_cookie = socket_cookie(&new).unwrap();
        epoll.unwatch_socket(number.as_raw_fd(), new_cookie).unwrap();
        let again = epoll.unwatch_socket(number.as_raw_fd(), new_cookie).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::ENOENT));
    }
}
