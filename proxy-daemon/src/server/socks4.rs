//! The SOCKS4/4a handshake: decode the request, resolve a 4a name, ask the
//! access list, CONNECT or BIND, reply. Every failure after the first byte
//! sends reply 91 before the close.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use tokio::net::TcpStream;

use super::dial::{self, await_peer, bind_listener, check_access, Established, Failure, HANDSHAKE_TIMEOUT};
use super::registry::{ConnType, Entry};
use crate::config::Config;
use crate::protocol::socks4::{self, Command, Destination, ParseError, Reply};

/// Sends 91 (rejected or failed).
pub async fn reply_failure(client: &mut TcpStream) {
    let _ = dial::send_now(client, &Reply::rejected().encode()).await;
}

/// Runs the handshake on `buf` (what has been read so far). Replies itself,
/// failures included (91); returns the established far side or why not.
pub async fn handshake(
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    entry: &Entry,
    buf: Vec<u8>,
) -> Result<Established, Failure> {
    let result = run(config, client, peer, entry, buf).await;
    if let Err(e) = &result {
        tracing::info!(src = %peer, "SOCKS4 request failed: {e}");
        if e.replies() {
            reply_failure(client).await;
        }
    }
    result
}

async fn run(
    config: &Config,
    client: &mut TcpStream,
    peer: SocketAddr,
    entry: &Entry,
    mut buf: Vec<u8>,
) -> Result<Established, Failure> {
    let read = async {
        loop {
            match socks4::parse_request(&buf) {
                Ok((req, used)) => return Ok((req, buf.split_off(used))),
                Err(ParseError::Incomplete) => dial::read_more(client, &mut buf, entry).await?,
                Err(e) => return Err(Failure::Malformed(e.to_string())),
            }
        }
    };
    let (request, early) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| Failure::Deadline)??;
    let (candidates, name) = match &request.destination {
        Destination::Addr(a) => (vec![SocketAddr::V4(*a)], None),
        Destination::Name { host, port } => {
            dial::deny_by_name(config, peer, *port, host)?;
            (dial::resolve(host, *port, true).await?, Some(host.as_str()))
        }
    };

    match request.command {
        Command::Connect => {
            let (upstream, dst) = dial::connect(config, peer, &candidates, name, entry).await?;
            dial::send_now(client, &Reply::granted(v4(upstream.local_addr()?)).encode()).await?;
            entry.touch();
            Ok(Established { kind: ConnType::Out, upstream, dst, early, limits: None })
        }
        Command::Bind => {
            let dst = candidates[0];
            entry.set_destination(dst);
            check_access(config, peer, dst, name)?;
            if !early.is_empty() {
                return Err(Failure::Bind(format!("{} unexpected bytes after the request", early.len())));
            }
            let listener = bind_listener(client, config.settings.vrf_device()).await?;
            dial::send_now(client, &Reply::granted(v4(listener.local_addr()?)).encode()).await?;
            entry.touch();
            let (upstream, peer_addr) = await_peer(listener, client, dst.ip()).await?;
            dial::send_now(client, &Reply::granted(v4(peer_addr)).encode()).await?;
            entry.touch();
            Ok(Established { kind: ConnType::In, upstream, dst: peer_addr, early: Vec::new(), limits: None })
        }
    }
}

/// SOCKS4 replies carry IPv4; anything else is reported as 0.0.0.0.
fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => SocketAddrV4::new(ip, addr.port()),
        IpAddr::V6(_) => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, addr.port()),
    }
}
