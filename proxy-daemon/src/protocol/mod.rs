//! Sans-io SOCKS codecs (SOCKS4/4a, SOCKS5): bytes in, typed requests and replies out. No sockets,
//! no clocks, no allocation beyond the decoded fields. The server owns the I/O.

pub mod socks4;
pub mod socks5;

/// A hostname from the wire as text: UTF-8 without control characters (no
/// resolver takes one, and a line break would forge lines in the daemon's
/// log, which names the host a request could not reach).
fn hostname(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok().filter(|h| !h.chars().any(char::is_control))
}
