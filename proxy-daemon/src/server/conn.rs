//! One client connection: admission has happened; read the first byte to
//! tell SOCKS4 from SOCKS5, let that protocol's handshake ([`super::socks4`],
//! [`super::socks5`]) set up the far side, then hand the pair to the data
//! path and run the tunnel it returns to its end, on this connection's task.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::dial::{read_more, refusal_reason, Established, Failure, HANDSHAKE_TIMEOUT, READ_CHUNK};
use super::registry::Slot;
use super::shared::Shared;
use super::{socks4, socks5};
use crate::datapath::userspace::UserspaceRelay;
use crate::datapath::{Pair, Tunnel};
use crate::protocol::socks4::Reply;

/// Refuses a client over the limit at once, in its own protocol as far as
/// what it already sent tells (a SOCKS5 greeting gets "no acceptable
/// method", anything else, or nothing yet, a SOCKS4 91), then closes.
pub fn refuse(stream: TcpStream) {
    // Only what is already queued is read, never waited for: the accept loop
    // is not delayed.
    let mut first = [0u8; 1];
    let first = matches!(stream.try_read(&mut first), Ok(1)).then_some(first[0]);
    let _ = match first {
        Some(5) => stream.try_write(&[5, crate::protocol::socks5::METHOD_UNACCEPTABLE]),
        _ => stream.try_write(&Reply::rejected().encode()),
    };
    close_after_reply(stream);
}

/// Closes a client the daemon has answered for the last time, after reading
/// what it had already sent (at most 64 KiB, never waiting): closing with
/// unread bytes makes the kernel send a reset, which can destroy the reply
/// before the client reads it.
fn close_after_reply(stream: TcpStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Serves one admitted client until its tunnel ends.
#[allow(clippy::manual_async_fn, reason = "an `async fn` stores its arguments twice (rustc #62958)")]
pub fn serve(server: Arc<Shared>, client: TcpStream, peer: SocketAddr, slot: Slot) -> impl Future<Output = ()> {
    // The set-up is boxed: its state (the handshake's buffers and timers) is
    // freed when the tunnel starts, so for the tunnel's whole life the task
    // holds little more than the tunnel.
    async move {
        let Some(tunnel) = Box::pin(set_up(&server, client, peer, &slot)).await else { return };
        run_to_end(&server, slot, tunnel).await;
    }
}

/// Runs the handshake and hands the pair to the data path; `None` when no
/// tunnel came of it (refused, failed, cancelled, or a UDP association that
/// has ended).
async fn set_up(server: &Shared, mut client: TcpStream, peer: SocketAddr, slot: &Slot) -> Option<Tunnel> {
    // TCP_NODELAY came with the accept: the listener has it (server::bind).
    let entry = &slot.entry;
    let established = tokio::select! {
        _ = entry.cancel.cancelled() => return None,
        r = handshake(server, &mut client, peer, slot) => r,
    };
    let Some(est) = established else {
        close_after_reply(client);
        return None;
    };
    let dst = est.dst;
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
            return None;
        }
    };
    entry.set_tunnel(est.kind, dst, tunnel.stats.clone());
    entry.set_park(tunnel.park.clone());
    tracing::debug!(src = %peer, %dst, kind = est.kind.as_str(), path, "tunnel up");
    Some(tunnel)
}

/// A tunnel taken over from another process (an upgrade): listed in `slot`
/// like one of ours, until it ends.
#[allow(clippy::manual_async_fn, reason = "an `async fn` stores its arguments twice (rustc #62958)")]
pub fn adopted(server: Arc<Shared>, slot: Slot, tunnel: Tunnel) -> impl Future<Output = ()> {
    async move {
        slot.entry.set_park(tunnel.park.clone());
        run_to_end(&server, slot, tunnel).await;
    }
}

/// Waits for the tunnel to end (or park), then counts it and leaves the list.
#[allow(clippy::manual_async_fn, reason = "an `async fn` stores its arguments twice (rustc #62958)")]
fn run_to_end(server: &Shared, slot: Slot, tunnel: Tunnel) -> impl Future<Output = ()> + '_ {
    async move {
        let Tunnel { run, park, .. } = tunnel;
        run.await;
        if park.requested() {
            // Handed over to a new process, which counts it from now on.
            return;
        }
        let row = slot.entry.row();
        let peer = slot.entry.src;
        let dst = row.dst_address.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let kind = row.kind;
        server.metrics.tunnel_closed(row.tx, row.rx);
        // Debug, not info: one line per tunnel was a write(2) per connection and
        // about a tenth of the connection rate; metrics count tunnels and bytes.
        tracing::debug!(src = %peer, %dst, kind = kind.as_str(), user = row.user.as_deref().unwrap_or("-"), tx = row.tx, rx = row.rx, "tunnel closed");
        drop(slot);
    }
}

/// Reads the first bytes, runs the protocol they announce, and counts the outcome.
async fn handshake(server: &Shared, client: &mut TcpStream, peer: SocketAddr, slot: &Slot) -> Option<Established> {
    let started = std::time::Instant::now();
    let result = negotiate(server, client, peer, slot).await;
    match &result {
        Ok(Some(_)) => server.metrics.handshake_done(started.elapsed()),
        Ok(None) => {}
        Err(e) => server.metrics.refused(refusal_reason(e)),
    }
    result.ok().flatten()
}

async fn negotiate(
    server: &Shared,
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
            socks4::reply_failure(client).await;
            Err(Failure::Refused("SOCKS4 while auth-method=password".into()))
        }
        4 => socks4::handshake(&config, client, peer, &slot.entry, buf).await.map(Some),
        5 if config.settings.version >= 5 => socks5::handshake(server, &config, client, peer, &slot.entry, buf).await,
        5 => {
            tracing::info!(src = %peer, "SOCKS5 client refused: version=4");
            socks5::refuse_version(client).await;
            Err(Failure::Refused("SOCKS5 while version=4".into()))
        }
        v => {
            tracing::info!(src = %peer, "request failed: unsupported SOCKS version {v}");
            socks4::reply_failure(client).await;
            Err(Failure::Malformed(format!("unsupported SOCKS version {v}")))
        }
    }
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
            let server = crate::server::Server::new(
                Default::default(),
                crate::config::DataPathMode::Userspace,
                "/nonexistent".into(),
            )
            .unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let peer = client.local_addr().unwrap();
            let slot = server.shared.registry.admit(peer, 10).unwrap();
            let fut = super::serve(server.shared.clone(), client, peer, slot);
            let size = size_of_future(&fut);
            eprintln!("serve() future: {size} bytes");
            assert!(size < 1024, "serve() future is {size} bytes");
        });
    }
}
