//! What the data-path tests share: a tunnel run on a task of its own.

use std::sync::Arc;

use proxyd::datapath::{FlowSource, Tunnel};

/// A tunnel whose future runs on a task of its own (the daemon runs it on
/// the connection's task), with its counters.
pub struct Running {
    pub stats: Arc<dyn FlowSource>,
    pub done: tokio::task::JoinHandle<()>,
}

/// Starts `tunnel`'s future on a task of its own.
pub fn spawn(tunnel: Tunnel) -> Running {
    Running { stats: tunnel.stats, done: tokio::spawn(tunnel.run) }
}
