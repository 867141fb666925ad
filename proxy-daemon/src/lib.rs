//! proxyd: a SOCKS4/4a proxy daemon that does what RouterOS's `/ip socks`
//! does, with the data path in the kernel where it can load.
//!
//! Data flows one way: [`server`] accepts and runs the handshake
//! ([`protocol`] decodes, [`config`] decides), then hands the socket pair to a
//! [`datapath`], which owns it until it ends. [`control`] serves the command
//! language on a Unix socket.

pub mod bpf;
pub mod completions;
pub mod config;
pub mod console;
pub mod control;
pub mod datapath;
pub mod manpage;
pub mod metrics;
pub mod privileges;
pub mod protocol;
pub mod sdnotify;
pub mod server;
pub mod xdp;
