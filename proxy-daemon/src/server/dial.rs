//! What the SOCKS4 and SOCKS5 handshakes share: the handshake's limits and
//! outcome ([`Established`], [`Failure`]), reading the request, the access
//! check, resolving, dialling, and the BIND listener (both bound to the
//! `vrf` device when there is one).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::registry::{ConnType, Entry};
use crate::config::{AccessRequest, Action, Config};
use crate::datapath::userspace::{send_at_once, Limits};
use crate::metrics::RefusalReason;
use crate::sys;

/// Longest time from accept to a decoded request (and, separately, to resolve
/// a name). Slow or silent clients are cut here.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to resolve a name.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time to connect to a destination.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a BIND waits for its peer to connect.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes read per call during the handshake: a whole request fits, and
/// early payload after it is kept for the tunnel.
pub const READ_CHUNK: usize = 1024;

/// A handshake that got its far side: what the data path takes over.
pub struct Established {
    pub kind: ConnType,
    pub upstream: TcpStream,
    /// The far side's address (known from the dial or the BIND's accept).
    pub dst: SocketAddr,
    /// Client bytes read past the request (the start of its stream).
    pub early: Vec<u8>,
    /// Pacing for a rate-limited user; such tunnels use the userspace relay.
    pub limits: Option<Limits>,
}

/// Why a handshake ended without a tunnel; each protocol turns it into its reply.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("client closed during the handshake")]
    ClientGone,
    #[error("handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    Deadline,
    #[error("refused: {0}")]
    Refused(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("denied by access rule {0}")]
    Denied(String),
    #[error("{0} is not a destination: the unspecified address reaches this host")]
    Unspecified(SocketAddr),
    #[error("cannot connect to {dst}: {source}")]
    Dial { dst: SocketAddr, source: io::Error },
    #[error("BIND: {0}")]
    Bind(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// How the metrics count a failure.
pub fn refusal_reason(f: &Failure) -> RefusalReason {
    match f {
        Failure::Denied(_) | Failure::Unspecified(_) => RefusalReason::Access,
        Failure::Refused(_) => RefusalReason::Auth,
        Failure::Resolve(_) | Failure::Dial { .. } => RefusalReason::Dial,
        _ => RefusalReason::Handshake,
    }
}

impl Failure {
    /// Whether the client is still there to read a failure reply.
    pub fn replies(&self) -> bool {
        !matches!(self, Failure::ClientGone)
    }
}

/// Appends what the client sent next to `buf`; an end of stream is [`Failure::ClientGone`].
pub async fn read_more(client: &mut TcpStream, buf: &mut Vec<u8>, entry: &Entry) -> Result<(), Failure> {
    buf.reserve(READ_CHUNK);
    match recv_now(client, buf).await? {
        0 => Err(Failure::ClientGone),
        _ => {
            entry.touch();
            Ok(())
        }
    }
}

/// Reads into `buf`'s spare capacity (at most [`READ_CHUNK`]) what `sock`
/// holds now, and waits only when it holds nothing. Tokio learns a socket's
/// readiness from its next `epoll_wait`, so a read through it on a socket just
/// accepted, whose request has usually arrived with it, would first go round
/// the event loop, after whatever else is ready on this shard.
async fn recv_now(sock: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    match sys::recv_spare(sock, buf, READ_CHUNK) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => loop {
            sock.readable().await?;
            // (`try_io` clears the readiness when the read finds nothing.)
            match sock.try_io(Interest::READABLE, || sys::recv_spare(sock, buf, READ_CHUNK)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        },
        r => r,
    }
}

/// Sends a handshake reply, at once when the socket takes it all (a reply
/// is a few bytes, and the socket's buffer is empty), else the rest through
/// tokio: like [`recv_now`], no turn of the event loop before the client has
/// its answer.
pub async fn send_now(sock: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let sent = send_at_once(sock, bytes)?;
    sock.write_all(&bytes[sent..]).await
}

/// The address a destination really names: an IPv4-mapped IPv6 address
/// (`::ffff:127.0.0.1`) is its IPv4 address, for the access list, the
/// connections list and the dial alike.
fn canonical(dst: SocketAddr) -> SocketAddr {
    SocketAddr::new(dst.ip().to_canonical(), dst.port())
}

/// Asks the access list about `dst` in its [`canonical`] form; a deny is a
/// [`Failure::Denied`] naming the rule. The unspecified address (`0.0.0.0`,
/// `::`), which Linux connects to this host, is never a destination, whatever
/// the rules say: a rule that denies 127.0.0.0/8 would not match it.
pub fn check_access(config: &Config, src: SocketAddr, dst: SocketAddr, dst_name: Option<&str>) -> Result<(), Failure> {
    let dst = canonical(dst);
    if dst.ip().is_unspecified() {
        return Err(Failure::Unspecified(dst));
    }
    let decision = config.access.decide(&AccessRequest { src, dst, dst_name });
    match decision.action {
        Action::Allow => Ok(()),
        Action::Deny => Err(Failure::Denied(decision.rule.map_or_else(|| "-".into(), |r| r.to_string()))),
    }
}

/// Refuses a request for a name that the access list denies by name alone,
/// before any DNS query for it is made.
pub fn deny_by_name(config: &Config, src: SocketAddr, port: u16, host: &str) -> Result<(), Failure> {
    match config.access.decide_by_name(src, port, host) {
        Some(d) if d.action == Action::Deny => {
            Err(Failure::Denied(d.rule.map_or_else(|| "-".into(), |r| r.to_string())))
        }
        _ => Ok(()),
    }
}

/// Resolves a name to its addresses, IPv4 first; `v4_only` for SOCKS4a,
/// which can only reach IPv4.
pub async fn resolve(host: &str, port: u16, v4_only: bool) -> Result<Vec<SocketAddr>, Failure> {
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)));
    match lookup.await {
        Ok(Ok(addrs)) => {
            let mut addrs: Vec<SocketAddr> = addrs.filter(|a| !v4_only || a.is_ipv4()).collect();
            addrs.sort_by_key(|a| !a.is_ipv4());
            addrs.dedup();
            if addrs.is_empty() {
                return Err(Failure::Resolve(format!("{host}: no usable address")));
            }
            Ok(addrs)
        }
        Ok(Err(e)) => Err(Failure::Resolve(format!("{host}: {e}"))),
        Err(_) => Err(Failure::Resolve(format!("{host}: timed out"))),
    }
}

/// Connects to the first of `candidates` that the access list allows and
/// that answers, within [`DIAL_TIMEOUT`] in all, through the `vrf` in
/// `config`. Records the destination in the row; returns the connection and
/// the address it reached.
pub async fn connect(
    config: &Config,
    src: SocketAddr,
    candidates: &[SocketAddr],
    name: Option<&str>,
    entry: &Entry,
) -> Result<(TcpStream, SocketAddr), Failure> {
    let deadline = tokio::time::Instant::now() + DIAL_TIMEOUT;
    let mut last = None;
    for &dst in candidates {
        let dst = canonical(dst);
        entry.set_destination(dst);
        if let Err(e) = check_access(config, src, dst, name) {
            last = Some(e);
            continue;
        }
        let attempt = tokio::time::timeout_at(deadline, dial(dst, config.settings.vrf_device()))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        match attempt {
            Ok(upstream) => return Ok((upstream, dst)),
            Err(source) => last = Some(Failure::Dial { dst, source }),
        }
    }
    Err(last.unwrap_or_else(|| Failure::Resolve("no address".into())))
}

/// One connection attempt, from a socket bound to `device` (`vrf`) first.
/// On loopback and other local paths the handshake is done by the time
/// `connect` returns (the SYN and its answer are processed inside the
/// call), which a `poll` sees at once; tokio's own connect would wait for
/// its next `epoll_wait` to learn it. Otherwise the wait is tokio's.
async fn dial(dst: SocketAddr, device: Option<&str>) -> io::Result<TcpStream> {
    let family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    crate::vrf::bind(&fd, device)?;
    sys::setsockopt_int(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        // (Interrupted, the attempt goes on in the background, as in progress.)
        Ok(()) | Err(Errno::EINPROGRESS | Errno::EINTR) => {}
        Err(e) => return Err(e.into()),
    }
    let mut pending = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    let done =
        poll(&mut pending, PollTimeout::ZERO)? == 1 && pending[0].revents().is_some_and(|r| r == PollFlags::POLLOUT);
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
    if done {
        return Ok(stream);
    }
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// BIND's listener, on the address the client reached the proxy at (so the
/// address in the first reply is one the client can pass on), bound to
/// `device` (`vrf`) like the SOCKS listener.
pub async fn bind_listener(client: &TcpStream, device: Option<&str>) -> Result<TcpListener, Failure> {
    let local = SocketAddr::new(client.local_addr()?.ip(), 0);
    let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // What TcpListener::bind does, with the device bound first.
    socket.set_reuseaddr(true)?;
    crate::vrf::bind(&socket, device)?;
    socket.bind(local)?;
    Ok(socket.listen(1024)?)
}

/// Waits for BIND's peer. The client must wait for the second reply: bytes
/// or a close from it now end the BIND. A peer from another address than
/// `expected` ends it too (SOCKS4 spec).
pub async fn await_peer(
    listener: TcpListener,
    client: &mut TcpStream,
    expected: IpAddr,
) -> Result<(TcpStream, SocketAddr), Failure> {
    let accept = async {
        let mut probe = [0u8; 1];
        tokio::select! {
            r = listener.accept() => Ok(r?),
            r = client.peek(&mut probe) => match r {
                Ok(0) => Err(Failure::ClientGone),
                Ok(_) => Err(Failure::Bind("client sent data before the second reply".into())),
                Err(e) => Err(Failure::Io(e)),
            },
        }
    };
    let (peer, peer_addr) = tokio::time::timeout(BIND_TIMEOUT, accept)
        .await
        .map_err(|_| Failure::Bind(format!("no peer connected within {BIND_TIMEOUT:?}")))??;
    if peer_addr.ip().to_canonical() != expected.to_canonical() {
        return Err(Failure::Bind(format!("peer {peer_addr} is not the requested {expected}")));
    }
    let _ = peer.set_nodelay(true);
    Ok((peer, peer_addr))
}
