//! Bad input changes nothing and gets a clear answer: malformed SOCKS requests get reply
//! 91 or a close (and the next good client is served); bad CLI values exit 1 naming the
//! property, with the configuration unchanged.

use proxyd_tests::fixtures::EchoServer;
use proxyd_tests::socks::{self, Answer, BIND, CONNECT};
use proxyd_tests::{data_paths, listen_local, tcp_connect, text, wait_until, Daemon};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// How a malformed case is sent.
#[derive(Clone, Copy, Debug)]
enum Send {
    /// Send the bytes and keep the connection open: the proxy must answer by itself.
    KeepOpen,
    /// Send the bytes, then half-close (the client is done).
    ThenClose,
}

/// A good client gets a tunnel that echoes.
fn good_client_served(proxy: SocketAddr, echo: SocketAddrV4, after: &str) {
    let mut c = socks::connect(proxy, echo);
    c.write_all(b"still alive").unwrap();
    let mut b = [0u8; 11];
    c.read_exact(&mut b).unwrap_or_else(|e| panic!("after {after}: good client got no echo: {e}"));
    assert_eq!(&b, b"still alive");
}

/// A refused request whose client sent more than the daemon read (a 20 KiB user id with
/// no end, a request followed by bytes) gets its 91 and then a FIN, not a reset: closing
/// with unread bytes makes the kernel reset the connection, which can destroy the reply
/// before the client reads it.
#[test]
fn refusal_ends_in_a_fin_not_a_reset() {
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&[]);
    let server = EchoServer::start();
    let echo = server.addr;
    d.cli_ok(&["ip", "socks", "access", "add", &format!("dst-port={}", echo.port()), "action=deny"]);
    let mut long = socks::request(CONNECT, echo, b"");
    long.pop();
    long.extend(std::iter::repeat_n(b'u', 20 * 1024));
    let mut denied = socks::request(CONNECT, echo, b"u");
    denied.extend(std::iter::repeat_n(b'x', 8 * 1024));
    for (what, bytes) in [("a 20 KiB user id", long), ("a denied request and 8 KiB after it", denied)] {
        let mut c = tcp_connect(proxy).unwrap();
        c.write_all(&bytes).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert_eq!(got, [0, 91, 0, 0, 0, 0, 0, 0], "{what}: want 91 and a FIN"),
            Err(e) => panic!("{what}: {e} after {got:?} (want 91 and a FIN)"),
        }
    }
    assert_eq!(server.accepted(), 0, "a refused request reached the destination");
}

/// Table of malformed SOCKS4/4a requests: each gets reply 91 or a close, never 90 and
/// never silence; none reaches the destination; a good client is served after each.
#[test]
fn malformed_requests_get_91_or_close() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let server = EchoServer::start();
        let echo = server.addr;
        // A port where nothing listens (bound then dropped).
        let (dead_l, dead) = listen_local();
        drop(dead_l);

        let valid = socks::request(CONNECT, echo, b"user");
        let valid_4a = socks::request_4a(CONNECT, echo.port(), b"localhost", b"user");
        let mut cases: Vec<(String, Vec<u8>, Send)> = vec![
            (
                "version 3".into(),
                {
                    let mut v = valid.clone();
                    v[0] = 3;
                    v
                },
                Send::KeepOpen,
            ),
            (
                "version 0".into(),
                {
                    let mut v = valid.clone();
                    v[0] = 0;
                    v
                },
                Send::KeepOpen,
            ),
            ("HTTP request".into(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Send::KeepOpen),
            (
                "command 0".into(),
                {
                    let mut v = valid.clone();
                    v[1] = 0;
                    v
                },
                Send::KeepOpen,
            ),
            (
                "command 3".into(),
                {
                    let mut v = valid.clone();
                    v[1] = 3;
                    v
                },
                Send::KeepOpen,
            ),
            (
                "command 255".into(),
                {
                    let mut v = valid.clone();
                    v[1] = 255;
                    v
                },
                Send::KeepOpen,
            ),
            ("user id of 256 bytes".into(), socks::request(CONNECT, echo, &[b'a'; 256]), Send::KeepOpen),
            ("user id of 300 bytes".into(), socks::request(CONNECT, echo, &[b'a'; 300]), Send::KeepOpen),
            (
                "user id of 4096 bytes, no NUL".into(),
                {
                    let mut v = valid[..8].to_vec();
                    v.extend([b'x'; 4096]);
                    v
                },
                Send::KeepOpen,
            ),
            (
                "4a hostname of 256 bytes".into(),
                socks::request_4a(CONNECT, echo.port(), &[b'h'; 256], b"u"),
                Send::KeepOpen,
            ),
            (
                "4a hostname of 4096 bytes, no NUL".into(),
                {
                    let mut v =
                        socks::request(CONNECT, SocketAddrV4::new(Ipv4Addr::new(0, 0, 0, 9), echo.port()), b"u");
                    v.extend([b'h'; 4096]);
                    v
                },
                Send::KeepOpen,
            ),
            ("4a with an empty hostname".into(), socks::request_4a(CONNECT, echo.port(), b"", b"u"), Send::KeepOpen),
            (
                "4a without a hostname, then close".into(),
                socks::request(CONNECT, SocketAddrV4::new(Ipv4Addr::new(0, 0, 0, 1), echo.port()), b"u"),
                Send::ThenClose,
            ),
            (
                "4a unresolvable hostname".into(),
                socks::request_4a(CONNECT, echo.port(), b"no-such-host.invalid", b"u"),
                Send::KeepOpen,
            ),
            ("CONNECT to a closed port".into(), socks::request(CONNECT, dead, b"u"), Send::KeepOpen),
            (
                "garbage after a BIND request".into(),
                {
                    let mut v = socks::request(BIND, echo, b"u");
                    v.extend_from_slice(b"garbage!");
                    v
                },
                Send::KeepOpen,
            ),
        ];
        for k in 0..valid.len() {
            cases.push((
                format!("CONNECT truncated to {k} of {} bytes, then close", valid.len()),
                valid[..k].to_vec(),
                Send::ThenClose,
            ));
        }
        for k in 0..valid_4a.len() {
            cases.push((
                format!("4a CONNECT truncated to {k} of {} bytes, then close", valid_4a.len()),
                valid_4a[..k].to_vec(),
                Send::ThenClose,
            ));
        }

        let mut failures = Vec::new();
        for (name, bytes, how) in &cases {
            let before = server.accepted();
            let mut c = tcp_connect(proxy).unwrap();
            let _ = c.write_all(bytes);
            if let Send::ThenClose = how {
                let _ = c.shutdown(Shutdown::Write);
            }
            let ans = socks::answer(&mut c, Duration::from_secs(5));
            let ok = match &ans {
                Answer::Reply(r) => r.vn == 0 && r.code == socks::REJECTED,
                Answer::Closed { got } => got.is_empty(),
                Answer::Silent { .. } => false,
            };
            if !ok {
                failures.push(format!("{name} ({how:?}): {ans:?}"));
            }
            // The BIND case legitimately never dials; the others must not reach the echo server.
            std::thread::sleep(Duration::from_millis(20));
            if server.accepted() != before {
                failures.push(format!("{name}: reached the destination"));
            }
            drop(c);
            good_client_served(proxy, echo, name);
        }
        assert!(
            failures.is_empty(),
            "malformed requests not answered with 91/close ({dp}):\n  {}",
            failures.join("\n  ")
        );
        assert!(
            wait_until(Duration::from_secs(5), || d.cli.connections().is_empty()),
            "connections left over after the bad clients: {:?}",
            d.cli.connections()
        );
    }
}

/// Bad CLI values exit 1 with the property named on stderr; config and state file unchanged.
#[test]
fn bad_cli_values_are_refused() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        d.enable(&["max-connections=7"]);
        d.cmd("ip socks access add src-address=127.0.0.1 dst-port=21 action=allow");
        let export = d.export("");
        let state = std::fs::read(&d.state).unwrap();
        let cases: &[(&[&str], &str)] = &[
            (&["ip", "socks", "set", "port=0"], "port"),
            (&["ip", "socks", "set", "port=65536"], "port"),
            (&["ip", "socks", "set", "max-connections=0"], "max-connections"),
            (&["ip", "socks", "set", "max-connections=1000001"], "max-connections"),
            (&["ip", "socks", "set", "enabled=perhaps"], "enabled"),
            (&["ip", "socks", "set", "connection-idle-timeout=5x"], "connection-idle-timeout"),
            (&["ip", "socks", "set", "max-connections=5", "port=0"], "port"),
            (&["ip", "socks", "access", "add", "action=maybe"], "action"),
            (&["ip", "socks", "access", "add", "src-address=1.2.3.4/33"], "src-address"),
            (&["ip", "socks", "access", "add", "dst-address=300.1.1.1"], "dst-address"),
            (&["ip", "socks", "access", "add", "dst-port=9-1"], "dst-port"),
            (&["ip", "socks", "access", "add", "src-port=0-70000"], "src-port"),
            (&["ip", "socks", "access", "set", "0", "dst-port=9-1"], "dst-port"),
            (&["ip", "socks", "access", "set", "0", "action=maybe"], "action"),
            // A stored hash that makes every login attempt cost seconds of a core.
            (
                &[
                    "ip",
                    "socks",
                    "users",
                    "add",
                    "name=slow",
                    "password-hash=$pbkdf2-sha256$i=200000000,l=32$c2FsdHNhbHRzYWx0$Ul9bpYOEsn4X0dy8U5k7dx3xQ5f5Fv3nhUq2kIYrZSE",
                ],
                "password-hash",
            ),
            // A password next to a hash (one would silently win), a property given twice.
            (
                &[
                    "ip",
                    "socks",
                    "users",
                    "add",
                    "name=x",
                    "password=typed",
                    "password-hash=$pbkdf2-sha256$i=10000,l=32$c2FsdHNhbHRzYWx0$Ul9bpYOEsn4X0dy8U5k7dx3xQ5f5Fv3nhUq2kIYrZSE",
                ],
                "password-hash",
            ),
            (&["ip", "socks", "access", "add", "dst-port=21", "dst-port=22"], "dst-port"),
            (&["ip", "socks", "set", "max-connections=5", "max-connections=6"], "max-connections"),
        ];
        let mut failures = Vec::new();
        for (args, prop) in cases {
            let out = d.cli(args);
            let err = text(&out.stderr);
            if out.status.code() != Some(1) {
                failures.push(format!(
                    "`proxyd {}`: exit {:?}, want 1 (stderr: {err:?})",
                    args.join(" "),
                    out.status.code()
                ));
            }
            if !err.contains(prop) {
                failures.push(format!("`proxyd {}`: stderr does not name `{prop}`: {err:?}", args.join(" ")));
            }
            let now = d.export("");
            if now != export {
                failures.push(format!("`proxyd {}` changed the configuration:\n{now}", args.join(" ")));
            }
        }
        // Usage errors (unknown command or menu) exit 2 and change nothing either.
        for args in [&["ip", "socks", "frobnicate"][..], &["ip", "fire", "print"][..]] {
            let out = d.cli(args);
            if out.status.code() != Some(2) {
                failures.push(format!(
                    "`proxyd {}`: exit {:?}, want 2 (usage error)",
                    args.join(" "),
                    out.status.code()
                ));
            }
        }
        if d.export("") != export {
            failures.push("a usage error changed the configuration".into());
        }
        assert!(failures.is_empty(), "bad CLI values ({dp}):\n  {}", failures.join("\n  "));
        assert_eq!(std::fs::read(&d.state).unwrap(), state, "a refused command rewrote the state file");
        // The daemon still answers and serves after all this.
        let printed = d.cli_ok(&["ip", "socks", "print"]);
        assert!(printed.contains("max-connections: 7"), "{printed}");
        assert!(tcp_connect(d.addr()).is_ok(), "proxy no longer listens");
    }
}
