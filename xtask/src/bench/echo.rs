//! The far end of every measurement: an echo/sink server in forked worker
//! processes (one epoll loop each, sharing the listening sockets), so its
//! sockets do not count against the load generator's open-files limit and its
//! CPU is not the load generator's.
//!
//! Protocol, decided by the first byte of a connection:
//! - `S`: sink. Everything after it is counted and discarded; at end of stream
//!   the server writes the count (u64, little endian) and closes. The sender
//!   thereby learns how many bytes really arrived end to end, and when.
//! - anything else: echo. Every byte (the first included) is written back.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{bail, Context, Result};

/// Loopback addresses the server listens on (same port on each), so that the
/// proxies' upstream connections spread over several 4-tuple spaces.
pub const LISTEN_IPS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 3),
    Ipv4Addr::new(127, 0, 0, 4),
];

pub struct EchoServer {
    pub addrs: Vec<SocketAddrV4>,
    /// The same echo from a thread per connection with blocking sockets (how
    /// many servers are written): one process, listening on its own port.
    pub threaded: SocketAddrV4,
    pub pids: Vec<i32>,
}

impl EchoServer {
    /// Forks `workers` server processes. Must be called while the calling
    /// process is still single-threaded.
    pub fn spawn(workers: usize) -> Result<EchoServer> {
        let listeners = bind_all()?;
        let addrs: Vec<SocketAddrV4> = listeners
            .iter()
            .map(|l| match l.local_addr() {
                Ok(std::net::SocketAddr::V4(a)) => a,
                _ => unreachable!(),
            })
            .collect();
        let fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
        for &fd in &fds {
            // SAFETY: plain syscalls on sockets we own.
            unsafe {
                libc::listen(fd, 4096);
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let mut pids = Vec::new();
        for _ in 0..workers {
            pids.push(fork_server(|| serve(&fds))?);
        }
        drop(listeners);
        let listener = TcpListener::bind((LISTEN_IPS[0], 0)).context("bind the threaded echo server")?;
        let threaded = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        pids.push(fork_server(|| serve_threaded(listener))?);
        Ok(EchoServer { addrs, threaded, pids })
    }

    pub fn stop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: pids are our own forked children.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        self.pids.clear();
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Forks a server process that runs `serve` until the bench (its parent)
/// exits; returns its pid. Only while the bench is still single-threaded.
fn fork_server(serve: impl FnOnce()) -> Result<i32> {
    // SAFETY: the process is single-threaded here (the bench forks before it
    // starts any thread); the child only runs its own loop and never returns
    // into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        serve();
        unsafe { libc::_exit(0) };
    }
    Ok(pid)
}

fn bind_all() -> Result<Vec<TcpListener>> {
    for _ in 0..20 {
        let first = TcpListener::bind((LISTEN_IPS[0], 0)).context("bind echo server")?;
        let port = first.local_addr()?.port();
        let mut all = vec![first];
        for ip in &LISTEN_IPS[1..] {
            match TcpListener::bind((*ip, port)) {
                Ok(l) => all.push(l),
                Err(_) => break,
            }
        }
        if all.len() == LISTEN_IPS.len() {
            return Ok(all);
        }
    }
    bail!("cannot bind the echo server on one port of {:?}", LISTEN_IPS)
}

const LISTENER_TAG: u64 = 1 << 40;
const MODE_NONE: u8 = 0;
const MODE_NEW: u8 = 1;
const MODE_ECHO: u8 = 2;
const MODE_SINK: u8 = 3;

struct Conn {
    mode: u8,
    count: u64,
}

/// The worker loop (never returns).
fn serve(listeners: &[RawFd]) {
    // SAFETY: raw epoll/socket syscalls on fds this process owns; buffers
    // are valid for the lengths passed.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        for &l in listeners {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                u64: LISTENER_TAG | l as u64,
            };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, l, &mut ev);
        }
        let mut conns: Vec<Conn> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            if n < 0 {
                continue;
            }
            for ev in &events[..n as usize] {
                let data = ev.u64;
                if data & LISTENER_TAG != 0 {
                    let l = (data & !LISTENER_TAG) as RawFd;
                    loop {
                        let fd = libc::accept4(
                            l,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if fd < 0 {
                            break;
                        }
                        let one: libc::c_int = 1;
                        libc::setsockopt(
                            fd,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            &one as *const _ as *const libc::c_void,
                            4,
                        );
                        let idx = fd as usize;
                        while conns.len() <= idx {
                            conns.push(Conn { mode: MODE_NONE, count: 0 });
                        }
                        conns[idx] = Conn { mode: MODE_NEW, count: 0 };
                        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
                    }
                    continue;
                }
                let fd = data as RawFd;
                let c = &mut conns[fd as usize];
                let r = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
                if r < 0 {
                    let e = *libc::__errno_location();
                    if e == libc::EAGAIN || e == libc::EINTR {
                        continue;
                    }
                    c.mode = MODE_NONE;
                    libc::close(fd);
                    continue;
                }
                if r == 0 {
                    if c.mode == MODE_SINK {
                        let b = c.count.to_le_bytes();
                        write_all(fd, &b);
                    }
                    c.mode = MODE_NONE;
                    libc::close(fd);
                    continue;
                }
                let r = r as usize;
                if c.mode == MODE_NEW {
                    if buf[0] == b'S' {
                        c.mode = MODE_SINK;
                        c.count = (r - 1) as u64;
                    } else {
                        c.mode = MODE_ECHO;
                    }
                } else if c.mode == MODE_SINK {
                    c.count += r as u64;
                }
                if c.mode == MODE_ECHO && !write_all(fd, &buf[..r]) {
                    c.mode = MODE_NONE;
                    libc::close(fd);
                }
            }
        }
    }
}

/// The threaded server's loop: a thread per connection with blocking reads
/// and writes, speaking the same protocol as the epoll workers (echo, or
/// sink after an `S`) until the peer closes.
fn serve_threaded(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let Ok(mut n @ 1..) = conn.read(&mut buf) else { return };
            if buf[0] == b'S' {
                let mut count = n as u64 - 1;
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    count += n as u64;
                }
                let _ = conn.write_all(&count.to_le_bytes());
                return;
            }
            while conn.write_all(&buf[..n]).is_ok() {
                match conn.read(&mut buf) {
                    Ok(m @ 1..) => n = m,
                    _ => return,
                }
            }
        });
    }
}

/// Writes everything to a non-blocking socket, waiting (bounded) when full.
unsafe fn write_all(fd: RawFd, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let w = libc::write(fd, data.as_ptr() as *const libc::c_void, data.len());
        if w > 0 {
            data = &data[w as usize..];
            continue;
        }
        let e = *libc::__errno_location();
        if w < 0 && (e == libc::EAGAIN || e == libc::EINTR) {
            let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
            if libc::poll(&mut p, 1, 5000) <= 0 {
                return false;
            }
            continue;
        }
        return false;
    }
    true
}
