//! The kernel path's backpressure and its per-tunnel path switches (issue 11):
//! a peer that stops reading holds bounded, accounted memory on every data
//! path, and one that keeps falling a little behind a fast sender leaves a
//! bounded amount in flight;
//! bytes crossing a promotion (relay -> splice) or a demotion (splice ->
//! relay) arrive whole and in order with exact counters; switching
//! `data-path` at runtime, to the path in use included, works, and under
//! load strands no byte, socket, pipe or map entry.

use proxyd_tests::{
    accept_timeout, data_paths, free_port, kernel_under_test, listen_local, pattern, sample, scrape, sha256, socks,
    wait_until, Daemon, Options,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// The data paths under test, with `auto` (per-tunnel promotion) when the kernel path is.
fn paths() -> Vec<&'static str> {
    let mut paths = data_paths();
    if paths.contains(&"kernel") {
        paths.push("auto");
    }
    paths
}

/// `MemAvailable` in bytes.
/// Held by the tests that load the machine hardest (200 stalled tunnels'
/// memory, a reader that must fall behind its sender), so that one does not
/// skew the other: a CI run saw the falling-behind reader's tunnel never demoted
/// while the stalled tunnels ran beside it.
fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemAvailable:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Bytes charged to TCP sockets machine-wide (`/proc/net/sockstat` `TCP: ... mem`, in pages).
fn tcp_mem() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = text.lines().find(|l| l.starts_with("TCP:")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "mem").unwrap();
    f[i + 1].parse::<u64>().unwrap() * 4096
}

/// Writes as much as each socket takes, without blocking, until `until`.
fn flood(socks: &[TcpStream], until: Instant) {
    let chunk = vec![0x5au8; 256 << 10];
    for s in socks {
        s.set_nonblocking(true).unwrap();
    }
    while Instant::now() < until {
        let mut wrote = false;
        for mut s in socks {
            match s.write(&chunk) {
                Ok(_) => wrote = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("a stalled tunnel failed: {e}"),
            }
        }
        if !wrote {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

const MIB: u64 = 1 << 20;

/// 200 tunnels whose client (then destination) stops reading while the other
/// side sends as fast as it can: on every data path the memory they hold stops
/// growing, stays within 16 MiB a tunnel, and is charged to TCP (sockstat's
/// `TCP mem` accounts for what `MemAvailable` lost), so `tcp_mem` protects the host.
#[test]
fn stalled_peers_hold_bounded_accounted_memory() {
    const TUNNELS: usize = 200;
    let _alone = heavy();
    for dp in paths() {
        for client_stalls in [true, false] {
            let who = if client_stalls { "client" } else { "destination" };
            let mut d = Daemon::start(dp);
            let proxy = d.enable(&["max-connections=1000"]);
            let (l, dst) = listen_local();
            let pairs: Vec<(TcpStream, TcpStream)> = (0..TUNNELS).map(|_| socks::tunnel(proxy, &l, dst)).collect();
            let (senders, _stalled): (Vec<TcpStream>, Vec<TcpStream>) =
                pairs.into_iter().map(|(c, u)| if client_stalls { (u, c) } else { (c, u) }).unzip();
            let (mem0, tcp0) = (mem_available(), tcp_mem());
            let start = Instant::now();
            flood(&senders, start + Duration::from_secs(5));
            let (early_mem, early_tcp) = (mem0.saturating_sub(mem_available()), tcp_mem().saturating_sub(tcp0));
            flood(&senders, start + Duration::from_secs(20));
            let (mem, tcp) = (mem0.saturating_sub(mem_available()), tcp_mem().saturating_sub(tcp0));
            eprintln!(
                "{dp}, {who} stalls: {TUNNELS} tunnels after 5 s / 20 s: MemAvailable -{} / -{} MiB, TCP mem +{} / +{} MiB ({:.1} MiB a tunnel)",
                early_mem / MIB,
                mem / MIB,
                early_tcp / MIB,
                tcp / MIB,
                tcp as f64 / MIB as f64 / TUNNELS as f64
            );
            assert!(mem < 3 << 30, "{dp}, {who} stalls: MemAvailable fell by {} MiB", mem / MIB);
            assert!(tcp < TUNNELS as u64 * 16 * MIB, "{dp}, {who} stalls: TCP mem grew by {} MiB", tcp / MIB);
            assert!(
                tcp <= early_tcp + early_tcp / 4 + 64 * MIB,
                "{dp}, {who} stalls: TCP mem kept growing: {} MiB at 5 s, {} MiB at 20 s",
                early_tcp / MIB,
                tcp / MIB
            );
            assert!(
                mem <= tcp + tcp / 2 + 512 * MIB,
                "{dp}, {who} stalls: {} MiB of memory went missing outside TCP's accounting ({} MiB charged)",
                mem / MIB,
                tcp / MIB
            );
        }
    }
}

/// One fast sender and a reader that keeps falling behind (it pauses 3 ms
/// after every MiB: at most about 300 MB/s, well below what the sender moves
/// even on a loaded machine; at 600 MB/s a CI run under load once saw the
/// reader keep up, so the tunnel was never demoted), for 4 s on each path: what the sender has
/// written and the reader not yet read (the sockets' buffers, the window and
/// the grace: under 150 MiB) stays under 256 MiB at every read. Under
/// `kernel` the tunnel is braked, demoted and spliced again while the bytes
/// pour in (checked: at least one promotion, and no more than the relay's
/// doubling share allows: 12 in 1.2 GiB without it, 5 with). Until a tunnel listened for
/// its window events before entering the maps, the first events of such an
/// epoch could go out before anyone listened, and the epoch ran with no
/// window at all: 2.8 GB in flight after 1.4 s in the bench's one-flow run.
#[test]
fn a_reader_that_falls_behind_bounds_what_is_in_flight() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let _alone = heavy();
    for dp in paths() {
        let mut d = Daemon::start(dp);
        let metrics = format!("127.0.0.1:{}", free_port());
        let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
        let (l, dst) = listen_local();
        let (c, mut u) = socks::tunnel(proxy, &l, dst);
        if dp == "kernel" {
            // Spliced before the bytes pour in: a pair whose first bytes never
            // let the hand-over find both queues empty is relayed instead, and
            // then nothing here would be demoted or promoted.
            let spliced = wait_until(Duration::from_secs(5), || d.cli.connections().iter().any(|r| r.path == "kernel"));
            assert!(spliced, "{dp}: the tunnel never entered the sockhash");
        }
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (sent, done) = (sent.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = c;
                let chunk = pattern(256 << 10, 11);
                let until = Instant::now() + Duration::from_secs(4);
                while Instant::now() < until {
                    let n = c.write(&chunk).expect("the sender's write");
                    sent.fetch_add(n as u64, Ordering::Release);
                }
                c.shutdown(Shutdown::Write).unwrap();
                done.store(true, Ordering::Release);
                c
            })
        };
        u.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let (mut got, mut since_pause, mut worst) = (0u64, 0u64, 0u64);
        loop {
            let n = u.read(&mut buf).expect("the reader's read");
            if n == 0 {
                break;
            }
            got += n as u64;
            since_pause += n as u64;
            if !done.load(Ordering::Acquire) {
                worst = worst.max(sent.load(Ordering::Acquire).saturating_sub(got));
            }
            if since_pause >= MIB {
                since_pause = 0;
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        let _c = writer.join().unwrap();
        let total = sent.load(Ordering::Acquire);
        let promoted = sample(&scrape(&metrics), "proxyd_tunnel_path_switches_total{switch=\"promoted\"}");
        eprintln!("{dp}: {} MiB sent, at most {} MiB in flight, {promoted} promotions", total / MIB, worst / MIB);
        assert_eq!(got, total, "{dp}: bytes lost or added");
        if dp == "kernel" {
            assert!(promoted >= 1, "{dp}: never demoted and spliced again ({promoted} promotions): the test no longer crosses a promotion under load");
            // The relay carries a demoted tunnel 16 MiB before its first
            // promotion, doubling after each: p promotions take at least
            // 16 MiB * (2^p - 1) (16 MiB each would allow one per 16 MiB).
            let most = u64::from((total / (16 * MIB) + 1).ilog2()) + 1;
            assert!(
                promoted <= most,
                "{dp}: {promoted} promotions in {} MiB (at most {most} with the relay's share doubling)",
                total / MIB
            );
        }
        assert!(worst < 256 * MIB, "{dp}: {} MiB written and not read: no window held the sender", worst / MIB);
    }
}

/// Reads exactly `len` bytes, sleeping `pause` once after `pause_at` bytes
/// (a peer that stalls and resumes).
fn read_exactly(s: &mut TcpStream, len: usize, pause_at: Option<(usize, Duration)>) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0u8; 1 << 20];
    let mut paused = false;
    while got.len() < len {
        if let Some((_, pause)) = pause_at.filter(|(at, _)| !paused && got.len() >= *at) {
            std::thread::sleep(pause);
            paused = true;
        }
        let want = (len - got.len()).min(buf.len());
        let n = s.read(&mut buf[..want]).expect("read through the tunnel");
        assert!(n > 0, "end of stream after {} of {len} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Transfers that cross promotion and demotion arrive whole, in order, with
/// exact counters: sizes a byte before, at and after the promotion threshold
/// (2 MiB) and well past it, both directions, with early data and a banner,
/// a reader that stalls for a second and resumes (demotion, then promotion
/// again), and a half-close while the tunnel may be switching.
#[test]
fn transfers_across_promotion_and_demotion_arrive_whole() {
    if !kernel_under_test("transfers_across_promotion_and_demotion_arrive_whole") {
        return;
    }
    let threshold = 2usize << 20;
    let sizes = [1, threshold - 1, threshold, threshold + 1, 3 * threshold, 48 << 20];
    for dp in paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        for (i, &len) in sizes.iter().enumerate() {
            for upload in [true, false] {
                let stall = (len > threshold && i % 2 == 1).then_some((len / 2, Duration::from_secs(1)));
                let half_close = i % 2 == 0;
                // Early data: the client's first bytes go with the request.
                let mut c = TcpStream::connect(proxy).unwrap();
                let mut req = socks::request(1, dst, b"");
                req.extend_from_slice(b"EARLY");
                c.write_all(&req).unwrap();
                let mut u = accept_timeout(&l, Duration::from_secs(10)).expect("accept");
                let reply = socks::read_reply(&mut c).unwrap();
                assert_eq!(reply.code, 90, "{dp}: CONNECT refused");
                // Banner: the destination speaks first.
                u.write_all(b"BANNER").unwrap();
                assert_eq!(read_exactly(&mut u, 5, None), b"EARLY", "{dp}: early data");
                assert_eq!(read_exactly(&mut c, 6, None), b"BANNER", "{dp}: banner");
                let data = pattern(len, (i * 2 + upload as usize) as u64);
                let want = sha256::hex(&data);
                let (mut sender, mut receiver) = if upload { (c, u) } else { (u, c) };
                let writer = std::thread::spawn(move || {
                    sender.write_all(&data).unwrap();
                    if half_close {
                        sender.shutdown(Shutdown::Write).unwrap();
                    }
                    sender
                });
                receiver.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let got = read_exactly(&mut receiver, len, stall);
                let sender = writer.join().unwrap();
                assert_eq!(sha256::hex(&got), want, "{dp}: transfer {i} ({len} B, upload {upload}): content");
                let (tx, rx) = if upload { (5 + len as u64, 6) } else { (5, 6 + len as u64) };
                let exact = wait_until(Duration::from_secs(5), || {
                    d.cli.connections().iter().any(|r| r.kind == "out" && r.tx == tx && r.rx == rx)
                });
                assert!(exact, "{dp}: transfer {i}: counters are not tx={tx} rx={rx}: {:?}", d.cli.connections());
                if half_close {
                    let mut rest = Vec::new();
                    receiver.read_to_end(&mut rest).expect("end of stream after the half-close");
                    assert!(rest.is_empty(), "{dp}: bytes after the end");
                }
                drop((sender, receiver));
                assert!(wait_until(Duration::from_secs(10), || d.cli.connections().is_empty()), "{dp}: rows left");
            }
        }
    }
}

/// Under `auto` an interactive tunnel is promoted into the sockhash while its
/// messages are in flight, and what follows crosses the switches intact: a
/// ping-pong whose messages grow from 1 byte to 16 KiB, both directions at
/// once, runs across the 50 ms promotion (checked: the tunnel is spliced);
/// then 128 MiB each way, its reader stalling for a second after 8 MiB (a
/// demotion to the relay, checked in the metrics, where the rest goes
/// through the pipe lane), and a half-close in each direction. Every byte
/// arrives in order and the counters are exact.
#[test]
fn interactive_tunnels_cross_promotion_whole() {
    if !kernel_under_test("interactive_tunnels_cross_promotion_whole") {
        return;
    }
    let mut d = Daemon::start("auto");
    let metrics = format!("127.0.0.1:{}", free_port());
    let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
    let (l, dst) = listen_local();
    let rounds = 2;
    for round in 0..rounds {
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        let (mut tx, mut rx) = (0u64, 0u64);
        let started = Instant::now();
        let mut i = 0u64;
        // Messages in flight both ways at the moment of promotion.
        while started.elapsed() < Duration::from_millis(150) {
            let len = 1 + (i * 997 % (16 << 10)) as usize;
            let (up, down) = (pattern(len, round * 1000 + i), pattern(len, round * 1000 + i + 1));
            c.write_all(&up).unwrap();
            u.write_all(&down).unwrap();
            assert_eq!(read_exactly(&mut u, len, None), up, "round {round}, message {i} upstream");
            assert_eq!(read_exactly(&mut c, len, None), down, "round {round}, message {i} downstream");
            (tx, rx, i) = (tx + len as u64, rx + len as u64, i + 1);
        }
        let spliced = wait_until(Duration::from_secs(5), || d.cli.connections().iter().any(|r| r.path == "kernel"));
        assert!(spliced, "round {round}: the interactive tunnel was not promoted: {:?}", d.cli.connections());
        // Past the window and the grace a stalled direction may take (68 MiB):
        // the stall demotes the tunnel.
        let len = 128 << 20;
        for upload in [true, false] {
            let data = pattern(len, round * 2 + upload as u64);
            let want = sha256::hex(&data);
            let (mut sender, mut receiver) = if upload { (c, u) } else { (u, c) };
            let writer = std::thread::spawn(move || {
                sender.write_all(&data).unwrap();
                sender
            });
            receiver.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let got = read_exactly(&mut receiver, len, Some((8 << 20, Duration::from_secs(1))));
            assert_eq!(sha256::hex(&got), want, "round {round}, upload {upload}: content");
            let sender = writer.join().unwrap();
            if upload {
                tx += len as u64;
                (c, u) = (sender, receiver);
            } else {
                rx += len as u64;
                (u, c) = (sender, receiver);
            }
        }
        let exact = wait_until(Duration::from_secs(5), || {
            d.cli.connections().iter().any(|r| r.kind == "out" && r.tx == tx && r.rx == rx)
        });
        assert!(exact, "round {round}: counters are not tx={tx} rx={rx}: {:?}", d.cli.connections());
        // Half-close each way: the FIN crosses after the last byte.
        let (first, second) = if round % 2 == 0 { (&mut c, &mut u) } else { (&mut u, &mut c) };
        first.write_all(b"last").unwrap();
        first.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        second.read_to_end(&mut rest).expect("end of stream after the half-close");
        assert_eq!(rest, b"last", "round {round}: bytes before the FIN");
        second.write_all(b"reply").unwrap();
        second.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        first.read_to_end(&mut back).expect("the other direction still flows after a half-close");
        assert_eq!(back, b"reply", "round {round}: the half-closed tunnel's other direction");
        drop((c, u));
        assert!(wait_until(Duration::from_secs(10), || d.cli.connections().is_empty()), "round {round}: rows left");
    }
    let text = scrape(&metrics);
    let switches = |kind: &str| sample(&text, &format!("proxyd_tunnel_path_switches_total{{switch=\"{kind}\"}}"));
    let (promoted, demoted) = (switches("promoted"), switches("demoted"));
    eprintln!("promotions {promoted}, demotions {demoted}");
    assert!(promoted >= rounds, "{promoted} promotions in {rounds} rounds");
    assert!(demoted >= 1, "no stall demoted a tunnel ({demoted}): the test no longer crosses a demotion");
}

/// `set data-path=` to the path in use succeeds and changes nothing; switching
/// back and forth at runtime works, and tunnels keep flowing after each switch.
#[test]
fn data_path_switches_at_runtime() {
    if !kernel_under_test("data_path_switches_at_runtime") {
        return;
    }
    for start in ["kernel", "auto"] {
        let mut d = Daemon::start(start);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        for next in [start, "kernel", "auto", "userspace", "kernel", "kernel", "auto"] {
            d.cmd(&format!("ip socks set data-path={next}"));
            let print = d.cmd("ip socks print");
            assert!(print.contains(&format!("data-path: {next}")), "after set data-path={next}:\n{print}");
            let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
            let data = pattern(8 << 20, 7);
            let sender = std::thread::spawn(move || {
                u.write_all(&data).unwrap();
                u
            });
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let got = read_exactly(&mut c, 8 << 20, None);
            assert_eq!(sha256::hex(&got), sha256::hex(&pattern(8 << 20, 7)), "{start} -> {next}: content");
            drop(sender.join().unwrap());
        }
    }
}

/// `run --data-path kernel` on a daemon whose saved `data-path` is `auto`
/// runs `kernel` and `ip socks print` says so; a change of another setting
/// keeps it, and `set data-path=auto` (the saved value, so no change to the
/// configuration) ends it: new tunnels start on the relay again.
#[test]
fn set_data_path_to_the_saved_value_ends_a_run_override() {
    if !kernel_under_test("set_data_path_to_the_saved_value_ends_a_run_override") {
        return;
    }
    let mut d = Daemon::start("kernel");
    let proxy = d.enable(&[]);
    let (l, dst) = listen_local();
    let data_path_line = |d: &Daemon| {
        let print = d.cmd("ip socks print");
        print.lines().find(|l| l.starts_with("data-path:")).unwrap_or_default().to_string()
    };
    let overridden = "data-path: auto (running kernel from `run --data-path`; in use: kernel)";
    assert_eq!(data_path_line(&d), overridden);
    // One short exchange, then quiet: `kernel` splices the tunnel at once,
    // `auto` keeps it on the relay (a promotion is decided only as bytes move).
    let exchange = |what: &str| {
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        u.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping", "{what}");
        (c, u)
    };
    let first = exchange("under the override");
    let spliced = wait_until(Duration::from_secs(5), || d.cli.connections().iter().any(|r| r.path == "kernel"));
    assert!(spliced, "run --data-path kernel splices at once: {:?}", d.cli.connections());
    drop(first);
    assert!(wait_until(Duration::from_secs(10), || d.cli.connections().is_empty()), "the first tunnel ended");
    d.cmd("ip socks set connection-idle-timeout=3m");
    assert_eq!(data_path_line(&d), overridden, "another setting's change keeps the override");
    d.cmd("ip socks set data-path=auto");
    assert_eq!(data_path_line(&d), "data-path: auto (in use: kernel)");
    let second = exchange("after set data-path=auto");
    std::thread::sleep(Duration::from_millis(200));
    let rows = d.cli.connections();
    assert!(rows.len() == 1 && rows[0].path == "userspace", "under auto a quiet tunnel stays on the relay: {rows:?}");
    drop(second);
}

/// Tunnels of every kind (short requests that half-close, bulk both ways,
/// interactive ping-pongs) run while `data-path` switches every 200 ms between
/// `kernel`, `userspace` and `auto`: every byte arrives, and once the tunnels
/// have ended the daemon holds the sockets it held before, no entry in the
/// kernel path's maps and no pipe beyond its spare pool (64 descriptors). A
/// switch strands nothing, whatever path a tunnel was on when it came.
#[test]
fn switches_under_load_lose_nothing_and_leak_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const T: &str = "switches_under_load_lose_nothing_and_leak_nothing";
    if !kernel_under_test(T) {
        return;
    }
    let Some(bpftool) = proxyd_tests::require_program(T, "bpftool") else { return };
    let _alone = heavy();
    let mut d = Daemon::start("auto");
    let proxy = d.enable(&[]);
    let pin_dir = d.pin_dir().expect("the kernel path pins its maps").to_path_buf();
    let echo = proxyd_tests::fixtures::EchoServer::start().addr;
    let before = open_files(d.pid());
    // Bounded in time (6 s of load) and in count (per thread, below).
    let deadline = Instant::now() + Duration::from_secs(6);
    let done = Arc::new(AtomicBool::new(false));
    // One thread per tunnel kind and seed, each opening tunnels one after
    // another (at most `max`) until the deadline; `run` drives one tunnel.
    let spawn = |kind: &'static str, max: u64, run: fn(&mut TcpStream, u64, u64) -> Result<(), String>| {
        move |i: u64| {
            std::thread::spawn(move || -> Result<(&'static str, u64), String> {
                let mut n = 0;
                while Instant::now() < deadline && n < max {
                    let mut s = socks::connect(proxy, echo);
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    run(&mut s, i, n).map_err(|e| format!("{kind} {i}/{n}: {e}"))?;
                    n += 1;
                }
                Ok((kind, n))
            })
        }
    };
    let short = spawn("short", 300, |s, i, n| {
        let msg = pattern(37, i * 1000 + n);
        s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
        (back == msg).then_some(()).ok_or_else(|| format!("{} bytes back of {}", back.len(), msg.len()))
    });
    let bulk = spawn("bulk", 8, |s, i, n| {
        let data = pattern(16 << 20, 100 + i * 10 + n);
        let want = sha256::hex(&data);
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&data).and_then(|_| w.shutdown(Shutdown::Write)).map_err(|e| e.to_string())
        });
        let mut back = Vec::with_capacity(16 << 20);
        let read = s.read_to_end(&mut back);
        writer.join().unwrap().map_err(|e| format!("write: {e}"))?;
        read.map_err(|e| format!("read: {e}"))?;
        (sha256::hex(&back) == want)
            .then_some(())
            .ok_or_else(|| format!("{} bytes back of {}, or different", back.len(), 16 << 20))
    });
    let ping_pong = spawn("ping-pong", 20, |s, i, _| {
        let until = Instant::now() + Duration::from_millis(700);
        let mut k = 0;
        while Instant::now() < until && k < 20_000 {
            let msg = pattern(64, 5000 + i * 100_000 + k);
            let mut back = [0u8; 64];
            s.write_all(&msg).and_then(|_| s.read_exact(&mut back)).map_err(|e| format!("message {k}: {e}"))?;
            if back[..] != msg[..] {
                return Err(format!("message {k}: a different message came back"));
            }
            k += 1;
        }
        Ok(())
    });
    let load: Vec<_> = (0..3).map(&short).chain((0..2).map(&bulk)).chain((0..2).map(&ping_pong)).collect();
    let switcher = {
        let (done, cli) = (done.clone(), d.cli.clone());
        std::thread::spawn(move || {
            let mut switches = 0;
            for next in ["kernel", "userspace", "auto"].iter().cycle() {
                if done.load(Ordering::Acquire) || switches >= 100 {
                    break;
                }
                cli.ok(&["ip", "socks", "set", &format!("data-path={next}")]);
                switches += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            switches
        })
    };
    let results: Vec<_> = load.into_iter().map(|h| h.join().expect("a load thread panicked")).collect();
    done.store(true, Ordering::Release);
    let switches = switcher.join().unwrap();
    let mut served = std::collections::BTreeMap::new();
    for r in results {
        let (kind, n) = r.unwrap_or_else(|e| panic!("{e}"));
        *served.entry(kind).or_insert(0) += n;
    }
    eprintln!("{switches} switches; tunnels served: {served:?}");
    assert!(switches >= 15, "only {switches} switches during the load");
    for kind in ["short", "bulk", "ping-pong"] {
        assert!(served.get(kind).copied().unwrap_or(0) >= 2, "too few {kind} tunnels: {served:?}");
    }
    assert!(wait_until(Duration::from_secs(10), || d.cli.connections().is_empty()), "tunnels still listed");
    let mut after = open_files(d.pid());
    let settled = wait_until(Duration::from_secs(5), || {
        after = open_files(d.pid());
        after.sockets == before.sockets
    });
    assert!(settled, "sockets before the load {}, after {}", before.sockets, after.sockets);
    assert!(after.pipes <= before.pipes.max(64), "pipe descriptors: {} before, {} after", before.pipes, after.pipes);
    for map in ["FLOWS", "PEERS", "SOCKS", "SPLICE"] {
        let out = std::process::Command::new(&bpftool)
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin_dir.join(map))
            .output()
            .expect("run bpftool");
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "bpftool map dump {map}: {}", String::from_utf8_lossy(&out.stderr));
        let entries = dump.matches("\"key\"").count();
        let head: String = dump.chars().take(300).collect();
        assert_eq!(entries, 0, "{map} keeps {entries} entries after every tunnel ended: {head}");
    }
}

/// Descriptors a process holds, by kind.
struct OpenFiles {
    sockets: usize,
    pipes: usize,
}

fn open_files(pid: u32) -> OpenFiles {
    let mut files = OpenFiles { sockets: 0, pipes: 0 };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the daemon's descriptors").flatten() {
        match std::fs::read_link(entry.path()).map(|p| p.to_string_lossy().into_owned()) {
            Ok(l) if l.starts_with("socket:") => files.sockets += 1,
            Ok(l) if l.starts_with("pipe:") => files.pipes += 1,
            _ => {}
        }
    }
    files
}

/// Under `kernel` a tunnel whose client pours from its first byte (the bytes
/// follow the request at once and never pause) is spliced while they pour,
/// and every byte arrives in order with exact counters. Run twice: as it
/// comes, and with the hand-over before the splice made to find the pair
/// busy (`PROXYD_BPF_FAULTS=hand-over-busy`), which a sender that pours
/// faster than its reader reads does by itself: such a pair was relayed for
/// the rest of its life; it now goes to the relay with the re-promotion rule
/// and is spliced at the relay's first quiet moment (the sender pauses 5 ms
/// after every 16 MiB, so there is one).
#[test]
fn a_tunnel_that_pours_from_its_first_byte_is_spliced() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if !kernel_under_test("a_tunnel_that_pours_from_its_first_byte_is_spliced") {
        return;
    }
    let _alone = heavy();
    for fault in ["", "hand-over-busy"] {
        let env: Vec<(String, String)> =
            [("PROXYD_BPF_FAULTS".to_string(), fault.to_string())].into_iter().filter(|_| !fault.is_empty()).collect();
        let mut d = Daemon::start_with("kernel", Options { env, ..Default::default() });
        let metrics = format!("127.0.0.1:{}", free_port());
        let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
        let (l, dst) = listen_local();
        let block = Arc::new(pattern(1 << 20, 23));
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = TcpStream::connect(proxy).unwrap();
        // (The clone shares these: a wedged tunnel fails the test, never hangs it.)
        c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let writer = {
            let (mut c, block, stop) = (c.try_clone().unwrap(), block.clone(), stop.clone());
            std::thread::spawn(move || {
                c.write_all(&socks::request(1, dst, b"")).unwrap();
                // Bounded in time and in bytes (16 GiB).
                let until = Instant::now() + Duration::from_secs(10);
                let mut sent = 0u64;
                while !stop.load(Ordering::Acquire) && Instant::now() < until && sent < 16 << 30 {
                    c.write_all(&block).expect("the sender's write");
                    sent += block.len() as u64;
                    if sent.is_multiple_of(16 << 20) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                c.shutdown(Shutdown::Write).unwrap();
                sent
            })
        };
        let mut u = accept_timeout(&l, Duration::from_secs(10)).expect("accept");
        let reader = {
            let block = block.clone();
            std::thread::spawn(move || {
                u.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                loop {
                    let n = u.read(&mut buf).expect("the reader's read");
                    if n == 0 {
                        return (got, u);
                    }
                    let mut at = 0;
                    while at < n {
                        let off = (got % block.len() as u64) as usize;
                        let len = (n - at).min(block.len() - off);
                        assert!(buf[at..at + len] == block[off..off + len], "bytes out of order at {got}");
                        (at, got) = (at + len, got + len as u64);
                    }
                }
            })
        };
        let reply = socks::read_reply(&mut c).unwrap();
        assert_eq!(reply.code, 90, "{fault}: CONNECT refused");
        let spliced = wait_until(Duration::from_secs(8), || d.cli.connections().iter().any(|r| r.path == "kernel"));
        stop.store(true, Ordering::Release);
        let sent = writer.join().unwrap();
        let (got, _u) = reader.join().unwrap();
        let promoted = sample(&scrape(&metrics), "proxyd_tunnel_path_switches_total{switch=\"promoted\"}");
        eprintln!("fault {fault:?}: {} MiB sent; spliced while pouring: {spliced}; {promoted} promotions", sent >> 20);
        assert_eq!(got, sent, "{fault}: bytes lost or added");
        assert!(spliced, "{fault}: the pouring tunnel never entered the sockhash: {:?}", d.cli.connections());
        if !fault.is_empty() {
            assert!(promoted >= 1, "{fault}: spliced without the relay's promotion ({promoted})");
            assert!(d.log().contains("PROXYD_BPF_FAULTS is set"), "{fault}: the daemon did not say it injects faults");
        }
        let exact =
            wait_until(Duration::from_secs(5), || d.cli.connections().iter().any(|r| r.kind == "out" && r.tx == sent));
        assert!(exact, "{fault}: the counters are not tx={sent}: {:?}", d.cli.connections());
    }
}
