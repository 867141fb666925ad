//! SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929):
//! the greeting, the auth request, the request, replies, and the UDP
//! datagram header. Sans-io like [`super::socks4`]: every parser answers
//! [`ParseError::Incomplete`] until the whole message is there and checks the
//! length before reading each field.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `METHOD` values of the greeting.
pub const METHOD_NONE: u8 = 0x00;
pub const METHOD_PASSWORD: u8 = 0x02;
pub const METHOD_UNACCEPTABLE: u8 = 0xff;

/// What the client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
}

/// An address as SOCKS5 carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Ip(SocketAddr),
    Domain { host: String, port: u16 },
}

impl Address {
    pub fn port(&self) -> u16 {
        match self {
            Address::Ip(a) => a.port(),
            Address::Domain { port, .. } => *port,
        }
    }

    /// Appends `ATYP ADDR PORT`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Address::Ip(SocketAddr::V4(a)) => {
                out.push(1);
                out.extend_from_slice(&a.ip().octets());
            }
            Address::Ip(SocketAddr::V6(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
            }
            Address::Domain { host, .. } => {
                out.push(3);
                out.push(host.len() as u8);
                out.extend_from_slice(host.as_bytes());
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(a) => write!(f, "{a}"),
            Address::Domain { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("incomplete message")]
    Incomplete,
    #[error("unsupported SOCKS version {0}")]
    Version(u8),
    #[error("greeting offers no methods")]
    NoMethods,
    #[error("unsupported username/password version {0}")]
    AuthVersion(u8),
    #[error("unknown SOCKS5 command {0}")]
    Command(u8),
    #[error("reserved byte is {0}, not 0")]
    Reserved(u8),
    #[error("unknown address type {0}")]
    AddressType(u8),
    #[error("empty domain name")]
    EmptyDomain,
    #[error("domain name is not valid text (UTF-8 without control characters)")]
    DomainEncoding,
    #[error("fragmented UDP datagrams are not supported")]
    Fragment,
}

impl ParseError {
    /// The reply that tells the client about this error (RFC 1928 section 6).
    pub fn reply(&self) -> ReplyCode {
        match self {
            ParseError::Command(_) => ReplyCode::CommandNotSupported,
            ParseError::AddressType(_) => ReplyCode::AddressTypeNotSupported,
            _ => ReplyCode::GeneralFailure,
        }
    }
}

/// `VER NMETHODS METHODS...`
pub fn parse_greeting(buf: &[u8]) -> Result<(Vec<u8>, usize), ParseError> {
    match buf.first() {
        None => return Err(ParseError::Incomplete),
        Some(5) => {}
        Some(&v) => return Err(ParseError::Version(v)),
    }
    let n = *buf.get(1).ok_or(ParseError::Incomplete)? as usize;
    if n == 0 {
        return Err(ParseError::NoMethods);
    }
    let methods = buf.get(2..2 + n).ok_or(ParseError::Incomplete)?;
    Ok((methods.to_vec(), 2 + n))
}

/// RFC 1929 credentials. The password is never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Vec<u8>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<hidden>").finish()
    }
}

/// `VER=1 ULEN UNAME PLEN PASSWD`
pub fn parse_credentials(buf: &[u8]) -> Result<(Credentials, usize), ParseError> {
    match buf.first() {
        None => return Err(ParseError::Incomplete),
        Some(1) => {}
        Some(&v) => return Err(ParseError::AuthVersion(v)),
    }
    let ulen = *buf.get(1).ok_or(ParseError::Incomplete)? as usize;
    let uname = buf.get(2..2 + ulen).ok_or(ParseError::Incomplete)?;
    let plen = *buf.get(2 + ulen).ok_or(ParseError::Incomplete)? as usize;
    let start = 3 + ulen;
    let passwd = buf.get(start..start + plen).ok_or(ParseError::Incomplete)?;
    let username = String::from_utf8_lossy(uname).into_owned();
    Ok((Credentials { username, password: passwd.to_vec() }, start + plen))
}

/// The answer to the credentials: status 0 is success.
pub fn encode_auth_status(ok: bool) -> [u8; 2] {
    [1, if ok { 0 } else { 1 }]
}

/// A decoded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub destination: Address,
}

/// Parses `ATYP ADDR PORT` at the start of `buf`.
fn parse_address(buf: &[u8]) -> Result<(Address, usize), ParseError> {
    let atyp = *buf.first().ok_or(ParseError::Incomplete)?;
    let (addr_len, skip) = match atyp {
        1 => (4, 1),
        4 => (16, 1),
        3 => (*buf.get(1).ok_or(ParseError::Incomplete)? as usize, 2),
        other => return Err(ParseError::AddressType(other)),
    };
    let end = skip + addr_len + 2;
    let field = buf.get(skip..end).ok_or(ParseError::Incomplete)?;
    let (addr, port) = field.split_at(addr_len);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let address = match atyp {
        1 => Address::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])), port)),
        4 => {
            let octets: [u8; 16] = addr.try_into().expect("16 bytes");
            Address::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => {
            if addr.is_empty() {
                return Err(ParseError::EmptyDomain);
            }
            let host = super::hostname(addr).ok_or(ParseError::DomainEncoding)?;
            Address::Domain { host: host.to_owned(), port }
        }
    };
    Ok((address, end))
}

/// `VER=5 CMD RSV=0 ATYP DST.ADDR DST.PORT`
pub fn parse_request(buf: &[u8]) -> Result<(Request, usize), ParseError> {
    match buf.first() {
        None => return Err(ParseError::Incomplete),
        Some(5) => {}
        Some(&v) => return Err(ParseError::Version(v)),
    }
    let command = match buf.get(1) {
        None => return Err(ParseError::Incomplete),
        Some(1) => Command::Connect,
        Some(2) => Command::Bind,
        Some(3) => Command::UdpAssociate,
        Some(&c) => return Err(ParseError::Command(c)),
    };
    match buf.get(2) {
        None => return Err(ParseError::Incomplete),
        Some(0) => {}
        Some(&r) => return Err(ParseError::Reserved(r)),
    }
    let (destination, used) = parse_address(&buf[3..])?;
    Ok((Request { command, destination }, 3 + used))
}

/// Reply codes (RFC 1928 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplyCode {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

impl ReplyCode {
    /// The reply for a failed connect or resolve.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => ReplyCode::ConnectionRefused,
            TimedOut => ReplyCode::TtlExpired,
            NetworkUnreachable => ReplyCode::NetworkUnreachable,
            HostUnreachable | NotFound => ReplyCode::HostUnreachable,
            _ => ReplyCode::GeneralFailure,
        }
    }
}

/// `VER=5 REP RSV=0 ATYP BND.ADDR BND.PORT`
pub fn encode_reply(code: ReplyCode, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![5, code as u8, 0];
    Address::Ip(bound).encode_into(&mut out);
    out
}

/// A UDP datagram's header: `RSV(2) FRAG ATYP DST.ADDR DST.PORT`.
/// Returns the address and where the payload starts.
pub fn parse_udp_header(buf: &[u8]) -> Result<(Address, usize), ParseError> {
    if buf.len() < 3 {
        return Err(ParseError::Incomplete);
    }
    if buf[2] != 0 {
        return Err(ParseError::Fragment);
    }
    let (addr, used) = parse_address(&buf[3..])?;
    Ok((addr, 3 + used))
}

/// Prepends the UDP header for a datagram from `from`.
pub fn encode_udp(from: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 22);
    out.extend_from_slice(&[0, 0, 0]);
    Address::Ip(from).encode_into(&mut out);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parser under test: a message and how many bytes it took, or why not.
    type Parser<T> = fn(&[u8]) -> Result<(T, usize), ParseError>;

    fn check_all_prefixes<T: PartialEq + fmt::Debug>(msg: &[u8], parse: Parser<T>) -> T {
        for n in 0..msg.len() {
            assert_eq!(parse(&msg[..n]).map(|_| ()), Err(ParseError::Incomplete), "prefix of {n} bytes");
        }
        let (v, used) = parse(msg).expect("whole message parses");
        assert_eq!(used, msg.len());
        v
    }

    /// Greetings decode prefix by prefix; no methods is an error.
    #[test]
    fn greeting() {
        assert_eq!(check_all_prefixes(b"\x05\x02\x00\x02", parse_greeting), vec![0, 2]);
        assert_eq!(parse_greeting(b"\x05\x00"), Err(ParseError::NoMethods));
        assert_eq!(parse_greeting(b"\x04\x01\x00"), Err(ParseError::Version(4)));
    }

    /// Username/password decode prefix by prefix; Debug hides the password.
    #[test]
    fn credentials() {
        let c = check_all_prefixes(b"\x01\x05alice\x06s3cret", parse_credentials);
        assert_eq!(c.username, "alice");
        assert_eq!(c.password, b"s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        let empty = check_all_prefixes(b"\x01\x00\x00", parse_credentials);
        assert_eq!(empty.username, "");
        assert_eq!(parse_credentials(b"\x05\x01a\x01b"), Err(ParseError::AuthVersion(5)));
        assert_eq!(encode_auth_status(false), [1, 1]);
    }

    /// CONNECT to IPv4, IPv6 and a domain decode prefix by prefix.
    #[test]
    fn requests() {
        let r = check_all_prefixes(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", parse_request);
        assert_eq!(r, Request { command: Command::Connect, destination: Address::Ip("127.0.0.1:80".parse().unwrap()) });
        let mut v6 = b"\x05\x01\x00\x04".to_vec();
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0x1f, 0x90]);
        let r = check_all_prefixes(&v6, parse_request);
        assert_eq!(r.destination, Address::Ip("[::1]:8080".parse().unwrap()));
        let r = check_all_prefixes(b"\x05\x03\x00\x03\x09localhost\x00\x35", parse_request);
        assert_eq!(
            r,
            Request {
                command: Command::UdpAssociate,
                destination: Address::Domain { host: "localhost".into(), port: 53 }
            }
        );
        let r = check_all_prefixes(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00", parse_request);
        assert_eq!(r.command, Command::Bind);
    }

    /// Bad requests map to the right reply codes.
    #[test]
    fn bad_requests() {
        assert_eq!(parse_request(b"\x05\x09"), Err(ParseError::Command(9)));
        assert_eq!(ParseError::Command(9).reply(), ReplyCode::CommandNotSupported);
        assert_eq!(parse_request(b"\x05\x01\x00\x07"), Err(ParseError::AddressType(7)));
        assert_eq!(ParseError::AddressType(7).reply(), ReplyCode::AddressTypeNotSupported);
        assert_eq!(parse_request(b"\x05\x01\x01"), Err(ParseError::Reserved(1)));
        assert_eq!(parse_request(b"\x05\x01\x00\x03\x00\x00\x50"), Err(ParseError::EmptyDomain));
        assert_eq!(parse_request(b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50"), Err(ParseError::DomainEncoding));
        assert_eq!(parse_request(b"\x05\x01\x00\x03\x03a\nb\x00\x50"), Err(ParseError::DomainEncoding));
        assert_eq!(parse_request(b"\x05\x01\x00\x03\x03a\x00b\x00\x50"), Err(ParseError::DomainEncoding));
    }

    /// Replies and UDP headers encode and decode symmetrically.
    #[test]
    fn replies_and_udp() {
        assert_eq!(
            encode_reply(ReplyCode::Succeeded, "127.0.0.1:1080".parse().unwrap()),
            b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
        );
        assert_eq!(encode_reply(ReplyCode::NotAllowed, "[::]:0".parse().unwrap()).len(), 22);
        let from: SocketAddr = "[::1]:5353".parse().unwrap();
        let d = encode_udp(from, b"ping");
        let (addr, start) = parse_udp_header(&d).unwrap();
        assert_eq!((addr, &d[start..]), (Address::Ip(from), &b"ping"[..]));
        assert_eq!(parse_udp_header(b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35"), Err(ParseError::Fragment));
        let udp = check_all_prefixes(b"\x00\x00\x00\x03\x09localhost\x00\x35", parse_udp_header);
        assert_eq!(udp, Address::Domain { host: "localhost".into(), port: 53 });
    }
}
