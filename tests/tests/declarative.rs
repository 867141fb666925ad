//! `proxyd run --config FILE`: the configuration is a file the operator owns.
//! An edit in place and a Kubernetes-style ConfigMap update (a new folder, the
//! `..data` symlink swapped) are applied within 2 s; a file with a bad line
//! is refused whole (its line in the log, the reload-error metric) and the
//! running configuration stays; control-socket changes are refused.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use proxyd_tests::daemon::Options;
use proxyd_tests::{free_port, listen_local, sample, scrape, socks, tcp_connect, wait_until, Daemon};

/// What a SOCKS4 CONNECT from 127.0.0.1 to `dst` gets: 90 (granted) or 91.
fn answer(proxy: SocketAddr, dst: std::net::SocketAddrV4) -> u8 {
    let mut c = TcpStream::connect(proxy).expect("the proxy listens");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = vec![4, 1];
    req.extend_from_slice(&dst.port().to_be_bytes());
    req.extend_from_slice(&dst.ip().octets());
    req.push(0);
    c.write_all(&req).unwrap();
    let mut reply = [0u8; 8];
    match c.read_exact(&mut reply) {
        Ok(()) => reply[1],
        Err(_) => 0,
    }
}

fn script(port: u16, metrics: u16, rules: &str) -> String {
    format!(
        "# proxyd, declarative\n/ip socks\nset enabled=yes port={port} listen-address=127.0.0.1 metrics-address=127.0.0.1:{metrics}\n/ip socks access\n{rules}"
    )
}

#[test]
fn the_config_file_is_applied_when_it_changes() {
    let (port, mport) = (free_port(), free_port());
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], mport).into();
    let (l, dst) = listen_local();
    // A ConfigMap's layout: config.rsc -> ..data/config.rsc, ..data -> ..v1.
    let dir = std::env::temp_dir().join(format!("proxyd-declarative-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..v1")).unwrap();
    std::fs::write(
        dir.join("..v1/config.rsc"),
        script(port, mport, "add src-address=127.0.0.1 action=allow\nadd action=deny\n"),
    )
    .unwrap();
    symlink("..v1", dir.join("..data")).unwrap();
    symlink("..data/config.rsc", dir.join("config.rsc")).unwrap();
    let file = dir.join("config.rsc");
    let options = Options { args: vec!["--config".into(), file.display().to_string()], ..Options::default() };
    let d = Daemon::start_with("userspace", options);
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "not listening:\n{}", d.log());
    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
    c.write_all(b"a").unwrap();
    let mut b = [0u8];
    u.read_exact(&mut b).unwrap();

    // Control-socket changes are refused, saying where the configuration lives; print works.
    let out = d.cli(&["ip", "socks", "access", "add", "action=deny"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.cmd("ip socks access print").contains("src-address=127.0.0.1"));

    // A ConfigMap update: a new folder, `..data` swapped atomically.
    std::fs::create_dir_all(dir.join("..v2")).unwrap();
    std::fs::write(dir.join("..v2/config.rsc"), script(port, mport, "add src-address=127.0.0.1 action=deny\n"))
        .unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || answer(proxy, dst) == 91),
        "the ConfigMap update was not applied within 2 s:\n{}",
        d.log()
    );
    // The open tunnel stays (no --config-enforce).
    c.write_all(b"b").unwrap();
    u.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"b");

    // A file with a bad third line is refused whole: the running configuration stays.
    std::fs::write(dir.join("..v2/config.rsc"), "/ip socks access\nadd action=allow\nadd action=maybe\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || d.log().contains("config.rsc:3:")),
        "the bad line was not reported:\n{}",
        d.log()
    );
    assert_eq!(answer(proxy, dst), 91, "a refused file changed the access list");
    let text = scrape(&metrics.to_string());
    assert_eq!(sample(&text, "proxyd_config_reload_errors_total"), 1, "{text}");

    // An edit in place is applied too.
    std::fs::write(dir.join("..v2/config.rsc"), script(port, mport, "add action=allow\n")).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || answer(proxy, dst) == 90),
        "the edit in place was not applied within 2 s:\n{}",
        d.log()
    );
    let _ = l.accept();
    assert!(!Path::new(&d.state).exists(), "--config mode wrote a state file");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--config-enforce`, a new version of the file closes the open
/// tunnels its access list denies; the others stay.
#[test]
fn config_enforce_closes_what_the_new_list_denies() {
    let (port, mport) = (free_port(), free_port());
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let (l, dst) = listen_local();
    let (l2, dst2) = listen_local();
    let dir = std::env::temp_dir().join(format!("proxyd-enforce-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.rsc");
    std::fs::write(&file, script(port, mport, "add action=allow\n")).unwrap();
    let args = vec!["--config".into(), file.display().to_string(), "--config-enforce".into()];
    let d = Daemon::start_with("userspace", Options { args, ..Options::default() });
    assert!(wait_until(Duration::from_secs(5), || tcp_connect(proxy).is_ok()), "not listening:\n{}", d.log());
    let (mut denied_c, mut denied_u) = socks::tunnel(proxy, &l, dst);
    let (mut kept_c, mut kept_u) = socks::tunnel(proxy, &l2, dst2);
    // Deny the first destination's port only.
    std::fs::write(&file, script(port, mport, &format!("add dst-port={} action=deny\nadd action=allow\n", dst.port())))
        .unwrap();
    assert!(
        socks::closed_within(&mut denied_c, Duration::from_secs(3)),
        "the tunnel the new list denies is still open:\n{}",
        d.log()
    );
    let _ = denied_u.write_all(b"x");
    kept_c.write_all(b"still").unwrap();
    let mut b = [0u8; 5];
    kept_u.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
