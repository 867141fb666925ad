//! The RouterOS manual's examples, typed after `proxyd` without the prompt, work and
//! print what the manual shows (whitespace padding aside).

use proxyd_tests::{data_paths, listen_local, socks, text, wait_until, Daemon};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

/// Lines with runs of whitespace collapsed and blank lines dropped.
fn norm(s: &str) -> Vec<String> {
    s.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|l| !l.is_empty()).collect()
}

/// The manual's `set enabled=yes` then `print` example prints the manual's four lines.
#[test]
fn manual_enable_and_print() {
    for dp in data_paths() {
        let d = Daemon::start(dp);
        // Listen on loopback only (beyond the manual; not part of the four lines).
        d.cmd("ip socks set listen-address=127.0.0.1");
        // Port 1080 as in the manual when it is free here, otherwise a free port.
        let port = if TcpListener::bind("127.0.0.1:1080").is_ok() {
            1080
        } else {
            let p = proxyd_tests::free_port();
            eprintln!("note: 127.0.0.1:1080 is busy, using port {p}");
            d.cli_ok(&["ip", "socks", "set", &format!("port={p}")]);
            p
        };
        let out = d.cli(&["ip", "socks", "set", "enabled=yes"]);
        assert!(out.status.success(), "`ip socks set enabled=yes` failed: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "`set` printed something on stdout: {:?}", text(&out.stdout));
        let printed = d.cli_ok(&["ip", "socks", "print"]);
        let lines = norm(&printed);
        let want = [
            "enabled: yes".to_string(),
            format!("port: {port}"),
            "connection-idle-timeout: 2m".to_string(),
            "max-connections: 200".to_string(),
        ];
        assert!(lines.len() >= 4, "`ip socks print` printed too little:\n{printed}");
        assert_eq!(lines[..4], want, "`ip socks print` does not start with the manual's lines:\n{printed}");
        for extra in &lines[4..] {
            assert!(
                ["listen-address", "data-path", "version", "auth-method", "vrf", "metrics-address", "xdp-interfaces"]
                    .contains(&extra.split(':').next().unwrap_or("")),
                "unexpected extra line {extra:?} in `ip socks print`:\n{printed}"
            );
        }
        assert!(lines.iter().any(|l| l == "listen-address: 127.0.0.1"), "no listen-address line:\n{printed}");
        // The port really listens.
        assert!(
            wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "nothing listens on 127.0.0.1:{port} after `set enabled=yes`"
        );
        // JSON variant carries the same values.
        let json: serde_json::Value =
            serde_json::from_str(&d.cmd("--json ip socks print")).expect("--json print is JSON");
        assert!(json.is_object(), "--json ip socks print is not an object: {json}");
    }
}

/// The FTP example's three `access add` commands and `access print` give the manual's table.
#[test]
fn manual_access_list_example() {
    for dp in data_paths() {
        let d = Daemon::start(dp);
        for cmd in [
            "ip socks access add src-address=192.168.0.2 dst-port=21 action=allow",
            "ip socks access add dst-port=1024-65535 action=allow",
            "ip socks access add action=deny",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            let out = d.cli(&args);
            assert!(out.status.success(), "`proxyd {cmd}` failed: {}", text(&out.stderr));
        }
        let printed = d.cmd("ip socks access print");
        assert_eq!(
            norm(&printed),
            [
                "Flags: X - disabled",
                "0 src-address=192.168.0.2 dst-port=21 action=allow",
                "1 dst-port=1024-65535 action=allow",
                "2 action=deny",
            ],
            "`ip socks access print` differs from the manual:\n{printed}"
        );
        // The manual's line continuation form is the same command split over two words.
        let out = d.cli(&["ip", "socks", "access", "disable", "1"]);
        assert!(out.status.success(), "`access disable 1` failed: {}", text(&out.stderr));
        let printed = d.cmd("ip socks access print");
        assert_eq!(norm(&printed)[2], "1 X dst-port=1024-65535 action=allow", "disabled flag:\n{printed}");
        d.cmd("ip socks access enable 1");
        d.cli_ok(&["ip", "socks", "access", "set", "2", "comment=drop everything else"]);
        // A comment goes on its own line before the row's properties: either
        // `;;; text` then `N props` (as specified to the tests), or RouterOS's own
        // layout `N ;;; text` then the properties indented.
        let printed = d.cmd("ip socks access print");
        let lines = norm(&printed);
        let head = [
            "Flags: X - disabled",
            "0 src-address=192.168.0.2 dst-port=21 action=allow",
            "1 dst-port=1024-65535 action=allow",
        ];
        assert_eq!(lines[..3], head, "rows before the commented one:\n{printed}");
        assert!(
            lines[3..] == [";;; drop everything else", "2 action=deny"]
                || lines[3..] == ["2 ;;; drop everything else", "action=deny"],
            "comment line layout:\n{printed}"
        );
        d.cmd("ip socks access move 2 0");
        let printed = d.cmd("ip socks access print");
        let lines = norm(&printed);
        assert!(
            lines[1..3] == [";;; drop everything else", "0 action=deny"]
                || lines[1..3] == ["0 ;;; drop everything else", "action=deny"],
            "move 2 0:\n{printed}"
        );
        d.cmd("ip socks access remove 0");
        let printed = d.cmd("ip socks access print");
        assert_eq!(
            norm(&printed),
            [
                "Flags: X - disabled",
                "0 src-address=192.168.0.2 dst-port=21 action=allow",
                "1 dst-port=1024-65535 action=allow",
            ],
            "remove 0:\n{printed}"
        );
    }
}

/// `ip socks connections print` shows the manual's header and one row per tunnel with
/// exact TX/RX; `print detail` adds `type=out`.
#[test]
fn manual_connections_print() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        // The manual's rules (client 127.0.0.1 instead of 192.168.0.2) leave this tunnel allowed.
        d.cmd("ip socks access add src-address=127.0.0.1 dst-port=21 action=allow");
        d.cmd("ip socks access add dst-port=1024-65535 action=allow");
        d.cmd("ip socks access add action=deny");

        let empty = d.cmd("ip socks connections print");
        assert_eq!(norm(&empty), ["# SRC-ADDRESS DST-ADDRESS TX RX"], "empty connections list:\n{empty}");

        let (l, dst) = listen_local();
        let mut c = socks::connect(proxy, dst);
        let mut u = proxyd_tests::accept_timeout(&l, Duration::from_secs(5)).expect("upstream accept");
        c.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        u.read_exact(&mut b).unwrap();
        u.write_all(b"1234567").unwrap();
        let mut b = [0u8; 7];
        c.read_exact(&mut b).unwrap();
        let src = c.local_addr().unwrap().to_string();
        let want = format!("0 {src} {dst} 5 7");
        let mut printed = String::new();
        let seen = wait_until(Duration::from_secs(3), || {
            printed = d.cmd("ip socks connections print");
            norm(&printed) == ["# SRC-ADDRESS DST-ADDRESS TX RX".to_string(), want.clone()]
        });
        assert!(seen, "`ip socks connections print` should be the header and `{want}`, got:\n{printed}");
        let detail = d.cmd("ip socks connections print detail");
        assert!(detail.contains("type=out"), "`connections print detail` lacks type=out:\n{detail}");
        let rows = d.cli.connections();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].src.as_str(), rows[0].dst.as_str()), (src.as_str(), dst.to_string().as_str()));
        assert_eq!((rows[0].tx, rows[0].rx, rows[0].kind.as_str()), (5, 7, "out"), "{rows:?}");
        drop(c);
        drop(u);
        let gone = wait_until(Duration::from_secs(3), || d.cli.connections().is_empty());
        assert!(gone, "the closed tunnel is still listed: {:?}", d.cli.connections());
    }
}

/// `export` prints a RouterOS script that reproduces the configuration; the
/// state file is its full form.
#[test]
fn export_prints_the_configuration() {
    for dp in data_paths() {
        let d = Daemon::start(dp);
        d.cmd("ip socks set port=1081 max-connections=42 connection-idle-timeout=1m30s");
        d.cmd("ip socks access add src-address=10.0.0.0/8 dst-port=80 action=deny");
        let export = d.cli_ok(&["export"]);
        for needle in ["port=1081", "max-connections=42", "src-address=10.0.0.0/8", "dst-port=80", "action=deny"] {
            assert!(export.contains(needle), "`export` lacks {needle}:\n{export}");
        }
        // The state file keeps the full form: every value and the password hashes.
        let full = d.cli_ok(&["export", "verbose", "show-sensitive"]);
        let state = std::fs::read_to_string(&d.state).expect("state file exists after a change");
        let script = |s: &str| norm(s).into_iter().filter(|l| !l.starts_with('#')).collect::<Vec<_>>();
        assert_eq!(
            script(&state),
            script(&full),
            "state file and `export verbose show-sensitive` differ (comments aside)"
        );
    }
}
