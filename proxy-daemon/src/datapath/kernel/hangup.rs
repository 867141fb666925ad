//! One epoll set for the hangups of every spliced socket. Each tunnel used to
//! own an epoll instance, a third descriptor per tunnel; with the open-files
//! limit at 20,000 that capped a daemon at about 6,600 tunnels. Here one
//! dispatcher task drains the shared set and wakes the tunnel a socket
//! belongs to, so a tunnel costs exactly its two sockets.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::sys::{self, Epoll};

/// The shared set and who waits on it.
pub(super) struct Hangups {
    epoll: AsyncFd<Epoll>,
    waiters: Mutex<HashMap<u64, Arc<Waiter>>>,
    next_id: AtomicU64,
}

/// What one tunnel learns from the set.
pub(super) struct Waiter {
    /// Event bits seen per side (`CLIENT`, `UPSTREAM`) since last taken.
    events: [AtomicU32; 2],
    /// Woken whenever bits are added.
    pub notify: Notify,
}

impl Waiter {
    /// The bits seen on `side` since the last call.
    pub fn take(&self, side: usize) -> u32 {
        self.events[side].swap(0, Ordering::AcqRel)
    }
}

/// A tunnel's place in the set; leaving it unregisters both sockets.
pub(super) struct Registration {
    hangups: Arc<Hangups>,
    id: u64,
    fds: [RawFd; 2],
    pub waiter: Arc<Waiter>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        for fd in self.fds {
            // The sockets are still open (the tunnel owns them); closing them
            // would also remove them, but only once no duplicate is left.
            let _ = self.hangups.epoll.get_ref().unwatch(fd);
        }
        self.hangups.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Hangups {
    /// Creates the set and starts its dispatcher (call inside the runtime).
    pub fn start() -> io::Result<(Arc<Self>, JoinHandle<()>)> {
        let hangups = Arc::new(Hangups {
            epoll: sys::async_epoll(Epoll::new()?)?,
            waiters: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let task = tokio::spawn(hangups.clone().dispatch());
        Ok((hangups, task))
    }

    /// Watches both sockets of a tunnel.
    pub fn register(self: &Arc<Self>, socks: &[StdTcpStream; 2]) -> io::Result<Registration> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Waiter { events: [AtomicU32::new(0), AtomicU32::new(0)], notify: Notify::new() });
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(id, waiter.clone());
        let reg = Registration { hangups: self.clone(), id, fds: [socks[0].as_raw_fd(), socks[1].as_raw_fd()], waiter };
        for (side, sock) in socks.iter().enumerate() {
            self.epoll.get_ref().watch_hangup(sock, id << 1 | side as u64)?;
        }
        Ok(reg)
    }

    async fn dispatch(self: Arc<Self>) {
        loop {
            match self.epoll.readable().await {
                // Clear, then drain: an event after the drain sets readiness again.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    tracing::error!("hangup watcher failed: {e}");
                    return;
                }
            }
            let events = match self.epoll.get_ref().drain() {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!("hangup watcher failed: {e}");
                    return;
                }
            };
            let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            for (token, bits) in events {
                if let Some(w) = waiters.get(&(token >> 1)) {
                    w.events[(token & 1) as usize].fetch_or(bits, Ordering::AcqRel);
                    w.notify.notify_one();
                }
            }
        }
    }
}
