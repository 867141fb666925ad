//! Readiness for systemd (`Type=notify`): `sd_notify(3)` without libsystemd.
//! A datagram with `READY=1` goes to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name written with a leading `@`). Without
//! `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Tells systemd the daemon is up (control socket bound, listener started).
/// Failures are logged, never fatal.
pub fn notify_ready() {
    match notify("READY=1") {
        Ok(true) => tracing::debug!("told systemd READY=1"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot tell systemd the daemon is ready: {e}"),
    }
}

/// Tells systemd the daemon is shutting down.
pub fn notify_stopping() {
    if let Err(e) = notify("STOPPING=1") {
        tracing::debug!("cannot tell systemd the daemon is stopping: {e}");
    }
}

/// Sends `state` (e.g. `READY=1`, `STATUS=...`) to `$NOTIFY_SOCKET`. Returns
/// whether there was a socket to send to.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    send_to(&target.to_string_lossy(), state)?;
    Ok(true)
}

/// Sends one datagram to `target`: a socket path, or `@name` for an abstract socket.
pub fn send_to(target: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let n = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        None if target.starts_with('/') => sock.send_to(state.as_bytes(), target)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={target} is neither a path nor @abstract"),
            ))
        }
    };
    if n != state.len() {
        return Err(io::Error::other("short write to NOTIFY_SOCKET"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path socket and an abstract (`@`) socket both receive the datagram.
    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("proxyd-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("proxyd-sdnotify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "READY=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        assert!(send_to("relative", "READY=1").is_err());
    }
}
