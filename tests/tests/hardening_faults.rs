//! Network and process faults: an upstream that refuses, resets mid-stream or never
//! answers, a client that vanishes mid-transfer, 10,000 such tunnels without a leak of
//! files or memory, `kill -9` during transfers, and SIGTERM's drain with a grace period.

use proxyd_tests::hardening::{fd_count, refusing_port, rss_kib, serial, set_linger_zero, BlackholeNs};
use proxyd_tests::{accept_timeout, data_paths, listen_local, socks, tcp_connect, wait_until, Daemon, Options};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sends a CONNECT for `dst` and returns the reply code (None: closed without a reply).
fn connect_code(proxy: SocketAddr, dst: SocketAddrV4, timeout: Duration) -> Option<u8> {
    let mut c = tcp_connect(proxy).expect("connect to proxy");
    c.write_all(&socks::request(socks::CONNECT, dst, b"t")).expect("send CONNECT");
    match socks::answer(&mut c, timeout) {
        socks::Answer::Reply(r) => Some(r.code),
        socks::Answer::Closed { .. } => None,
        socks::Answer::Silent { got } => panic!("no answer within {timeout:?} (got {got:?})"),
    }
}

/// A port on 127.0.0.1 that refuses connections for the whole test run.
fn closed_port() -> SocketAddrV4 {
    static PORT: std::sync::OnceLock<(std::os::fd::OwnedFd, SocketAddrV4)> = std::sync::OnceLock::new();
    PORT.get_or_init(refusing_port).1
}

/// Waits until the connections list is empty; panics with the rows otherwise.
fn rows_leave(d: &Daemon, what: &str) {
    let gone = wait_until(Duration::from_secs(5), || d.cli.connections().is_empty());
    assert!(gone, "[{}] {what}: rows still listed after 5 s: {:?}", d.data_path, d.cli.connections());
}

/// An upstream that refuses (closed port) gets the client a 91, and no row stays.
#[test]
fn upstream_refuses_gets_91() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        for _ in 0..20 {
            assert_eq!(
                connect_code(proxy, closed_port(), Duration::from_secs(5)),
                Some(socks::REJECTED),
                "[{dp}] CONNECT to a closed port"
            );
        }
        rows_leave(&d, "after refused dials");
    }
}

/// Writes to `s` (through a clone) on a thread of its own for up to 10 s;
/// the thread returns whether a write failed (the peer went away) by then.
fn pour(s: &TcpStream) -> std::thread::JoinHandle<bool> {
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![0x5a; 16 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if writer.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    })
}

/// Reads at least 256 KiB from `s`: the tunnel carries the pour.
fn read_256k(s: &mut TcpStream, what: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 256 * 1024 {
        let n = s.read(&mut buf).expect(what);
        assert!(n > 0, "{what}: end of stream after {got} bytes");
        got += n;
    }
}

/// An upstream that resets mid-stream (SO_LINGER 0) makes the client see a reset or
/// close within 5 s while it is still sending, and the row leaves.
#[test]
fn upstream_reset_mid_stream() {
    for dp in data_paths() {
        // Debug logs: printed if the test fails (the tunnel's end is logged at debug).
        let debug = Options { env: vec![("PROXYD_LOG".into(), "debug".into())], ..Options::default() };
        let mut d = Daemon::start_with(dp, debug);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        for round in 0..5 {
            let (c, mut u) = socks::tunnel(proxy, &l, dst);
            let writing = pour(&c);
            read_256k(&mut u, "upstream read");
            u.write_all(b"half an answer").unwrap();
            set_linger_zero(&u);
            drop(u);
            let mut c = c;
            assert!(
                socks::closed_within(&mut c, Duration::from_secs(5)),
                "[{dp}] round {round}: client not closed 5 s after the upstream reset"
            );
            rows_leave(&d, "after upstream resets");
            assert!(
                writing.join().unwrap(),
                "[{dp}] round {round}: the client could still send 10 s after the upstream reset"
            );
        }
    }
}

/// A client that vanishes mid-transfer (reset while the upstream streams to it) makes
/// the upstream see a close within 5 s, and the row leaves.
#[test]
fn client_vanishes_mid_transfer() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        for (round, reset) in [true, false, true, false].into_iter().enumerate() {
            let (mut c, u) = socks::tunnel(proxy, &l, dst);
            let writing = pour(&u);
            read_256k(&mut c, "client read");
            if reset {
                set_linger_zero(&c);
            }
            drop(c); // unread bytes queued: the kernel resets either way
            assert!(
                writing.join().unwrap(),
                "[{dp}] round {round}: upstream could still send 10 s after the client vanished"
            );
            let mut u = u;
            assert!(socks::closed_within(&mut u, Duration::from_secs(5)));
            rows_leave(&d, "after the client vanished");
        }
    }
}

/// A destination that never answers (a namespace that drops the SYNs) gets the client
/// a 91 within the 10 s dial timeout (checked: between 9 and 13 s), and no row stays.
#[test]
fn upstream_never_answers_gets_91_within_dial_timeout() {
    let Some(ns) = BlackholeNs::create("upstream_never_answers_gets_91_within_dial_timeout") else {
        return;
    };
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        // Several at once: the dials run concurrently, not one after another.
        let started = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let dead = ns.dead(8000 + i);
                std::thread::spawn(move || {
                    let code = connect_code(proxy, dead, Duration::from_secs(20));
                    (code, started.elapsed())
                })
            })
            .collect();
        // Meanwhile an honest client is served at once.
        let (l, dst) = listen_local();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let (_c, _u) = socks::tunnel(proxy, &l, dst);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "[{dp}] honest client waited {:?} behind hanging dials",
            t.elapsed()
        );
        drop((_c, _u));
        for h in handles {
            let (code, after) = h.join().unwrap();
            assert_eq!(code, Some(socks::REJECTED), "[{dp}] blackholed CONNECT");
            assert!(
                after >= Duration::from_secs(9) && after <= Duration::from_secs(13),
                "[{dp}] blackholed CONNECT answered after {after:?}, want about the 10 s dial timeout"
            );
        }
        rows_leave(&d, "after blackholed dials");
    }
}

/// The kinds of tunnel the leak test mixes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Bytes both ways, then both close.
    Clean,
    /// CONNECT to a closed port: 91.
    Refused,
    /// The upstream resets mid-stream.
    UpstreamReset,
    /// The client resets mid-transfer.
    ClientVanishes,
}

/// Runs one tunnel of `kind` through `proxy`, the upstream being `l` (private to the
/// calling thread). Returns a description of what went wrong, if anything.
fn one_tunnel(proxy: SocketAddr, l: &TcpListener, dst: SocketAddrV4, kind: Kind) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{kind:?}: {what}: {e}");
    if let Kind::Refused = kind {
        let mut c = tcp_connect(proxy).map_err(|e| err("connect", e))?;
        c.write_all(&socks::request(socks::CONNECT, closed_port(), b"t")).map_err(|e| err("send", e))?;
        return match socks::answer(&mut c, Duration::from_secs(5)) {
            socks::Answer::Reply(r) if r.code == socks::REJECTED => Ok(()),
            other => Err(format!("Refused: got {other:?}")),
        };
    }
    let mut c = tcp_connect(proxy).map_err(|e| err("connect", e))?;
    c.write_all(&socks::request(socks::CONNECT, dst, b"t")).map_err(|e| err("send", e))?;
    let r = socks::read_reply(&mut c).map_err(|e| err("reply", e))?;
    if r.code != socks::GRANTED {
        return Err(format!("{kind:?}: reply {}", r.code));
    }
    let mut u = accept_timeout(l, Duration::from_secs(5)).ok_or(format!("{kind:?}: no accept"))?;
    let mut buf = [0u8; 4096];
    c.write_all(&[1u8; 1000]).map_err(|e| err("client write", e))?;
    u.read_exact(&mut buf[..1000]).map_err(|e| err("upstream read", e))?;
    u.write_all(&[2u8; 3000]).map_err(|e| err("upstream write", e))?;
    c.read_exact(&mut buf[..3000]).map_err(|e| err("client read", e))?;
    match kind {
        Kind::Clean => {
            drop(c);
            if !socks::closed_within(&mut u, Duration::from_secs(5)) {
                return Err("Clean: upstream not closed".into());
            }
        }
        Kind::UpstreamReset => {
            u.write_all(&[3u8; 2000]).map_err(|e| err("upstream write", e))?;
            set_linger_zero(&u);
            drop(u);
            if !socks::closed_within(&mut c, Duration::from_secs(5)) {
                return Err("UpstreamReset: client not closed".into());
            }
        }
        Kind::ClientVanishes => {
            u.write_all(&[4u8; 2000]).map_err(|e| err("upstream write", e))?;
            set_linger_zero(&c);
            drop(c);
            if !socks::closed_within(&mut u, Duration::from_secs(5)) {
                return Err("ClientVanishes: upstream not closed".into());
            }
        }
        Kind::Refused => unreachable!(),
    }
    Ok(())
}

/// Runs `total` mixed tunnels on `workers` threads; returns the failures (at most 20).
fn run_mixed(proxy: SocketAddr, total: usize, workers: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(300);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (next, failures) = (next.clone(), failures.clone());
            std::thread::spawn(move || {
                let (l, dst) = listen_local();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || Instant::now() > deadline {
                        break;
                    }
                    let kind = [Kind::Clean, Kind::Refused, Kind::UpstreamReset, Kind::ClientVanishes][i % 4];
                    if let Err(e) = one_tunnel(proxy, &l, dst, kind) {
                        let mut f = failures.lock().unwrap();
                        if f.len() < 20 {
                            f.push(format!("tunnel {i}: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(next.load(Ordering::Relaxed) >= total, "the tunnels did not finish within 300 s");
    let f = failures.lock().unwrap().clone();
    f
}

/// After 10,000 tunnels that end badly or well (clean, refused, upstream reset, client
/// reset, plus 8 blackholed dials when root), every row has left and the daemon's open
/// files are back at the baseline, its memory within 16 MiB of it.
#[test]
fn ten_thousand_faulty_tunnels_leave_no_leak() {
    let _serial = serial();
    let ns = BlackholeNs::create("ten_thousand_faulty_tunnels_leave_no_leak (blackhole part)");
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=1000"]);
        let pid = d.pid();
        // Warm up (allocator arenas, runtime threads), then take the baseline.
        let f = run_mixed(proxy, 400, 4);
        assert!(f.is_empty(), "[{dp}] warm-up failures: {f:#?}");
        rows_leave(&d, "after the warm-up");
        std::thread::sleep(Duration::from_millis(300));
        let (fd0, rss0) = (fd_count(pid), rss_kib(pid));

        let blackholed: Vec<_> = ns
            .as_ref()
            .map(|ns| {
                (0..8)
                    .map(|i| {
                        let dead = ns.dead(9000 + i);
                        std::thread::spawn(move || connect_code(proxy, dead, Duration::from_secs(20)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let started = Instant::now();
        let f = run_mixed(proxy, 10_000 - blackholed.len(), 6);
        let took = started.elapsed();
        for h in blackholed {
            assert_eq!(h.join().unwrap(), Some(socks::REJECTED), "[{dp}] blackholed CONNECT");
        }
        assert!(f.is_empty(), "[{dp}] failures among 10,000 tunnels: {f:#?}");
        rows_leave(&d, "after 10,000 tunnels");
        std::thread::sleep(Duration::from_millis(300));
        let (fd1, rss1) = (fd_count(pid), rss_kib(pid));
        eprintln!("[{dp}] 10,000 tunnels in {took:?}: fds {fd0} -> {fd1}, RSS {rss0} KiB -> {rss1} KiB");
        assert!(fd1 <= fd0 + 2, "[{dp}] open files grew from {fd0} to {fd1} after 10,000 tunnels (leak)");
        assert!(rss1 <= rss0 + 16 * 1024, "[{dp}] RSS grew from {rss0} KiB to {rss1} KiB after 10,000 tunnels");
    }
}

/// `kill -9` during four transfers: the clients see a close, the daemon starts again
/// on the same state (configuration identical), new tunnels work, and on the kernel
/// path the stale pins do not stop it and none are left after its clean stop.
#[test]
fn kill_9_during_transfers_then_restart() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=123", "connection-idle-timeout=1h"]);
        d.cmd("ip socks access add src-address=127.0.0.0/8 action=allow");
        d.cli_ok(&["ip", "socks", "access", "add", "action=deny", "comment=default deny"]);
        let before = d.export("");
        let (l, dst) = listen_local();
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        let mut pumps = Vec::new();
        for _ in 0..4 {
            let (c, mut u) = socks::tunnel(proxy, &l, dst);
            let st = stop.clone();
            pumps.push(std::thread::spawn(move || {
                let chunk = vec![7u8; 16 * 1024];
                let deadline = Instant::now() + Duration::from_secs(20);
                while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if u.write_all(&chunk).is_err() {
                        break;
                    }
                }
            }));
            clients.push(c);
        }
        // Transfers are running: read a little from each.
        let mut buf = vec![0u8; 64 * 1024];
        for c in &mut clients {
            let mut got = 0;
            while got < 100_000 {
                got += c.read(&mut buf).expect("transfer running");
            }
        }
        d.kill9();
        for (i, c) in clients.iter_mut().enumerate() {
            assert!(
                socks::closed_within(c, Duration::from_secs(5)),
                "[{dp}] transfer {i} not closed 5 s after kill -9"
            );
        }
        stop.store(true, Ordering::Relaxed);
        for p in pumps {
            p.join().unwrap();
        }
        if let Some(pin) = d.pin_dir() {
            let stale: Vec<_> = std::fs::read_dir(pin).map(|r| r.flatten().count()).into_iter().collect();
            eprintln!("[{dp}] pins left by kill -9 in {}: {stale:?}", pin.display());
        }
        d.restart();
        assert_eq!(d.export(""), before, "[{dp}] configuration differs after kill -9");
        let up = wait_until(Duration::from_secs(5), || TcpStream::connect(proxy).is_ok());
        assert!(up, "[{dp}] not listening on {proxy} after the restart");
        let mut c = socks::connect(proxy, dst);
        let mut u = accept_timeout(&l, Duration::from_secs(5)).expect("accept after restart");
        c.write_all(b"after restart").unwrap();
        let mut b = [0u8; 13];
        u.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"after restart");
        drop((c, u));
        let pin = d.pin_dir().map(|p| p.to_path_buf());
        assert!(d.stop(), "[{dp}] no clean exit after the restart:\n{}", d.log());
        if let Some(pin) = pin {
            let left: Vec<_> =
                std::fs::read_dir(&pin).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
            assert!(left.is_empty(), "[{dp}] pins left in {} after a clean stop: {left:?}", pin.display());
        }
    }
}

/// SIGHUP (a foreground `proxyd run` whose terminal closed) is a clean stop like
/// SIGTERM: new clients are refused, the open tunnel keeps working until it ends, the
/// daemon exits 0 and removes its control socket (the signal's default killed it at
/// once, dropping the tunnel and leaving the socket).
#[test]
fn sighup_is_a_clean_stop() {
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&[]);
    let (l, dst) = listen_local();
    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
    d.signal(libc::SIGHUP);
    let refused = wait_until(
        Duration::from_millis(500),
        || matches!(TcpStream::connect(proxy), Err(e) if e.kind() == ErrorKind::ConnectionRefused),
    );
    assert!(refused, "still accepting 500 ms after SIGHUP");
    c.write_all(b"still here").unwrap();
    let mut b = [0u8; 10];
    u.read_exact(&mut b).expect("the tunnel works after SIGHUP");
    drop(c);
    assert!(socks::closed_within(&mut u, Duration::from_secs(2)));
    drop(u);
    let st = d
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running after its tunnel ended\n{}", d.log()));
    assert!(st.success(), "exit status {st} after SIGHUP\n{}", d.log());
    assert!(!d.cli.control.exists(), "the control socket {} is left behind", d.cli.control.display());
}

/// SIGTERM with 100 open tunnels: new clients are refused at once (within
/// 500 ms), the open tunnels keep working, and the daemon exits 0 as soon as
/// the last one ends; tunnels still open when `--shutdown-grace 2s` runs out
/// are all closed and the daemon exits 0 then.
#[test]
fn sigterm_stops_accepting_and_drains() {
    const TUNNELS: usize = 100;
    for dp in data_paths() {
        let options = Options { args: vec!["--shutdown-grace".into(), "2s".into()], ..Options::default() };
        // The tunnels end within the grace period.
        let mut d = Daemon::start_with(dp, options.clone());
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let mut tunnels: Vec<_> = (0..TUNNELS).map(|_| socks::tunnel(proxy, &l, dst)).collect();
        let t = Instant::now();
        d.signal(libc::SIGTERM);
        let refused = wait_until(
            Duration::from_millis(500),
            || matches!(TcpStream::connect(proxy), Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        );
        assert!(refused, "[{dp}] still accepting 500 ms after SIGTERM");
        std::thread::sleep(Duration::from_millis(300));
        for (c, u) in &mut tunnels {
            c.write_all(b"still here").unwrap();
            let mut b = [0u8; 10];
            u.read_exact(&mut b).expect("tunnel works after SIGTERM");
            u.write_all(b"ok").unwrap();
            c.read_exact(&mut b[..2]).expect("tunnel works after SIGTERM");
        }
        assert!(d.wait_exit(Duration::from_millis(100)).is_none(), "[{dp}] exited with tunnels open");
        let last = tunnels.pop().unwrap();
        for (c, mut u) in tunnels {
            drop(c);
            assert!(socks::closed_within(&mut u, Duration::from_secs(2)));
        }
        assert!(d.wait_exit(Duration::from_millis(100)).is_none(), "[{dp}] exited with one tunnel open");
        let (c, mut u) = last;
        drop(c);
        assert!(socks::closed_within(&mut u, Duration::from_secs(2)));
        drop(u);
        let st = d
            .wait_exit(Duration::from_secs(3))
            .unwrap_or_else(|| panic!("[{dp}] still running after its last tunnel ended"));
        assert!(st.success(), "[{dp}] exit status {st} after SIGTERM\n{}", d.log());
        assert!(
            t.elapsed() < Duration::from_millis(1900),
            "[{dp}] exit took {:?}: it waited for the grace period instead of the tunnels",
            t.elapsed()
        );

        // The tunnels outlive the grace period.
        let mut d = Daemon::start_with(dp, options);
        let proxy = d.enable(&[]);
        let mut tunnels: Vec<_> = (0..TUNNELS).map(|_| socks::tunnel(proxy, &l, dst)).collect();
        let t = Instant::now();
        d.signal(libc::SIGTERM);
        let st =
            d.wait_exit(Duration::from_secs(6)).unwrap_or_else(|| panic!("[{dp}] did not exit after the grace period"));
        let took = t.elapsed();
        assert!(st.success(), "[{dp}] exit status {st} after the grace period\n{}", d.log());
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
            "[{dp}] exited {took:?} after SIGTERM with --shutdown-grace 2s"
        );
        for (i, (c, _u)) in tunnels.iter_mut().enumerate() {
            assert!(
                socks::closed_within(c, Duration::from_secs(2)),
                "[{dp}] tunnel {i} was not closed when the grace period ran out"
            );
        }
    }
}
