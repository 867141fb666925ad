//! One client connection: admission has happened; read the first byte to
//! tell SOCKS4 from SOCKS5, let that protocol's handshake ([`super::socks4`],
//! [`super::socks5`]) set up the far side, then hand the pair to the data
//! path and wait for the tunnel to end. Also the pieces both protocols share:
//! the access check, resolving, dialling, and the BIND listener.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::registry::{ConnType, Entry, Slot};
use super::Server;
use crate::config::{AccessRequest, Action, Config};
use crate::datapath::userspace::{Limits, UserspaceRelay};
use crate::datapath::Pair;
use crate::protocol::socks4::Reply;

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
    #[error("cannot connect to {dst}: {source}")]
    Dial { dst: SocketAddr, source: io::Error },
    #[error("BIND: {0}")]
    Bind(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Why a connection got no tunnel, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The access list denied the request.
    Access,
    /// `max-connections` was reached.
    Limit,
    /// A malformed, slow, abandoned or unsupported handshake.
    Handshake,
    /// SOCKS5 login failed, or the method/version was refused.
    Auth,
    /// The destination could not be resolved or reached.
    Dial,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 5] = [Self::Access, Self::Limit, Self::Handshake, Self::Auth, Self::Dial];

    pub fn of(f: &Failure) -> Self {
        match f {
            Failure::Denied(_) => Self::Access,
            Failure::Refused(_) => Self::Auth,
            Failure::Resolve(_) | Failure::Dial { .. } => Self::Dial,
            _ => Self::Handshake,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::Limit => "limit",
            Self::Handshake => "handshake",
            Self::Auth => "auth",
            Self::Dial => "dial",
        }
    }
}

impl Failure {
    /// Whether the client is still there to read a failure reply.
    pub fn replies(&self) -> bool {
        !matches!(self, Failure::ClientGone)
    }
}

/// Refuses a client over the limit at once: a SOCKS4 91 without reading, then close.
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
    let established = tokio::select! {
        _ = entry.cancel.cancelled() => return,
        // Boxed: the handshake's state is freed when it ends instead of
        // staying inside every long-lived connection task.
        r = Box::pin(handshake(&server, &mut client, peer, &slot)) => r,
    };
    let Some(est) = established else { return };
    let dst = est.upstream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let pair = Pair { client, upstream: est.upstream, client_early: est.early };
    let (path, tunnel) = match est.limits {
        Some(limits) => (
            "userspace (rate-limited)".to_string(),
            UserspaceRelay.attach_limited(pair, entry.cancel.clone(), Some(limits)),
        ),
        None => {
            let datapath = server.datapath();
            (datapath.kind().to_string(), datapath.attach(pair, entry.cancel.clone()))
        }
    };
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(src = %peer, %dst, "cannot attach the tunnel to the {path} data path: {e}");
            return;
        }
    };
    entry.set_tunnel(est.kind, dst, tunnel.stats.clone());
    tracing::debug!(src = %peer, %dst, kind = est.kind.as_str(), path, "tunnel up");
    let _ = tunnel.done.await;
    let row = entry.row();
    server.metrics.tunnel_closed(row.tx, row.rx);
    // Debug, not info: one line per tunnel was a write(2) per connection and
    // about a tenth of the connection rate; metrics count tunnels and bytes.
    tracing::debug!(src = %peer, %dst, kind = est.kind.as_str(), user = row.user.as_deref().unwrap_or("-"), tx = row.tx, rx = row.rx, "tunnel closed");
    drop(slot);
}

/// Reads the first bytes, runs the protocol they announce, and counts the outcome.
async fn handshake(server: &Server, client: &mut TcpStream, peer: SocketAddr, slot: &Slot) -> Option<Established> {
    let started = std::time::Instant::now();
    let result = negotiate(server, client, peer, slot).await;
    match &result {
        Ok(Some(_)) => server.metrics.handshake_done(started.elapsed()),
        Ok(None) => {}
        Err(e) => server.metrics.refused(RefusalReason::of(e)),
    }
    result.ok().flatten()
}

async fn negotiate(
    server: &Server,
    client: &mut TcpStream,
    peer: SocketAddr,
    slot: &Slot,
) -> Result<Option<Established>, Failure> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read_more(client, &mut buf, &slot.entry))
        .await
        .map_err(|_| Failure::Deadline)??;
    let config = server.config();
    match buf[0] {
        // SOCKS4 carries no password: under auth-method=password it would bypass the login.
        4 if config.settings.auth_method == crate::config::AuthMethod::Password => {
            tracing::info!(src = %peer, "SOCKS4 client refused: auth-method=password");
            super::socks4::reply_failure(client).await;
            Err(Failure::Refused("SOCKS4 while auth-method=password".into()))
        }
        4 => super::socks4::handshake(&config, client, peer, &slot.entry, buf).await.map(Some),
        5 if config.settings.version >= 5 => {
            super::socks5::handshake(server, &config, client, peer, &slot.entry, buf).await
        }
        5 => {
            tracing::info!(src = %peer, "SOCKS5 client refused: version=4");
            super::socks5::refuse_version(client).await;
            Err(Failure::Refused("SOCKS5 while version=4".into()))
        }
        v => {
            tracing::info!(src = %peer, "request failed: unsupported SOCKS version {v}");
            super::socks4::reply_failure(client).await;
            Err(Failure::Malformed(format!("unsupported SOCKS version {v}")))
        }
    }
}

/// Appends what the client sent next to `buf`; an end of stream is [`Failure::ClientGone`].
pub async fn read_more(client: &mut TcpStream, buf: &mut Vec<u8>, entry: &Entry) -> Result<(), Failure> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let n = client.read(&mut buf[start..]).await;
    buf.truncate(start + *n.as_ref().unwrap_or(&0));
    match n? {
        0 => Err(Failure::ClientGone),
        _ => {
            entry.touch();
            Ok(())
        }
    }
}

/// Asks the access list; a deny is a [`Failure::Denied`] naming the rule.
pub fn check_access(config: &Config, src: SocketAddr, dst: SocketAddr, dst_name: Option<&str>) -> Result<(), Failure> {
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
/// that answers, within [`DIAL_TIMEOUT`] in all. Records the destination in the row.
pub async fn connect(
    config: &Config,
    src: SocketAddr,
    candidates: &[SocketAddr],
    name: Option<&str>,
    entry: &Entry,
) -> Result<TcpStream, Failure> {
    let deadline = tokio::time::Instant::now() + DIAL_TIMEOUT;
    let mut last = None;
    for &dst in candidates {
        entry.set_destination(dst);
        if let Err(e) = check_access(config, src, dst, name) {
            last = Some(e);
            continue;
        }
        let attempt = tokio::time::timeout_at(deadline, TcpStream::connect(dst))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
        match attempt {
            Ok(upstream) => {
                let _ = upstream.set_nodelay(true);
                return Ok(upstream);
            }
            Err(source) => last = Some(Failure::Dial { dst, source }),
        }
    }
    Err(last.unwrap_or_else(|| Failure::Resolve("no address".into())))
}

/// BIND's listener, on the address the client reached the proxy at (so the
/// address in the first reply is one the client can pass on).
pub async fn bind_listener(client: &TcpStream) -> Result<TcpListener, Failure> {
    let local_ip = client.local_addr()?.ip();
    Ok(TcpListener::bind(SocketAddr::new(local_ip, 0)).await?)
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

#[cfg(test)]
mod tests {
    /// The connection task stays small while its tunnel runs: the handshake's
    /// state is boxed away (memory per idle tunnel is a benchmark figure).
    #[test]
    fn connection_task_is_small() {
        fn size_of_future<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let server =
                super::Server::new(Default::default(), crate::config::DataPathMode::Userspace, "/nonexistent".into())
                    .unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let peer = client.local_addr().unwrap();
            let slot = server.registry.admit(peer, 10).unwrap();
            let fut = super::serve(server.clone(), client, peer, slot);
            let size = size_of_future(&fut);
            eprintln!("serve() future: {size} bytes");
            assert!(size < 1024, "serve() future is {size} bytes");
        });
    }
}
