//! Hostile clients: 5,000 slow-loris handshakes do not delay an honest client, and a
//! flood of 20,000 connection attempts beyond `max-connections` never raises the count
//! above the limit, keeps memory bounded, and lets an honest client in as soon as a
//! slot frees.

use proxyd_tests::hardening::{loopback_source, rss_kib, serial};
use proxyd_tests::{
    accept_timeout, connect_from, data_paths, listen_local, socks, tcp_connect, wait_until, ConnPoller, Daemon,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// One honest CONNECT plus a byte each way; returns how long it took.
fn honest_round_trip(proxy: SocketAddr, l: &TcpListener, dst: SocketAddrV4) -> Duration {
    let t = Instant::now();
    let mut c = tcp_connect(proxy).expect("honest connect");
    c.write_all(&socks::request(socks::CONNECT, dst, b"honest")).unwrap();
    let r = socks::read_reply(&mut c).expect("honest reply");
    assert_eq!(r.code, socks::GRANTED, "honest client refused");
    let mut u = accept_timeout(l, Duration::from_secs(5)).expect("accept honest");
    c.write_all(b"h").unwrap();
    let mut b = [0u8; 1];
    u.read_exact(&mut b).unwrap();
    u.write_all(b"i").unwrap();
    c.read_exact(&mut b).unwrap();
    t.elapsed()
}

/// 5,000 clients sending their request one byte per second (10 threads x 500): an
/// honest client, measured 20 times while they trickle, gets its tunnel and a byte each
/// way within 100 ms every time; the handshake deadline then clears the slow ones.
#[test]
fn slowloris_does_not_delay_honest_client() {
    const SLOW: usize = 5_000;
    const THREADS: usize = 10;
    let _serial = serial();
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=6000"]);
        let (l, dst) = listen_local();
        // A request that takes about 30 s at one byte per second (the deadline is 10 s).
        let request = Arc::new(socks::request(socks::CONNECT, dst, b"slow-client-user-id-xx"));
        let ready = Arc::new(Barrier::new(THREADS + 1));
        let stop = Arc::new(AtomicBool::new(false));
        let connect_failures = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (request, ready, stop, fails) =
                    (request.clone(), ready.clone(), stop.clone(), connect_failures.clone());
                std::thread::spawn(move || {
                    let mut socks: Vec<TcpStream> = Vec::with_capacity(SLOW / THREADS);
                    for _ in 0..SLOW / THREADS {
                        match TcpStream::connect_timeout(&proxy, Duration::from_secs(5)) {
                            Ok(s) => {
                                s.set_nonblocking(true).unwrap();
                                socks.push(s);
                            }
                            Err(_) => {
                                fails.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    ready.wait();
                    // One byte per socket per second, for at most 14 s.
                    let start = Instant::now();
                    for i in 0..14 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if i < request.len() {
                            for s in &mut socks {
                                let _ = s.write(&request[i..i + 1]);
                            }
                        }
                        let next = start + Duration::from_secs(i as u64 + 1);
                        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    socks
                })
            })
            .collect();
        ready.wait();
        assert_eq!(connect_failures.load(Ordering::Relaxed), 0, "[{dp}] some slow clients could not connect");
        let all_in = wait_until(Duration::from_secs(5), || d.cli.connections().len() >= SLOW);
        let listed = d.cli.connections().len();
        assert!(all_in, "[{dp}] only {listed} of {SLOW} slow clients listed");

        // Honest clients while the slow ones trickle (about 4 s of measurements).
        let mut times = Vec::new();
        for _ in 0..20 {
            times.push(honest_round_trip(proxy, &l, dst));
            std::thread::sleep(Duration::from_millis(200));
        }
        let slow_listed = d.cli.connections().len();
        times.sort();
        eprintln!(
            "[{dp}] honest client with {slow_listed} slow clients: median {:?}, max {:?}",
            times[times.len() / 2],
            times[times.len() - 1]
        );
        assert!(
            slow_listed >= SLOW,
            "[{dp}] slow clients were dropped before the measurements ended ({slow_listed} left)"
        );
        assert!(
            times[times.len() - 1] < Duration::from_millis(100),
            "[{dp}] honest client took up to {:?} with {SLOW} slow clients: {times:?}",
            times[times.len() - 1]
        );

        // The 10 s handshake deadline clears them (they never finish their request).
        let cleared = wait_until(Duration::from_secs(15), || d.cli.connections().len() <= 1);
        let left = d.cli.connections().len();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            drop(t.join().unwrap());
        }
        assert!(cleared, "[{dp}] {left} slow clients still listed well past the handshake deadline");
    }
}

/// max-connections=50 with 50 tunnels held, then 20,000 connection attempts (8 threads,
/// from 8 loopback addresses): the listed count never exceeds 50 (polled during the
/// flood), RSS stays within 32 MiB of its start, an honest client gets in while the
/// flood runs once a slot frees (retrying: flood connections compete for the slot; at
/// the latest 2 s after the flood), and at once (within 100 ms) after it.
#[test]
fn flood_beyond_max_connections() {
    const MAX: usize = 50;
    const ATTEMPTS: usize = 20_000;
    const THREADS: usize = 8;
    let _serial = serial();
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[&format!("max-connections={MAX}")]);
        let (l, dst) = listen_local();
        let mut held: Vec<(TcpStream, TcpStream)> = (0..MAX)
            .map(|_| {
                let c = socks::connect(proxy, dst);
                let u = accept_timeout(&l, Duration::from_secs(5)).expect("accept held");
                (c, u)
            })
            .collect();
        assert_eq!(d.cli.connections().len(), MAX);
        let pid = d.pid();
        let rss0 = rss_kib(pid);
        let peak = Arc::new(AtomicU64::new(rss0));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let poller = ConnPoller::start(d.cli.clone(), Duration::from_millis(20));

        let done = Arc::new(AtomicUsize::new(0));
        let rejected = Arc::new(AtomicUsize::new(0));
        let proxy_v4 = match proxy {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let started = Instant::now();
        let flood: Vec<_> = (0..THREADS)
            .map(|t| {
                let (done, rejected) = (done.clone(), rejected.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(240);
                    for _ in 0..ATTEMPTS / THREADS {
                        if Instant::now() > deadline {
                            break;
                        }
                        if let Ok(mut s) = connect_from(loopback_source(t, THREADS), proxy_v4) {
                            if let socks::Answer::Reply(r) = socks::answer(&mut s, Duration::from_millis(300)) {
                                if r.code == socks::REJECTED {
                                    rejected.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();

        // Mid-flood: free one slot. A freed slot goes to whoever connects first, and the
        // flood connects thousands of times a second, so the honest client retries; it
        // must get in before the flood is over (or within 2 s after it ends).
        drop(held.pop());
        let t = Instant::now();
        let mut honest = None;
        let mut flood_over_at: Option<Instant> = None;
        while honest.is_none() && flood_over_at.is_none_or(|at| at.elapsed() < Duration::from_secs(2)) {
            if flood_over_at.is_none() && done.load(Ordering::Relaxed) >= ATTEMPTS {
                flood_over_at = Some(Instant::now());
            }
            assert!(t.elapsed() < Duration::from_secs(250), "flood threads stuck");
            let mut c = tcp_connect(proxy).expect("honest connect");
            c.write_all(&socks::request(socks::CONNECT, dst, b"honest")).unwrap();
            if let socks::Answer::Reply(r) = socks::answer(&mut c, Duration::from_secs(2)) {
                if r.code == socks::GRANTED {
                    honest = Some(c);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let during = t.elapsed();
        let honest = honest.unwrap_or_else(|| {
            panic!("[{dp}] honest client not admitted during the flood nor 2 s after it, with a slot free")
        });
        let in_during_flood = flood_over_at.is_none();
        let u = accept_timeout(&l, Duration::from_secs(5)).expect("accept honest");
        held.push((honest, u));

        for f in flood {
            f.join().unwrap();
        }
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        let snapshots = poller.take();
        drop(poller);
        let max_seen = snapshots.iter().map(|s| s.len()).max().unwrap_or(0);
        let peak = peak.load(Ordering::Relaxed);
        eprintln!(
            "[{dp}] {ATTEMPTS} attempts in {took:?}: {} answered 91, {} snapshots, max {max_seen} rows, \
             RSS {rss0} KiB -> peak {peak} KiB, honest client in after {during:?} of retries ({})",
            rejected.load(Ordering::Relaxed),
            snapshots.len(),
            if in_during_flood { "during the flood" } else { "after it" }
        );
        assert!(snapshots.len() >= 20, "[{dp}] too few connection snapshots ({})", snapshots.len());
        assert!(max_seen <= MAX, "[{dp}] {max_seen} connections listed with max-connections={MAX}");
        assert!(
            rejected.load(Ordering::Relaxed) >= ATTEMPTS * 9 / 10,
            "[{dp}] only {} of {ATTEMPTS} attempts got 91",
            rejected.load(Ordering::Relaxed)
        );
        assert!(peak <= rss0 + 32 * 1024, "[{dp}] RSS rose from {rss0} KiB to {peak} KiB during the flood");

        // After the flood: a freed slot is taken by the next honest client at once.
        assert!(wait_until(Duration::from_secs(5), || d.cli.connections().len() == MAX));
        drop(held.pop());
        assert!(wait_until(Duration::from_secs(5), || d.cli.connections().len() == MAX - 1));
        let mut c = tcp_connect(proxy).unwrap();
        let t = Instant::now();
        c.write_all(&socks::request(socks::CONNECT, dst, b"honest")).unwrap();
        let r = socks::read_reply(&mut c).expect("reply after the flood");
        assert_eq!(r.code, socks::GRANTED, "[{dp}] honest client refused with a free slot after the flood");
        assert!(t.elapsed() < Duration::from_millis(100), "[{dp}] honest client took {:?}", t.elapsed());
        drop(held);
    }
}
