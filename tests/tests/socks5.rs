//! SOCKS5 (issue 7, "Done when" 1-4): curl over IPv4 and IPv6 with and without a
//! login, RFC 1929 refusals that never log the password, UDP ASSOCIATE with PySocks and
//! a raw client (third addresses are not relayed), `version`, `auth-method`,
//! `only-one`, `rate-limit`, and every new property printed, exported and restored.
//!
//! The raw SOCKS5 client, the HTTP server on any address (the shared one is IPv4-only),
//! the UDP echo server and the bulk source/sink live here, not in `src/`, because only
//! this file uses them.

use proxyd_tests::fixtures::{curl, HttpServer};
use proxyd_tests::socks as socks4;
use proxyd_tests::{
    accept_timeout, data_paths, pattern, require_program, require_python_module, run_with_timeout, sha256, tcp_connect,
    text, wait_until, Daemon, Options,
};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Passwords distinctive enough that finding them in a log or a file is no accident.
const ALICE_PW: &str = "Alice-c0rrect-H0rse-7q";
const WRONG_PW: &str = "Wr0ng-Batt3ry-Stapl3-9z";
const BOB_PW: &str = "B0b-Tr0ub4dor-3x";
const CAROL_PW: &str = "C4rol-Pa55phrase-2k";

/// Like [`Daemon::enable`] but with `listen-address=::` (IPv4 and IPv6), on a port
/// that was free on every address (the harness's `free_port` checks 127.0.0.1 only, and
/// a dual-stack bind also collides with `[::1]:P` and connected sockets on port P);
/// retries with another port when the bind still loses a race.
fn enable_dual(d: &mut Daemon, extra: &[&str]) -> u16 {
    let mut last = String::new();
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("[::]:0").unwrap().local_addr().unwrap().port();
        let accepts = [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))];
        match d.try_enable("::", port, extra, &accepts) {
            Ok(()) => return port,
            Err(e) => last = e,
        }
    }
    panic!("cannot enable proxyd on listen-address=:: (5 ports tried): {last}");
}

// ---------------------------------------------------------------------------------
// A raw SOCKS5 client (RFC 1928 / RFC 1929), byte by byte.
// ---------------------------------------------------------------------------------

const CMD_CONNECT: u8 = 1;
const CMD_UDP: u8 = 3;

/// A SOCKS5 destination.
#[derive(Clone, Debug)]
enum Dst {
    Ip(SocketAddr),
    Name(String, u16),
}

/// `ATYP ADDR PORT`.
fn addr_bytes(d: &Dst) -> Vec<u8> {
    let mut v = Vec::new();
    match d {
        Dst::Ip(SocketAddr::V4(a)) => {
            v.push(1);
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        Dst::Ip(SocketAddr::V6(a)) => {
            v.push(4);
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        Dst::Name(h, p) => {
            v.push(3);
            v.push(h.len() as u8);
            v.extend_from_slice(h.as_bytes());
            v.extend_from_slice(&p.to_be_bytes());
        }
    }
    v
}

/// Reads `ATYP ADDR PORT` with an IP address (what replies and relayed datagrams carry).
fn read_addr(r: &mut impl Read) -> std::io::Result<SocketAddr> {
    let mut atyp = [0u8; 1];
    r.read_exact(&mut atyp)?;
    let ip = match atyp[0] {
        1 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            r.read_exact(&mut b)?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        t => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("address type {t} in a reply"))),
    };
    let mut p = [0u8; 2];
    r.read_exact(&mut p)?;
    Ok(SocketAddr::new(ip, u16::from_be_bytes(p)))
}

/// Sends the greeting; the 2-byte method reply, or None when the proxy closed first.
fn greet(s: &mut TcpStream, methods: &[u8]) -> Option<[u8; 2]> {
    let mut m = vec![5, methods.len() as u8];
    m.extend_from_slice(methods);
    s.write_all(&m).ok()?;
    let mut b = [0u8; 2];
    s.read_exact(&mut b).ok().map(|_| b)
}

/// Sends RFC 1929 credentials; the 2-byte status, or None when the proxy closed first.
fn login(s: &mut TcpStream, user: &str, pass: &str) -> Option<[u8; 2]> {
    let mut m = vec![1, user.len() as u8];
    m.extend_from_slice(user.as_bytes());
    m.push(pass.len() as u8);
    m.extend_from_slice(pass.as_bytes());
    s.write_all(&m).ok()?;
    let mut b = [0u8; 2];
    s.read_exact(&mut b).ok().map(|_| b)
}

/// Sends a request and reads the reply: (REP, BND.ADDR).
fn request(s: &mut TcpStream, cmd: u8, dst: &Dst) -> std::io::Result<(u8, SocketAddr)> {
    let mut m = vec![5, cmd, 0];
    m.extend_from_slice(&addr_bytes(dst));
    s.write_all(&m)?;
    let mut head = [0u8; 3];
    s.read_exact(&mut head)?;
    assert_eq!((head[0], head[2]), (5, 0), "malformed SOCKS5 reply head {head:?}");
    Ok((head[1], read_addr(s)?))
}

/// Greets (no-auth, or username/password when `auth` is given) and sends `cmd` for
/// `dst`; the open stream and the reply (REP, BND.ADDR), or what went wrong.
fn handshake(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    cmd: u8,
    dst: &Dst,
) -> Result<(TcpStream, u8, SocketAddr), String> {
    let mut s = tcp_connect(proxy).map_err(|e| format!("connect to {proxy}: {e}"))?;
    let method = if auth.is_some() { 2 } else { 0 };
    match greet(&mut s, &[method]) {
        Some([5, m]) if m == method => {}
        other => return Err(format!("method reply {other:?} (want [5, {method}])")),
    }
    if let Some((u, p)) = auth {
        match login(&mut s, u, p) {
            Some([1, 0]) => {}
            other => return Err(format!("login as {u}: status {other:?}")),
        }
    }
    let (rep, bound) = request(&mut s, cmd, dst).map_err(|e| format!("request {dst:?}: {e}"))?;
    Ok((s, rep, bound))
}

/// A granted CONNECT tunnel to `dst`; panics otherwise.
fn connect(proxy: SocketAddr, auth: Option<(&str, &str)>, dst: &Dst) -> TcpStream {
    let (s, rep, _) =
        handshake(proxy, auth, CMD_CONNECT, dst).unwrap_or_else(|e| panic!("SOCKS5 CONNECT {dst:?} via {proxy}: {e}"));
    assert_eq!(rep, 0, "SOCKS5 CONNECT {dst:?} via {proxy}: reply {rep}");
    s
}

/// The reply code of a CONNECT to `dst` (no auth).
fn connect_reply(proxy: SocketAddr, dst: &Dst) -> u8 {
    let (_, rep, _) =
        handshake(proxy, None, CMD_CONNECT, dst).unwrap_or_else(|e| panic!("SOCKS5 CONNECT {dst:?} via {proxy}: {e}"));
    rep
}

/// GET / over an open tunnel; the body.
fn http_get(mut s: TcpStream) -> Vec<u8> {
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read the HTTP answer");
    let at = all.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP head");
    all.split_off(at + 4)
}

// ---------------------------------------------------------------------------------
// Destination servers.
// ---------------------------------------------------------------------------------

/// A UDP echo server on 127.0.0.1 that counts the datagrams it got.
struct UdpEcho {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    fn start() -> UdpEcho {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp echo");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = s.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (received.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut b = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok((n, from)) = s.recv_from(&mut b) {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = s.send_to(&b[..n], from);
                }
            }
        });
        UdpEcho { addr, received, stop, thread: Some(thread) }
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listener that, for one connection, sends `len` bytes as fast as it can and closes.
fn bulk_source(len: usize) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let Some(mut c) = accept_timeout(&l, Duration::from_secs(10)) else {
            return;
        };
        c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let data = pattern(len, 8);
        let _ = c.write_all(&data);
        let _ = c.shutdown(Shutdown::Write);
    });
    (addr, t)
}

/// A listener that, for one connection, reads to EOF; it returns the byte count and
/// when the last byte arrived.
fn bulk_sink() -> (SocketAddr, JoinHandle<(usize, Instant)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut c = accept_timeout(&l, Duration::from_secs(10)).expect("sink: no connection");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (mut n, mut last) = (0, Instant::now());
        let mut b = vec![0u8; 65536];
        while let Ok(k) = c.read(&mut b) {
            if k == 0 {
                break;
            }
            n += k;
            last = Instant::now();
        }
        (n, last)
    });
    (addr, t)
}

/// Lines of the daemon's log that say a tunnel closed (debug level).
fn tunnels_closed(d: &Daemon) -> Vec<String> {
    d.log().lines().filter(|l| l.contains("tunnel closed")).map(str::to_string).collect()
}

// ---------------------------------------------------------------------------------
// Done when 1: curl over IPv4 and IPv6, with and without a login; wrong passwords.
// ---------------------------------------------------------------------------------

/// curl --socks5 and --socks5-hostname, with and without --proxy-user, fetch intact
/// bodies from HTTP servers on 127.0.0.1 and [::1] via a proxy reached on both families.
#[test]
fn curl_socks5_fetches_over_ipv4_and_ipv6() {
    let test = "curl_socks5_fetches_over_ipv4_and_ipv6";
    if require_program(test, "curl").is_none() {
        return;
    }
    let body4 = pattern(300_000, 51);
    let body6 = pattern(250_000, 52);
    let http4 = HttpServer::start(body4.clone());
    let http6 = HttpServer::start_on("[::1]:0", body6.clone());
    let targets = [(http4.url("127.0.0.1"), &body4), (http4.url("localhost"), &body4), (http6.url("[::1]"), &body6)];
    for dp in data_paths() {
        // Tunnel summaries are logged at debug.
        let log = Options {
            env: vec![("PROXYD_LOG".into(), "info,proxyd::server::conn=debug".into())],
            ..Default::default()
        };
        let mut d = Daemon::start_with(dp, log);
        let port = enable_dual(&mut d, &["version=5"]);
        let proxies = [format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
        let fetch = |flag: &str, proxy: &str, url: &str, user: Option<&str>| {
            let mut args = vec!["-sS", "--max-time", "20", flag, proxy];
            if let Some(u) = user {
                args.extend_from_slice(&["--proxy-user", u]);
            }
            args.push(url);
            curl(&args, T)
        };
        let creds = format!("alice:{ALICE_PW}");
        for login in [None, Some(creds.as_str())] {
            if login.is_some() {
                d.cli_ok(&["ip", "socks", "users", "add", "name=alice", &format!("password={ALICE_PW}")]);
                d.cmd("ip socks set auth-method=password");
            }
            for proxy in &proxies {
                for flag in ["--socks5", "--socks5-hostname"] {
                    for (url, body) in &targets {
                        let what = format!("[{dp}] curl {flag} {proxy} user={login:?} {url}");
                        let before = tunnels_closed(&d).len();
                        let (code, out, err) = fetch(flag, proxy, url, login);
                        assert_eq!(code, Some(0), "{what} failed: {err}\n{}", d.log());
                        assert_eq!(
                            sha256::hex(&out),
                            sha256::hex(body),
                            "{what}: body differs ({} bytes, want {})",
                            out.len(),
                            body.len()
                        );
                        // The fetch went through proxyd (and as alice when logged in).
                        let seen = wait_until(Duration::from_secs(5), || {
                            let lines = tunnels_closed(&d);
                            lines.len() > before
                                && (login.is_none() || lines[before..].iter().any(|l| l.contains("\"alice\"")))
                        });
                        assert!(seen, "{what}: proxyd logged no tunnel (for alice) for it:\n{}", d.log());
                    }
                }
            }
        }
        // With auth-method=password a client without a login gets nowhere.
        let before = http4.accepted();
        let (code, _, _) = fetch("--socks5", &proxies[0], &targets[0].0, None);
        assert_ne!(code, Some(0), "[{dp}] curl without --proxy-user got through auth-method=password");
        assert_eq!(http4.accepted(), before, "[{dp}] an unauthenticated request reached the server");
    }
}

/// A wrong password or unknown user gets RFC 1929 status [1, non-zero] and a close;
/// the log names the user but never contains a password (even at PROXYD_LOG=trace).
#[test]
fn wrong_password_is_refused_and_logged_without_it() {
    let test = "wrong_password_is_refused_and_logged_without_it";
    let http = HttpServer::start(b"secret page".to_vec());
    let dst = Dst::Ip(http.local);
    for dp in data_paths() {
        for level in ["info", "trace"] {
            let opts = Options { env: vec![("PROXYD_LOG".into(), level.into())], ..Options::default() };
            let mut d = Daemon::start_with(dp, opts);
            let proxy = d.enable(&["version=5", "auth-method=password"]);
            d.cli_ok(&["ip", "socks", "users", "add", "name=alice", &format!("password={ALICE_PW}")]);
            let log_start = d.log().len();
            for (user, pass) in [("alice", WRONG_PW), ("mallory", WRONG_PW), ("alice", "")] {
                let mut s = tcp_connect(proxy).unwrap();
                assert_eq!(greet(&mut s, &[2]), Some([5, 2]), "[{dp}] method reply");
                let st = login(&mut s, user, pass);
                assert!(
                    matches!(st, Some([1, x]) if x != 0),
                    "[{dp}] login {user}/{pass:?}: want RFC 1929 status [1, non-zero], got {st:?}"
                );
                assert!(
                    socks4::closed_within(&mut s, Duration::from_secs(5)),
                    "[{dp}] the proxy keeps a failed login's connection open"
                );
                let named =
                    wait_until(Duration::from_secs(5), || d.log()[log_start..].lines().any(|l| l.contains(user)));
                assert!(named, "[{dp}] no log line names the failed user {user}:\n{}", d.log());
            }
            // A name with a line break cannot forge a log line: it is logged escaped.
            let mut s = tcp_connect(proxy).unwrap();
            assert_eq!(greet(&mut s, &[2]), Some([5, 2]), "[{dp}] method reply");
            assert!(matches!(login(&mut s, "eve\nFORGED-LINE", WRONG_PW), Some([1, x]) if x != 0));
            let escaped = wait_until(Duration::from_secs(5), || d.log()[log_start..].contains("eve\\nFORGED-LINE"));
            assert!(escaped, "[{dp}] the user name with a line break is not logged escaped:\n{}", d.log());
            let forged = d.log()[log_start..].lines().any(|l| l.starts_with("FORGED-LINE"));
            assert!(!forged, "[{dp}] a client's user name started a log line:\n{}", d.log());
            if require_program(test, "curl").is_some() {
                let (code, _, err) = curl(
                    &[
                        "-sS",
                        "--max-time",
                        "10",
                        "--socks5",
                        &proxy.to_string(),
                        "--proxy-user",
                        &format!("alice:{WRONG_PW}"),
                        &http.url("127.0.0.1"),
                    ],
                    T,
                );
                assert_ne!(code, Some(0), "[{dp}] curl with a wrong password got through");
                assert!(err.contains("rejected") || code == Some(97), "[{dp}] curl: {err}");
            }
            // The right password still works: the failures were about the password.
            let s = connect(proxy, Some(("alice", ALICE_PW)), &dst);
            assert_eq!(http_get(s), b"secret page");
            assert_eq!(http.accepted(), 1, "[{dp}] a refused login reached the server");
            http.accepted.store(0, Ordering::SeqCst);
            d.stop();
            let log = d.log();
            for pw in [WRONG_PW, ALICE_PW] {
                assert!(!log.contains(pw), "[{dp}] PROXYD_LOG={level}: the log contains the password {pw}:\n{log}");
            }
        }
    }
    let _ = test;
}

// ---------------------------------------------------------------------------------
// Done when 2: UDP ASSOCIATE.
// ---------------------------------------------------------------------------------

const PYSOCKS_UDP: &str = r#"
import sys, socket, socks
pport, eport, user, pw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.set_proxy(socks.SOCKS5, "127.0.0.1", pport, username=user or None, password=pw or None)
for i in range(8):
    msg = ("ping %d " % i).encode() + bytes(range(256)) * (i * 5)
    s.sendto(msg, ("127.0.0.1", eport))
    data, addr = s.recvfrom(65535)
    assert data == msg, "datagram %d came back different (%d bytes, want %d)" % (i, len(data), len(msg))
    assert tuple(addr) == ("127.0.0.1", eport), "datagram %d from %r" % (i, addr)
s.close()
print("ok")
"#;

/// PySocks (socksocket SOCK_DGRAM) sends datagrams through a UDP association to an
/// echo server and gets each one back intact, without and with a login.
#[test]
fn udp_associate_round_trip_with_pysocks() {
    if !require_python_module("udp_associate_round_trip_with_pysocks", "socks", "python3-socks") {
        return;
    }
    let echo = UdpEcho::start();
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5"]);
        for login in [false, true] {
            let (user, pw) = if login {
                d.cli_ok(&["ip", "socks", "users", "add", "name=alice", &format!("password={ALICE_PW}")]);
                d.cmd("ip socks set auth-method=password");
                ("alice", ALICE_PW)
            } else {
                ("", "")
            };
            let before = echo.received();
            let out = run_with_timeout(
                Command::new("/usr/bin/python3").args([
                    "-c",
                    PYSOCKS_UDP,
                    &proxy.port().to_string(),
                    &echo.addr.port().to_string(),
                    user,
                    pw,
                ]),
                T,
            );
            assert!(
                out.status.success() && text(&out.stdout).contains("ok"),
                "[{dp}] PySocks UDP (login={login}) failed: {}{}\n{}",
                text(&out.stdout),
                text(&out.stderr),
                d.log()
            );
            assert_eq!(echo.received() - before, 8, "[{dp}] the echo server did not get 8 datagrams");
        }
    }
}

/// Wraps a payload in the SOCKS5 UDP header for `dst`.
fn udp_wrap(dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0];
    v.extend_from_slice(&addr_bytes(&Dst::Ip(dst)));
    v.extend_from_slice(payload);
    v
}

/// The next datagram on `s` within its read timeout, if any.
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut b = vec![0u8; 65536];
    s.recv_from(&mut b).ok().map(|(n, from)| (b[..n].to_vec(), from))
}

/// Sends `payload` to `dst` through the relay and checks that it comes back wrapped
/// with `dst` as its source.
fn udp_round_trip(client: &UdpSocket, relay: SocketAddr, dst: SocketAddr, payload: &[u8], what: &str) {
    client.send_to(&udp_wrap(dst, payload), relay).unwrap();
    let (got, from) = recv(client).unwrap_or_else(|| panic!("{what}: no answer through the relay {relay}"));
    assert_eq!(from, relay, "{what}: answer not from the relay");
    let mut r = &got[..];
    let mut head = [0u8; 3];
    r.read_exact(&mut head).unwrap();
    assert_eq!(head, [0, 0, 0], "{what}: UDP header");
    assert_eq!(read_addr(&mut r).unwrap(), dst, "{what}: wrong source in the UDP header");
    assert_eq!(r, payload, "{what}: payload differs");
}

/// Raw client: a round trip works; datagrams a third address sends to the relay (raw,
/// or SOCKS-wrapped for the echo server) reach neither the client nor the echo server;
/// the association dies with its TCP connection.
#[test]
fn udp_relay_ignores_third_addresses_and_dies_with_tcp() {
    let echo = UdpEcho::start();
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5"]);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let declared = Dst::Ip(client.local_addr().unwrap());
        let (ctl, rep, relay) =
            handshake(proxy, None, CMD_UDP, &declared).unwrap_or_else(|e| panic!("[{dp}] UDP ASSOCIATE: {e}"));
        assert_eq!(rep, 0, "[{dp}] UDP ASSOCIATE refused");
        assert!(
            relay.port() != 0 && relay.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST),
            "[{dp}] relay address {relay} is not usable by a 127.0.0.1 client"
        );
        udp_round_trip(&client, relay, echo.addr, b"hello through the relay", &format!("[{dp}] first"));
        let rows = d.cli.connections();
        assert!(rows.iter().any(|r| r.kind == "udp"), "[{dp}] no udp row while associated: {rows:?}");

        // Third addresses: another port on the client's IP, and another IP.
        let thirds: Vec<UdpSocket> = ["127.0.0.1:0", "127.0.0.2:0"]
            .iter()
            .map(|a| {
                let s = UdpSocket::bind(a).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
                s
            })
            .collect();
        let echo_before = echo.received();
        for t in &thirds {
            let me = t.local_addr().unwrap();
            // Raw bytes, as if it were a peer answering the client.
            t.send_to(format!("intruder {me}").as_bytes(), relay).unwrap();
            // Wrapped, as if it were the client: must not be relayed to the echo server.
            t.send_to(&udp_wrap(echo.addr, format!("spoof {me}").as_bytes()), relay).unwrap();
            // Wrapped for the client's own address.
            t.send_to(&udp_wrap(client.local_addr().unwrap(), b"spoof2"), relay).unwrap();
        }
        // The client itself, to the unspecified address (which reaches this host).
        let nowhere = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), echo.addr.port());
        client.send_to(&udp_wrap(nowhere, b"to 0.0.0.0"), relay).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        client.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        if let Some((got, from)) = recv(&client) {
            panic!("[{dp}] a datagram from a third address reached the client from {from}: {:?}", text(&got));
        }
        for t in &thirds {
            if let Some((got, from)) = recv(t) {
                panic!("[{dp}] third socket {:?} got {:?} from {from}", t.local_addr(), text(&got));
            }
        }
        assert_eq!(
            echo.received(),
            echo_before,
            "[{dp}] the relay forwarded a third address's datagram, or one for 0.0.0.0, to the echo server"
        );

        // The association still serves its client.
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        udp_round_trip(&client, relay, echo.addr, &pattern(1400, 9), &format!("[{dp}] after the intruders"));

        // Closing the TCP connection ends the association.
        drop(ctl);
        assert!(
            wait_until(Duration::from_secs(5), || d.cli.connections().is_empty()),
            "[{dp}] the udp row outlives its TCP connection: {:?}",
            d.cli.connections()
        );
        let before = echo.received();
        client.send_to(&udp_wrap(echo.addr, b"after close"), relay).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(echo.received(), before, "[{dp}] the relay still forwards after its TCP connection closed");
        client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        assert!(recv(&client).is_none(), "[{dp}] an answer came after the association ended");
    }
}

// ---------------------------------------------------------------------------------
// Done when 3: version, auth-method, only-one, rate-limit.
// ---------------------------------------------------------------------------------

/// Malformed SOCKS5 requests get exactly one reply with the RFC 1928 code (07 unknown
/// command, 08 unknown address type, 01 otherwise) and a close; an empty method list gets
/// 05 FF. Nothing reaches the destination, and a good client is served after them.
#[test]
fn malformed_requests_get_one_reply_and_a_close() {
    let http = HttpServer::start(b"after the bad ones".to_vec());
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&["version=5"]);
    let port = http.addr().port().to_be_bytes();
    let reply = |code: u8| vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0];
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("unknown command 9", [&[5, 9, 0, 1, 127, 0, 0, 1][..], &port].concat(), reply(7)),
        ("unknown address type 5", [&[5, 1, 0, 5, 127, 0, 0, 1][..], &port].concat(), reply(8)),
        ("empty domain", [&[5, 1, 0, 3, 0][..], &port].concat(), reply(1)),
        ("reserved byte 1", [&[5, 1, 1, 1, 127, 0, 0, 1][..], &port].concat(), reply(1)),
        ("line break in the domain", [&[5, 1, 0, 3, 3, b'a', b'\n', b'b'][..], &port].concat(), reply(1)),
    ];
    for (what, req, want) in cases {
        let mut s = tcp_connect(proxy).unwrap();
        assert_eq!(greet(&mut s, &[0]), Some([5, 0]), "{what}: greeting");
        s.write_all(&req).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got);
        assert!(end.is_ok(), "{what}: no close within 5 s ({end:?}) after {got:?}");
        assert_eq!(got, want, "{what}: want one reply and a close");
    }
    let mut s = tcp_connect(proxy).unwrap();
    s.write_all(&[5, 0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(got, [5, 0xff], "a greeting with no methods");
    assert_eq!(http.accepted(), 0, "a malformed request reached the destination");
    let dst = Dst::Ip(http.local);
    assert_eq!(http_get(connect(proxy, None, &dst)), b"after the bad ones");
}

/// The access list judges the address a request really reaches: `::ffff:127.0.0.1` is
/// 127.0.0.1 (a rule denying 127.0.0.0/8 refuses it, and the connections list shows
/// 127.0.0.1), and the unspecified address (`0.0.0.0`, `::`), which Linux connects to
/// this host, is refused whatever the rules (REP 02; SOCKS4 gets 91).
#[test]
fn access_list_judges_the_address_reached() {
    let http = HttpServer::start(b"local service".to_vec());
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&["version=5"]);
    let port = http.addr().port();
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
    let unspecified = [format!("0.0.0.0:{port}"), format!("[::]:{port}")];
    for a in &unspecified {
        let a: SocketAddr = a.parse().unwrap();
        assert_eq!(connect_reply(proxy, &Dst::Ip(a)), 2, "CONNECT {a} without rules");
    }
    let mut s4 = tcp_connect(proxy).unwrap();
    s4.write_all(&socks4::request(socks4::CONNECT, format!("0.0.0.0:{port}").parse().unwrap(), b"u")).unwrap();
    match socks4::answer(&mut s4, Duration::from_secs(5)) {
        socks4::Answer::Reply(r) => assert_eq!(r.code, socks4::REJECTED, "SOCKS4 CONNECT 0.0.0.0: {r:?}"),
        other => panic!("SOCKS4 CONNECT 0.0.0.0: {other:?}"),
    }
    d.cmd("ip socks access add dst-address=127.0.0.0/8 action=deny");
    assert_eq!(connect_reply(proxy, &Dst::Ip(mapped)), 2, "CONNECT {mapped} with 127.0.0.0/8 denied");
    assert_eq!(http.accepted(), 0, "a refused request reached the local service");

    d.cmd("ip socks access remove 0");
    let s = connect(proxy, None, &Dst::Ip(mapped));
    let rows = d.cli.connections();
    assert!(
        rows.iter().any(|r| r.dst == format!("127.0.0.1:{port}")),
        "the tunnel to {mapped} is not listed as 127.0.0.1:{port}: {rows:?}"
    );
    assert_eq!(http_get(s), b"local service");

    // A rule written with the mapped form is stored, printed and matched as IPv4.
    d.cmd("ip socks access add src-address=::ffff:127.0.0.1 action=deny");
    let printed = d.cmd("ip socks access print");
    assert!(printed.contains("0 src-address=127.0.0.1 action=deny"), "{printed}");
    assert_eq!(connect_reply(proxy, &Dst::Ip(http.local)), 2, "a client the mapped rule names");
}

/// version=4 answers a SOCKS5 greeting with 0xFF or a close (curl --socks5 fails) and
/// still serves SOCKS4; version=5 serves both.
#[test]
fn version_4_refuses_socks5_and_version_5_serves_both() {
    let has_curl = require_program("version_4_refuses_socks5_and_version_5_serves_both", "curl").is_some();
    for dp in data_paths() {
        let http = HttpServer::start(b"v4 page".to_vec());
        let dst = Dst::Ip(http.local);
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        assert!(d.cmd("ip socks print").contains("version: 4"), "[{dp}] default version is not 4");
        for methods in [&[0u8][..], &[0, 2], &[2]] {
            let mut s = tcp_connect(proxy).unwrap();
            let got = greet(&mut s, methods);
            assert!(
                matches!(got, None | Some([5, 0xff])),
                "[{dp}] version=4 answered a SOCKS5 greeting {methods:?} with {got:?}"
            );
            assert!(
                socks4::closed_within(&mut s, Duration::from_secs(5)),
                "[{dp}] version=4 keeps a SOCKS5 client open"
            );
        }
        if has_curl {
            let (code, _, _) =
                curl(&["-sS", "--max-time", "10", "--socks5", &proxy.to_string(), &http.url("127.0.0.1")], T);
            assert_ne!(code, Some(0), "[{dp}] curl --socks5 got through version=4");
        }
        assert_eq!(http.accepted(), 0, "[{dp}] a refused SOCKS5 client reached the server");
        let mut s4 = socks4::connect(proxy, http.addr());
        s4.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut all = Vec::new();
        s4.read_to_end(&mut all).unwrap();
        assert!(all.ends_with(b"v4 page"), "[{dp}] SOCKS4 under version=4");

        d.cmd("ip socks set version=5");
        assert_eq!(http_get(connect(proxy, None, &dst)), b"v4 page", "[{dp}] SOCKS5 under version=5");
        let mut s4 = socks4::connect(proxy, http.addr());
        s4.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut all = Vec::new();
        s4.read_to_end(&mut all).unwrap();
        assert!(all.ends_with(b"v4 page"), "[{dp}] SOCKS4 under version=5");
    }
}

/// auth-method=password with no (enabled) user refuses every SOCKS5 client, whatever
/// methods it offers: 0xFF or a close (SOCKS4 clients: the next test).
#[test]
fn password_without_users_refuses_everyone() {
    for dp in data_paths() {
        let http = HttpServer::start(b"nobody may see this".to_vec());
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5", "auth-method=password"]);
        for stage in ["no users", "only a disabled user"] {
            if stage == "only a disabled user" {
                d.cli_ok(&["ip", "socks", "users", "add", "name=bob", &format!("password={BOB_PW}"), "disabled=yes"]);
            }
            for methods in [&[2u8][..], &[0], &[0, 2], &[2, 0, 1]] {
                let mut s = tcp_connect(proxy).unwrap();
                let got = greet(&mut s, methods);
                assert!(
                    matches!(got, None | Some([5, 0xff])),
                    "[{dp}] {stage}: greeting {methods:?} answered {got:?}, want 0xFF or close"
                );
                if got.is_some() {
                    // Even a client that ignores the 0xFF and sends credentials gets nowhere.
                    let st = login(&mut s, "bob", BOB_PW);
                    assert!(!matches!(st, Some([1, 0])), "[{dp}] {stage}: login after 0xFF accepted");
                }
            }
            assert_eq!(http.accepted(), 0, "[{dp}] {stage}: a request reached the server");
        }
        // The first enabled user opens the door, for that user only.
        d.cmd("ip socks users enable 0");
        let dst = Dst::Ip(http.local);
        assert_eq!(http_get(connect(proxy, Some(("bob", BOB_PW)), &dst)), b"nobody may see this");
    }
}

/// A user added without a password can never log in: the `add` succeeds (an
/// export without `show-sensitive` restores users that way) but warns, naming
/// the user and the command that fixes it, once; the user logs in after a `set`.
#[test]
fn a_user_without_a_password_is_warned_about_and_locked_out() {
    let http = HttpServer::start(b"after the password".to_vec());
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&["version=5", "auth-method=password"]);
    let add = d.cli(&["ip", "socks", "users", "add", "name=carol"]);
    assert!(add.status.success(), "{add:?}");
    let warned = String::from_utf8_lossy(&add.stderr).into_owned();
    assert!(
        warned.contains("user carol has no password") && warned.contains("users set [find name=carol] password="),
        "{warned}"
    );
    let again = d.cli(&["ip", "socks", "users", "set", "0", "comment=still none"]);
    assert!(again.status.success() && again.stderr.is_empty(), "warned twice: {again:?}");
    let mut s = tcp_connect(proxy).unwrap();
    assert_eq!(greet(&mut s, &[2]), Some([5, 2]));
    assert!(!matches!(login(&mut s, "carol", ""), Some([1, 0])), "a user without a password logged in");
    let set = d.cli(&["ip", "socks", "users", "set", "0", &format!("password={BOB_PW}")]);
    assert!(set.status.success() && set.stderr.is_empty(), "{set:?}");
    let dst = Dst::Ip(http.local);
    assert_eq!(http_get(connect(proxy, Some(("carol", BOB_PW)), &dst)), b"after the password");
}

/// A SOCKS4/4a client cannot log in, so auth-method=password refuses it (91 or a
/// close), with no users and with users (otherwise SOCKS4 bypasses the login).
#[test]
fn password_refuses_socks4_clients() {
    for dp in data_paths() {
        let http = HttpServer::start(b"members only".to_vec());
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5", "auth-method=password"]);
        for users in ["no users", "a user"] {
            if users == "a user" {
                d.cli_ok(&["ip", "socks", "users", "add", "name=alice", &format!("password={ALICE_PW}")]);
            }
            for (what, req) in [
                ("SOCKS4", socks4::request(socks4::CONNECT, http.addr(), b"alice")),
                ("SOCKS4a", socks4::request_4a(socks4::CONNECT, http.addr().port(), b"localhost", b"alice")),
            ] {
                let mut s = tcp_connect(proxy).unwrap();
                s.write_all(&req).unwrap();
                let ans = socks4::answer(&mut s, Duration::from_secs(5));
                assert!(
                    !matches!(ans, socks4::Answer::Reply(r) if r.code == socks4::GRANTED),
                    "[{dp}] {users}: a {what} client (no password) got a tunnel under auth-method=password: {ans:?}"
                );
            }
        }
        assert_eq!(http.accepted(), 0, "[{dp}] a SOCKS4 request reached the server under auth-method=password");
    }
}

/// only-one=yes: a user's second connection is refused (RFC 1929 status non-zero) while
/// the first is open and allowed after it closes; the connections list names the user.
#[test]
fn only_one_refuses_second_connection_until_first_closes() {
    let http = HttpServer::start(b"one at a time".to_vec());
    let dst = Dst::Ip(http.local);
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5", "auth-method=password"]);
        d.cli_ok(&["ip", "socks", "users", "add", "name=bob", &format!("password={BOB_PW}"), "only-one=yes"]);
        d.cli_ok(&["ip", "socks", "users", "add", "name=carol", &format!("password={CAROL_PW}")]);
        let first = connect(proxy, Some(("bob", BOB_PW)), &dst);
        assert!(wait_until(Duration::from_secs(5), || d.cli.connections().len() == 1), "[{dp}] no row for bob");

        // The user column: --json, print detail, and the USER column of print.
        let json: serde_json::Value = serde_json::from_str(&d.cmd("--json ip socks connections print")).unwrap();
        assert_eq!(json[0]["user"], "bob", "[{dp}] --json row: {json}");
        let detail = d.cmd("ip socks connections print detail");
        assert!(detail.contains("user=bob"), "[{dp}] print detail lacks user=bob:\n{detail}");
        let plain = d.cmd("ip socks connections print");
        assert!(plain.contains("USER") && plain.contains("bob"), "[{dp}] print lacks the USER column:\n{plain}");

        for attempt in 0..2 {
            let mut s = tcp_connect(proxy).unwrap();
            assert_eq!(greet(&mut s, &[2]), Some([5, 2]), "[{dp}] method reply");
            let st = login(&mut s, "bob", BOB_PW);
            assert!(
                matches!(st, Some([1, x]) if x != 0),
                "[{dp}] bob's second connection (attempt {attempt}) while the first is open: status {st:?}"
            );
        }
        // Another user is not limited by bob's only-one, and may have two at once.
        let c1 = connect(proxy, Some(("carol", CAROL_PW)), &dst);
        let c2 = connect(proxy, Some(("carol", CAROL_PW)), &dst);
        drop((c1, c2));

        assert_eq!(http_get(first), b"one at a time", "[{dp}] bob's first tunnel");
        assert!(
            wait_until(Duration::from_secs(5), || d.cli.connections().is_empty()),
            "[{dp}] rows remain after closing: {:?}",
            d.cli.connections()
        );
        let again = connect(proxy, Some(("bob", BOB_PW)), &dst);
        assert_eq!(http_get(again), b"one at a time", "[{dp}] bob after the first closed");
    }
}

/// rate-limit=8M: a 4 MB download and a 4 MB upload through the proxy each take
/// 4 s within 10 percent (8 Mbit/s), where an unlimited user is far faster.
#[test]
fn rate_limit_8m_paces_bulk_transfers() {
    const LEN: usize = 4_000_000;
    let want = LEN as f64 * 8.0 / 8e6;
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5", "auth-method=password"]);
        d.cli_ok(&["ip", "socks", "users", "add", "name=slow", &format!("password={ALICE_PW}"), "rate-limit=8M"]);
        d.cli_ok(&["ip", "socks", "users", "add", "name=fast", &format!("password={BOB_PW}")]);

        // Unlimited, for contrast (and to show the source can go much faster).
        let (src, t) = bulk_source(LEN);
        let mut s = connect(proxy, Some(("fast", BOB_PW)), &Dst::Ip(src));
        let start = Instant::now();
        let mut n = 0;
        let mut b = vec![0u8; 65536];
        while let Ok(k) = s.read(&mut b) {
            if k == 0 {
                break;
            }
            n += k;
        }
        let fast = start.elapsed().as_secs_f64();
        t.join().unwrap();
        assert_eq!(n, LEN, "[{dp}] unlimited download size");

        // Download.
        let (src, t) = bulk_source(LEN);
        let mut s = connect(proxy, Some(("slow", ALICE_PW)), &Dst::Ip(src));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let start = Instant::now();
        let mut n = 0;
        while let Ok(k) = s.read(&mut b) {
            if k == 0 {
                break;
            }
            n += k;
        }
        let down = start.elapsed().as_secs_f64();
        t.join().unwrap();
        drop(s);
        assert_eq!(n, LEN, "[{dp}] rate-limited download size");

        // Upload.
        let (dst, t) = bulk_sink();
        let mut s = connect(proxy, Some(("slow", ALICE_PW)), &Dst::Ip(dst));
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let start = Instant::now();
        s.write_all(&pattern(LEN, 10)).expect("upload");
        s.shutdown(Shutdown::Write).unwrap();
        let (got, last) = t.join().unwrap();
        let up = last.duration_since(start).as_secs_f64();
        assert_eq!(got, LEN, "[{dp}] rate-limited upload size");

        eprintln!("[{dp}] 4 MB: unlimited {fast:.2} s, 8M down {down:.2} s, 8M up {up:.2} s (want {want:.2} s)");
        for (what, secs) in [("download", down), ("upload", up)] {
            let mbps = LEN as f64 * 8.0 / secs / 1e6;
            assert!(
                (want * 0.9..=want * 1.1).contains(&secs),
                "[{dp}] rate-limit=8M {what} of {LEN} bytes took {secs:.2} s = {mbps:.2} Mbit/s; \
                 want {want:.1} s +-10% (8 Mbit/s)"
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Done when 4: print, export, restart; dst-address by name; IPv6 rules.
// ---------------------------------------------------------------------------------

/// Every SOCKS5 property (version, auth-method, users with only-one/rate-limit/
/// disabled/comment, IPv6 and domain access rules) prints, exports with
/// password-hash only, survives restart and kill -9, and restores working logins.
#[test]
fn socks5_properties_print_export_and_survive_restart() {
    let mut d = Daemon::start("userspace");
    let http = HttpServer::start(b"persisted".to_vec());
    let dst = Dst::Ip(http.local);
    let port = enable_dual(&mut d, &["version=5", "auth-method=password"]);
    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    d.cli_ok(&[
        "ip",
        "socks",
        "users",
        "add",
        "name=alice",
        &format!("password={ALICE_PW}"),
        "only-one=yes",
        "rate-limit=8M",
        "comment=alice laptop",
    ]);
    d.cli_ok(&[
        "ip",
        "socks",
        "users",
        "add",
        "name=bob",
        &format!("password={BOB_PW}"),
        "disabled=yes",
        "comment=spare",
    ]);
    d.cli_ok(&["ip", "socks", "users", "add", "name=carol", &format!("password={CAROL_PW}"), "rate-limit=512k"]);
    d.cmd("ip socks access add src-address=fd00:1234::/32 action=deny comment=v6-lan");
    d.cmd("ip socks access add dst-address=2001:db8::/32 action=deny");
    d.cmd("ip socks access add dst-address=blocked.example action=deny");
    d.cmd("ip socks access add src-address=::1/128 dst-address=::1/128 dst-port=1-1023 action=deny");
    let cleartexts = [ALICE_PW, BOB_PW, CAROL_PW];
    let no_cleartext = |what: &str, s: &str| {
        for pw in cleartexts {
            assert!(!s.contains(pw), "{what} contains the cleartext password {pw}:\n{s}");
        }
    };

    let check = |d: &Daemon, when: &str| -> String {
        let settings = d.cmd("ip socks print");
        for want in ["version: 5", "auth-method: password", "listen-address: ::"] {
            assert!(settings.contains(want), "{when}: `ip socks print` lacks {want:?}:\n{settings}");
        }
        let users = d.cmd("ip socks users print");
        for want in
            ["alice", "bob", "carol", "only-one=yes", "rate-limit=8M", "rate-limit=512k", "alice laptop", "spare"]
        {
            assert!(users.contains(want), "{when}: `users print` lacks {want:?}:\n{users}");
        }
        // A row is `N X name=...`, or `N X ;;; comment` followed by `  name=...`.
        let lines: Vec<&str> = users.lines().collect();
        let bob = lines.iter().position(|l| l.contains("name=bob")).expect("bob's row");
        let flagged = lines[bob].contains(" X ") || (bob > 0 && lines[bob - 1].contains(" X ;;;"));
        assert!(flagged, "{when}: bob not flagged disabled:\n{users}");
        for out in [users.clone(), d.cmd("ip socks users print detail"), d.cmd("--json ip socks users print")] {
            no_cleartext(&format!("{when}: users print"), &out);
            assert!(
                !out.contains("pbkdf2") && !out.to_lowercase().contains("password"),
                "{when}: users print shows a password (hash):\n{out}"
            );
        }
        let json: serde_json::Value = serde_json::from_str(&d.cmd("--json ip socks users print")).unwrap();
        assert_eq!(json[0]["rate-limit"], 8_000_000, "{when}: {json}");
        assert_eq!(json[0]["only-one"], true, "{when}: {json}");
        assert_eq!(json[1]["disabled"], true, "{when}: {json}");
        let access = d.cmd("ip socks access print");
        for want in ["fd00:1234::/32", "2001:db8::/32", "blocked.example", "dst-address=::1", "v6-lan"] {
            assert!(access.contains(want), "{when}: `access print` lacks {want:?}:\n{access}");
        }
        let export = d.export("show-sensitive");
        no_cleartext(&format!("{when}: export"), &export);
        no_cleartext(&format!("{when}: state file"), &std::fs::read_to_string(&d.state).unwrap());
        assert_eq!(export.matches("password-hash=").count(), 3, "{when}: export:\n{export}");
        for want in [
            "version=5",
            "auth-method=password",
            "only-one=yes",
            "rate-limit=8M",
            "rate-limit=512k",
            "disabled=yes",
            "fd00:1234::/32",
            "2001:db8::/32",
            "dst-address=blocked.example",
        ] {
            assert!(export.contains(want), "{when}: export lacks {want:?}:\n{export}");
        }
        export
    };
    let logins = |d: &Daemon, when: &str, expect: &[(&str, &str, bool)]| {
        for (u, p, ok) in expect {
            let r = handshake(proxy, Some((u, p)), CMD_CONNECT, &dst);
            match (r, ok) {
                (Ok((s, 0, _)), true) => assert_eq!(http_get(s), b"persisted", "{when}: {u}"),
                (Err(_), false) => {}
                (Ok((_, rep, _)), _) => {
                    panic!("{when}: login {u} (ok={ok}) got reply {rep}\n{}", d.log())
                }
                (Err(e), true) => panic!("{when}: login {u} failed: {e}\n{}", d.log()),
            }
        }
        assert!(wait_until(Duration::from_secs(5), || d.cli.connections().is_empty()), "{when}: rows remain");
    };
    let expect =
        [("alice", ALICE_PW, true), ("alice", WRONG_PW, false), ("bob", BOB_PW, false), ("carol", CAROL_PW, true)];

    let before = check(&d, "before restart");
    logins(&d, "before restart", &expect);
    d.restart();
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "not listening after restart");
    assert_eq!(check(&d, "after restart"), before, "export changed across restart");
    logins(&d, "after restart", &expect);
    d.kill9();
    d.restart();
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "not listening after kill -9");
    assert_eq!(check(&d, "after kill -9"), before, "export changed across kill -9");

    // set / enable / disable / remove, then restart again.
    d.cli_ok(&["ip", "socks", "users", "set", "2", &format!("password={WRONG_PW}"), "rate-limit=0"]);
    d.cmd("ip socks users enable 1");
    d.cmd("ip socks users set 0 only-one=no comment=moved");
    let after_set = d.export("show-sensitive");
    no_cleartext("after set: export", &after_set);
    assert!(!after_set.contains(WRONG_PW), "export contains carol's new cleartext password");
    d.restart();
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "not listening after restart");
    assert_eq!(d.export("show-sensitive"), after_set, "export changed across restart after set");
    let users = d.cmd("ip socks users print");
    assert!(users.contains("moved"), "`users set 0 comment=moved` not shown:\n{users}");
    assert!(!users.contains("rate-limit=512k"), "rate-limit=0 did not clear carol's limit:\n{users}");
    logins(&d, "after set", &[("carol", CAROL_PW, false), ("carol", WRONG_PW, true), ("bob", BOB_PW, true)]);
    d.cmd("ip socks users remove 1");
    d.restart();
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "not listening after restart");
    let users = d.cmd("ip socks users print");
    assert!(!users.contains("bob"), "removed user came back:\n{users}");
    logins(&d, "after remove", &[("bob", BOB_PW, false), ("alice", ALICE_PW, true)]);

    // The export alone (password hashes, no cleartext) restores the same logins.
    let export = d.export("show-sensitive");
    d.stop();
    let mut d2 = Daemon::start("userspace");
    d2.stop();
    std::fs::write(&d2.state, &export).unwrap();
    d2.restart();
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "the export does not listen");
    assert_eq!(d2.export("show-sensitive"), export, "a daemon started from the export exports something else");
    logins(&d2, "from export", &[("alice", ALICE_PW, true), ("alice", WRONG_PW, false), ("carol", WRONG_PW, true)]);
}

/// `dst-address=localhost action=deny` gives reply 2 to a SOCKS5 CONNECT by name (curl
/// --socks5-hostname) but not by address (curl --socks5 to 127.0.0.1); IPv6 prefixes
/// match IPv6 destinations and IPv6 clients.
#[test]
fn access_rules_match_domain_names_and_ipv6() {
    let has_curl = require_program("access_rules_match_domain_names_and_ipv6", "curl").is_some();
    for dp in data_paths() {
        let http4 = HttpServer::start(b"by address only".to_vec());
        let http6 = HttpServer::start_on("[::1]:0", b"six".to_vec());
        let mut d = Daemon::start(dp);
        let port = enable_dual(&mut d, &["version=5"]);
        let p4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let p6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let hport = http4.addr().port();
        d.cmd("ip socks access add dst-address=localhost action=deny");

        for name in ["localhost", "LOCALHOST"] {
            let rep = connect_reply(p4, &Dst::Name(name.into(), hport));
            assert_eq!(rep, 2, "[{dp}] CONNECT {name}:{hport} under dst-address=localhost deny: reply {rep}, want 2");
        }
        assert_eq!(http4.accepted(), 0, "[{dp}] a denied name request reached the server");
        let s = connect(p4, None, &Dst::Ip(http4.local));
        assert_eq!(http_get(s), b"by address only", "[{dp}] CONNECT 127.0.0.1 must pass a name rule");
        if has_curl {
            let url = http4.url("localhost");
            let (code, _, _) = curl(&["-sS", "--max-time", "10", "--socks5-hostname", &p4.to_string(), &url], T);
            assert_ne!(code, Some(0), "[{dp}] curl --socks5-hostname localhost got through the name rule");
            let (code, out, err) = curl(&["-sS", "--max-time", "10", "--socks5", &p4.to_string(), &url], T);
            assert_eq!(
                (code, out.as_slice()),
                (Some(0), &b"by address only"[..]),
                "[{dp}] curl --socks5 (local resolve): {err}"
            );
        }
        let served = http4.accepted();
        assert_eq!(served, if has_curl { 2 } else { 1 }, "[{dp}] server connections");

        // IPv6 destinations.
        d.cmd("ip socks access add dst-address=::1/128 action=deny");
        let rep = connect_reply(p4, &Dst::Ip(http6.local));
        assert_eq!(rep, 2, "[{dp}] CONNECT [::1] under dst-address=::1/128 deny: reply {rep}");
        assert_eq!(http6.accepted(), 0, "[{dp}] a denied IPv6 request reached the server");
        d.cmd("ip socks access remove 1");
        assert_eq!(http_get(connect(p6, None, &Dst::Ip(http6.local))), b"six", "[{dp}] CONNECT [::1] allowed again");

        // IPv6 clients.
        d.cmd("ip socks access add src-address=::/0 action=deny");
        d.cmd("ip socks access move 1 0");
        let rep = connect_reply(p6, &Dst::Ip(http4.local));
        assert_eq!(rep, 2, "[{dp}] a client from [::1] under src-address=::/0 deny: reply {rep}");
        assert_eq!(http4.accepted(), served, "[{dp}] a denied IPv6 client reached the server");
        assert_eq!(
            http_get(connect(p4, None, &Dst::Ip(http4.local))),
            b"by address only",
            "[{dp}] an IPv4 client (via the dual-stack listener) must not match ::/0"
        );
    }
}

/// A request for a name the access list denies gets reply 2 without the name being
/// resolved first (no DNS leak for denied names; not reply 4 when the name does not
/// resolve), also for another case and a trailing dot.
#[test]
fn name_rule_denies_before_resolving() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["version=5"]);
        d.cmd("ip socks access add dst-address=blocked.invalid action=deny");
        for name in ["blocked.invalid", "BLOCKED.invalid", "blocked.invalid."] {
            let start = Instant::now();
            let rep = connect_reply(proxy, &Dst::Name(name.into(), 80));
            assert_eq!(
                rep,
                2,
                "[{dp}] CONNECT {name}:80 under `dst-address=blocked.invalid action=deny`: reply {rep} \
                 after {:?}, want 2 (4 = the daemon resolved the denied name before asking the access list)",
                start.elapsed()
            );
        }
    }
}
