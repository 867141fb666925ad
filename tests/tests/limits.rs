//! `connection-idle-timeout` and `max-connections` on real tunnels.

use proxyd_tests::socks::{self, Answer};
use proxyd_tests::{accept_timeout, data_paths, listen_local, tcp_connect, wait_until, Daemon};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends one byte each way over a tunnel, panicking with `what` if it fails.
fn ping(c: &mut TcpStream, u: &mut TcpStream, what: &str) {
    let mut b = [0u8; 1];
    c.write_all(b"p").unwrap_or_else(|e| panic!("{what}: client write: {e}"));
    u.read_exact(&mut b).unwrap_or_else(|e| panic!("{what}: upstream read: {e}"));
    u.write_all(b"q").unwrap_or_else(|e| panic!("{what}: upstream write: {e}"));
    c.read_exact(&mut b).unwrap_or_else(|e| panic!("{what}: client read: {e}"));
}

/// Returns when `s` sees EOF/reset, or None if it is still open at `deadline`.
fn wait_closed(s: &mut TcpStream, deadline: Instant) -> Option<Instant> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
            Err(_) => return Some(Instant::now()),
        }
    }
}

/// connection-idle-timeout=2s closes an idle tunnel (both ends) within 3 s while a
/// tunnel carrying a byte every 300 ms stays up.
#[test]
fn idle_timeout_closes_idle_tunnel_keeps_busy_one() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["connection-idle-timeout=2s"]);
        let printed = d.cli_ok(&["ip", "socks", "print"]);
        assert!(printed.contains("connection-idle-timeout: 2s"), "idle timeout not shown as 2s:\n{printed}");
        let (l, dst) = listen_local();

        let mut busy_c = socks::connect(proxy, dst);
        let mut busy_u = accept_timeout(&l, Duration::from_secs(5)).expect("accept busy");
        let mut idle_c = socks::connect(proxy, dst);
        let idle_since = Instant::now();
        let mut idle_u = accept_timeout(&l, Duration::from_secs(5)).expect("accept idle");

        // Busy tunnel: one byte every 300 ms, client -> upstream, for 4.5 s, in a thread.
        let mut busy_c2 = busy_c.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for _ in 0..15 {
                if busy_c2.write_all(b"b").is_err() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            true
        });
        let closed_at = wait_closed(&mut idle_c, idle_since + Duration::from_secs(3));
        let Some(closed_at) = closed_at else {
            panic!("idle tunnel still open 3 s after its last byte (connection-idle-timeout=2s)");
        };
        let after = closed_at - idle_since;
        assert!(after >= Duration::from_millis(1800), "idle tunnel closed too early, after {after:?}");
        assert!(
            wait_closed(&mut idle_u, Instant::now() + Duration::from_secs(1)).is_some(),
            "idle tunnel closed towards the client but not towards the destination"
        );

        assert!(sender.join().unwrap(), "busy tunnel: client write failed");
        let mut got = [0u8; 15];
        busy_u.read_exact(&mut got).expect("busy tunnel lost bytes");
        assert_eq!(&got, b"bbbbbbbbbbbbbbb");
        ping(&mut busy_c, &mut busy_u, "busy tunnel after 4.5 s");
        let rows = d.cli.connections();
        assert_eq!(rows.len(), 1, "only the busy tunnel should be listed: {rows:?}");
        assert_eq!((rows[0].tx, rows[0].rx), (16, 1), "busy tunnel counters: {rows:?}");
    }
}

/// max-connections=3: three tunnels (one still handshaking) stay, the fourth client is
/// refused in under 1 s without reaching the destination, and a slot frees on close.
#[test]
fn max_connections_refuses_the_next_client_at_once() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=3"]);
        let (l, dst) = listen_local();
        let mut c1 = socks::connect(proxy, dst);
        let mut u1 = accept_timeout(&l, Duration::from_secs(5)).expect("accept 1");
        let mut c2 = socks::connect(proxy, dst);
        let mut u2 = accept_timeout(&l, Duration::from_secs(5)).expect("accept 2");
        // The third is still handshaking: connected, nothing sent yet.
        let mut c3 = tcp_connect(proxy).unwrap();
        assert!(
            wait_until(Duration::from_secs(3), || d.cli.connections().len() == 3),
            "three connections should be listed: {:?}",
            d.cli.connections()
        );

        let start = Instant::now();
        let refused = match tcp_connect(proxy) {
            Err(_) => Answer::Closed { got: vec![] },
            Ok(mut c4) => {
                let _ = c4.write_all(&socks::request(socks::CONNECT, dst, b"u"));
                socks::answer(&mut c4, Duration::from_secs(3))
            }
        };
        let took = start.elapsed();
        match &refused {
            Answer::Reply(r) => {
                assert_eq!(r.code, socks::REJECTED, "4th client was granted: {r:?}")
            }
            Answer::Closed { got } => {
                assert!(got.is_empty(), "4th client got a partial reply {got:?}")
            }
            Answer::Silent { .. } => panic!("4th client was neither refused nor closed within 3 s"),
        }
        assert!(took < Duration::from_secs(1), "4th client refused only after {took:?}");
        assert!(accept_timeout(&l, Duration::from_millis(300)).is_none(), "the refused client reached the destination");

        // The three are intact; the handshaking one can still finish.
        ping(&mut c1, &mut u1, "tunnel 1");
        ping(&mut c2, &mut u2, "tunnel 2");
        c3.write_all(&socks::request(socks::CONNECT, dst, b"u")).unwrap();
        let r = socks::read_reply(&mut c3).expect("reply for the handshaking 3rd client");
        assert_eq!(r.code, socks::GRANTED, "3rd client (handshaking when the 4th came) refused: {r:?}");
        let mut u3 = accept_timeout(&l, Duration::from_secs(5)).expect("accept 3");
        ping(&mut c3, &mut u3, "tunnel 3");

        // Closing one frees a slot.
        drop(c1);
        drop(u1);
        assert!(
            wait_until(Duration::from_secs(3), || d.cli.connections().len() == 2),
            "closed tunnel still counted: {:?}",
            d.cli.connections()
        );
        let mut c5 = socks::connect(proxy, dst);
        let mut u5 = accept_timeout(&l, Duration::from_secs(5)).expect("accept 5");
        ping(&mut c5, &mut u5, "tunnel after a slot freed");
    }
}

/// Over max-connections, a client whose first bytes are already queued when the daemon
/// accepts is refused in its own protocol: a SOCKS5 greeting gets "no acceptable
/// method" (05 FF), a SOCKS4 request 91; both end with a FIN, not a reset (which could
/// destroy the reply unread). The daemon is stopped (SIGSTOP) while the two connect
/// and send, so their bytes are queued before it accepts.
#[test]
fn over_the_limit_refusal_speaks_the_clients_protocol() {
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&["max-connections=1", "version=5"]);
    let (_l, dst) = listen_local();
    let _held = tcp_connect(proxy).unwrap();
    assert!(wait_until(Duration::from_secs(3), || d.cli.connections().len() == 1), "the first connection is listed");
    d.signal(libc::SIGSTOP);
    let sent = (|| -> std::io::Result<(TcpStream, TcpStream)> {
        let mut c5 = tcp_connect(proxy)?;
        c5.write_all(&[5, 1, 0])?;
        let mut c4 = tcp_connect(proxy)?;
        c4.write_all(&socks::request(socks::CONNECT, dst, b"u"))?;
        Ok((c5, c4))
    })();
    std::thread::sleep(Duration::from_millis(100));
    d.signal(libc::SIGCONT);
    let (mut c5, mut c4) = sent.expect("connect and send while the daemon is stopped");
    for (s, want, what) in
        [(&mut c5, vec![5u8, 0xff], "SOCKS5 greeting"), (&mut c4, vec![0, 91, 0, 0, 0, 0, 0, 0], "SOCKS4 request")]
    {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => assert_eq!(got, want, "{what} over the limit got {got:?}"),
            Err(e) => panic!("{what} over the limit: {e} after {got:?} (want {want:?} and a FIN)"),
        }
    }
}

/// Settings apply without a restart: a new port rebinds (the old one stops accepting),
/// `enabled=no` stops accepting, and open tunnels keep working through both.
#[test]
fn settings_apply_without_restart() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let old = d.enable(&[]);
        let (l, dst) = listen_local();
        let mut c = socks::connect(old, dst);
        let mut u = accept_timeout(&l, Duration::from_secs(5)).expect("accept");

        let new_port = proxyd_tests::free_port();
        d.cli_ok(&["ip", "socks", "set", &format!("port={new_port}")]);
        let new: std::net::SocketAddr = format!("127.0.0.1:{new_port}").parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(3), || tcp_connect(old).is_err()),
            "old port {old} still accepts after `set port={new_port}`"
        );
        let mut c2 = socks::connect(new, dst);
        let mut u2 = accept_timeout(&l, Duration::from_secs(5)).expect("accept via new port");
        ping(&mut c, &mut u, "tunnel opened before the port change");
        ping(&mut c2, &mut u2, "tunnel via the new port");

        d.cmd("ip socks set enabled=no");
        assert!(
            wait_until(Duration::from_secs(3), || tcp_connect(new).is_err()),
            "port {new} still accepts after `set enabled=no`"
        );
        ping(&mut c, &mut u, "old tunnel after enabled=no");
        ping(&mut c2, &mut u2, "new tunnel after enabled=no");
        assert_eq!(d.cli.connections().len(), 2, "open tunnels should stay listed after enabled=no");
    }
}

/// A new `listen-address` on the same port moves the listener (the new one is
/// bound while the old one still listens, so a refused change would leave the
/// old one as it was); open tunnels stay, and no other socket gets the port.
#[test]
fn listen_address_moves_on_the_same_port() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let port = proxy.port();
        let other: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        let (l, dst) = listen_local();
        let mut c = socks::connect(proxy, dst);
        let mut u = accept_timeout(&l, Duration::from_secs(5)).expect("accept");
        assert!(tcp_connect(other).is_err(), "{other} accepts while listen-address=127.0.0.1");

        d.cmd("ip socks set listen-address=0.0.0.0");
        let mut c2 = socks::connect(other, dst);
        let mut u2 = accept_timeout(&l, Duration::from_secs(5)).expect("accept via 0.0.0.0");
        ping(&mut c, &mut u, "tunnel opened before the move");
        ping(&mut c2, &mut u2, "tunnel via the moved listener");

        d.cmd("ip socks set listen-address=127.0.0.1");
        assert!(
            wait_until(Duration::from_secs(3), || tcp_connect(other).is_err()),
            "{other} still accepts after `set listen-address=127.0.0.1`"
        );
        let mut c3 = socks::connect(proxy, dst);
        let mut u3 = accept_timeout(&l, Duration::from_secs(5)).expect("accept after the move back");
        ping(&mut c3, &mut u3, "tunnel after the move back");
        ping(&mut c, &mut u, "first tunnel after both moves");
        let taken = std::net::TcpListener::bind(proxy);
        assert!(taken.is_err(), "another socket could bind {proxy} after the moves");
    }
}
