//! Parking a tunnel for an upgrade: the tunnel's task stops where no byte
//! is held in the daemon (the relay between chunks with its readers'
//! queues drained; a spliced pair while it stays in the maps, its bytes
//! still moving in the kernel) and leaves its sockets and counters in the
//! [`Park`], for a new process to resume with [`DataPath::resume`].
//!
//! A half-closed tunnel parks too, with the directions that ended; one
//! that is switching paths (braking before a demotion) parks once on the
//! relay.
//!
//! [`DataPath::resume`]: super::DataPath::resume

use std::net::TcpStream as StdTcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// A tunnel's parking place: the request, and what the task left in it.
#[derive(Default)]
pub struct Park {
    requested: AtomicBool,
    notify: Notify,
    parked: Mutex<Option<Parked>>,
}

/// A parked tunnel: both sockets (client first) and where it stood.
pub struct Parked {
    pub socks: [StdTcpStream; 2],
    pub state: ParkedState,
}

/// Where a parked tunnel stood, as the new process needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "path", rename_all = "lowercase")]
pub enum ParkedState {
    /// On the relay: its counters so far, and which directions (client to
    /// upstream, upstream to client) had ended with a half-close.
    Userspace {
        tx: u64,
        rx: u64,
        last_ns: u64,
        #[serde(default)]
        ended: [bool; 2],
    },
    /// Spliced: the pair is still in the maps (its `FLOWS` entries keep
    /// counting this epoch); what the epochs before and userspace counted.
    Kernel {
        cookies: [u64; 2],
        /// Bytes userspace wrote to each socket before this epoch's splice
        /// (the offset of the flow counters against `tcpi_bytes_acked`).
        written_before: [u64; 2],
        /// What the verdict counted in earlier epochs (client side, upstream side).
        kernel_done: [u64; 2],
        /// What userspace moved (tx, rx) and when a byte last moved.
        user_tx: u64,
        user_rx: u64,
        last_ns: u64,
        /// FIN received on each socket, and write half of each socket shut.
        #[serde(default)]
        fin: [bool; 2],
        #[serde(default)]
        shut: [bool; 2],
    },
}

impl Park {
    /// Asks the tunnel to park at its next safe point.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Completes once parking was requested.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.requested() {
                return;
            }
            notified.await;
        }
    }

    /// The task leaves the tunnel here (and then ends).
    pub fn put(&self, parked: Parked) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(parked);
    }

    /// What the task left, once it ended parked.
    pub fn take(&self) -> Option<Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
