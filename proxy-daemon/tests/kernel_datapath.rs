//! The kernel data path driven in-process, as root, for what the daemon-level
//! tests (tests/tests/kernel.rs, backpressure.rs) cannot reach through the
//! `proxyd` binary: maps sized for fewer tunnels than are open, a reset
//! crossing the tunnel (spliced, and on the relay before the splice), and a
//! tunnel outliving its data path's pins.
//!
//! Each tunnel is built like the server builds one after a handshake:
//! `client_outer <-> client_inner` (accepted on a loopback listener) and
//! `upstream_inner <-> dest_outer`, with the 8-byte SOCKS4 reply already
//! written to the client; the inner pair goes to `DataPath::attach`.
//!
//! That a kernel-path load error is one line is checked on the daemon
//! (tests/tests/kernel.rs, `kernel_failure_at_start_is_one_line`), not here.
//!
//! Skipped (with the reason) unless the kernel data path is under test, as
//! everywhere in the suite: root and `CI`, or `PROXYD_TEST_KERNEL=1`; in CI
//! a missing prerequisite fails instead (`proxyd_tests::kernel_under_test`).

mod common;

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{spawn, Running};
use proxyd::datapath::kernel::{KernelDataPath, Policy};
use proxyd::datapath::{DataPathKind, Pair, SharedDataPath};
use proxyd_tests::{kernel_under_test, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The 8 bytes a SOCKS4 server answers before the tunnel starts.
const REPLY: [u8; 8] = [0, 90, 0, 0, 0, 0, 0, 0];
/// Most a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(60);
/// Most one step (a read, a tunnel's end, a path change) may take.
const STEP: Duration = Duration::from_secs(10);

/// A pin dir of this test's own under /sys/fs/bpf; removed at the end even
/// when the test fails (the data path removes it on a clean drop).
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        PinDir(PathBuf::from(format!("/sys/fs/bpf/proxyd-test-{}-{n}", std::process::id())))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log of the data path (`PROXYD_LOG`, default warn), shown for failed tests.
fn init_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROXYD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A tunnel under test and its two outer ends.
struct Harness {
    /// The SOCKS client's end (`client_outer`).
    client: TcpStream,
    /// The destination's end (`dest_outer`).
    dest: TcpStream,
    tunnel: Running,
}

/// Builds `client_outer <-> client_inner` and `upstream_inner <-> dest_outer`
/// on loopback and writes the SOCKS4 reply to the client; returns the outer
/// ends and the inner pair, ready for `attach`.
async fn connect() -> (TcpStream, TcpStream, Pair) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(front.local_addr().unwrap()), front.accept());
    let (mut client, (mut client_inner, _)) = (client.unwrap(), accepted.unwrap());
    let (upstream_inner, accepted) = tokio::join!(TcpStream::connect(back.local_addr().unwrap()), back.accept());
    let (upstream_inner, (dest, _)) = (upstream_inner.unwrap(), accepted.unwrap());
    client_inner.write_all(&REPLY).await.unwrap();
    let mut reply = [0u8; 8];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, REPLY);
    (client, dest, Pair { client: client_inner, upstream: upstream_inner, client_early: Vec::new() })
}

/// A tunnel on `dp`, as [`connect`] builds it.
async fn harness(dp: &SharedDataPath) -> Harness {
    let (client, dest, pair) = connect().await;
    let tunnel = spawn(dp.attach(pair, CancellationToken::new()).expect("attach"));
    Harness { client, dest, tunnel }
}

/// Waits until the tunnel's bytes move on `kind`.
async fn wait_path(tunnel: &Running, kind: DataPathKind, what: &str) {
    let waited = tokio::time::timeout(STEP, async {
        while tunnel.stats.path() != kind {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}: the tunnel never moved to the {kind} path");
}

/// `msg` from the client to the destination, then `answer` back; returns
/// when both have arrived whole.
async fn round_trip(h: &mut Harness, msg: &[u8], answer: &[u8], what: &str) {
    h.client.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, h.dest.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: client -> destination timed out"))
        .unwrap_or_else(|e| panic!("{what}: client -> destination: {e}"));
    assert_eq!(got, msg, "{what}: client -> destination");
    h.dest.write_all(answer).await.unwrap();
    let mut got = vec![0u8; answer.len()];
    tokio::time::timeout(STEP, h.client.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: destination -> client timed out"))
        .unwrap_or_else(|e| panic!("{what}: destination -> client: {e}"));
    assert_eq!(got, answer, "{what}: destination -> client");
}

/// Writes `data` and a FIN on `w` while `r` reads to end of stream (a clean
/// EOF, not a reset), and checks that exactly `data` arrived.
async fn send_and_close(w: &mut TcpStream, r: &mut TcpStream, data: &[u8], what: &str) {
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut got = Vec::with_capacity(data.len());
    let (wrote, read) = tokio::time::timeout(STEP, async { tokio::join!(write, r.read_to_end(&mut got)) })
        .await
        .unwrap_or_else(|_| panic!("{what}: transfer timed out after {} of {} bytes", got.len(), data.len()));
    wrote.unwrap_or_else(|e| panic!("{what}: write: {e}"));
    read.unwrap_or_else(|e| panic!("{what}: read (want a clean end of stream): {e}"));
    assert_eq!(got.len(), data.len(), "{what}: bytes received");
    assert!(got == data, "{what}: the bytes differ");
}

/// Waits for the tunnel to end, then checks its final counters.
async fn finish(tunnel: &mut Running, tx: u64, rx: u64, what: &str) {
    tokio::time::timeout(STEP, &mut tunnel.done)
        .await
        .unwrap_or_else(|_| panic!("{what}: the tunnel did not end"))
        .unwrap_or_else(|e| panic!("{what}: the tunnel task failed: {e}"));
    let s = tunnel.stats.snapshot();
    assert_eq!((s.tx, s.rx), (tx, rx), "{what}: final counters (tx, rx)");
}

/// Closes `s` with a reset (`SO_LINGER` 0, then close).
fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger).expect("SO_LINGER");
    drop(s);
}

/// The next read on `s` fails with a reset: neither data nor a clean end of stream.
async fn expect_reset(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(STEP, s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: neither a reset nor anything else arrived"));
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("{what}: a clean end of stream, want a reset"),
        other => panic!("{what}: {other:?}, want a reset"),
    }
}

/// Maps sized for one tunnel: a second tunnel open at the same time is
/// relayed instead (the maps are full), and both carry data both ways with
/// exact counters and close cleanly; once they are gone the maps take a
/// tunnel again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_maps_relay_the_next_tunnel() {
    if !kernel_under_test("full_maps_relay_the_next_tunnel") {
        return;
    }
    init_log();
    let dir = PinDir::new();
    tokio::time::timeout(TEST_LIMIT, async {
        let kernel = Arc::new(KernelDataPath::load_with_capacity(&dir.0, 1).expect("load the kernel data path"));
        let dp = kernel.with_policy(Policy::Always);
        let mut a = harness(&dp).await;
        wait_path(&a.tunnel, DataPathKind::Kernel, "first tunnel").await;
        let mut b = harness(&dp).await;
        // A round trip through the second tunnel: by then it has tried the
        // maps (the splice follows the hand-over without a pause).
        round_trip(&mut b, b"b?", b"b!", "second tunnel").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.tunnel.stats.path(), DataPathKind::Userspace, "the second tunnel must be relayed");
        round_trip(&mut a, b"a?", b"a!", "first tunnel").await;
        assert_eq!(a.tunnel.stats.path(), DataPathKind::Kernel, "the first tunnel must stay spliced");
        let (up, down) = (pattern(100_000, 1), pattern(50_000, 2));
        for (h, what) in [(&mut a, "first tunnel (spliced)"), (&mut b, "second tunnel (relayed)")] {
            // Half-close each way: the client's FIN first, the answer after it.
            send_and_close(&mut h.client, &mut h.dest, &up, what).await;
            send_and_close(&mut h.dest, &mut h.client, &down, what).await;
        }
        finish(&mut a.tunnel, 2 + 100_000, 2 + 50_000, "first tunnel (spliced)").await;
        finish(&mut b.tunnel, 2 + 100_000, 2 + 50_000, "second tunnel (relayed)").await;
        // Both left the maps at their end: the one place is free again.
        let mut c = harness(&dp).await;
        wait_path(&c.tunnel, DataPathKind::Kernel, "a tunnel after both ended").await;
        round_trip(&mut c, b"c?", b"c!", "a tunnel after both ended").await;
        drop((c.client, c.dest));
        finish(&mut c.tunnel, 2, 2, "a tunnel after both ended").await;
    })
    .await
    .expect("the test took too long");
}

/// A reset from either outer end reaches the other outer end as a reset,
/// not a clean end of stream: spliced (`kernel`, after a round trip), and
/// on the relay before any splice (`auto`, a tunnel that has moved nothing
/// is never promoted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_crosses_the_tunnel() {
    if !kernel_under_test("a_reset_crosses_the_tunnel") {
        return;
    }
    init_log();
    let dir = PinDir::new();
    tokio::time::timeout(TEST_LIMIT, async {
        let kernel = Arc::new(KernelDataPath::load(&dir.0).expect("load the kernel data path"));
        for spliced in [true, false] {
            let (dp, kind) = if spliced {
                (kernel.with_policy(Policy::Always), DataPathKind::Kernel)
            } else {
                (kernel.with_policy(Policy::Auto), DataPathKind::Userspace)
            };
            for client_resets in [false, true] {
                let what = format!(
                    "{} resets, {}",
                    if client_resets { "client" } else { "destination" },
                    if spliced { "spliced" } else { "relayed before the splice" }
                );
                let mut h = harness(&dp).await;
                let moved = if spliced {
                    wait_path(&h.tunnel, DataPathKind::Kernel, &what).await;
                    round_trip(&mut h, b"x", b"y", &what).await;
                    1
                } else {
                    0
                };
                let promotions = kernel.switches().0;
                assert_eq!(h.tunnel.stats.path(), kind, "{what}: path before the reset");
                let Harness { client, dest, mut tunnel } = h;
                let (resetting, mut other) = if client_resets { (client, dest) } else { (dest, client) };
                reset(resetting);
                expect_reset(&mut other, &what).await;
                finish(&mut tunnel, moved, moved, &what).await;
                assert_eq!(kernel.switches().0, promotions, "{what}: no promotion happened");
            }
        }
    })
    .await
    .expect("the test took too long");
}

/// Dropping the data path (both its handles) while a tunnel is spliced
/// removes the pins at once, yet the tunnel keeps working both ways (the
/// program stays attached while a tunnel uses it) and ends cleanly with
/// exact counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_outlives_its_data_paths_pins() {
    if !kernel_under_test("a_tunnel_outlives_its_data_paths_pins") {
        return;
    }
    init_log();
    let dir = PinDir::new();
    tokio::time::timeout(TEST_LIMIT, async {
        let kernel = Arc::new(KernelDataPath::load(&dir.0).expect("load the kernel data path"));
        let dp = kernel.with_policy(Policy::Always);
        let mut h = harness(&dp).await;
        wait_path(&h.tunnel, DataPathKind::Kernel, "before the drop").await;
        round_trip(&mut h, b"ping", b"pong", "before the drop").await;
        assert!(dir.0.join("FLOWS").exists(), "the data path pins FLOWS in {}", dir.0.display());
        drop(dp);
        drop(kernel);
        for name in ["FLOWS", "PEERS", "SOCKS", "SPLICE"] {
            assert!(!dir.0.join(name).exists(), "pin {name} left after the drop");
        }
        assert!(!dir.0.exists(), "pin dir {} left after the drop", dir.0.display());
        round_trip(&mut h, b"still", b"there", "after the drop").await;
        assert_eq!(h.tunnel.stats.path(), DataPathKind::Kernel, "still spliced after the drop");
        let (up, down) = (pattern(300_000, 3), pattern(200_000, 4));
        send_and_close(&mut h.client, &mut h.dest, &up, "after the drop").await;
        send_and_close(&mut h.dest, &mut h.client, &down, "after the drop").await;
        finish(&mut h.tunnel, 4 + 5 + 300_000, 4 + 5 + 200_000, "after the drop").await;
    })
    .await
    .expect("the test took too long");
}

/// A reset that reaches the proxy before the pair is spliced (`kernel`: the
/// RST is already queued when the hand-over reads the sockets) reaches the
/// other outer end as a reset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_splice_crosses_the_tunnel() {
    if !kernel_under_test("a_reset_before_the_splice_crosses_the_tunnel") {
        return;
    }
    init_log();
    let dir = PinDir::new();
    tokio::time::timeout(TEST_LIMIT, async {
        let kernel = Arc::new(KernelDataPath::load(&dir.0).expect("load the kernel data path"));
        let dp = kernel.with_policy(Policy::Always);
        for client_resets in [false, true] {
            let what = format!("{} resets before the splice", if client_resets { "client" } else { "destination" });
            let (client, dest, pair) = connect().await;
            let (resetting, mut other) = if client_resets { (client, dest) } else { (dest, client) };
            reset(resetting);
            // Let the RST land on the inner socket before the data path takes the pair.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut tunnel = spawn(dp.attach(pair, CancellationToken::new()).expect("attach"));
            expect_reset(&mut other, &what).await;
            finish(&mut tunnel, 0, 0, &what).await;
        }
    })
    .await
    .expect("the test took too long");
}
