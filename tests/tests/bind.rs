//! SOCKS4 BIND over raw sockets: two replies, the peer-IP check, data both ways.

use proxyd_tests::socks::{self, Answer, BIND};
use proxyd_tests::{connect_from, data_paths, tcp_connect, wait_until, Daemon};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

/// BIND gives a first reply 90 with the listening address (the IP the client reached the
/// proxy at), a second reply 90 with the peer's address; data flows and counts as `in`.
#[test]
fn bind_two_replies_and_data() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let peer_ip = Ipv4Addr::new(127, 0, 0, 3);
        let mut c = tcp_connect(proxy).unwrap();
        c.write_all(&socks::request(BIND, SocketAddrV4::new(peer_ip, 21), b"ftp")).unwrap();
        let first = socks::read_reply(&mut c).expect("first BIND reply");
        assert_eq!((first.vn, first.code), (0, socks::GRANTED), "first reply: {first:?}");
        assert_eq!(
            *first.addr.ip(),
            Ipv4Addr::LOCALHOST,
            "first reply must carry the address the client reached the proxy at"
        );
        assert_ne!(first.addr.port(), 0, "first reply carries port 0");
        let rows = d.cli.connections();
        assert!(
            rows.iter().any(|r| r.kind == "in" || r.kind == "unknown"),
            "BIND waiting for its peer not listed: {rows:?}"
        );

        let mut peer = connect_from(peer_ip, first.addr).expect("peer connects to the bound address");
        let second = socks::read_reply(&mut c).expect("second BIND reply");
        assert_eq!((second.vn, second.code), (0, socks::GRANTED), "second reply: {second:?}");
        let peer_local = peer.local_addr().unwrap();
        assert_eq!(second.addr.to_string(), peer_local.to_string(), "second reply must carry the peer's address");

        peer.write_all(b"data from the server side").unwrap();
        let mut b = [0u8; 25];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"data from the server side");
        c.write_all(b"ack").unwrap();
        let mut b = [0u8; 3];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ack");
        let mut rows = Vec::new();
        let ok = wait_until(Duration::from_secs(3), || {
            rows = d.cli.connections();
            rows.len() == 1 && rows[0].kind == "in" && rows[0].tx == 3 && rows[0].rx == 25
        });
        assert!(ok, "BIND tunnel should be one row type=in tx=3 rx=25: {rows:?}");
        assert_eq!(rows[0].src, c.local_addr().unwrap().to_string());
    }
}

/// A peer connecting from an IP other than the requested DSTIP makes the client get 91
/// as second reply, and both connections are closed without relaying anything.
#[test]
fn bind_rejects_peer_from_wrong_ip() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let mut c = tcp_connect(proxy).unwrap();
        c.write_all(&socks::request(BIND, SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 21), b"")).unwrap();
        let first = socks::read_reply(&mut c).expect("first BIND reply");
        assert_eq!(first.code, socks::GRANTED, "first reply: {first:?}");
        let mut intruder = connect_from(Ipv4Addr::new(127, 0, 0, 4), first.addr).expect("intruder connects");
        let _ = intruder.write_all(b"intruder data");
        match socks::answer(&mut c, Duration::from_secs(5)) {
            Answer::Reply(r) => {
                assert_eq!((r.vn, r.code), (0, socks::REJECTED), "second reply for a wrong peer: {r:?}")
            }
            other => panic!("client should get a second reply 91 for a peer from the wrong IP: {other:?}"),
        }
        assert!(socks::closed_within(&mut c, Duration::from_secs(3)), "client connection not closed after 91");
        let mut got = Vec::new();
        intruder.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = intruder.read_to_end(&mut got);
        assert!(got.is_empty(), "the wrong peer received {got:?}");
        assert!(
            wait_until(Duration::from_secs(3), || d.cli.connections().is_empty()),
            "rejected BIND still listed: {:?}",
            d.cli.connections()
        );
    }
}
