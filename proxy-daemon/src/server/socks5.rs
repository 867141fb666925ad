//! The SOCKS5 handshake (RFC 1928, RFC 1929): method selection, optional
//! username/password against `/ip socks users` (with `only-one` and
//! `rate-limit`), then CONNECT, BIND or UDP ASSOCIATE. A failure after the
//! request sends the RFC's reply code before the close. UDP ASSOCIATE runs
//! its relay here, in userspace, until the client's TCP connection ends.

use std::collections::HashSet;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::dial::{self, await_peer, bind_listener, check_access, Established, Failure, HANDSHAKE_TIMEOUT};
use super::registry::{ConnType, Entry};
use super::shared::Shared;
use crate::config::{AuthMethod, Config};
use crate::datapath::{monotonic_ns, FlowSource, FlowStats};
use crate::protocol::socks5::{self, Address, Command, ParseError, ReplyCode};

/// Most distinct destinations one UDP association remembers (answers are
/// accepted only from these).
const UDP_MAX_PEERS: usize = 1024;
/// Largest UDP datagram relayed.
const UDP_MAX_DATAGRAM: usize = 65_535;

/// Tells a SOCKS5 client that no method is acceptable (`version=4`).
pub async fn refuse_version(client: &mut TcpStream) {
    let _ = client.write_all(&[5, socks5::METHOD_UNACCEPTABLE]).await;
}

/// Runs the handshake on `buf` (what has been read so far). Replies itself,
/// failures included; returns the far side of a TCP tunnel, `None` for a UDP
/// association that has ended, or why it failed.
pub async fn handshake(
    server: &Shared,
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    entry: &Entry,
    buf: Vec<u8>,
) -> Result<Option<Established>, Failure> {
    let mut requested = false;
    let result = run(server, config, client, peer, entry, buf, &mut requested).await;
    if let Err(e) = &result {
        tracing::info!(src = %peer, user = entry.user().as_deref().unwrap_or("-"), "SOCKS5 request failed: {e}");
        if requested && e.replies() {
            let _ = client.write_all(&socks5::encode_reply(reply_code(e), unspecified())).await;
        }
    }
    result
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

fn reply_code(e: &Failure) -> ReplyCode {
    match e {
        Failure::Denied(_) | Failure::Refused(_) => ReplyCode::NotAllowed,
        Failure::Resolve(_) => ReplyCode::HostUnreachable,
        Failure::Dial { source, .. } => ReplyCode::from_io(source),
        Failure::Deadline => ReplyCode::TtlExpired,
        _ => ReplyCode::GeneralFailure,
    }
}

/// A sans-io parser of one SOCKS5 message: the message and the bytes it took.
type Parser<T> = fn(&[u8]) -> Result<(T, usize), ParseError>;

/// Reads until `parse` has a whole message; returns it and keeps what follows in `buf`.
async fn read_message<T>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    entry: &Entry,
    parse: Parser<T>,
) -> Result<Result<T, ParseError>, Failure> {
    let read = async {
        loop {
            match parse(buf) {
                Ok((msg, used)) => {
                    buf.drain(..used);
                    return Ok(Ok(msg));
                }
                Err(ParseError::Incomplete) => dial::read_more(client, buf, entry).await?,
                Err(e) => return Ok(Err(e)),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| Failure::Deadline)?
}

#[allow(clippy::too_many_arguments)]
async fn run(
    server: &Shared,
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    entry: &Entry,
    mut buf: Vec<u8>,
    requested: &mut bool,
) -> Result<Option<Established>, Failure> {
    // Method selection.
    let methods = read_message(client, &mut buf, entry, socks5::parse_greeting)
        .await?
        .map_err(|e| Failure::Malformed(e.to_string()))?;
    let password = config.settings.auth_method == AuthMethod::Password;
    let want = if password { socks5::METHOD_PASSWORD } else { socks5::METHOD_NONE };
    let someone_can_log_in = !password || config.users.iter().any(|u| !u.disabled);
    let usable = methods.contains(&want) && someone_can_log_in;
    if !usable {
        client.write_all(&[5, socks5::METHOD_UNACCEPTABLE]).await?;
        let why = if password && methods.contains(&want) {
            "auth-method=password and no user is enabled"
        } else {
            "no acceptable method offered"
        };
        return Err(Failure::Refused(why.into()));
    }
    client.write_all(&[5, want]).await?;

    // Username/password (RFC 1929).
    let mut limits = None;
    if password {
        let creds = read_message(client, &mut buf, entry, socks5::parse_credentials)
            .await?
            .map_err(|e| Failure::Malformed(e.to_string()))?;
        let user = config.users.iter().find(|u| !u.disabled && u.name == creds.username).cloned();
        let verified = match &user {
            Some(u) => {
                let hash = u.password.clone();
                let password = creds.password.clone();
                tokio::task::spawn_blocking(move || hash.verify(&password)).await.unwrap_or(false)
            }
            None => false,
        };
        let Some(user) = user.filter(|_| verified) else {
            client.write_all(&socks5::encode_auth_status(false)).await?;
            tracing::warn!(src = %peer, user = %creds.username, "SOCKS5 login failed: unknown user or wrong password");
            return Err(Failure::Refused("authentication failed".into()));
        };
        if !server.registry.claim_user(entry, &user.name, user.only_one) {
            client.write_all(&socks5::encode_auth_status(false)).await?;
            return Err(Failure::Refused(format!("user {} is already connected (only-one)", user.name)));
        }
        client.write_all(&socks5::encode_auth_status(true)).await?;
        limits = user.rate_limit.map(|bps| server.user_limits(&user.name, bps));
    }

    // The request.
    let request = read_message(client, &mut buf, entry, socks5::parse_request).await?;
    *requested = true;
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            client.write_all(&socks5::encode_reply(e.reply(), unspecified())).await?;
            return Err(Failure::Malformed(e.to_string()));
        }
    };
    let (candidates, dst_name) = match &request.destination {
        Address::Ip(a) => (vec![*a], None),
        Address::Domain { port, .. } if request.command == Command::UdpAssociate => {
            // The client's own UDP address; a name here is not resolved.
            (vec![SocketAddr::from(([0, 0, 0, 0], *port))], None)
        }
        Address::Domain { host, port } => {
            dial::deny_by_name(config, peer, *port, host)?;
            (dial::resolve(host, *port, false).await?, Some(host.as_str()))
        }
    };
    let dst = candidates[0];
    let early = std::mem::take(&mut buf);
    match request.command {
        Command::Connect => {
            let upstream = dial::connect(config, peer, &candidates, dst_name, entry).await?;
            client.write_all(&socks5::encode_reply(ReplyCode::Succeeded, upstream.local_addr()?)).await?;
            entry.touch();
            Ok(Some(Established { kind: ConnType::Out, upstream, early, limits }))
        }
        Command::Bind => {
            entry.set_destination(dst);
            check_access(config, peer, dst, dst_name)?;
            if !early.is_empty() {
                return Err(Failure::Bind(format!("{} unexpected bytes after the request", early.len())));
            }
            let listener = bind_listener(client).await?;
            client.write_all(&socks5::encode_reply(ReplyCode::Succeeded, listener.local_addr()?)).await?;
            entry.touch();
            let (upstream, peer_addr) = await_peer(listener, client, dst.ip()).await?;
            client.write_all(&socks5::encode_reply(ReplyCode::Succeeded, peer_addr)).await?;
            entry.touch();
            Ok(Some(Established { kind: ConnType::In, upstream, early: Vec::new(), limits }))
        }
        Command::UdpAssociate => {
            udp_associate(config, client, peer, dst, entry).await?;
            Ok(None)
        }
    }
}

/// Counters of one UDP association (payload bytes).
#[derive(Default)]
struct UdpCounters {
    tx: AtomicU64,
    rx: AtomicU64,
    last_ns: AtomicU64,
}

impl FlowSource for UdpCounters {
    fn snapshot(&self) -> FlowStats {
        FlowStats {
            tx: self.tx.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
            last_activity_ns: self.last_ns.load(Ordering::Relaxed),
        }
    }
}

/// One UDP socket for both families: IPv6 with IPv4-mapped addresses, or IPv4 alone.
async fn udp_socket() -> std::io::Result<UdpSocket> {
    match UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).await {
        Ok(s) => Ok(s),
        Err(_) => UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await,
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

/// Relays datagrams for the client until its TCP connection ends. Only the
/// client's own address may send through the relay, and only the
/// destinations it has sent to may answer.
async fn udp_associate(
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    requested: SocketAddr,
    entry: &Entry,
) -> Result<(), Failure> {
    let socket = udp_socket().await?;
    let relay_addr = SocketAddr::new(client.local_addr()?.ip().to_canonical(), socket.local_addr()?.port());
    let counters = Arc::new(UdpCounters { last_ns: AtomicU64::new(monotonic_ns()), ..Default::default() });
    entry.set_tunnel(ConnType::Udp, relay_addr, counters.clone());
    client.write_all(&socks5::encode_reply(ReplyCode::Succeeded, relay_addr)).await?;
    tracing::debug!(src = %peer, relay = %relay_addr, "UDP association up");

    let client_ip = peer.ip().to_canonical();
    // The client's UDP port: as requested, or learned from its first datagram.
    let mut client_udp: Option<SocketAddr> =
        (requested.port() != 0).then(|| SocketAddr::new(client_ip, requested.port()));
    let mut peers: HashSet<SocketAddr> = HashSet::new();
    let mut dgram = vec![0u8; UDP_MAX_DATAGRAM];
    let mut control = [0u8; 512];
    loop {
        tokio::select! {
            r = client.read(&mut control) => match r {
                Ok(0) | Err(_) => break,
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
                        Address::Domain { host, port } => match dial::resolve(host, *port, false).await {
                            Ok(a) => (a[0], Some(host.as_str())),
                            Err(_) => continue,
                        },
                    };
                    if let Err(e) = check_access(config, peer, dst, name) {
                        tracing::debug!(src = %peer, %dst, "UDP datagram dropped: {e}");
                        continue;
                    }
                    if peers.len() < UDP_MAX_PEERS {
                        peers.insert(dst);
                    }
                    entry.set_destination(dst);
                    if socket.send_to(&dgram[start..n], sendable(&socket, dst)).await.is_ok() {
                        counters.tx.fetch_add((n - start) as u64, Ordering::Relaxed);
                        counters.last_ns.store(monotonic_ns(), Ordering::Relaxed);
                    }
                } else if peers.contains(&from) {
                    let Some(to) = client_udp else { continue };
                    let wrapped = socks5::encode_udp(from, &dgram[..n]);
                    if socket.send_to(&wrapped, sendable(&socket, to)).await.is_ok() {
                        counters.rx.fetch_add(n as u64, Ordering::Relaxed);
                        counters.last_ns.store(monotonic_ns(), Ordering::Relaxed);
                    }
                } else {
                    tracing::debug!(src = %peer, %from, "UDP datagram from a third address dropped");
                }
            }
        }
    }
    tracing::info!(src = %peer, relay = %relay_addr, "UDP association closed");
    Ok(())
}
