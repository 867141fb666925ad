//! Every acknowledged change is in the state file: settings and rules survive a clean
//! restart and a `kill -9`, and the state file parses on the next start.

use proxyd_tests::{data_paths, Daemon};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn print_all(d: &Daemon) -> (String, String, String) {
    (d.cli_ok(&["ip", "socks", "print"]), d.cmd("ip socks access print"), d.export(""))
}

/// Settings and rules (with comment and disabled flag) survive a SIGTERM restart, and
/// the daemon listens on the saved port again.
#[test]
fn settings_and_rules_survive_restart() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=17", "connection-idle-timeout=1h2m3s"]);
        d.cli_ok(&[
            "ip",
            "socks",
            "access",
            "add",
            "src-address=127.0.0.0/8",
            "dst-port=21",
            "action=allow",
            "comment=ftp control",
        ]);
        d.cmd("ip socks access add dst-address=10.1.2.0/24 src-port=1000-2000 action=deny disabled=yes");
        d.cmd("ip socks access add dst-port=1024-65535 action=allow");
        let before = print_all(&d);
        d.restart();
        let after = print_all(&d);
        assert_eq!(before.0, after.0, "`ip socks print` changed across a restart");
        assert_eq!(before.1, after.1, "`ip socks access print` changed across a restart");
        assert_eq!(before.2, after.2, "`export` changed across a restart");
        assert!(
            proxyd_tests::wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(proxy).is_ok()),
            "after restart nothing listens on the saved address {proxy}"
        );
    }
}

/// `kill -9` right after a burst of 50 acknowledged `access add`: all 50 rules (in order)
/// and the settings are there after the next start.
#[test]
fn burst_of_adds_survives_kill_9() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        d.enable(&["max-connections=33"]);
        for i in 0..50 {
            d.cli_ok(&["ip", "socks", "access", "add", &format!("dst-port={}", 2000 + i), "action=allow"]);
        }
        let before = print_all(&d);
        d.kill9();
        d.restart();
        let after = print_all(&d);
        assert_eq!(before.0, after.0, "`ip socks print` differs after kill -9");
        assert_eq!(before.1, after.1, "`ip socks access print` differs after kill -9");
        assert_eq!(before.2, after.2, "`export` differs after kill -9");
        let rows = after.1.lines().filter(|l| l.contains("dst-port=")).count();
        assert_eq!(rows, 50, "expected 50 rules after kill -9:\n{}", after.1);
    }
}

/// `kill -9` in the middle of a stream of `access add` from 4 clients at once: every
/// acknowledged (exit 0) rule is there; nothing else but at most the in-flight ones.
#[test]
fn kill_9_mid_burst_loses_no_acknowledged_change() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let attempted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (cli, acked, attempted, stop) = (d.cli.clone(), acked.clone(), attempted.clone(), stop.clone());
                std::thread::spawn(move || {
                    for i in 0..100u32 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let port = 10000 + w * 1000 + i;
                        attempted.lock().unwrap().push(port);
                        let out =
                            cli.run(&["ip", "socks", "access", "add", &format!("dst-port={port}"), "action=deny"]);
                        if out.status.success() {
                            acked.lock().unwrap().push(port);
                        } else {
                            break; // the daemon is gone
                        }
                    }
                })
            })
            .collect();
        assert!(
            proxyd_tests::wait_until(Duration::from_secs(60), || acked.lock().unwrap().len() >= 60),
            "60 `access add` were not acknowledged within 60 s"
        );
        d.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().unwrap();
        }
        d.restart();
        let printed = d.cmd("ip socks access print");
        let present: Vec<u32> = printed
            .lines()
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("dst-port=")))
            .map(|p| p.parse().expect("dst-port number"))
            .collect();
        let acked = acked.lock().unwrap().clone();
        let attempted = attempted.lock().unwrap().clone();
        let missing: Vec<_> = acked.iter().filter(|p| !present.contains(p)).collect();
        assert!(missing.is_empty(), "acknowledged rules lost by kill -9: {missing:?}\n{printed}");
        let unknown: Vec<_> = present.iter().filter(|p| !attempted.contains(p)).collect();
        assert!(unknown.is_empty(), "rules nobody added: {unknown:?}");
        let mut dedup = present.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), present.len(), "duplicated rules after restart:\n{printed}");
        // Each client's rules keep their order.
        for w in 0..4 {
            let mine: Vec<_> = present.iter().filter(|p| (**p - 10000) / 1000 == w).collect();
            assert!(mine.windows(2).all(|x| x[0] < x[1]), "client {w}'s rules out of order: {mine:?}");
        }
        eprintln!("kill -9 mid-burst ({dp}): {} acknowledged, {} present after restart", acked.len(), present.len());
    }
}

/// SIGINT stops the daemon cleanly (exit 0), and the next start has the same config.
#[test]
fn sigint_stops_cleanly() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        d.enable(&["max-connections=9"]);
        let before = print_all(&d);
        assert!(d.stop_with(libc::SIGINT), "proxyd did not exit 0 on SIGINT; stderr:\n{}", d.log());
        d.restart();
        assert_eq!(before, print_all(&d), "configuration changed across a SIGINT restart");
    }
}

/// A start whose port is taken keeps running (so that it can be fixed), says
/// so in `ip socks print` (text and JSON) instead of looking enabled, refuses
/// a `set` while the port is still taken, and listens after the next `set`
/// once the port is free, even one that changes nothing.
#[test]
fn a_port_taken_at_start_shows_in_print_and_the_next_set_retries() {
    let mut d = Daemon::start("userspace");
    let addr = d.enable(&[]);
    assert!(d.stop(), "proxyd did not exit cleanly; stderr:\n{}", d.log());
    let squatter = std::net::TcpListener::bind(addr).expect("the port is free again after the stop");
    d.restart();
    let print = d.cli_ok(&["ip", "socks", "print"]);
    assert!(print.starts_with("enabled: yes\n"), "{print}");
    let line = print.lines().find(|l| l.starts_with("not-in-effect: ")).unwrap_or_else(|| panic!("{print}"));
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    let json: serde_json::Value = serde_json::from_str(&d.cli_ok(&["--json", "ip", "socks", "print"])).unwrap();
    assert!(json["not-in-effect"].as_str().is_some_and(|e| e.contains("in use")), "{json}");

    let refused = d.cli(&["ip", "socks", "set", "enabled=yes"]);
    assert_eq!(refused.status.code(), Some(1), "a set that cannot listen must fail");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use"), "{refused:?}");

    drop(squatter);
    d.cli_ok(&["ip", "socks", "set", "enabled=yes"]);
    assert!(
        std::net::TcpStream::connect(addr).is_ok(),
        "not listening on {addr} after the retry; stderr:\n{}",
        d.log()
    );
    let print = d.cli_ok(&["ip", "socks", "print"]);
    assert!(!print.contains("not-in-effect"), "{print}");
}
