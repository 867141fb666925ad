//! Sans-io SOCKS codecs: bytes in, typed requests and replies out. No sockets,
//! no clocks, no allocation beyond the decoded fields. The server owns the I/O.

pub mod socks4;
