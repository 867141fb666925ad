//! `vrf` (RouterOS v7): the listener and every socket proxyd opens for a
//! client (CONNECT dials, BIND listeners, the SOCKS5 UDP relay) are bound to
//! the named device with `SO_BINDTODEVICE`; `main` binds nothing; a name
//! that does not exist is refused and changes nothing.
//!
//! This kernel has no VRF driver, so a plain interface stands in for the VRF.
//! The daemon runs in a namespace `P` made here (not the root namespace: that
//! one has a default route to a real network and host-wide rp_filter and
//! forwarding settings; here nothing the test sends can leave its own veth
//! pair). `P` has `lo` and veth `pv` (198.19.0.1/30). Namespace `V` holds the
//! other end `vp` (198.19.0.2/30) and the destination address 198.19.0.9 (on
//! its `lo`) with TCP and UDP echo servers. `P` has no route to 198.19.0.9 (no
//! default route either), so a socket reaches it only when it is bound to
//! `pv` (Linux then takes the destination as on-link on the bound device):
//! a working tunnel to it is proof that the dial was bound. Clients come from
//! `V` through the veth, as a VRF's clients come in through its interfaces.
//! Addresses are from 198.18.0.0/15 (RFC 2544 benchmarking) and exist only in
//! the namespaces, which are removed on drop.
//!
//! Root-gated (skipped without root, failed when `CI` is set), except
//! `unknown_vrf_is_refused_and_changes_nothing`, which runs anywhere.

use proxyd_tests::fixtures::EchoServer;
use proxyd_tests::in_ns;
use proxyd_tests::{
    data_paths, find_program, free_port, is_root, skip_or_fail, socks, tcp_connect, text, wait_until, Daemon,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

/// The proxy's address on `pv`, and its SOCKS port.
const PROXY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const PORT: u16 = 1080;
/// `V`'s end of the veth pair.
const V_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// The destination: on `V`'s `lo`, reachable from `P` only through a socket bound to `pv`.
const DEST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);
/// The echo servers' port (TCP and UDP) on the destination.
const ECHO_PORT: u16 = 7;

/// Root, `ip` and `ss`; prints why not (fails in CI).
fn prerequisites(test: &str) -> bool {
    if !is_root() {
        return skip_or_fail(test, "needs root (network namespaces)");
    }
    for program in ["ip", "ss"] {
        if find_program(program).is_none() {
            return skip_or_fail(test, &format!("program `{program}` not found (apt-get install iproute2)"));
        }
    }
    true
}

/// Runs `ip ARGS`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {} failed: {}", args.join(" "), text(&out.stderr));
}

/// `ss -Hn ARGS` inside namespace `ns`.
fn ss(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns, "ss", "-Hn"]).args(args).output().expect("run ss");
    assert!(out.status.success(), "ss {} failed: {}", args.join(" "), text(&out.stderr));
    text(&out.stdout)
}

/// Namespaces `P` (the proxy) and `V` (the far side of the "VRF"), joined by
/// the veth pair `pv`/`vp`; deleted on drop, also when the test panics.
struct Net {
    p: String,
    v: String,
}

impl Net {
    fn new() -> Net {
        let tag = proxyd_tests::unique_tag();
        let net = Net { p: format!("proxyd-vrf-{tag}-p"), v: format!("proxyd-vrf-{tag}-v") };
        // From here on, drop removes whatever was made.
        for ns in [&net.p, &net.v] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &net.p, "link", "add", "pv", "type", "veth", "peer", "name", "vp", "netns", &net.v]);
        ip(&["-n", &net.p, "addr", "add", &format!("{PROXY_IP}/30"), "dev", "pv"]);
        ip(&["-n", &net.v, "addr", "add", &format!("{V_IP}/30"), "dev", "vp"]);
        ip(&["-n", &net.v, "addr", "add", &format!("{DEST_IP}/32"), "dev", "lo"]);
        ip(&["-n", &net.p, "link", "set", "pv", "up"]);
        ip(&["-n", &net.v, "link", "set", "vp", "up"]);
        net
    }

    /// Starts a daemon inside `P`.
    fn daemon(&self, data_path: &str) -> Daemon {
        in_ns(&self.p, || Daemon::start(data_path))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.v, &self.p] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// TCP and UDP echo servers on the destination (port 7 in `V`); the TCP one
/// records where each connection came from.
fn echo_servers(net: &Net) -> EchoServer {
    let (tcp, udp) = in_ns(&net.v, || {
        (TcpListener::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT)).unwrap(), UdpSocket::bind((DEST_IP, ECHO_PORT)).unwrap())
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    EchoServer::on(tcp)
}

/// A TCP connection from namespace `ns` to `addr` (10 s I/O timeouts).
fn connect_in(ns: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    in_ns(ns, || tcp_connect(addr))
}

/// Sends `msg` through a tunnel and checks that it comes back.
fn echo(s: &mut TcpStream, msg: &[u8], what: &str) {
    s.write_all(msg).unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(back, msg, "{what}: echo differs");
}

/// A SOCKS4 CONNECT to the destination's echo port over `s`; the reply.
fn connect_dest(s: &mut TcpStream) -> socks::Reply {
    s.write_all(&socks::request(socks::CONNECT, SocketAddrV4::new(DEST_IP, ECHO_PORT), b"vrf")).unwrap();
    socks::read_reply(s).expect("a SOCKS4 reply")
}

/// The SOCKS5 UDP ASSOCIATE of a client in `V`: the control connection, the
/// client's UDP socket, and the relay's address from the reply.
fn udp_associate(net: &Net) -> (TcpStream, UdpSocket, SocketAddr) {
    let proxy = SocketAddr::from((PROXY_IP, PORT));
    let (mut control, client) =
        in_ns(&net.v, || (tcp_connect(proxy).expect("control connection from V"), UdpSocket::bind((V_IP, 0)).unwrap()));
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    control.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    control.read_exact(&mut method).unwrap();
    assert_eq!(method, [5, 0], "SOCKS5 greeting");
    let mut req = vec![5, 3, 0, 1, 0, 0, 0, 0];
    req.extend_from_slice(&client.local_addr().unwrap().port().to_be_bytes());
    control.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    control.read_exact(&mut rep).unwrap();
    assert_eq!((rep[0], rep[1], rep[3]), (5, 0, 1), "UDP ASSOCIATE reply {rep:?}");
    let relay = SocketAddr::from((Ipv4Addr::new(rep[4], rep[5], rep[6], rep[7]), u16::from_be_bytes([rep[8], rep[9]])));
    (control, client, relay)
}

/// One datagram to the destination's UDP echo through the relay; whether it came back.
fn udp_round_trip(client: &UdpSocket, relay: SocketAddr, payload: &[u8]) -> bool {
    let mut dgram = vec![0, 0, 0, 1];
    dgram.extend_from_slice(&DEST_IP.octets());
    dgram.extend_from_slice(&ECHO_PORT.to_be_bytes());
    dgram.extend_from_slice(payload);
    client.send_to(&dgram, relay).unwrap();
    let mut buf = [0u8; 2048];
    match client.recv_from(&mut buf) {
        Ok((n, from)) => from == relay && buf[..n] == dgram[..],
        Err(_) => false,
    }
}

/// `set vrf=pv` binds the listener (loopback clients no longer reach it,
/// clients through `pv` do), CONNECT dials, the BIND listener and the UDP
/// relay to `pv`; `ss` shows each socket bound. With `vrf=main` the
/// destination is unreachable (no route): the refusal shows that only the
/// binding reaches it. Back to `main`, an open tunnel keeps working and new
/// dials are unbound again.
#[test]
fn vrf_binds_the_listener_and_every_outgoing_socket() {
    if !prerequisites("vrf_binds_the_listener_and_every_outgoing_socket") {
        return;
    }
    for dp in data_paths() {
        let net = Net::new();
        let d = net.daemon(dp);
        let dest = echo_servers(&net);
        d.cmd(&format!("ip socks set enabled=yes port={PORT} version=5"));
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT));
        let via_veth = SocketAddr::from((PROXY_IP, PORT));
        assert!(
            wait_until(Duration::from_secs(5), || connect_in(&net.p, loopback).is_ok()),
            "[{dp}] no listener on {loopback}\n{}",
            d.log()
        );

        // vrf=main: no binding, no route to the destination.
        assert!(d.cmd("ip socks print").contains("\nvrf: main\n"), "[{dp}] default vrf");
        let mut c = connect_in(&net.p, loopback).unwrap();
        assert_eq!(connect_dest(&mut c).code, socks::REJECTED, "[{dp}] the destination answered without vrf");

        // vrf=pv: saved, printed, exported.
        d.cmd("ip socks set vrf=pv");
        assert!(d.cmd("ip socks print").contains("\nvrf: pv\n"), "[{dp}] print");
        let json: serde_json::Value = serde_json::from_str(d.cmd("--json ip socks print").trim()).unwrap();
        assert_eq!(json["vrf"], "pv", "[{dp}] --json print");
        assert!(d.export("verbose").contains(" vrf=pv "), "[{dp}] export");
        assert!(std::fs::read_to_string(&d.state).unwrap().contains(" vrf=pv "), "[{dp}] state file");

        // The listener is in the "VRF": bound to pv, so a client on loopback
        // is refused and a client coming in through pv is served.
        let listening = ss(&net.p, &["-lt", &format!("sport = :{PORT}")]);
        assert!(listening.contains(&format!("0.0.0.0%pv:{PORT}")), "[{dp}] listener not bound to pv:\n{listening}");
        assert!(
            wait_until(Duration::from_secs(5), || connect_in(&net.p, loopback)
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)),
            "[{dp}] a loopback client still reaches the listener with vrf=pv"
        );
        let mut tunnel = connect_in(&net.v, via_veth).expect("a client through pv reaches the listener");
        let reply = connect_dest(&mut tunnel);
        assert_eq!(reply.code, socks::GRANTED, "[{dp}] CONNECT through vrf=pv: {reply:?}\n{}", d.log());
        // The reply names the dial's own address: pv's.
        assert_eq!(*reply.addr.ip(), PROXY_IP, "[{dp}] the dial did not leave through pv");
        echo(&mut tunnel, b"through the vrf", &format!("[{dp}] tunnel"));
        assert!(dest.peers().iter().any(|p| p.ip() == PROXY_IP), "[{dp}] the destination saw no dial");
        let dialled = ss(&net.p, &["-t", &format!("dst {DEST_IP}")]);
        assert!(dialled.contains(&format!("{PROXY_IP}%pv:")), "[{dp}] dial not bound to pv:\n{dialled}");

        // SOCKS4 BIND: the listener for the peer is bound to pv as well.
        let mut b = connect_in(&net.v, via_veth).unwrap();
        b.write_all(&socks::request(socks::BIND, SocketAddrV4::new(DEST_IP, 0), b"vrf")).unwrap();
        let first = socks::read_reply(&mut b).expect("first BIND reply");
        assert_eq!((first.code, *first.addr.ip()), (socks::GRANTED, PROXY_IP), "[{dp}] BIND: {first:?}");
        let bind_port = first.addr.port();
        let listening = ss(&net.p, &["-lt", &format!("sport = :{bind_port}")]);
        assert!(
            listening.contains(&format!("{PROXY_IP}%pv:{bind_port}")),
            "[{dp}] BIND listener not bound to pv:\n{listening}"
        );
        let mut peer = in_ns(&net.v, || proxyd_tests::connect_from(DEST_IP, first.addr)).expect("BIND peer connects");
        let second = socks::read_reply(&mut b).expect("second BIND reply");
        assert_eq!((second.code, *second.addr.ip()), (socks::GRANTED, DEST_IP), "[{dp}] BIND: {second:?}");
        b.write_all(b"to the peer").unwrap();
        let mut got = [0u8; 11];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to the peer", "[{dp}] BIND tunnel");

        // SOCKS5 UDP ASSOCIATE: the relay socket is bound to pv.
        let (control, client, relay) = udp_associate(&net);
        assert_eq!(relay.ip(), PROXY_IP, "[{dp}] UDP relay address");
        let bound = ss(&net.p, &["-u", "-a", &format!("sport = :{}", relay.port())]);
        assert!(bound.contains(&format!("%pv:{}", relay.port())), "[{dp}] UDP relay not bound to pv:\n{bound}");
        assert!(udp_round_trip(&client, relay, b"datagram through the vrf"), "[{dp}] no UDP answer through pv");
        drop(control);

        // Back to main: the open tunnel stays; loopback clients are served
        // again and their dials, unbound, cannot reach the destination.
        d.cmd("ip socks set vrf=main");
        echo(&mut tunnel, b"still here", &format!("[{dp}] tunnel opened before vrf=main"));
        assert!(
            wait_until(Duration::from_secs(5), || connect_in(&net.p, loopback).is_ok()),
            "[{dp}] no listener on loopback after vrf=main"
        );
        let listening = ss(&net.p, &["-lt", &format!("sport = :{PORT}")]);
        assert!(!listening.contains('%'), "[{dp}] listener still bound after vrf=main:\n{listening}");
        let mut c = connect_in(&net.p, loopback).unwrap();
        assert_eq!(connect_dest(&mut c).code, socks::REJECTED, "[{dp}] a new dial is still bound after vrf=main");
        assert!(d.export("verbose").contains(" vrf=main "), "[{dp}] export after vrf=main");
    }
}

/// What an operator sees of a refused `vrf`: exit 1, a message naming `vrf`
/// and what it takes, and nothing changed (print, `--json`, export, the state
/// file, the listener). `vrf=lo` (a device every host has) is taken and still
/// serves loopback clients; it survives a restart. A state file naming a
/// device that is gone still loads: the daemon runs without a listener and
/// says why, and `set vrf=main` brings the listener back.
#[test]
fn unknown_vrf_is_refused_and_changes_nothing() {
    const NOSUCH: &str = "pxd-nosuch0";
    assert!(!std::path::Path::new("/sys/class/net").join(NOSUCH).exists(), "{NOSUCH} exists here");
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let snapshot = |d: &Daemon| {
            (
                d.cmd("ip socks print"),
                d.cmd("--json ip socks print"),
                d.export("verbose"),
                std::fs::read_to_string(&d.state).unwrap(),
            )
        };
        let before = snapshot(&d);
        let other_port = free_port();
        for args in [
            vec!["ip", "socks", "set", "vrf=pxd-nosuch0"],
            vec!["ip", "socks", "set", "vrf=a/b"],
            vec!["ip", "socks", "set", "vrf="],
            vec!["ip", "socks", "set", &format!("port={other_port}"), "vrf=pxd-nosuch0"],
        ] {
            let out = d.cli(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "[{dp}] `{}`: {err}", args.join(" "));
            assert!(err.contains("vrf") && err.contains("main"), "[{dp}] `{}`: {err}", args.join(" "));
            assert_eq!(snapshot(&d), before, "[{dp}] `{}` changed something", args.join(" "));
        }
        assert!(text(&d.cli(&["ip", "socks", "set", "vrf=pxd-nosuch0"]).stderr).contains(NOSUCH));
        assert!(tcp_connect(proxy).is_ok(), "[{dp}] the listener went away after refused changes");
        assert!(tcp_connect(SocketAddr::from((Ipv4Addr::LOCALHOST, other_port))).is_err(), "[{dp}] port changed");
        // Refused while disabled too (no listener would notice).
        d.cmd("ip socks set enabled=no");
        let out = d.cli(&["ip", "socks", "set", "vrf=pxd-nosuch0"]);
        assert_eq!(out.status.code(), Some(1), "[{dp}] accepted while disabled");
        d.cmd("ip socks set enabled=yes");

        // vrf=lo: the listener and the dials are bound to lo, where loopback clients are.
        d.cmd("ip socks set vrf=lo");
        let (l, dst) = proxyd_tests::listen_local();
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        u.read_exact(&mut b).unwrap();
        drop((c, u));
        d.restart();
        assert!(d.cmd("ip socks print").contains("\nvrf: lo\n"), "[{dp}] vrf=lo lost in a restart");
        assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "[{dp}] no listener after restart");

        // The state file names a device that is not there (any more).
        d.stop();
        let state = std::fs::read_to_string(&d.state).unwrap().replace(" vrf=lo ", &format!(" vrf={NOSUCH} "));
        std::fs::write(&d.state, state).unwrap();
        d.restart();
        assert!(d.cmd("ip socks print").contains(&format!("\nvrf: {NOSUCH}\n")), "[{dp}] state file not loaded");
        assert!(tcp_connect(proxy).is_err(), "[{dp}] listening although vrf={NOSUCH} is missing");
        assert!(
            wait_until(Duration::from_secs(5), || d.log().contains("not accepting clients")
                && d.log().contains(NOSUCH)),
            "[{dp}] the log does not say why nothing listens:\n{}",
            d.log()
        );
        d.cmd("ip socks set vrf=main");
        assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "[{dp}] no listener after vrf=main");
    }
}
