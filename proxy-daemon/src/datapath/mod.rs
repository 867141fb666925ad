//! The data path: what moves a tunnel's bytes once the handshake is done.
//!
//! One trait, two implementations. [`userspace::UserspaceRelay`] moves bytes
//! through the daemon (copying small messages, handing bulk on with
//! `splice(2)` through a [`pipe`]) and works everywhere;
//! [`kernel::KernelDataPath`] puts the socket pair into a BPF sockhash and
//! lets an `sk_skb` program splice them, at once (`kernel`) or once a tunnel
//! proves to be interactive rather than bulk (`auto`), and hands a tunnel
//! back to the same relay when a peer falls behind.
//! The server hands over a connected [`Pair`] and gets back a [`Tunnel`]: a
//! live view of the flow's counters, the future that runs the tunnel (the
//! caller's task awaits it: one task per connection), and its
//! [`park::Park`], where an upgrade stops it to hand it to a new process
//! (which takes it on with [`DataPath::resume`]). Nothing outside the data
//! path touches the sockets after `attach`.

pub mod kernel;
pub mod park;
pub mod pipe;
pub mod udp;
pub mod userspace;

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use park::{Park, ParkedState};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A connected client and its destination, ready to be spliced.
pub struct Pair {
    /// The SOCKS client's connection.
    pub client: TcpStream,
    /// The connection to the destination (CONNECT) or from the peer (BIND).
    pub upstream: TcpStream,
    /// Bytes the client sent after its request, already read by the handshake;
    /// they are the start of the client-to-destination stream and must be sent first.
    pub client_early: Vec<u8>,
}

/// Counters of one tunnel, as the connections list shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Bytes from the client delivered towards the destination.
    pub tx: u64,
    /// Bytes from the destination delivered towards the client.
    pub rx: u64,
    /// When a byte last moved in either direction, in `CLOCK_MONOTONIC`
    /// nanoseconds (the clock `bpf_ktime_get_ns` reads).
    pub last_activity_ns: u64,
}

/// Where a tunnel's counters are read from (atomics or a BPF map).
pub trait FlowSource: Send + Sync {
    fn snapshot(&self) -> FlowStats;

    /// What moves the tunnel's bytes right now.
    fn path(&self) -> DataPathKind {
        DataPathKind::Userspace
    }
}

/// A tunnel handed to a data path.
pub struct Tunnel {
    /// Live counters.
    pub stats: Arc<dyn FlowSource>,
    /// Moves the bytes; ends when both directions are closed and both
    /// sockets are released, or when the tunnel parked (an upgrade). The
    /// connection's own task runs it: a second task per tunnel would cost a
    /// task header (cache-line aligned), a join handle and a wake-up at the
    /// end.
    pub run: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Where an upgrade asks the tunnel to park.
    pub park: Arc<Park>,
}

/// Which implementation moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathKind {
    Kernel,
    Userspace,
}

impl fmt::Display for DataPathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPathKind::Kernel => "kernel",
            DataPathKind::Userspace => "userspace",
        })
    }
}

/// The seam between the server and whatever moves the bytes.
pub trait DataPath: Send + Sync {
    fn kind(&self) -> DataPathKind;

    /// Takes ownership of `pair` and starts moving bytes both ways, with
    /// half-close in either direction and no byte lost at close.
    /// Cancelling `cancel` closes the tunnel at once (idle reaper, shutdown).
    fn attach(&self, pair: Pair, cancel: CancellationToken) -> io::Result<Tunnel>;

    /// Takes over a tunnel that another process parked (an upgrade): its
    /// sockets (client first) and where it stood. Fails, changing nothing,
    /// when this data path cannot carry it on (a spliced tunnel without a
    /// kernel path).
    fn resume(
        &self,
        socks: [std::net::TcpStream; 2],
        state: ParkedState,
        cancel: CancellationToken,
    ) -> io::Result<Tunnel>;
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of [`FlowStats::last_activity_ns`].
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Makes `socks` send a RST, not a FIN, when they close (their owner drops
/// them): how a tunnel ends when one side failed or its stream has a gap.
pub(crate) fn reset_on_close(socks: &[impl std::os::fd::AsFd]) {
    for sock in socks {
        if let Err(e) = crate::sys::set_linger_zero(sock) {
            tracing::debug!("SO_LINGER 0: {e}");
        }
    }
}

/// Shared handle to the active data path.
pub type SharedDataPath = Arc<dyn DataPath>;
