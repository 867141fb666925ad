//! The UDP ASSOCIATE relay (SOCKS5): datagrams between the client's UDP
//! port and the destinations it names, in userspace, until the client's TCP
//! control connection ends. Only the client's own address may send through
//! the relay, and only the destinations it has sent to may answer. What the
//! client may reach, and how names resolve, is the caller's ([`Policy`]):
//! the relay itself knows nothing of the access list. Its socket is bound to
//! the `vrf` device when there is one.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

use super::monotonic_ns;
use super::userspace::Counters;
use crate::protocol::socks5::{self, Address};

/// Most distinct destinations one UDP association remembers (answers are
/// accepted only from these).
const MAX_PEERS: usize = 1024;
/// Largest UDP datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// What the relay asks of its caller for each datagram from the client.
pub trait Policy {
    /// The address of a name the client sent to, or `None` to drop the datagram.
    fn resolve(&self, host: &str, port: u16) -> impl Future<Output = Option<SocketAddr>>;
    /// Whether the client may send to `dst` (`name` when it named a host);
    /// called once per datagram, so it may also record the destination.
    fn allow(&self, dst: SocketAddr, name: Option<&str>) -> bool;
}

/// One UDP socket for both families: IPv6 with IPv4-mapped addresses, or
/// IPv4 alone; bound to `device` (`vrf`) before it gets its port.
pub fn socket(device: Option<&str>) -> io::Result<UdpSocket> {
    match bound_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), device) {
        Ok(s) => Ok(s),
        Err(_) => bound_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), device),
    }
}

/// What `UdpSocket::bind(addr)` does, with the device bound first.
fn bound_socket(addr: SocketAddr, device: Option<&str>) -> io::Result<UdpSocket> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    crate::vrf::bind(&fd, device)?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// Relays until `control` (the client's TCP connection) ends. `client_ip`
/// is the client's address; `client_port` its UDP port when it announced
/// one (else learned from its first datagram). Counts payload bytes.
pub async fn relay(
    socket: &UdpSocket,
    control: &mut TcpStream,
    client_ip: IpAddr,
    client_port: Option<u16>,
    counters: &Counters,
    policy: &impl Policy,
) -> io::Result<()> {
    let client_ip = client_ip.to_canonical();
    let mut client_udp: Option<SocketAddr> = client_port.map(|p| SocketAddr::new(client_ip, p));
    let mut peers: HashSet<SocketAddr> = HashSet::new();
    let mut dgram = vec![0u8; MAX_DATAGRAM];
    let mut scratch = [0u8; 512];
    loop {
        tokio::select! {
            r = control.read(&mut scratch) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
            r = socket.recv_from(&mut dgram) => {
                let (n, from) = r?;
                let from = canonical(from);
                let is_client = from.ip() == client_ip && client_udp.is_none_or(|c| c == from);
                if is_client {
                    client_udp.get_or_insert(from);
                    let Ok((addr, start)) = socks5::parse_udp_header(&dgram[..n]) else { continue };
                    let (dst, name) = match &addr {
                        Address::Ip(a) => (canonical(*a), None),
                        Address::Domain { host, port } => match policy.resolve(host, *port).await {
                            Some(a) => (a, Some(host.as_str())),
                            None => continue,
                        },
                    };
                    if !policy.allow(dst, name) {
                        continue;
                    }
                    if peers.len() < MAX_PEERS {
                        peers.insert(dst);
                    }
                    if socket.send_to(&dgram[start..n], sendable(socket, dst)).await.is_ok() {
                        counters.tx.fetch_add((n - start) as u64, Ordering::Relaxed);
                        counters.last_ns.store(monotonic_ns(), Ordering::Relaxed);
                    }
                } else if peers.contains(&from) {
                    let Some(to) = client_udp else { continue };
                    let wrapped = socks5::encode_udp(from, &dgram[..n]);
                    if socket.send_to(&wrapped, sendable(socket, to)).await.is_ok() {
                        counters.rx.fetch_add(n as u64, Ordering::Relaxed);
                        counters.last_ns.store(monotonic_ns(), Ordering::Relaxed);
                    }
                } else {
                    tracing::debug!(%from, "UDP datagram from a third address dropped");
                }
            }
        }
    }
}

/// The address to hand to `send_to` on `socket`.
fn sendable(socket: &UdpSocket, dst: SocketAddr) -> SocketAddr {
    match (socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false), dst) {
        (true, SocketAddr::V4(a)) => SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)),
        _ => dst,
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
