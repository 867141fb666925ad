//! Sans-io SOCKS codecs (SOCKS4/4a, SOCKS5): bytes in, typed requests and replies out. No sockets,
//! no clocks, no allocation beyond the decoded fields. The server owns the I/O.

pub mod socks4;
pub mod socks5;
