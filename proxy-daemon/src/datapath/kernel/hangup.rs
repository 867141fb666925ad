//! One epoll set for the hangups of every spliced socket. Each tunnel used to
//! own an epoll instance, a third descriptor per tunnel; with the open-files
//! limit at 20,000 that capped a daemon at about 6,600 tunnels. Here one
//! dispatcher task drains the shared set and wakes the tunnel a socket
//! belongs to, so a tunnel costs exactly its two sockets.
//!
//! The same dispatcher reads the verdict's event ring (`EVENTS`, registered
//! in the set under its own token): a socket whose window runs low
//! ([`EV_LOW`]) or that overran it ([`EV_OVER`]) wakes its tunnel the same way,
//! and so does one whose skb the verdict had to drop ([`EV_BROKEN`]: the
//! tunnel is reset rather than left with a gap).

use std::collections::HashMap;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use proxy_common::{Event, EVENT_BROKEN, EVENT_LOW, EVENT_OVER};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::sys::{self, Epoll};

/// Bit set in a side's events when its window ran low (from the ring).
pub(super) const EV_LOW: u32 = 1 << 30;
/// Bit set in a side's events when it overran its window (from the ring).
pub(super) const EV_OVER: u32 = 1 << 29;
/// Bit set in a side's events when the verdict dropped bytes of it (from the
/// ring): its stream has a gap.
pub(super) const EV_BROKEN: u32 = 1 << 28;
/// The epoll token of the event ring (tunnel tokens are `id << 1 | side`).
const RING_TOKEN: u64 = u64::MAX;

/// The shared set and who waits on it.
pub(super) struct Hangups {
    epoll: AsyncFd<Epoll>,
    /// The verdict's event ring (only the dispatcher reads it).
    ring: Mutex<RingBuf<MapData>>,
    waiters: Mutex<Waiters>,
    next_id: AtomicU64,
}

/// Registered tunnels, by registration id and by socket cookie.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u64, Arc<Waiter>>,
    /// Cookie -> (registration id, side).
    by_cookie: HashMap<u64, (u64, usize)>,
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
    cookies: [u64; 2],
    pub waiter: Arc<Waiter>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        for (fd, cookie) in self.fds.into_iter().zip(self.cookies) {
            // Usually the sockets are still open (a duplicate would keep a
            // closed one in the set); when they are not, their numbers may
            // be another tunnel's now, and `unwatch_socket` leaves those be.
            let _ = self.hangups.epoll.get_ref().unwatch_socket(fd, cookie);
        }
        let mut waiters = self.hangups.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.by_id.remove(&self.id);
        for cookie in self.cookies {
            if waiters.by_cookie.get(&cookie).is_some_and(|&(id, _)| id == self.id) {
                waiters.by_cookie.remove(&cookie);
            }
        }
    }
}

impl Hangups {
    /// Creates the set and starts its dispatcher (call inside the runtime).
    pub fn start(ring: RingBuf<MapData>) -> io::Result<(Arc<Self>, JoinHandle<()>)> {
        let epoll = Epoll::new()?;
        epoll.watch_readable(&ring, RING_TOKEN)?;
        let hangups = Arc::new(Hangups {
            epoll: sys::async_epoll(epoll)?,
            ring: Mutex::new(ring),
            waiters: Mutex::new(Waiters::default()),
            next_id: AtomicU64::new(0),
        });
        let task = tokio::spawn(hangups.clone().dispatch());
        Ok((hangups, task))
    }

    /// Watches both sockets of a tunnel (and their events in the ring).
    pub fn register(self: &Arc<Self>, socks: &[StdTcpStream; 2], cookies: [u64; 2]) -> io::Result<Registration> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Waiter { events: [AtomicU32::new(0), AtomicU32::new(0)], notify: Notify::new() });
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters.by_id.insert(id, waiter.clone());
            for (side, cookie) in cookies.into_iter().enumerate() {
                waiters.by_cookie.insert(cookie, (id, side));
            }
        }
        let reg = Registration {
            hangups: self.clone(),
            id,
            fds: [socks[0].as_raw_fd(), socks[1].as_raw_fd()],
            cookies,
            waiter,
        };
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
            let mut ring_events = Vec::new();
            if events.iter().any(|&(token, _)| token == RING_TOKEN) {
                let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<Event>() {
                        // `Event` is two native-endian u64s: cookie, kind.
                        let cookie = u64::from_ne_bytes(item[0..8].try_into().unwrap());
                        let kind = u64::from_ne_bytes(item[8..16].try_into().unwrap());
                        ring_events.push((cookie, kind));
                    }
                }
            }
            let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let wake = |id: u64, side: usize, bits: u32| {
                if let Some(w) = waiters.by_id.get(&id) {
                    w.events[side].fetch_or(bits, Ordering::AcqRel);
                    w.notify.notify_one();
                }
            };
            for (token, bits) in events {
                if token != RING_TOKEN {
                    wake(token >> 1, (token & 1) as usize, bits);
                }
            }
            for (cookie, kind) in ring_events {
                let bits = match kind {
                    EVENT_LOW => EV_LOW,
                    EVENT_OVER => EV_OVER,
                    EVENT_BROKEN => EV_BROKEN,
                    _ => continue,
                };
                if let Some(&(id, side)) = waiters.by_cookie.get(&cookie) {
                    wake(id, side, bits);
                }
            }
        }
    }
}
