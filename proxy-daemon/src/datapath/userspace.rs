//! The userspace relay: the data path that works everywhere. Two pumps, one
//! per direction, copy bytes through the daemon; each counts what it has
//! handed to the other socket and stamps the last activity. End of stream on
//! one side becomes a half-close (FIN after the last byte) on the other; an
//! error on either side resets both, so neither peer mistakes a failure for a
//! clean end. Buffers exist only while bytes are moving, so idle tunnels cost
//! little memory. It is also the path for rate-limited SOCKS5 users: a
//! [`RateLimit`] paces each direction.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::{monotonic_ns, DataPath, DataPathKind, FlowSource, FlowStats, Pair, Tunnel};

/// Bytes read per system call while a direction is busy.
const CHUNK: usize = 64 * 1024;

/// The relay (stateless: every tunnel carries its own counters).
#[derive(Default)]
pub struct UserspaceRelay;

/// Counters of one relayed tunnel.
#[derive(Default)]
struct Counters {
    tx: AtomicU64,
    rx: AtomicU64,
    last_ns: AtomicU64,
}

impl FlowSource for Counters {
    fn snapshot(&self) -> FlowStats {
        FlowStats {
            tx: self.tx.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
            last_activity_ns: self.last_ns.load(Ordering::Relaxed),
        }
    }
}

/// Paces traffic to a rate; one per user and direction, shared by that
/// user's tunnels.
pub struct RateLimit {
    bytes_per_sec: f64,
    /// When the next byte may go.
    next: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bits_per_sec: u64) -> Self {
        RateLimit { bytes_per_sec: bits_per_sec as f64 / 8.0, next: Mutex::new(Instant::now()) }
    }

    /// Most bytes to move at once: a twentieth of a second's worth keeps the pace smooth.
    fn chunk(&self) -> usize {
        ((self.bytes_per_sec / 20.0) as usize).clamp(512, CHUNK)
    }

    /// Books `n` bytes; returns how long to wait before sending them.
    fn reserve(&self, n: usize) -> Duration {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap();
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        start - now
    }
}

/// The limits of a rate-limited user's tunnel.
#[derive(Clone)]
pub struct Limits {
    /// Client towards destination.
    pub up: Arc<RateLimit>,
    /// Destination towards client.
    pub down: Arc<RateLimit>,
}

impl UserspaceRelay {
    /// Like [`DataPath::attach`], with each direction paced by `limits`.
    pub fn attach_limited(&self, pair: Pair, cancel: CancellationToken, limits: Option<Limits>) -> io::Result<Tunnel> {
        let counters = Arc::new(Counters { last_ns: AtomicU64::new(monotonic_ns()), ..Default::default() });
        let client_fd = pair.client.as_fd().as_raw_fd();
        let upstream_fd = pair.upstream.as_fd().as_raw_fd();
        let (client_r, client_w) = pair.client.into_split();
        let (upstream_r, upstream_w) = pair.upstream.into_split();
        let c = counters.clone();
        let (up_limit, down_limit) = match limits {
            Some(l) => (Some(l.up), Some(l.down)),
            None => (None, None),
        };
        let done = tokio::spawn(async move {
            let up = pump(client_r, upstream_w, pair.client_early, &c.tx, &c.last_ns, up_limit.as_deref());
            let down = pump(upstream_r, client_w, Vec::new(), &c.rx, &c.last_ns, down_limit.as_deref());
            tokio::pin!(up, down);
            let (mut up_done, mut down_done) = (false, false);
            while !(up_done && down_done) {
                let result = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = &mut up, if !up_done => { up_done = true; r }
                    r = &mut down, if !down_done => { down_done = true; r }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "relay direction failed; resetting both sides");
                    // Both halves are still owned by the pumps, so the fds are open.
                    reset_on_close(client_fd);
                    reset_on_close(upstream_fd);
                    break;
                }
            }
            // Dropping the pumps drops the halves and closes both sockets.
        });
        Ok(Tunnel { stats: counters, done })
    }
}

impl DataPath for UserspaceRelay {
    fn kind(&self) -> DataPathKind {
        DataPathKind::Userspace
    }

    fn attach(&self, pair: Pair, cancel: CancellationToken) -> io::Result<Tunnel> {
        self.attach_limited(pair, cancel, None)
    }
}

/// Copies one direction until end of stream, then half-closes the writer.
async fn pump(
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    early: Vec<u8>,
    count: &AtomicU64,
    last_ns: &AtomicU64,
    limit: Option<&RateLimit>,
) -> io::Result<()> {
    let chunk = limit.map_or(CHUNK, RateLimit::chunk);
    if !early.is_empty() {
        writer.write_all(&early).await?;
        count.fetch_add(early.len() as u64, Ordering::Relaxed);
        last_ns.store(monotonic_ns(), Ordering::Relaxed);
    }
    loop {
        reader.readable().await?;
        // Allocate only for a burst; an idle direction holds no buffer.
        let mut buf = vec![0u8; chunk];
        loop {
            let n = match reader.try_read(&mut buf) {
                Ok(0) => {
                    writer.shutdown().await?;
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            last_ns.store(monotonic_ns(), Ordering::Relaxed);
            if let Some(wait) = limit.map(|l| l.reserve(n)).filter(|w| !w.is_zero()) {
                tokio::time::sleep(wait).await;
            }
            writer.write_all(&buf[..n]).await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
            last_ns.store(monotonic_ns(), Ordering::Relaxed);
        }
    }
}

/// Makes the next close of `fd` send RST instead of FIN (`SO_LINGER` 0).
fn reset_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: fd is an open socket owned by the caller's halves; the option
    // value is a properly sized `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pacer books time in proportion to bytes at the configured rate.
    #[test]
    fn rate_limit_books_time() {
        let l = RateLimit::new(8_000_000); // 1 MB/s
        assert_eq!(l.chunk(), 50_000);
        assert!(l.reserve(500_000) < Duration::from_millis(5), "the first burst goes at once");
        let wait = l.reserve(1);
        assert!(wait > Duration::from_millis(490) && wait < Duration::from_millis(510), "{wait:?}");
    }
}
