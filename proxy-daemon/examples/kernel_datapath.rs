//! Exercises the kernel data path on loopback, as root: loads the programs,
//! splices real TCP pairs and checks what the issue asks of it.
//!
//! ```text
//! cargo run --example kernel_datapath                  # all checks, 200 no-loss transfers
//! cargo run --example kernel_datapath -- check 1000    # 1000 no-loss transfers
//! cargo run --example kernel_datapath -- bench [MiB]   # throughput per socket buffer size
//! cargo run --example kernel_datapath -- load DIR       # load only, print the outcome
//! ```
//!
//! Each tunnel is `client -> [proxy side A | proxy side B] -> dest`, all in
//! this process: A and B are handed to `KernelDataPath::attach` like the
//! server does after a handshake (with an 8-byte "SOCKS reply" already
//! written to the client, and optional early bytes).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxyd::datapath::kernel::KernelDataPath;
use proxyd::datapath::{DataPath, Pair, Tunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Set once an event of target `proxyd::bpf` (the BPF programs' aya-log
/// messages, forwarded by the data path) was seen.
static BPF_LOG_SEEN: AtomicBool = AtomicBool::new(false);

/// A tracing layer that notes BPF log events, whatever the log filter.
struct BpfLogSeen;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BpfLogSeen {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "proxyd::bpf" {
            BPF_LOG_SEEN.store(true, Ordering::Relaxed);
        }
    }
}

/// The 8 bytes a SOCKS4 server answers before splicing.
const REPLY: [u8; 8] = [0, 90, 0, 0, 0, 0, 0, 0];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(filter))
        .with(BpfLogSeen)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let (Some("load"), Some(dir)) = (args.first().map(String::as_str), args.get(1)) {
        // Just load (e.g. as an unprivileged user) and print the outcome.
        return match KernelDataPath::load(std::path::Path::new(dir)) {
            Ok(_) => {
                println!("loaded");
                Ok(())
            }
            Err(e) => {
                println!("error: {e}");
                Ok(())
            }
        };
    }
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/proxyd-example-{}", std::process::id()));
    let dp = Arc::new(KernelDataPath::load(&pin_dir)?);
    match args.first().map(String::as_str) {
        Some("bench") => {
            let mib = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2048u64);
            bench(&dp, mib).await?;
        }
        _ => {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200usize);
            checks(&dp, &pin_dir, n).await?;
        }
    }
    // A second load on the same pin dir takes the pins over; dropping the
    // first one must not remove them.
    let second = KernelDataPath::load(&pin_dir)?;
    drop(dp);
    assert!(
        pin_dir.join("FLOWS").exists(),
        "the first data path removed the second one's pins"
    );
    let mut h = harness(&second, b"", b"").await?;
    h.client.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    h.dest.read_exact(&mut got).await?;
    assert_eq!(&got, b"ping");
    println!("ok: a second load takes the pin dir over");
    // The tunnel outlives its data path's pins (the program stays attached).
    drop(second);
    for name in ["FLOWS", "PEERS", "SOCKS", "SPLICE"] {
        assert!(!pin_dir.join(name).exists(), "pin {name} left after drop");
    }
    assert!(!pin_dir.exists(), "pin dir left after drop");
    h.dest.write_all(b"pong").await?;
    h.client.read_exact(&mut got).await?;
    assert_eq!(&got, b"pong");
    drop((h.client, h.dest));
    finish(h.tunnel, 4, 4, "after drop").await?;
    println!("ok: pins removed on drop; open tunnels keep working until they end");

    // Maps sized for one tunnel: a second one is relayed, counted the same.
    {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/proxyd-example-small-{}",
            std::process::id()
        ));
        let small = KernelDataPath::load_with_capacity(&dir, 1)?;
        let mut a = harness(&small, b"", b"").await?;
        let mut b = harness(&small, b"", b"").await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let flows = bpftool_dump(&dir.join("FLOWS"))?;
        assert_eq!(
            flows.as_array().map(Vec::len),
            Some(2),
            "one tunnel in the maps: {flows}"
        );
        for h in [&mut a, &mut b] {
            send(&mut h.client, 7, 100_000).await?;
            h.client.shutdown().await?;
            expect(&mut h.dest, 7, 100_000, "small maps").await?;
            send(&mut h.dest, 8, 50_000).await?;
            h.dest.shutdown().await?;
            expect(&mut h.client, 8, 50_000, "small maps").await?;
        }
        finish(a.tunnel, 100_000, 50_000, "small maps, first").await?;
        finish(b.tunnel, 100_000, 50_000, "small maps, second").await?;
        println!("ok: with full maps the next tunnel is relayed, counters exact");
    }

    // Load errors are one line.
    for dir in ["/tmp/proxyd-not-bpffs", "/proc/proxyd"] {
        match KernelDataPath::load(std::path::Path::new(dir)) {
            Ok(_) => return Err(format!("load on {dir} succeeded").into()),
            Err(e) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "multi-line error: {line}");
                println!("ok: load on {dir} fails with one line: {line}");
            }
        }
    }
    Ok(())
}

/// A tunnel under test and the two outer ends.
struct Harness {
    client: TcpStream,
    dest: TcpStream,
    tunnel: Tunnel,
    cancel: CancellationToken,
}

/// Builds client -> proxy -> dest; `banner` is written by dest before attach.
async fn harness(dp: &KernelDataPath, early: &[u8], banner: &[u8]) -> Result<Harness> {
    harness_with(dp, early, banner, b"").await
}

/// [`harness`], and `pipelined` is sent by the client after the reply, before
/// attach (it waits in the proxy's client socket).
async fn harness_with(
    dp: &KernelDataPath,
    early: &[u8],
    banner: &[u8],
    pipelined: &[u8],
) -> Result<Harness> {
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let back = TcpListener::bind("127.0.0.1:0").await?;
    let (client, proxy_client) =
        tokio::join!(TcpStream::connect(front.local_addr()?), front.accept());
    let (mut client, (mut proxy_client, _)) = (client?, proxy_client?);
    let (upstream, dest) = tokio::join!(TcpStream::connect(back.local_addr()?), back.accept());
    let (upstream, (mut dest, _)) = (upstream?, dest?);
    if !banner.is_empty() {
        dest.write_all(banner).await?;
        // Let the banner land in the upstream socket's receive queue.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy_client.write_all(&REPLY).await?;
    let mut reply = [0u8; 8];
    client.read_exact(&mut reply).await?;
    assert_eq!(reply, REPLY);
    if !pipelined.is_empty() {
        client.write_all(pipelined).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancel = CancellationToken::new();
    let tunnel = dp.attach(
        Pair {
            client: proxy_client,
            upstream,
            client_early: early.to_vec(),
        },
        cancel.clone(),
    )?;
    Ok(Harness {
        client,
        dest,
        tunnel,
        cancel,
    })
}

/// Byte `pos` of the deterministic pseudo-random stream `seed` (splitmix64
/// per 8-byte word), so writer and reader agree without sharing state.
fn stream_byte_word(seed: u64, word: u64) -> [u8; 8] {
    let mut z = seed.wrapping_add(word.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `out` with the stream's bytes at positions `pos..`.
fn stream_fill(seed: u64, pos: u64, out: &mut [u8]) {
    let mut word = u64::MAX;
    let mut bytes = [0u8; 8];
    for (i, b) in out.iter_mut().enumerate() {
        let p = pos + i as u64;
        if p / 8 != word {
            word = p / 8;
            bytes = stream_byte_word(seed, word);
        }
        *b = bytes[(p % 8) as usize];
    }
}

/// Writes `len` bytes of stream `seed`.
async fn send(w: &mut (impl AsyncWriteExt + Unpin), seed: u64, len: u64) -> Result {
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        stream_fill(seed, pos, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        pos += n as u64;
    }
    Ok(())
}

/// Reads to EOF and checks it got exactly `len` bytes of stream `seed`.
async fn expect(r: &mut (impl AsyncReadExt + Unpin), seed: u64, len: u64, what: &str) -> Result {
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream_fill(seed, got, &mut want[..n]);
        if buf[..n] != want[..n] {
            return Err(format!("{what}: data differs in bytes {got}..{}", got + n as u64).into());
        }
        got += n as u64;
    }
    if got != len {
        return Err(format!("{what}: got {got} bytes, want {len}").into());
    }
    Ok(())
}

/// Waits for the tunnel to end and checks its final counters.
async fn finish(tunnel: Tunnel, tx: u64, rx: u64, what: &str) -> Result {
    tokio::time::timeout(Duration::from_secs(10), tunnel.done)
        .await
        .map_err(|_| format!("{what}: tunnel did not end"))??;
    let s = tunnel.stats.snapshot();
    if (s.tx, s.rx) != (tx, rx) {
        return Err(format!(
            "{what}: counters tx={} rx={}, want tx={tx} rx={rx}",
            s.tx, s.rx
        )
        .into());
    }
    Ok(())
}

fn bpftool_dump(pin: &std::path::Path) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()?;
    if !out.status.success() {
        return Err(format!("bpftool: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn checks(dp: &KernelDataPath, pin_dir: &std::path::Path, n: usize) -> Result {
    // Both ways, exact counters, early bytes, bpftool shows named fields.
    {
        let early = b"EARLY-".to_vec();
        let mut h = harness(dp, &early, b"").await?;
        h.client.write_all(b"hello").await?;
        let mut got = [0u8; 11];
        h.dest.read_exact(&mut got).await?;
        assert_eq!(&got, b"EARLY-hello");
        h.dest.write_all(b"world!").await?;
        let mut got = [0u8; 6];
        h.client.read_exact(&mut got).await?;
        assert_eq!(&got, b"world!");
        let s = h.tunnel.stats.snapshot();
        assert_eq!((s.tx, s.rx), (11, 6), "live counters");
        assert!(s.last_activity_ns > 0 && s.last_activity_ns <= proxyd::datapath::monotonic_ns());
        let dump = bpftool_dump(&pin_dir.join("FLOWS"))?;
        let text = dump.to_string();
        assert!(
            text.contains("\"bytes\"")
                && text.contains("\"packets\"")
                && text.contains("\"last_ns\""),
            "bpftool: {text}"
        );
        println!("ok: both ways, tx/rx exact, bpftool FLOWS = {text}");
        h.client.shutdown().await?;
        h.dest.shutdown().await?;
        let mut rest = Vec::new();
        h.dest.read_to_end(&mut rest).await?;
        h.client.read_to_end(&mut rest).await?;
        assert!(rest.is_empty());
        finish(h.tunnel, 11, 6, "basic").await?;
        let flows = bpftool_dump(&pin_dir.join("FLOWS"))?;
        assert_eq!(
            flows.as_array().map(Vec::len),
            Some(0),
            "FLOWS not empty after close: {flows}"
        );
        println!("ok: closed by both FINs, maps empty");
    }
    // An upstream that speaks first (its banner queued before insertion) and
    // a client that sent more right after its request (also queued), with
    // and without userspace moving the queued bytes first: without, the
    // running kernel must redirect what was queued before insertion.
    for kernel_only in [false, true] {
        dp.set_hand_over_queued(!kernel_only);
        let mut h = harness_with(dp, b"EARLY", b"220 banner\r\n", b"PIPELINED").await?;
        let mut got = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(2), h.client.read_exact(&mut got)).await??;
        assert_eq!(&got, b"220 banner\r\n");
        let mut got = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(2), h.dest.read_exact(&mut got)).await??;
        assert_eq!(&got, b"EARLYPIPELINED");
        h.client.write_all(b"more").await?;
        let mut got = [0u8; 4];
        h.dest.read_exact(&mut got).await?;
        assert_eq!(&got, b"more");
        let s = h.tunnel.stats.snapshot();
        assert_eq!((s.tx, s.rx), (18, 12));
        println!(
            "ok: banner and pipelined bytes queued before the splice arrive whole, in order ({})",
            if kernel_only {
                "left to the kernel"
            } else {
                "moved by userspace first"
            }
        );
        drop((h.client, h.dest));
        finish(h.tunnel, 18, 12, "queued before insertion").await?;
    }
    dp.set_hand_over_queued(true);
    // Half-close, client first then dest, with data after the first FIN.
    for client_first in [true, false] {
        let mut h = harness(dp, b"", b"").await?;
        let (a, b) = (300_001u64, 4_000_003u64);
        if client_first {
            send(&mut h.client, 1, a).await?;
            h.client.shutdown().await?;
            expect(&mut h.dest, 1, a, "half-close c->d").await?;
            send(&mut h.dest, 2, b).await?;
            h.dest.shutdown().await?;
            expect(&mut h.client, 2, b, "half-close d->c after client FIN").await?;
            finish(h.tunnel, a, b, "half-close client first").await?;
        } else {
            send(&mut h.dest, 3, b).await?;
            h.dest.shutdown().await?;
            expect(&mut h.client, 3, b, "half-close d->c").await?;
            send(&mut h.client, 4, a).await?;
            h.client.shutdown().await?;
            expect(&mut h.dest, 4, a, "half-close c->d after dest FIN").await?;
            finish(h.tunnel, a, b, "half-close dest first").await?;
        }
    }
    println!("ok: half-close both ways");
    // Reset propagates (before the splice is done: relayed; after: spliced).
    for settle in [0, 50] {
        let mut h = harness(dp, b"", b"").await?;
        tokio::time::sleep(Duration::from_millis(settle)).await;
        let before = h.tunnel.stats.snapshot().last_activity_ns;
        h.client.write_all(b"x").await?;
        let mut one = [0u8; 1];
        h.dest.read_exact(&mut one).await?;
        let after = h.tunnel.stats.snapshot();
        assert_eq!(after.tx, 1);
        assert!(
            after.last_activity_ns > before,
            "last activity did not move"
        );
        let linger = nix::sys::socket::sockopt::Linger;
        nix::sys::socket::setsockopt(
            &h.dest,
            linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
        drop(h.dest);
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(2), h.client.read(&mut buf)).await?;
        assert!(
            matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "client after upstream RST: {r:?}"
        );
        finish_any(h.tunnel).await?;
    }
    println!("ok: RST from dest resets the client (relayed and spliced), last activity moves");
    let mut buf = [0u8; 16];
    {
        let mut h = harness(dp, b"", b"").await?;
        h.cancel.cancel();
        finish_any(h.tunnel).await?;
        let r = tokio::time::timeout(Duration::from_secs(2), h.client.read(&mut buf)).await?;
        assert!(matches!(r, Ok(0)) || r.is_err());
        println!("ok: cancel closes the tunnel");
    }
    // A client that closed its write half before the splice: relayed.
    {
        let front = TcpListener::bind("127.0.0.1:0").await?;
        let back = TcpListener::bind("127.0.0.1:0").await?;
        let mut client = TcpStream::connect(front.local_addr()?).await?;
        let (proxy_client, _) = front.accept().await?;
        let upstream = TcpStream::connect(back.local_addr()?).await?;
        let (mut dest, _) = back.accept().await?;
        client.write_all(b"all-at-once").await?;
        client.shutdown().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let tunnel = dp.attach(
            Pair {
                client: proxy_client,
                upstream,
                client_early: vec![],
            },
            CancellationToken::new(),
        )?;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), dest.read_to_end(&mut got)).await??;
        assert_eq!(got, b"all-at-once");
        dest.write_all(b"bye").await?;
        dest.shutdown().await?;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await?;
        assert_eq!(got, b"bye");
        tokio::time::timeout(Duration::from_secs(5), tunnel.done).await??;
        let s = tunnel.stats.snapshot();
        assert_eq!((s.tx, s.rx), (11, 3));
        println!("ok: client FIN before splice (CLOSE_WAIT) falls back to the relay, counted");
    }
    // The programs' aya-log messages reach `tracing` (target proxyd::bpf):
    // make the verdict miss its peer by deleting the PEERS entries.
    {
        let mut h = harness(dp, b"", b"").await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        for entry in bpftool_dump(&pin_dir.join("PEERS"))?
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let key: Vec<String> = entry["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_string())
                .collect();
            let out = Command::new("bpftool")
                .args(["map", "delete", "pinned"])
                .arg(pin_dir.join("PEERS"))
                .arg("key")
                .args(&key)
                .output()?;
            assert!(out.status.success(), "bpftool delete: {out:?}");
        }
        h.client.write_all(b"lost").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.cancel.cancel();
        finish_any(h.tunnel).await?;
        assert!(
            BPF_LOG_SEEN.load(Ordering::Relaxed),
            "no aya-log message from the verdict reached tracing"
        );
        println!("ok: the verdict's aya-log messages reach tracing (target proxyd::bpf)");
    }

    // No loss at close: random sizes, sender closes right after its last write.
    let started = Instant::now();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut total = 0u64;
    for i in 0..n {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Every other round of four: log-uniform 1 B .. 8 MiB (many small ones);
        // the others: uniform 1 B .. 8 MiB.
        let size = if (i / 4) % 2 == 1 {
            1 + (rng >> 8) % (1u64 << (rng % 24))
        } else {
            1 + (rng >> 8) % (8 << 20)
        };
        total += size;
        let seed = rng;
        let mut h = harness(dp, b"", b"").await?;
        match i % 4 {
            // client -> dest, client closes fully right after writing
            0 => {
                let mut c = h.client;
                let w = tokio::spawn(async move { send(&mut c, seed, size).await });
                expect(&mut h.dest, seed, size, &format!("#{i} c->d {size}")).await?;
                w.await??;
                drop(h.dest);
                finish_any(h.tunnel).await?;
            }
            // dest -> client, dest closes fully right after writing
            1 => {
                let mut d = h.dest;
                let w = tokio::spawn(async move { send(&mut d, seed, size).await });
                expect(&mut h.client, seed, size, &format!("#{i} d->c {size}")).await?;
                w.await??;
                drop(h.client);
                finish_any(h.tunnel).await?;
            }
            // half-close: client sends + FIN, then dest answers + FIN
            2 => {
                send(&mut h.client, seed, size).await?;
                h.client.shutdown().await?;
                expect(&mut h.dest, seed, size, &format!("#{i} hc c->d {size}")).await?;
                send(&mut h.dest, !seed, size).await?;
                drop(h.dest);
                expect(&mut h.client, !seed, size, &format!("#{i} hc d->c {size}")).await?;
                finish(h.tunnel, size, size, &format!("#{i}")).await?;
            }
            // both at once, both close after writing
            _ => {
                let (mut cr, mut cw) = h.client.into_split();
                let (mut dr, mut dw) = h.dest.into_split();
                let a = tokio::spawn(async move {
                    let r = send(&mut cw, seed, size).await;
                    drop(cw);
                    r
                });
                let b = tokio::spawn(async move {
                    let r = send(&mut dw, !seed, size).await;
                    drop(dw);
                    r
                });
                let (w1, w2) = (
                    format!("#{i} both c->d {size}"),
                    format!("#{i} both d->c {size}"),
                );
                let (r1, r2) = tokio::join!(
                    expect(&mut dr, seed, size, &w1),
                    expect(&mut cr, !seed, size, &w2)
                );
                r1?;
                r2?;
                a.await??;
                b.await??;
                finish_any(h.tunnel).await?;
            }
        }
    }
    println!(
        "ok: {n} transfers (1 B..8 MiB, {} MiB in all) arrived whole in {:.1}s",
        total >> 20,
        started.elapsed().as_secs_f64()
    );
    let flows = bpftool_dump(&pin_dir.join("FLOWS"))?;
    assert_eq!(
        flows.as_array().map(Vec::len),
        Some(0),
        "FLOWS not empty at the end: {flows}"
    );
    Ok(())
}

async fn finish_any(t: Tunnel) -> Result {
    tokio::time::timeout(Duration::from_secs(10), t.done)
        .await
        .map_err(|_| "tunnel did not end")??;
    Ok(())
}

/// One tunnel per socket buffer setting: `mib` MiB one way, then `mib` MiB
/// each way at once. The client and destination run in this process too, so
/// the figures include their copying; they compare settings, not products.
async fn bench(dp: &KernelDataPath, mib: u64) -> Result {
    for buffer in [0u32, 4 << 20, 8 << 20, 16 << 20, 32 << 20] {
        dp.set_socket_buffer(buffer);
        let label = if buffer == 0 {
            "autotune".to_string()
        } else {
            format!("{} MiB", buffer >> 20)
        };
        for both_ways in [false, true] {
            let h = harness(dp, b"", b"").await?;
            let len = mib << 20;
            let back = if both_ways { len } else { 0 };
            let started = Instant::now();
            let (cr, cw) = h.client.into_split();
            let (dr, dw) = h.dest.into_split();
            let (a, b, n1, n2) = tokio::join!(pump(cw, len), pump(dw, back), sink(dr), sink(cr));
            let secs = started.elapsed().as_secs_f64();
            a?;
            b?;
            assert_eq!((n1?, n2?), (len, back));
            finish(h.tunnel, len, back, "bench").await?;
            println!(
                "bench: buffer {label:>8}, {}: {:.1} Gbit/s through the tunnel ({mib} MiB per direction, {secs:.2}s)",
                if both_ways { "both ways" } else { "one way  " },
                (len + back) as f64 * 8.0 / secs / 1e9,
            );
        }
    }
    Ok(())
}

/// Writes `len` zero bytes, then shuts the write half.
async fn pump(mut w: tokio::net::tcp::OwnedWriteHalf, len: u64) -> Result {
    let zero = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zero.len() as u64) as usize;
        w.write_all(&zero[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(())
}

/// Reads to EOF, returning the byte count.
async fn sink(mut r: tokio::net::tcp::OwnedReadHalf) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}
