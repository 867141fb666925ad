//! The live connections list: one row per client connection from accept to
//! close, the admission check that keeps `max-connections` exact, and the
//! idle reaper. Rows read their counters from the data path's flow source.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::datapath::park::Park;
use crate::datapath::{monotonic_ns, DataPathKind, FlowSource};

/// The `type` column: what the connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnType {
    /// The handshake is still running.
    Unknown,
    /// CONNECT: the proxy dialled out.
    Out,
    /// BIND: a peer connected in.
    In,
    /// SOCKS5 UDP ASSOCIATE: datagrams relayed for the client.
    Udp,
}

impl ConnType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnType::Unknown => "unknown",
            ConnType::Out => "out",
            ConnType::In => "in",
            ConnType::Udp => "udp",
        }
    }
}

/// What a row knows once the handshake has got that far.
#[derive(Default)]
struct Progress {
    user: Option<String>,
    dst: Option<SocketAddr>,
    kind: Option<ConnType>,
    flow: Option<Arc<dyn FlowSource>>,
    /// Where an upgrade parks the tunnel (TCP tunnels; not UDP associations).
    park: Option<Arc<Park>>,
}

/// One client connection.
pub struct Entry {
    /// The client's address.
    pub src: SocketAddr,
    /// Closes the connection (idle reaper, shutdown).
    pub cancel: CancellationToken,
    /// Last byte seen during the handshake (`CLOCK_MONOTONIC` ns).
    handshake_activity_ns: AtomicU64,
    progress: Mutex<Progress>,
}

impl Entry {
    /// Records handshake activity (a byte in either direction).
    pub fn touch(&self) {
        self.handshake_activity_ns.store(monotonic_ns(), Ordering::Relaxed);
    }

    pub fn set_destination(&self, dst: SocketAddr) {
        self.progress.lock().unwrap().dst = Some(dst);
    }

    /// The tunnel is up: from now on the flow source counts.
    pub fn set_tunnel(&self, kind: ConnType, dst: SocketAddr, flow: Arc<dyn FlowSource>) {
        let mut p = self.progress.lock().unwrap();
        p.kind = Some(kind);
        p.dst = Some(dst);
        p.flow = Some(flow);
    }

    /// Where an upgrade can park this connection's tunnel.
    pub fn set_park(&self, park: Arc<Park>) {
        self.progress.lock().unwrap().park = Some(park);
    }

    /// The tunnel's parking place, once it has one.
    pub fn park(&self) -> Option<Arc<Park>> {
        self.progress.lock().unwrap().park.clone()
    }

    /// Records the SOCKS5 user without a claim (a tunnel taken over from
    /// another process, whose claim was made there).
    pub fn set_user(&self, user: Option<String>) {
        self.progress.lock().unwrap().user = user;
    }

    pub fn user(&self) -> Option<String> {
        self.progress.lock().unwrap().user.clone()
    }

    pub fn row(&self) -> Row {
        let p = self.progress.lock().unwrap();
        let stats = p.flow.as_ref().map(|f| f.snapshot()).unwrap_or_default();
        Row {
            path: p.flow.as_ref().map(|f| f.path()),
            user: p.user.clone(),
            src_address: self.src,
            dst_address: p.dst,
            tx: stats.tx,
            rx: stats.rx,
            kind: p.kind.unwrap_or(ConnType::Unknown),
            last_activity_ns: stats.last_activity_ns.max(self.handshake_activity_ns.load(Ordering::Relaxed)),
        }
    }
}

/// A row of `connections print`.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    #[serde(rename = "src-address")]
    pub src_address: SocketAddr,
    #[serde(rename = "dst-address")]
    pub dst_address: Option<SocketAddr>,
    pub tx: u64,
    pub rx: u64,
    #[serde(rename = "type")]
    pub kind: ConnType,
    /// The SOCKS5 user, when the client logged in.
    pub user: Option<String>,
    /// What moves the tunnel's bytes right now; none during the handshake.
    pub path: Option<DataPathKind>,
    #[serde(skip)]
    pub last_activity_ns: u64,
}

/// All client connections.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    /// Parent of every entry's cancellation token: cancelling it closes every
    /// connection, and every one admitted after.
    root: CancellationToken,
}

/// A place in the registry; the row leaves the list when this is dropped.
pub struct Slot {
    registry: Arc<Registry>,
    id: u64,
    pub entry: Arc<Entry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.entries.lock().unwrap().remove(&self.id);
    }
}

impl Registry {
    /// Admits a new client unless `max` connections are already open.
    pub fn admit(self: &Arc<Self>, src: SocketAddr, max: usize) -> Option<Slot> {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= max {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            src,
            cancel: self.root.child_token(),
            handshake_activity_ns: AtomicU64::new(monotonic_ns()),
            progress: Mutex::new(Progress::default()),
        });
        entries.insert(id, entry.clone());
        Some(Slot { registry: self.clone(), id, entry })
    }

    /// Lists a connection taken over from another process under the number
    /// it had there (so the list keeps its order), whatever the limit.
    pub fn adopt(self: &Arc<Self>, id: u64, src: SocketAddr) -> Slot {
        let mut entries = self.entries.lock().unwrap();
        let entry = Arc::new(Entry {
            src,
            cancel: self.root.child_token(),
            handshake_activity_ns: AtomicU64::new(0),
            progress: Mutex::new(Progress::default()),
        });
        entries.insert(id, entry.clone());
        self.next_id.fetch_max(id + 1, Ordering::Relaxed);
        Slot { registry: self.clone(), id, entry }
    }

    /// New connections are numbered from `id` on (after an upgrade: above
    /// every connection the old process may still hand over).
    pub fn number_from(&self, id: u64) {
        self.next_id.fetch_max(id, Ordering::Relaxed);
    }

    /// The next number a connection gets.
    pub fn next_number(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Every connection with its number, in order.
    pub fn numbered(&self) -> Vec<(u64, Arc<Entry>)> {
        self.entries.lock().unwrap().iter().map(|(id, e)| (*id, e.clone())).collect()
    }

    /// Records that `entry` belongs to `user`; with `only_one`, refuses when
    /// another connection of that user is open. Atomic against other claims.
    pub fn claim_user(&self, entry: &Entry, user: &str, only_one: bool) -> bool {
        let entries = self.entries.lock().unwrap();
        if only_one && entries.values().any(|e| !std::ptr::eq(&**e, entry) && e.user().as_deref() == Some(user)) {
            return false;
        }
        entry.progress.lock().unwrap().user = Some(user.to_owned());
        true
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Vec<Arc<Entry>> {
        self.entries.lock().unwrap().values().cloned().collect()
    }

    /// Rows in the order the connections arrived.
    pub fn rows(&self) -> Vec<Row> {
        self.snapshot().iter().map(|e| e.row()).collect()
    }

    /// Closes every connection with no byte in either direction for `timeout`.
    /// Returns how many it closed.
    pub fn reap_idle(&self, timeout: Duration) -> usize {
        let now = monotonic_ns();
        let limit = timeout.as_nanos() as u64;
        let mut closed = 0;
        for e in self.snapshot() {
            let row = e.row();
            if now.saturating_sub(row.last_activity_ns) >= limit && !e.cancel.is_cancelled() {
                let dst = row.dst_address.map_or_else(|| "-".to_string(), |d| d.to_string());
                tracing::info!(src = %row.src_address, %dst, kind = row.kind.as_str(), "closing idle connection");
                e.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Closes the connections with these row numbers (as `connections print`
    /// numbers them). Checks every number first; returns the first missing one.
    pub fn cancel_rows(&self, numbers: &[usize]) -> Result<(), usize> {
        let entries = self.snapshot();
        if let Some(&n) = numbers.iter().find(|&&n| n >= entries.len()) {
            return Err(n);
        }
        for &n in numbers {
            tracing::info!(src = %entries[n].src, "closing connection on request (connections remove)");
            entries[n].cancel.cancel();
        }
        Ok(())
    }

    /// Closes the connections from `src` (`--config-enforce`).
    pub fn cancel_where(&self, src: SocketAddr) {
        for e in self.snapshot().iter().filter(|e| e.src == src) {
            tracing::info!(%src, "closing a connection the new access list denies");
            e.cancel.cancel();
        }
    }

    /// Closes every connection, and any admitted from now on (shutdown after
    /// the grace period).
    pub fn cancel_all(&self) {
        self.root.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admission stops at the limit and frees a place when a slot drops.
    #[test]
    fn admission_is_exact() {
        let r = Arc::new(Registry::default());
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s1 = r.admit(a, 2).unwrap();
        let _s2 = r.admit(a, 2).unwrap();
        assert!(r.admit(a, 2).is_none());
        drop(s1);
        assert_eq!(r.len(), 1);
        assert!(r.admit(a, 2).is_some());
    }

    /// A fresh handshaking row shows type unknown and no counters.
    #[test]
    fn handshaking_row() {
        let r = Arc::new(Registry::default());
        let s = r.admit("127.0.0.1:5".parse().unwrap(), 10).unwrap();
        let row = s.entry.row();
        assert_eq!((row.kind, row.tx, row.rx, row.dst_address), (ConnType::Unknown, 0, 0, None));
        assert_eq!(r.reap_idle(Duration::from_secs(60)), 0);
        assert_eq!(r.reap_idle(Duration::ZERO), 1);
        assert!(s.entry.cancel.is_cancelled());
    }

    /// only-one refuses a user's second connection until the first ends.
    #[test]
    fn only_one_claims() {
        let r = Arc::new(Registry::default());
        let a = r.admit("127.0.0.1:5".parse().unwrap(), 10).unwrap();
        let b = r.admit("127.0.0.1:6".parse().unwrap(), 10).unwrap();
        assert!(r.claim_user(&a.entry, "alice", true));
        assert!(!r.claim_user(&b.entry, "alice", true));
        assert!(r.claim_user(&b.entry, "alice", false), "without only-one both may connect");
        drop(a);
        let c = r.admit("127.0.0.1:7".parse().unwrap(), 10).unwrap();
        assert!(!r.claim_user(&c.entry, "alice", true), "b still holds alice");
        drop(b);
        assert!(r.claim_user(&c.entry, "alice", true));
        assert_eq!(c.entry.row().user.as_deref(), Some("alice"));
    }
}
