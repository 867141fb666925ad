//! Where connections run: one single-threaded tokio runtime per core (a
//! shard), each accepting on a listening socket of its own (a `SO_REUSEPORT`
//! group; see `Server::spawn_accept`) and running the connections it
//! accepted from handshake to close.
//!
//! A connection's tasks, sockets and timers stay on the thread that accepted
//! it, so a request/response round trip wakes one thread and never hands a
//! task to another. Measured in the bench's connection-rate runs against the
//! multi-threaded runtime (alternating, one session): +9-15% connections/s at
//! 1, 16 and 64 clients, over SOCKS4 and SOCKS5, and 12% less proxy CPU per
//! connection. The kernel gives each new connection to one socket of the
//! group, preferring the one whose shard last ran on the core that took the
//! SYN (`SO_INCOMING_CPU`), and so wakes one shard (docs/decisions.md). The
//! daemon's own work (control socket, metrics, the kernel path's watcher, the
//! idle reaper) stays on the main runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// The shards, started on first use.
#[derive(Default)]
pub struct Shards {
    handles: OnceLock<Vec<Handle>>,
    /// Round robin for work that arrives from elsewhere (tunnels taken over).
    next: AtomicUsize,
}

impl Shards {
    /// One runtime handle per shard (one shard per available core).
    pub fn handles(&self) -> &[Handle] {
        self.handles.get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).filter_map(start).collect()
        })
    }

    /// The shard for the next piece of work that did not arrive through an
    /// accept (round robin). `None` only if no shard thread could start.
    pub fn next(&self) -> Option<&Handle> {
        let handles = self.handles();
        (!handles.is_empty()).then(|| &handles[self.next.fetch_add(1, Ordering::Relaxed) % handles.len()])
    }

    /// Runs `count` futures, `make(0..count)`, on the shards in turn (at
    /// least one on every shard); aborted together on drop.
    pub fn spawn_spread<F, Fut>(&self, count: usize, mut make: F) -> Spawned
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handles = self.handles();
        if handles.is_empty() {
            // No shard thread: the caller's runtime serves alone.
            return Spawned((0..count.max(1)).map(|i| tokio::spawn(make(i))).collect());
        }
        Spawned((0..count.max(handles.len())).map(|i| handles[i % handles.len()].spawn(make(i))).collect())
    }
}

/// Starts shard `i`'s thread and returns its runtime's handle.
fn start(i: usize) -> Option<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(format!("proxyd-shard-{i}")).spawn(move || {
        // Sockets and timers only: no signal or process driver, which would
        // check for exited children at every wake-up of the shard.
        match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
            Ok(rt) => {
                let _ = tx.send(Some(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            }
            Err(e) => {
                tracing::error!("cannot start shard {i}: {e}");
                let _ = tx.send(None);
            }
        }
    });
    match spawned {
        Ok(_) => rx.recv().ok().flatten(),
        Err(e) => {
            tracing::error!("cannot start shard {i}: {e}");
            None
        }
    }
}

/// Tasks started on the shards together (an accept loop on each); dropping
/// this, or [`Spawned::abort`], stops them all. The default is no task.
#[derive(Default)]
pub struct Spawned(Vec<JoinHandle<()>>);

impl Spawned {
    /// A single task on the current runtime, held the same way.
    pub fn here(task: JoinHandle<()>) -> Spawned {
        Spawned(vec![task])
    }

    pub fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }

    /// Stops the tasks and waits until they are gone (their futures
    /// dropped, with everything they hold).
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.0);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.abort();
    }
}
