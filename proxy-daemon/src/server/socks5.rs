//! The SOCKS5 handshake (RFC 1928, RFC 1929): method selection, optional
//! username/password against `/ip socks users` (with `only-one` and
//! `rate-limit`), then CONNECT, BIND or UDP ASSOCIATE. A failure after the
//! request sends the RFC's reply code before the close. UDP ASSOCIATE hands
//! the association to the UDP relay (`datapath::udp`) with the access check
//! and name resolution it needs.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::dial::{self, await_peer, bind_listener, check_access, Established, Failure, HANDSHAKE_TIMEOUT};
use super::registry::{ConnType, Entry};
use super::shared::Shared;
use crate::config::{AuthMethod, Config};
use crate::datapath::udp;
use crate::datapath::userspace::Counters;
use crate::protocol::socks5::{self, Address, Command, ParseError, ReplyCode};

/// Tells a SOCKS5 client that no method is acceptable (`version=4`).
pub async fn refuse_version(client: &mut TcpStream) {
    let _ = dial::send_now(client, &[5, socks5::METHOD_UNACCEPTABLE]).await;
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
            let _ = dial::send_now(client, &socks5::encode_reply(reply_code(e), unspecified())).await;
        }
    }
    result
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

fn reply_code(e: &Failure) -> ReplyCode {
    match e {
        Failure::Denied(_) | Failure::Unspecified(_) | Failure::Refused(_) => ReplyCode::NotAllowed,
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
    let methods = match read_message(client, &mut buf, entry, socks5::parse_greeting).await? {
        Ok(methods) => methods,
        // An empty list offers nothing acceptable: RFC 1928's 0xFF below.
        Err(ParseError::NoMethods) => Vec::new(),
        Err(e) => return Err(Failure::Malformed(e.to_string())),
    };
    let password = config.settings.auth_method == AuthMethod::Password;
    let want = if password { socks5::METHOD_PASSWORD } else { socks5::METHOD_NONE };
    let someone_can_log_in = !password || config.users.iter().any(|u| !u.disabled);
    let usable = methods.contains(&want) && someone_can_log_in;
    if !usable {
        dial::send_now(client, &[5, socks5::METHOD_UNACCEPTABLE]).await?;
        let why = if password && methods.contains(&want) {
            "auth-method=password and no user is enabled"
        } else {
            "no acceptable method offered"
        };
        return Err(Failure::Refused(why.into()));
    }
    dial::send_now(client, &[5, want]).await?;

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
                // The handshake's deadline covers the check too (its rounds are
                // bounded when the hash is stored; a blocking pool that is busy
                // with a burst of logins waits here, not forever).
                let check = tokio::task::spawn_blocking(move || hash.verify(&password));
                tokio::time::timeout(HANDSHAKE_TIMEOUT, check).await.map_err(|_| Failure::Deadline)?.unwrap_or(false)
            }
            None => false,
        };
        let Some(user) = user.filter(|_| verified) else {
            dial::send_now(client, &socks5::encode_auth_status(false)).await?;
            // Quoted and escaped: the name is the client's, and may hold a line break.
            tracing::warn!(src = %peer, user = ?creds.username, "SOCKS5 login failed: unknown user or wrong password");
            return Err(Failure::Refused("authentication failed".into()));
        };
        if !server.registry.claim_user(entry, &user.name, user.only_one) {
            dial::send_now(client, &socks5::encode_auth_status(false)).await?;
            return Err(Failure::Refused(format!("user {} is already connected (only-one)", user.name)));
        }
        dial::send_now(client, &socks5::encode_auth_status(true)).await?;
        limits = user.rate_limit.map(|bps| server.user_limits(&user.name, bps));
    }

    // The request. One that cannot be parsed gets its own reply code here;
    // from then on a failure owes the client the reply `handshake` sends.
    let request = match read_message(client, &mut buf, entry, socks5::parse_request).await? {
        Ok(r) => r,
        Err(e) => {
            dial::send_now(client, &socks5::encode_reply(e.reply(), unspecified())).await?;
            return Err(Failure::Malformed(e.to_string()));
        }
    };
    *requested = true;
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
            let (upstream, dst) = dial::connect(config, peer, &candidates, dst_name, entry).await?;
            dial::send_now(client, &socks5::encode_reply(ReplyCode::Succeeded, upstream.local_addr()?)).await?;
            entry.touch();
            Ok(Some(Established { kind: ConnType::Out, upstream, dst, early, limits }))
        }
        Command::Bind => {
            entry.set_destination(dst);
            check_access(config, peer, dst, dst_name)?;
            if !early.is_empty() {
                return Err(Failure::Bind(format!("{} unexpected bytes after the request", early.len())));
            }
            let listener = bind_listener(client, config.settings.vrf_device()).await?;
            dial::send_now(client, &socks5::encode_reply(ReplyCode::Succeeded, listener.local_addr()?)).await?;
            entry.touch();
            let (upstream, peer_addr) = await_peer(listener, client, dst.ip()).await?;
            dial::send_now(client, &socks5::encode_reply(ReplyCode::Succeeded, peer_addr)).await?;
            entry.touch();
            Ok(Some(Established { kind: ConnType::In, upstream, dst: peer_addr, early: Vec::new(), limits }))
        }
        Command::UdpAssociate => {
            udp_associate(config, client, peer, dst, entry).await?;
            Ok(None)
        }
    }
}

/// Answers UDP ASSOCIATE and relays datagrams for the client until its
/// TCP connection ends.
async fn udp_associate(
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    requested: SocketAddr,
    entry: &Entry,
) -> Result<(), Failure> {
    let socket = udp::socket(config.settings.vrf_device())?;
    let relay_addr = SocketAddr::new(client.local_addr()?.ip().to_canonical(), socket.local_addr()?.port());
    let counters = Arc::new(Counters::new());
    entry.set_tunnel(ConnType::Udp, relay_addr, counters.clone());
    dial::send_now(client, &socks5::encode_reply(ReplyCode::Succeeded, relay_addr)).await?;
    tracing::debug!(src = %peer, relay = %relay_addr, "UDP association up");
    let port = (requested.port() != 0).then_some(requested.port());
    let policy = UdpAccess { config, peer, entry };
    udp::relay(&socket, client, peer.ip(), port, &counters, &policy).await?;
    tracing::info!(src = %peer, relay = %relay_addr, "UDP association closed");
    Ok(())
}

/// The access list and the resolver, for the UDP relay.
struct UdpAccess<'a> {
    config: &'a Config,
    peer: SocketAddr,
    entry: &'a Entry,
}

impl udp::Policy for UdpAccess<'_> {
    async fn resolve(&self, host: &str, port: u16) -> Option<SocketAddr> {
        dial::resolve(host, port, false).await.ok().map(|a| a[0])
    }

    fn allow(&self, dst: SocketAddr, name: Option<&str>) -> bool {
        if let Err(e) = check_access(self.config, self.peer, dst, name) {
            tracing::debug!(src = %self.peer, %dst, "UDP datagram dropped: {e}");
            return false;
        }
        self.entry.set_destination(dst);
        true
    }
}
