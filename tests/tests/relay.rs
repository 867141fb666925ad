//! Relay correctness on CONNECT tunnels: half-close both ways, no byte lost when a side
//! closes right after its last write, upstream banners, early client data, exact tx/rx.

use proxyd_tests::{accept_timeout, data_paths, listen_local, pattern, sha256, socks, tcp_connect, wait_until, Daemon};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

fn read_to_end(s: &mut TcpStream, what: &str) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap_or_else(|e| panic!("{what}: read to EOF failed after {} bytes: {e}", v.len()));
    v
}

/// Half-close works both ways: after one side shuts its write half, the other can still
/// send, and each EOF reaches the other end.
#[test]
fn half_close_both_directions() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();

        // Client finishes first.
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        c.write_all(b"request").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut u, "upstream after client half-close"), b"request");
        u.write_all(b"late answer from upstream").unwrap();
        u.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c, "client after upstream answered"), b"late answer from upstream");

        // Upstream finishes first.
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        u.write_all(b"banner, then EOF").unwrap();
        u.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c, "client after upstream half-close"), b"banner, then EOF");
        c.write_all(b"client still talks").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut u, "upstream after client talked"), b"client still talks");
    }
}

/// Transfers of 1 B .. 8 MiB in both directions arrive whole when the sender closes
/// (close(2), not shutdown) right after its last write.
#[test]
fn close_right_after_last_write_loses_nothing() {
    const SIZES: [usize; 7] = [1, 100, 1460, 65_536, 300_001, 1_048_579, 8 * 1024 * 1024];
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let mut failures = Vec::new();
        for (i, &size) in SIZES.iter().enumerate() {
            for upload in [true, false] {
                let data = pattern(size, i as u64 * 2 + upload as u64);
                let (c, u) = socks::tunnel(proxy, &l, dst);
                let (mut sender, mut receiver) = if upload { (c, u) } else { (u, c) };
                let payload = data.clone();
                let t = std::thread::spawn(move || {
                    sender.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                    sender.write_all(&payload).expect("write");
                    drop(sender); // close right after the last write
                });
                let got = read_to_end(&mut receiver, &format!("{size} bytes"));
                t.join().unwrap();
                if got.len() != size || sha256::hex(&got) != sha256::hex(&data) {
                    failures.push(format!(
                        "{} of {size} bytes: got {} bytes{}",
                        if upload { "upload" } else { "download" },
                        got.len(),
                        if got.len() == size { " (content differs)" } else { "" }
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "bytes lost on close ({dp}):\n  {}", failures.join("\n  "));
    }
}

/// A banner the destination sends right at accept (before the client says anything)
/// reaches the client, and the tunnel works afterwards.
#[test]
fn upstream_banner_sent_at_accept_reaches_client() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let t = std::thread::spawn(move || {
            let (mut u, _) = l.accept().unwrap();
            u.write_all(b"220 banner\r\n").unwrap();
            let mut b = [0u8; 4];
            u.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"QUIT");
            u.write_all(b"221 bye\r\n").unwrap();
        });
        let mut c = socks::connect(proxy, dst);
        let mut b = [0u8; 12];
        c.read_exact(&mut b).expect("banner did not reach the client");
        assert_eq!(&b, b"220 banner\r\n");
        c.write_all(b"QUIT").unwrap();
        assert_eq!(read_to_end(&mut c, "after QUIT"), b"221 bye\r\n");
        t.join().unwrap();
    }
}

/// Bytes sent in the same segment as the CONNECT request reach the destination before
/// the bytes sent later, and the reply is exactly 8 bytes.
#[test]
fn early_data_in_request_segment_is_relayed_in_order() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let mut c = tcp_connect(proxy).unwrap();
        let mut first = socks::request(socks::CONNECT, dst, b"early");
        first.extend_from_slice(b"EARLY-DATA");
        c.write_all(&first).unwrap(); // one write, TCP_NODELAY: one segment
        let r = socks::read_reply(&mut c).expect("reply");
        assert_eq!(r.code, socks::GRANTED, "{r:?}");
        let mut u = accept_timeout(&l, Duration::from_secs(5)).expect("accept");
        c.write_all(b"+LATER").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut u, "upstream"), b"EARLY-DATA+LATER");
        u.write_all(b"ok").unwrap();
        drop(u);
        assert_eq!(read_to_end(&mut c, "client after reply"), b"ok", "extra bytes after the 8-byte reply");
        assert!(wait_until(Duration::from_secs(3), || d.cli.connections().is_empty()));
    }
}

/// tx counts client->destination bytes and rx destination->client bytes, exactly, with
/// handshake bytes excluded; the row names client and destination and has type out.
#[test]
fn tx_rx_are_exact() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        let src = c.local_addr().unwrap().to_string();
        let (mut tx, mut rx) = (0u64, 0u64);
        for (up, down) in [(12_345usize, 54_321usize), (1, 0), (0, 1), (200_000, 3), (7, 1_000_000)] {
            let data = pattern(up, 1);
            let mut cc = c.try_clone().unwrap();
            let t = std::thread::spawn(move || cc.write_all(&data).unwrap());
            let mut got = vec![0u8; up];
            u.read_exact(&mut got).unwrap();
            t.join().unwrap();
            let data = pattern(down, 2);
            let mut uu = u.try_clone().unwrap();
            let t = std::thread::spawn(move || uu.write_all(&data).unwrap());
            let mut got = vec![0u8; down];
            c.read_exact(&mut got).unwrap();
            t.join().unwrap();
            tx += up as u64;
            rx += down as u64;
            let mut rows = Vec::new();
            let ok = wait_until(Duration::from_secs(3), || {
                rows = d.cli.connections();
                rows.len() == 1 && rows[0].tx == tx && rows[0].rx == rx
            });
            assert!(ok, "after {tx} bytes up and {rx} down the row should say tx={tx} rx={rx}: {rows:?}");
            assert_eq!(rows[0].src, src, "src-address");
            assert_eq!(rows[0].dst, dst.to_string(), "dst-address");
            assert_eq!(rows[0].kind, "out", "type");
        }
    }
}
