//! Fuzzes the SOCKS5 codec (greeting, RFC 1929 credentials, request, UDP header):
//! no parser panics or claims more bytes than it was given or than the message can
//! hold; every prefix of the input answers `Incomplete` or exactly what the whole input
//! answers (so feeding bytes in pieces never changes the outcome); a decoded message
//! re-encodes to the bytes it came from; error replies encode. The input is also read
//! as a session, the way the server does: greeting, then credentials, then request.
#![no_main]

use std::fmt::Debug;
use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use proxyd::protocol::socks5::{
    encode_auth_status, encode_reply, encode_udp, parse_credentials, parse_greeting, parse_request, parse_udp_header,
    Address, Command, Credentials, ParseError, ReplyCode, METHOD_PASSWORD,
};

/// Longest messages: VER NMETHODS 255 methods; VER ULEN 255 PLEN 255;
/// VER CMD RSV ATYP LEN 255 PORT; RSV RSV FRAG ATYP LEN 255 PORT.
const MAX_GREETING: usize = 2 + 255;
const MAX_CREDENTIALS: usize = 3 + 255 + 255;
const MAX_REQUEST: usize = 3 + 2 + 255 + 2;
const MAX_UDP_HEADER: usize = 3 + 2 + 255 + 2;

type Parse<T> = fn(&[u8]) -> Result<(T, usize), ParseError>;

/// The properties every parser shares; returns what the whole input decodes to.
fn check<T: PartialEq + Debug>(data: &[u8], parse: Parse<T>, max: usize) -> Result<(T, usize), ParseError> {
    let whole = parse(data);
    match &whole {
        Ok((_, used)) => assert!(*used > 0 && *used <= data.len() && *used <= max, "used {used} of {}", data.len()),
        Err(ParseError::Incomplete) => {
            assert!(data.len() < max, "Incomplete after {} bytes", data.len())
        }
        Err(e) => {
            let code = e.reply();
            assert_eq!(encode_reply(code, SocketAddr::from(([0, 0, 0, 0], 0))).len(), 10);
        }
    }
    // Byte-at-a-time delivery: each prefix is Incomplete, or already the final answer
    // (an Ok only once the whole message is there, an error as soon as it shows).
    let upto = match &whole {
        Ok((_, used)) => *used,
        _ => data.len().min(max),
    };
    for k in 0..=upto {
        match parse(&data[..k]) {
            Err(ParseError::Incomplete) => {}
            other => {
                assert_eq!(other, whole, "prefix of {k} bytes decodes differently");
                if let Ok((_, used)) = &other {
                    assert_eq!(*used, k, "Ok before the whole message was there");
                }
            }
        }
    }
    if let Ok((_, used)) = &whole {
        assert!(matches!(parse(&data[..used - 1]), Err(ParseError::Incomplete)));
    }
    whole
}

fn encode_address(a: &Address) -> Vec<u8> {
    let mut v = Vec::new();
    a.encode_into(&mut v);
    v
}

fn greeting(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let r = check(data, parse_greeting, MAX_GREETING).ok()?;
    let (methods, used) = &r;
    assert_eq!(data[0], 5);
    assert_eq!(methods.len(), data[1] as usize);
    assert!(!methods.is_empty());
    assert_eq!(&data[2..*used], &methods[..]);
    Some(r)
}

fn credentials(data: &[u8]) -> Option<(Credentials, usize)> {
    let r = check(data, parse_credentials, MAX_CREDENTIALS).ok()?;
    let (c, used) = &r;
    let ulen = data[1] as usize;
    assert_eq!(*used, 3 + ulen + data[2 + ulen] as usize);
    assert_eq!(&c.password[..], &data[3 + ulen..*used]);
    if let Ok(name) = std::str::from_utf8(&data[2..2 + ulen]) {
        assert_eq!(c.username, name);
    }
    // Debug never shows the password: it is the name and a fixed placeholder, whatever
    // the password bytes are.
    assert_eq!(
        format!("{c:?}"),
        format!("Credentials {{ username: {:?}, password: \"<hidden>\" }}", c.username),
        "Debug of credentials shows more than the name"
    );
    let _ = encode_auth_status(c.username.is_empty());
    Some(r)
}

fn request(data: &[u8]) -> Option<usize> {
    let (req, used) = check(data, parse_request, MAX_REQUEST).ok()?;
    assert_eq!(data[0], 5);
    assert_eq!(data[2], 0);
    let cmd = match req.command {
        Command::Connect => 1,
        Command::Bind => 2,
        Command::UdpAssociate => 3,
    };
    assert_eq!(data[1], cmd);
    // The destination re-encodes to exactly the bytes it came from.
    assert_eq!(encode_address(&req.destination), &data[3..used]);
    if let Address::Domain { host, .. } = &req.destination {
        assert!(!host.is_empty() && host.len() <= 255);
    }
    // A reply for an IP destination carries the same address back.
    if let Address::Ip(a) = req.destination {
        let reply = encode_reply(ReplyCode::Succeeded, a);
        assert_eq!(&reply[..3], &[5, 0, 0]);
        assert_eq!(&reply[3..], &data[3..used]);
    }
    Some(used)
}

fn udp_header(data: &[u8]) {
    let Ok((addr, start)) = check(data, parse_udp_header, MAX_UDP_HEADER) else {
        return;
    };
    assert_eq!(data[2], 0, "fragments are refused");
    assert_eq!(encode_address(&addr), &data[3..start]);
    if let Address::Ip(a) = addr {
        // What the relay sends to the client parses back to the same source and payload.
        let wrapped = encode_udp(a, &data[start..]);
        let (back, at) = parse_udp_header(&wrapped).expect("encode_udp output parses");
        assert_eq!((back, &wrapped[at..]), (Address::Ip(a), &data[start..]));
    }
}

fuzz_target!(|data: &[u8]| {
    // Longer inputs add nothing: every message fits in 513 bytes.
    let data = &data[..data.len().min(1024)];
    let _ = greeting(data);
    let _ = credentials(data);
    let _ = request(data);
    udp_header(data);

    // As a session: greeting, credentials when offered, then the request.
    let Some((methods, used)) = greeting(data) else {
        return;
    };
    let mut rest = &data[used..];
    if methods.contains(&METHOD_PASSWORD) {
        let Some((_, used)) = credentials(rest) else {
            return;
        };
        rest = &rest[used..];
    }
    let _ = request(rest);
});
