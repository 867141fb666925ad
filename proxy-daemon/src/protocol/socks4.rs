//! SOCKS4 and SOCKS4a requests and replies (the 1990s NEC spec and the 4a
//! extension): `VN=4 CD DSTPORT DSTIP USERID NUL [HOSTNAME NUL]`.
//!
//! [`parse_request`] is called on whatever has been read so far; it answers
//! [`ParseError::Incomplete`] until the whole request is there, and never reads a
//! field before checking the length. Every other error maps to reply 91.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Longest user id or hostname accepted, in bytes (without the NUL).
pub const MAX_FIELD_LEN: usize = 255;
/// Longest request: header, user id, NUL, hostname, NUL.
pub const MAX_REQUEST_LEN: usize = 8 + MAX_FIELD_LEN + 1 + MAX_FIELD_LEN + 1;

/// What the client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
}

/// Where the client wants to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// SOCKS4: an IPv4 address.
    Addr(SocketAddrV4),
    /// SOCKS4a: a name the proxy resolves (DSTIP was 0.0.0.x, x != 0).
    Name { host: String, port: u16 },
}

impl Destination {
    pub fn port(&self) -> u16 {
        match self {
            Destination::Addr(a) => a.port(),
            Destination::Name { port, .. } => *port,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Addr(a) => write!(f, "{a}"),
            Destination::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A decoded request. The user id is kept only as a length: proxyd does not
/// authenticate SOCKS4 users, and user ids are not logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub destination: Destination,
    pub user_id_len: usize,
}

/// Why a request could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("incomplete request")]
    Incomplete,
    #[error("unsupported SOCKS version {0}")]
    Version(u8),
    #[error("unknown SOCKS4 command {0}")]
    Command(u8),
    #[error("user id longer than {MAX_FIELD_LEN} bytes")]
    UserIdTooLong,
    #[error("SOCKS4a hostname longer than {MAX_FIELD_LEN} bytes")]
    HostnameTooLong,
    #[error("SOCKS4a request without a hostname")]
    EmptyHostname,
    #[error("SOCKS4a hostname is not valid text (UTF-8 without control characters)")]
    HostnameEncoding,
}

impl ParseError {
    /// The reply that tells the client about this error.
    pub fn reply(&self) -> ReplyCode {
        ReplyCode::Rejected
    }
}

/// Decodes one request from the start of `buf`.
/// Returns the request and how many bytes it took; bytes after it belong to
/// the stream that follows (early payload).
pub fn parse_request(buf: &[u8]) -> Result<(Request, usize), ParseError> {
    if let Some(&vn) = buf.first() {
        if vn != 4 {
            return Err(ParseError::Version(vn));
        }
    }
    let command = match buf.get(1) {
        None => return Err(ParseError::Incomplete),
        Some(1) => Command::Connect,
        Some(2) => Command::Bind,
        Some(&cd) => return Err(ParseError::Command(cd)),
    };
    if buf.len() < 8 {
        return Err(ParseError::Incomplete);
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);

    let (user_len, after_user) = field(&buf[8..], ParseError::UserIdTooLong)?;
    let mut used = 8 + after_user;

    // SOCKS4a: 0.0.0.x with x != 0 means "a hostname follows".
    let o = ip.octets();
    let destination = if o[0] == 0 && o[1] == 0 && o[2] == 0 && o[3] != 0 {
        let (host_len, after_host) = field(&buf[used..], ParseError::HostnameTooLong)?;
        if host_len == 0 {
            return Err(ParseError::EmptyHostname);
        }
        let host = super::hostname(&buf[used..used + host_len]).ok_or(ParseError::HostnameEncoding)?.to_owned();
        used += after_host;
        Destination::Name { host, port }
    } else {
        Destination::Addr(SocketAddrV4::new(ip, port))
    };
    Ok((Request { command, destination, user_id_len: user_len }, used))
}

/// Finds a NUL-terminated field of at most [`MAX_FIELD_LEN`] bytes.
/// Returns (length without NUL, bytes consumed including NUL).
fn field(buf: &[u8], too_long: ParseError) -> Result<(usize, usize), ParseError> {
    let window = &buf[..buf.len().min(MAX_FIELD_LEN + 1)];
    match window.iter().position(|&b| b == 0) {
        Some(n) => Ok((n, n + 1)),
        None if buf.len() > MAX_FIELD_LEN => Err(too_long),
        None => Err(ParseError::Incomplete),
    }
}

/// The reply codes of SOCKS4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplyCode {
    /// 90: request granted.
    Granted = 90,
    /// 91: request rejected or failed.
    Rejected = 91,
}

/// A reply: `VN=0 CD DSTPORT DSTIP`, 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: ReplyCode,
    pub addr: SocketAddrV4,
}

impl Reply {
    pub fn granted(addr: SocketAddrV4) -> Self {
        Reply { code: ReplyCode::Granted, addr }
    }

    pub fn rejected() -> Self {
        Reply { code: ReplyCode::Rejected, addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0) }
    }

    pub fn encode(&self) -> [u8; 8] {
        let p = self.addr.port().to_be_bytes();
        let ip = self.addr.ip().octets();
        [0, self.code as u8, p[0], p[1], ip[0], ip[1], ip[2], ip[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &[u8] = b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00";
    const CONNECT_4A: &[u8] = b"\x04\x01\x01\xbb\x00\x00\x00\x07bob\x00example.com\x00";
    const BIND: &[u8] = b"\x04\x02\x00\x15\x0a\x05\x08\x08\x00";

    /// Every strict prefix of a valid request is Incomplete; the whole one parses.
    fn check_all_prefixes(msg: &[u8]) -> Request {
        for n in 0..msg.len() {
            assert_eq!(parse_request(&msg[..n]), Err(ParseError::Incomplete), "prefix of {n} bytes");
        }
        let (req, used) = parse_request(msg).expect("whole request parses");
        assert_eq!(used, msg.len());
        req
    }

    /// A SOCKS4 CONNECT with a user id decodes, prefix by prefix.
    #[test]
    fn connect_all_prefixes() {
        let req = check_all_prefixes(CONNECT);
        assert_eq!(req.command, Command::Connect);
        assert_eq!(req.destination, Destination::Addr("127.0.0.1:80".parse().unwrap()));
        assert_eq!(req.user_id_len, 5);
    }

    /// A SOCKS4a CONNECT carries the hostname and port.
    #[test]
    fn connect_4a_all_prefixes() {
        let req = check_all_prefixes(CONNECT_4A);
        assert_eq!(req.destination, Destination::Name { host: "example.com".into(), port: 443 });
    }

    /// A BIND with an empty user id decodes.
    #[test]
    fn bind_all_prefixes() {
        let req = check_all_prefixes(BIND);
        assert_eq!(req.command, Command::Bind);
        assert_eq!(req.destination, Destination::Addr("10.5.8.8:21".parse().unwrap()));
    }

    /// Bytes after the request are left for the stream and counted out of `used`.
    #[test]
    fn trailing_bytes_are_not_consumed() {
        let mut msg = CONNECT.to_vec();
        msg.extend_from_slice(b"GET / HTTP/1.0\r\n");
        let (_, used) = parse_request(&msg).unwrap();
        assert_eq!(used, CONNECT.len());
    }

    /// Wrong version and unknown command are rejected at the first byte that shows them.
    #[test]
    fn bad_version_and_command() {
        assert_eq!(parse_request(b"\x05"), Err(ParseError::Version(5)));
        assert_eq!(parse_request(b"\x05\x01\x00"), Err(ParseError::Version(5)));
        assert_eq!(parse_request(b"\x04\x03"), Err(ParseError::Command(3)));
        assert_eq!(parse_request(b"\x04\x00\x00\x50\x7f\x00\x00\x01\x00"), Err(ParseError::Command(0)));
    }

    /// A user id of 255 bytes is fine; 256 bytes without NUL is an error, not Incomplete.
    #[test]
    fn user_id_limit() {
        let mut ok = b"\x04\x01\x00\x50\x7f\x00\x00\x01".to_vec();
        ok.extend(std::iter::repeat_n(b'u', 255));
        ok.push(0);
        assert!(parse_request(&ok).is_ok());
        let mut long = b"\x04\x01\x00\x50\x7f\x00\x00\x01".to_vec();
        long.extend(std::iter::repeat_n(b'u', 256));
        assert_eq!(parse_request(&long), Err(ParseError::UserIdTooLong));
        long.push(0);
        assert_eq!(parse_request(&long), Err(ParseError::UserIdTooLong));
    }

    /// Hostname limit and the empty hostname of a 4a request.
    #[test]
    fn hostname_limits() {
        let mut msg = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00".to_vec();
        assert_eq!(parse_request(&msg), Err(ParseError::Incomplete));
        msg.push(0);
        assert_eq!(parse_request(&msg), Err(ParseError::EmptyHostname));
        let mut long = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00".to_vec();
        long.extend(std::iter::repeat_n(b'h', 256));
        assert_eq!(parse_request(&long), Err(ParseError::HostnameTooLong));
        let mut max = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00".to_vec();
        max.extend(std::iter::repeat_n(b'h', 255));
        max.push(0);
        assert!(parse_request(&max).is_ok());
        assert!(MAX_REQUEST_LEN >= max.len());
    }

    /// A hostname that is not UTF-8, or holds a control character, is refused.
    #[test]
    fn hostname_encoding() {
        let msg = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\xff\xfe\x00";
        assert_eq!(parse_request(msg), Err(ParseError::HostnameEncoding));
        let msg = b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a\nb\x00";
        assert_eq!(parse_request(msg), Err(ParseError::HostnameEncoding));
    }

    /// 0.0.0.0 is a plain SOCKS4 address, not the 4a marker.
    #[test]
    fn zero_address_is_not_4a() {
        let (req, _) = parse_request(b"\x04\x02\x00\x00\x00\x00\x00\x00\x00").unwrap();
        assert_eq!(req.destination, Destination::Addr("0.0.0.0:0".parse().unwrap()));
    }

    /// Replies encode as VN=0, CD, port, address.
    #[test]
    fn reply_encoding() {
        let r = Reply::granted("127.0.0.1:8080".parse().unwrap()).encode();
        assert_eq!(r, [0, 90, 0x1f, 0x90, 127, 0, 0, 1]);
        assert_eq!(Reply::rejected().encode(), [0, 91, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ParseError::Version(5).reply(), ReplyCode::Rejected);
    }
}
