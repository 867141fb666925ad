//! Raw SOCKS4/4a client helpers: build requests byte by byte, read replies, and
//! classify how the proxy answered a (possibly malformed) request.

use crate::{accept_timeout, tcp_connect};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// SOCKS4 command CONNECT.
pub const CONNECT: u8 = 1;
/// SOCKS4 command BIND.
pub const BIND: u8 = 2;
/// Reply code: request granted.
pub const GRANTED: u8 = 90;
/// Reply code: request rejected or failed.
pub const REJECTED: u8 = 91;

/// A SOCKS4 request: VN=4, CD, DSTPORT, DSTIP, USERID, NUL.
pub fn request(cmd: u8, dst: SocketAddrV4, user: &[u8]) -> Vec<u8> {
    let mut v = vec![4, cmd];
    v.extend_from_slice(&dst.port().to_be_bytes());
    v.extend_from_slice(&dst.ip().octets());
    v.extend_from_slice(user);
    v.push(0);
    v
}

/// A SOCKS4a request: DSTIP 0.0.0.1, then USERID NUL HOSTNAME NUL.
pub fn request_4a(cmd: u8, port: u16, host: &[u8], user: &[u8]) -> Vec<u8> {
    let mut v = request(cmd, SocketAddrV4::new(Ipv4Addr::new(0, 0, 0, 1), port), user);
    v.extend_from_slice(host);
    v.push(0);
    v
}

/// A decoded 8-byte SOCKS4 reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The first byte (must be 0).
    pub vn: u8,
    /// 90 granted, 91 rejected.
    pub code: u8,
    /// DSTPORT/DSTIP of the reply.
    pub addr: SocketAddrV4,
}

impl Reply {
    /// Decodes 8 reply bytes.
    pub fn parse(b: [u8; 8]) -> Reply {
        Reply {
            vn: b[0],
            code: b[1],
            addr: SocketAddrV4::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]), u16::from_be_bytes([b[2], b[3]])),
        }
    }
}

/// Reads one 8-byte reply.
pub fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(Reply::parse(b))
}

/// Opens a CONNECT tunnel to `dst` through `proxy`; panics unless granted.
pub fn connect(proxy: SocketAddr, dst: SocketAddrV4) -> TcpStream {
    let mut s = tcp_connect(proxy).unwrap_or_else(|e| panic!("connect to proxy {proxy}: {e}"));
    s.write_all(&request(CONNECT, dst, b"test")).expect("send CONNECT");
    let r = read_reply(&mut s).unwrap_or_else(|e| panic!("no reply to CONNECT {dst} via {proxy}: {e}"));
    assert_eq!((r.vn, r.code), (0, GRANTED), "CONNECT {dst} via {proxy} not granted: {r:?}");
    s
}

/// Opens a CONNECT tunnel through `proxy` to the listener `l` (listening at `dst`);
/// returns the client's end and the destination's end.
pub fn tunnel(proxy: SocketAddr, l: &TcpListener, dst: SocketAddrV4) -> (TcpStream, TcpStream) {
    let c = connect(proxy, dst);
    let u = accept_timeout(l, Duration::from_secs(5)).expect("the destination accepts the tunnel");
    (c, u)
}

/// How a proxy answered a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An 8-byte reply arrived (first reply only).
    Reply(Reply),
    /// The proxy closed (EOF or reset) before a full reply; `got` bytes came first.
    Closed { got: Vec<u8> },
    /// Nothing conclusive within the time limit.
    Silent { got: Vec<u8> },
}

/// Reads what the proxy sends back within `timeout`: a full reply, a close, or silence.
pub fn answer(s: &mut TcpStream, timeout: Duration) -> Answer {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Answer::Silent { got };
        }
        s.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => return Answer::Closed { got },
            Ok(n) => {
                got.extend_from_slice(&b[..n]);
                if got.len() >= 8 {
                    return Answer::Reply(Reply::parse(got[..8].try_into().unwrap()));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Answer::Silent { got },
            Err(_) => return Answer::Closed { got },
        }
    }
}

/// Waits until the peer closes the stream (EOF or reset) within `timeout`, discarding
/// data; returns false if it is still open.
pub fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 4096];
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}
