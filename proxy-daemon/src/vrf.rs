//! The `vrf` setting on Linux: the listener and every socket proxyd opens
//! for a client (CONNECT dials, BIND listeners, UDP ASSOCIATE relays) are
//! bound to one device with `SO_BINDTODEVICE`. Bound to a VRF device, a
//! socket routes through the VRF's table and accepts only what arrives
//! through the VRF's interfaces; bound to a plain interface, it sends and
//! receives only through that interface. `vrf=main` binds nothing.
//!
//! Since Linux 5.7 binding a socket that is not bound yet needs no
//! capability, so this works with the capabilities proxyd keeps.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt::BindToDevice};

/// Fails, naming the property and what it takes, when no device `name`
/// exists in the daemon's network namespace.
pub fn check(name: &str) -> io::Result<()> {
    match nix::net::if_::if_nametoindex(name) {
        Ok(_) => Ok(()),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "invalid value for vrf: `{name}`: no such VRF or interface here ({e}) (allowed: {})",
                crate::config::VRF_ALLOWED
            ),
        )),
    }
}

/// Binds `sock` to `device` (before it is bound to an address or connects);
/// `None` (`vrf=main`) leaves it alone.
pub fn bind(sock: &impl AsFd, device: Option<&str>) -> io::Result<()> {
    let Some(device) = device else { return Ok(()) };
    setsockopt(sock, BindToDevice, &OsString::from(device))
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("vrf={device}: cannot bind to the device: {e}")))
}
