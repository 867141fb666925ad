//! Who may change the daemon and what it can do: the control socket refuses non-root
//! users, the daemon keeps only the capabilities it needs (in every thread), logs never
//! carry payloads, user ids or passwords, and it raises its open-files limit for
//! `max-connections` or says that it cannot.

use proxyd_tests::hardening::{cap_names, nofile_limits, thread_caps};
use proxyd_tests::{
    accept_timeout, data_paths, listen_local, require_program, socks, text, wait_until, Daemon, Options,
};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

/// Capabilities the daemon may keep: net_bind_service (10), net_admin (12), perfmon (38), bpf (39).
const KEPT: u64 = (1 << 10) | (1 << 12) | (1 << 38) | (1 << 39);

/// Runs the proxyd CLI as user `nobody` (uid/gid 65534, no groups, no capabilities).
fn cli_as_nobody(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&d.cli.bin)
        .arg("--control")
        .arg(&d.cli.control)
        .args(args);
    proxyd_tests::run_with_timeout(&mut cmd, Duration::from_secs(15))
}

/// The control socket is mode 0600; user `nobody` is refused both by the file mode and,
/// when the mode is loosened to 0666, by the daemon's peer-credential check; nothing
/// it asked for changes.
#[test]
fn control_socket_refuses_non_root() {
    const T: &str = "control_socket_refuses_non_root";
    if !proxyd_tests::is_root() {
        proxyd_tests::skip_or_fail(T, "needs root (runs the CLI as user nobody)");
        return;
    }
    if require_program(T, "setpriv").is_none() {
        return;
    }
    let d = Daemon::start("userspace");
    let mode = std::fs::metadata(&d.cli.control).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "control socket mode is {mode:o}, want 600");
    let before = d.export("");

    let out = cli_as_nobody(&d, &["ip", "socks", "set", "max-connections=77"]);
    assert!(!out.status.success(), "nobody changed the daemon through the 0600 socket: {}", text(&out.stdout));

    // Loosen the file mode: the daemon's own SO_PEERCRED check must still refuse.
    std::fs::set_permissions(&d.cli.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    // Let nobody reach the socket through the test's private dir.
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for args in [
        &["ip", "socks", "set", "max-connections=77"][..],
        &["ip", "socks", "access", "add", "action=deny"][..],
        &["export"][..],
    ] {
        let out = cli_as_nobody(&d, args);
        assert!(
            !out.status.success(),
            "nobody got an answer to `{}` through a 0666 socket (peer check missing): {}",
            args.join(" "),
            text(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "nobody read `{}`: {}", args.join(" "), text(&out.stdout));
    }
    std::fs::set_permissions(&d.cli.control, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(d.export(""), before, "a refused non-root command changed the configuration");
    assert!(d.log().contains("control connection refused"), "the refusal is not logged:\n{}", d.log());
}

/// After start-up every thread's effective, permitted and bounding sets hold nothing
/// but net_bind_service, net_admin and bpf (inheritable and ambient empty, no_new_privs
/// set); tunnels still work (on the kernel path through the BPF maps) and the daemon
/// can still rebind to a port below 1024.
#[test]
fn keeps_only_needed_capabilities() {
    const T: &str = "keeps_only_needed_capabilities";
    if !proxyd_tests::is_root() {
        proxyd_tests::skip_or_fail(T, "needs root (starts with all capabilities)");
        return;
    }
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        // A tunnel carries bytes both ways (kernel path: sockhash/peer/flow map updates).
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        u.read_exact(&mut b).unwrap();
        u.write_all(b"pong!").unwrap();
        let mut b5 = [0u8; 5];
        c.read_exact(&mut b5).unwrap();
        assert_eq!(&b5, b"pong!");
        let counted = wait_until(Duration::from_secs(3), || d.cli.connections().iter().any(|r| r.tx == 4 && r.rx == 5));
        assert!(counted, "[{dp}] counters wrong after dropping capabilities: {:?}", d.cli.connections());

        let threads = thread_caps(d.pid());
        assert!(threads.len() > 1, "[{dp}] expected a multi-threaded daemon");
        for t in &threads {
            let what = format!("[{dp}] thread {}", t.tid);
            assert_eq!(t.eff & !KEPT, 0, "{what}: effective set has {}", cap_names(t.eff & !KEPT));
            assert_eq!(t.prm & !KEPT, 0, "{what}: permitted set has {}", cap_names(t.prm & !KEPT));
            assert_eq!(t.bnd & !KEPT, 0, "{what}: bounding set has {}", cap_names(t.bnd & !KEPT));
            assert_eq!((t.inh, t.amb), (0, 0), "{what}: inheritable/ambient not empty");
            assert!(t.no_new_privs, "{what}: no_new_privs not set");
            assert_eq!(t.eff, KEPT, "{what}: a needed capability is missing: has {}", cap_names(t.eff));
        }
        drop((c, u));

        // CAP_NET_BIND_SERVICE kept: rebinding to a free port below 1024 works live.
        if let Some(low) = (1000..1024).find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok()) {
            d.cli_ok(&["ip", "socks", "set", &format!("port={low}")]);
            let proxy = format!("127.0.0.1:{low}").parse().unwrap();
            let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
            c.write_all(b"x").unwrap();
            u.read_exact(&mut [0u8; 1]).unwrap();
        }
        assert!(d.stop(), "[{dp}] no clean exit:\n{}", d.log());
    }
}

const PAYLOAD_UP: &str = "PAYLOAD-UP-8c1f2e77";
const PAYLOAD_DOWN: &str = "PAYLOAD-DOWN-41b9d0aa";
const USER_ID: &str = "USERID-5e0c3a19";
const PASSWORD: &str = "PASSWORD-d94b2c6f";

/// With logging at `trace`, tunnels (granted, denied, malformed, SOCKS4a, BIND-less)
/// and SOCKS5 logins (right and wrong password) leave no payload byte, SOCKS4 user id
/// or password in the daemon's stderr.
#[test]
fn logs_carry_no_payload_user_id_or_password() {
    for dp in data_paths() {
        let mut d =
            Daemon::start_with(dp, Options { env: vec![("PROXYD_LOG".into(), "trace".into())], ..Options::default() });
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let denied_port = proxyd_tests::free_port();
        d.cli_ok(&["ip", "socks", "access", "add", &format!("dst-port={denied_port}"), "action=deny"]);
        let user = USER_ID.as_bytes();

        // Granted tunnel, payload both ways, early data right after the request.
        let mut c = proxyd_tests::tcp_connect(proxy).unwrap();
        let mut req = socks::request(socks::CONNECT, dst, user);
        req.extend_from_slice(PAYLOAD_UP.as_bytes());
        c.write_all(&req).unwrap();
        assert_eq!(socks::read_reply(&mut c).unwrap().code, socks::GRANTED);
        let mut u = accept_timeout(&l, Duration::from_secs(5)).expect("accept");
        c.write_all(PAYLOAD_UP.as_bytes()).unwrap();
        let mut got = vec![0u8; PAYLOAD_UP.len() * 2];
        u.read_exact(&mut got).unwrap();
        u.write_all(PAYLOAD_DOWN.as_bytes()).unwrap();
        let mut got = vec![0u8; PAYLOAD_DOWN.len()];
        c.read_exact(&mut got).unwrap();
        drop(c);
        drop(u);

        // Denied by a rule, malformed (command 7), SOCKS4a, and an over-long user id.
        let denied = SocketAddrV4::new(Ipv4Addr::LOCALHOST, denied_port);
        let mut malformed = socks::request(socks::CONNECT, dst, user);
        malformed[1] = 7;
        let long_user = format!("{USER_ID}{}", "x".repeat(2000));
        for bytes in [
            socks::request(socks::CONNECT, denied, user),
            malformed,
            socks::request_4a(socks::CONNECT, dst.port(), b"localhost", user),
            socks::request(socks::CONNECT, dst, long_user.as_bytes()),
        ] {
            let mut c = proxyd_tests::tcp_connect(proxy).unwrap();
            let _ = c.write_all(&bytes);
            let _ = socks::answer(&mut c, Duration::from_secs(5));
            if let Some(mut u) = accept_timeout(&l, Duration::from_millis(200)) {
                let _ = u.write_all(PAYLOAD_DOWN.as_bytes());
            }
        }

        // SOCKS5 logins, when this build speaks SOCKS5 (`version=5`).
        let socks5 = d.cli(&["ip", "socks", "set", "version=5", "auth-method=password"]).status.success();
        if socks5 {
            d.cli_ok(&["ip", "socks", "users", "add", "name=alice", &format!("password={PASSWORD}")]);
            for pass in [PASSWORD.to_string(), format!("{PASSWORD}-wrong")] {
                let mut c = proxyd_tests::tcp_connect(proxy).unwrap();
                c.write_all(&[5, 1, 2]).unwrap();
                let mut m = [0u8; 2];
                if c.read_exact(&mut m).is_err() || m != [5, 2] {
                    panic!("[{dp}] SOCKS5 greeting: server chose {m:?}, want [5, 2]");
                }
                let mut auth = vec![1, 5];
                auth.extend_from_slice(b"alice");
                auth.push(pass.len() as u8);
                auth.extend_from_slice(pass.as_bytes());
                c.write_all(&auth).unwrap();
                let mut r = [0u8; 2];
                let _ = c.read_exact(&mut r);
            }
        } else {
            eprintln!("note: this proxyd has no SOCKS5 (`set version=5` refused); password part skipped");
        }

        // Let the daemon log the closes.
        wait_until(Duration::from_secs(5), || d.cli.connections().is_empty());
        std::thread::sleep(Duration::from_millis(200));
        assert!(d.stop(), "[{dp}] no clean exit");
        let log = d.log();
        assert!(log.contains("tunnel closed"), "[{dp}] expected tunnel logs at trace level:\n{log}");
        for secret in [PAYLOAD_UP, PAYLOAD_DOWN, USER_ID, PASSWORD] {
            assert!(
                !log.contains(secret),
                "[{dp}] the daemon's log contains {secret:?}:\n{}",
                log.lines().filter(|l| l.contains(secret)).collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Started with a soft open-files limit of 1024, a saved max-connections=9000 makes
/// the daemon raise its soft limit to at least 2 x 9000 (two sockets per tunnel); a
/// max-connections beyond the hard limit makes it say so in its log.
#[test]
fn raises_nofile_limit_for_max_connections() {
    let mut d = Daemon::start_with("userspace", Options { nofile_soft: Some(1024), ..Options::default() });
    let (soft0, hard) = nofile_limits(d.pid());
    assert_eq!(soft0, 1024.min(hard), "the harness did not lower the soft limit");
    d.cmd("ip socks set max-connections=9000");
    d.restart();
    let (soft, _) = nofile_limits(d.pid());
    let want = (2 * 9000u64).min(hard);
    assert!(soft >= want, "max-connections=9000: soft NOFILE is {soft}, want >= {want} (hard {hard})\n{}", d.log());

    // Beyond the hard limit: raised as far as possible, and logged.
    let too_many = hard / 2 + 1000;
    if too_many <= 1_000_000 {
        d.cli_ok(&["ip", "socks", "set", &format!("max-connections={too_many}")]);
        d.restart();
        let (soft, _) = nofile_limits(d.pid());
        assert_eq!(soft, hard, "soft NOFILE not raised to the hard limit");
        let log = d.log();
        assert!(
            log.lines().any(|l| l.contains(&format!("max-connections={too_many}")) && l.contains("limit")),
            "no log line says max-connections={too_many} exceeds the open-files limit {hard}:\n{log}"
        );
    }
}

/// A max-connections raised at run time (no restart) raises the soft open-files
/// limit too: settings apply without a restart (design.md).
#[test]
fn raises_nofile_limit_when_max_connections_changes_live() {
    let d = Daemon::start_with("userspace", Options { nofile_soft: Some(1024), ..Options::default() });
    let (_, hard) = nofile_limits(d.pid());
    d.cmd("ip socks set max-connections=9000");
    let want = (2 * 9000u64).min(hard);
    let raised = wait_until(Duration::from_secs(2), || nofile_limits(d.pid()).0 >= want);
    assert!(
        raised,
        "after a live `set max-connections=9000` the soft NOFILE is still {} (want >= {want}): \
         9000 clients would hit EMFILE",
        nofile_limits(d.pid()).0
    );
}
