//! One client connection: read the request (sans-io codec), resolve a 4a
//! name, ask the access list, then CONNECT or BIND, reply, and hand the pair
//! to the data path. Every failure after a request has been read sends reply
//! 91 before the close. The whole handshake has a deadline; the idle reaper
//! may also end it through the row's cancel token.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::registry::{ConnType, Entry, Slot};
use super::Server;
use crate::config::{AccessRequest, Action};
use crate::datapath::Pair;
use crate::protocol::socks4::{self, Command, Destination, ParseError, Reply};

/// Longest time from accept to the end of the handshake (request read,
/// destination resolved and dialled). Slow or silent clients are cut here.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to resolve a SOCKS4a name.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time to connect to a destination.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a BIND waits for its peer to connect.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes read per call during the handshake: a whole request fits, and
/// early payload after it is kept for the tunnel.
const READ_CHUNK: usize = 1024;

/// Why a handshake ended without a tunnel. The client gets 91 unless it is gone.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("malformed request: {0}")]
    Malformed(ParseError),
    #[error("client closed during the handshake")]
    ClientGone,
    #[error("handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    Deadline,
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("denied by access rule {0}")]
    Denied(String),
    #[error("cannot connect to {dst}: {source}")]
    Dial { dst: SocketAddr, source: io::Error },
    #[error("BIND: {0}")]
    Bind(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl Failure {
    /// Whether the client should get reply 91 (it is still there to read it).
    fn replies(&self) -> bool {
        !matches!(self, Failure::ClientGone)
    }
}

/// Refuses a client over the limit at once: reply 91 without reading, then close.
pub fn refuse(stream: TcpStream) {
    // The client may not have sent its request yet; a best-effort reply is
    // all it gets. try_write never blocks, so the accept loop is not delayed.
    let _ = stream.try_write(&Reply::rejected().encode());
    drop(stream);
}

/// Serves one admitted client until its tunnel ends.
pub async fn serve(server: Arc<Server>, mut client: TcpStream, peer: SocketAddr, slot: Slot) {
    let entry = slot.entry.clone();
    let _ = client.set_nodelay(true);
    let outcome = tokio::select! {
        _ = entry.cancel.cancelled() => return,
        r = handshake(&server, &mut client, peer, &slot) => r,
    };
    let (kind, upstream, early) = match outcome {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(src = %peer, "request failed: {e}");
            if e.replies() {
                let _ = client.write_all(&Reply::rejected().encode()).await;
            }
            return;
        }
    };
    let dst = upstream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let datapath = server.datapath();
    let pair = Pair { client, upstream, client_early: early };
    let tunnel = match datapath.attach(pair, entry.cancel.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(src = %peer, %dst, "cannot attach tunnel to the {} data path: {e}", datapath.kind());
            return;
        }
    };
    entry.set_tunnel(kind, dst, tunnel.stats.clone());
    tracing::debug!(src = %peer, %dst, kind = kind.as_str(), "tunnel up");
    let _ = tunnel.done.await;
    let row = entry.row();
    tracing::info!(src = %peer, %dst, kind = kind.as_str(), tx = row.tx, rx = row.rx, "tunnel closed");
    drop(slot);
}

/// Reads the request and sets up the far side. Returns the tunnel's type,
/// the far socket, and any payload the client sent after its request.
async fn handshake(
    server: &Server,
    client: &mut TcpStream,
    peer: SocketAddr,
    slot: &Slot,
) -> Result<(ConnType, TcpStream, Vec<u8>), Failure> {
    let entry = &slot.entry;
    let read = read_request(client, entry);
    let (request, early) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| Failure::Deadline)??;
    let dst = tokio::time::timeout(HANDSHAKE_TIMEOUT, resolve(&request.destination))
        .await
        .map_err(|_| Failure::Deadline)??;
    entry.set_destination(SocketAddr::V4(dst));
    let config = server.config();
    let decision = config.access.decide(&AccessRequest { src: peer, dst: SocketAddr::V4(dst), dst_name: None });
    if decision.action == Action::Deny {
        let rule = decision.rule.map_or_else(|| "-".into(), |r| r.to_string());
        return Err(Failure::Denied(rule));
    }

    match request.command {
        Command::Connect => {
            let upstream = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(dst))
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
                .map_err(|source| Failure::Dial { dst: SocketAddr::V4(dst), source })?;
            let _ = upstream.set_nodelay(true);
            let bound = v4(upstream.local_addr()?);
            client.write_all(&Reply::granted(bound).encode()).await?;
            entry.touch();
            Ok((ConnType::Out, upstream, early))
        }
        Command::Bind => {
            if !early.is_empty() {
                return Err(Failure::Bind(format!("{} unexpected bytes after the request", early.len())));
            }
            let upstream = bind(client, dst, entry).await?;
            Ok((ConnType::In, upstream, Vec::new()))
        }
    }
}

/// Reads one request; returns it and the bytes that followed it.
async fn read_request(client: &mut TcpStream, entry: &Entry) -> Result<(socks4::Request, Vec<u8>), Failure> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let (request, used) = loop {
        match socks4::parse_request(&buf) {
            Ok(r) => break r,
            Err(ParseError::Incomplete) => {}
            Err(e) => return Err(Failure::Malformed(e)),
        }
        let start = buf.len();
        buf.resize(start + READ_CHUNK, 0);
        let n = client.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(Failure::ClientGone);
        }
        entry.touch();
    };
    Ok((request, buf.split_off(used)))
}

/// The destination as an address; SOCKS4a names are resolved here.
async fn resolve(dst: &Destination) -> Result<SocketAddrV4, Failure> {
    match dst {
        Destination::Addr(a) => Ok(*a),
        Destination::Name { host, port } => {
            let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), *port)));
            match lookup.await {
                Ok(Ok(addrs)) => {
                    for a in addrs {
                        if let SocketAddr::V4(a) = a {
                            return Ok(a);
                        }
                    }
                    Err(Failure::Resolve(format!("{host}: no IPv4 address")))
                }
                Ok(Err(e)) => Err(Failure::Resolve(format!("{host}: {e}"))),
                Err(_) => Err(Failure::Resolve(format!("{host}: timed out"))),
            }
        }
    }
}

/// BIND: listen on the address the client reached us at, tell the client
/// where (first reply), accept one peer whose address is the requested
/// DSTIP, tell the client who (second reply).
async fn bind(client: &mut TcpStream, dst: SocketAddrV4, entry: &Entry) -> Result<TcpStream, Failure> {
    let local_ip = client.local_addr()?.ip();
    let listener = TcpListener::bind(SocketAddr::new(local_ip, 0)).await?;
    let bound = v4(listener.local_addr()?);
    client.write_all(&Reply::granted(bound).encode()).await?;
    entry.touch();

    let accept = async {
        let mut probe = [0u8; 1];
        tokio::select! {
            r = listener.accept() => Ok(r?),
            // The client must wait for the second reply; bytes or a close now end the BIND.
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
    drop(listener);
    if peer_addr.ip() != IpAddr::V4(*dst.ip()) {
        return Err(Failure::Bind(format!("peer {peer_addr} is not the requested {}", dst.ip())));
    }
    let _ = peer.set_nodelay(true);
    client.write_all(&Reply::granted(v4(peer_addr)).encode()).await?;
    entry.touch();
    Ok(peer)
}

/// SOCKS4 replies carry IPv4; anything else is reported as 0.0.0.0.
fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddrV4::new(ip, a.port()),
            None => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, a.port()),
        },
    }
}
