//! The userspace relay: the data path that works everywhere. Two pumps, one
//! per direction, copy bytes through the daemon; each counts what it has
//! handed to the other socket and stamps the last activity. End of stream on
//! one side becomes a half-close (FIN after the last byte) on the other; an
//! error on either side resets both, so neither peer mistakes a failure for a
//! clean end. Buffers exist only while bytes are moving, so idle tunnels cost
//! little memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

impl DataPath for UserspaceRelay {
    fn kind(&self) -> DataPathKind {
        DataPathKind::Userspace
    }

    fn attach(&self, pair: Pair, cancel: CancellationToken) -> io::Result<Tunnel> {
        let counters = Arc::new(Counters { last_ns: AtomicU64::new(monotonic_ns()), ..Default::default() });
        let client_fd = pair.client.as_fd().as_raw_fd();
        let upstream_fd = pair.upstream.as_fd().as_raw_fd();
        let (client_r, client_w) = pair.client.into_split();
        let (upstream_r, upstream_w) = pair.upstream.into_split();
        let c = counters.clone();
        let done = tokio::spawn(async move {
            let up = pump(client_r, upstream_w, pair.client_early, &c.tx, &c.last_ns);
            let down = pump(upstream_r, client_w, Vec::new(), &c.rx, &c.last_ns);
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

/// Copies one direction until end of stream, then half-closes the writer.
async fn pump(
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    early: Vec<u8>,
    count: &AtomicU64,
    last_ns: &AtomicU64,
) -> io::Result<()> {
    if !early.is_empty() {
        writer.write_all(&early).await?;
        count.fetch_add(early.len() as u64, Ordering::Relaxed);
        last_ns.store(monotonic_ns(), Ordering::Relaxed);
    }
    loop {
        reader.readable().await?;
        // Allocate only for a burst; an idle direction holds no buffer.
        let mut buf = vec![0u8; CHUNK];
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
