//! proxyd: a SOCKS4, SOCKS4a and SOCKS5 proxy daemon that does what
//! RouterOS's `/ip socks` does, with the data path in the kernel where it can
//! load.
//!
//! Data flows one way: [`server`] accepts and runs the handshake
//! ([`protocol`] decodes, [`config`] decides), then hands the socket pair to a
//! [`datapath`], which owns it until it ends. [`control`] serves the command
//! language on a Unix socket. `cargo xtask lint` checks that no module
//! imports a module that imports it back.
//!
//! `unsafe` lives only in [`sys`] (raw system calls) and [`privileges`]
//! (capabilities), each block with its SAFETY argument.

#![deny(unsafe_code)]

pub mod bpf;
pub mod completions;
pub mod config;
pub mod console;
pub mod control;
pub mod datapath;
pub mod manpage;
pub mod metrics;
#[allow(unsafe_code)]
pub mod privileges;
pub mod protocol;
pub mod sdnotify;
pub mod server;
#[allow(unsafe_code)]
pub mod sys;
pub mod upgrade;
pub mod vrf;
pub mod xdp;
