//! The manual's "FTP service through SOCKS server" example on loopback: a real FTP
//! server on port 21 (pyftpdlib), the manual's three access rules, a passive-mode
//! download with curl --socks4 (CONNECT to the data port) and an active-mode download
//! with Dante's socksify (BIND), both hash-compared, and the connections list showing
//! the data connections with exact byte counts.

use proxyd_tests::fixtures::FtpServer;
use proxyd_tests::socks::{self, Answer};
use proxyd_tests::{
    data_paths, pattern, require_program, require_python_module, require_root, run_with_timeout, sha256, tcp_connect,
    text, Conn, ConnPoller, Daemon,
};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

const FILE_LEN: usize = 3 * 1024 * 1024 + 17;

/// Dante client config: everything via proxyd as SOCKS v4, CONNECT and BIND.
fn socksify_conf(proxy_port: u16) -> String {
    format!(
        "debug: 0\n\
         route {{\n\
         \x20 from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {proxy_port}\n\
         \x20 proxyprotocol: socks_v4\n\
         \x20 command: connect bind\n\
         }}\n"
    )
}

fn all_rows(snaps: &[Vec<Conn>]) -> Vec<Conn> {
    let mut v: Vec<Conn> = snaps.iter().flatten().cloned().collect();
    v.dedup();
    v
}

/// The manual's FTP example: passive (curl --socks4) and active (socksify, BIND)
/// downloads arrive intact and `connections print` shows their exact byte counts.
#[test]
fn manual_ftp_example_passive_and_active() {
    let test = "manual_ftp_example_passive_and_active";
    if !require_root(test)
        || require_program(test, "curl").is_none()
        || require_program(test, "socksify").is_none()
        || !require_python_module(test, "pyftpdlib", "python3-pyftpdlib")
    {
        return;
    }
    // A loopback address of its own, so port 21 does not collide with anything else.
    let ftp_ip = Ipv4Addr::new(127, 0, 21, 10 + (std::process::id() % 200) as u8);
    let ftp_addr = SocketAddrV4::new(ftp_ip, 21);
    let file = pattern(FILE_LEN, 21);
    let want = sha256::hex(&file);

    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let root = d.dir.join("ftproot");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("file.bin"), &file).unwrap();
        // Data connections stay open 1 s after their last byte, so the poller sees their
        // final counters.
        let ftp = FtpServer::start(ftp_addr, &root, 1.0);
        let proxy = d.enable(&[]);
        for rule in [
            "ip socks access add src-address=127.0.0.1 dst-port=21 action=allow",
            "ip socks access add dst-port=1024-65535 action=allow",
            "ip socks access add action=deny",
        ] {
            d.cli_ok(&rule.split(' ').collect::<Vec<_>>());
        }
        let url = format!("ftp://{ftp_ip}/file.bin");
        let poller = ConnPoller::start(d.cli.clone(), Duration::from_millis(20));

        // Passive mode: curl --socks4, CONNECT to port 21 then to the passive data port.
        let out = run_with_timeout(
            Command::new("curl").args(["-sS", "--max-time", "60", "--socks4", &proxy.to_string(), &url]),
            Duration::from_secs(70),
        );
        assert!(out.status.success(), "passive download (curl --socks4 {url}) failed: {}", text(&out.stderr));
        assert_eq!(out.stdout.len(), FILE_LEN, "passive download length");
        assert_eq!(sha256::hex(&out.stdout), want, "passive download differs");
        std::thread::sleep(Duration::from_millis(100));
        let rows = all_rows(&poller.take());
        let control = rows.iter().find(|r| r.kind == "out" && r.dst == ftp_addr.to_string() && r.rx > 0);
        assert!(control.is_some(), "no `out` row for the FTP control connection to {ftp_addr}: {rows:?}");
        let data = rows.iter().find(|r| {
            r.kind == "out"
                && r.dst.starts_with(&format!("{ftp_ip}:"))
                && r.dst != ftp_addr.to_string()
                && r.rx == FILE_LEN as u64
                && r.tx == 0
        });
        assert!(
            data.is_some(),
            "no `out` row for the passive data connection with tx=0 rx={FILE_LEN}; rows seen: {:?}",
            rows.iter().filter(|r| r.dst != ftp_addr.to_string()).collect::<Vec<_>>()
        );

        // Active mode: socksify (Dante client) turns the client's PORT listener into BIND.
        let conf = d.dir.join("socks.conf");
        std::fs::write(&conf, socksify_conf(proxy.port())).unwrap();
        let out = run_with_timeout(
            Command::new("socksify")
                .env("SOCKS_CONF", &conf)
                // Dante routes loopback addresses directly unless told not to.
                .env("SOCKS_AUTOADD_LANROUTES", "no")
                .args(["curl", "-sS", "--max-time", "60", "-P", "-", &url]),
            Duration::from_secs(70),
        );
        assert!(out.status.success(), "active download (socksify curl -P - {url}) failed: {}", text(&out.stderr));
        assert_eq!(out.stdout.len(), FILE_LEN, "active download length");
        assert_eq!(sha256::hex(&out.stdout), want, "active download differs");
        std::thread::sleep(Duration::from_millis(100));
        let rows = all_rows(&poller.take());
        let bind = rows.iter().find(|r| r.kind == "in" && r.rx == FILE_LEN as u64 && r.tx == 0);
        assert!(
            bind.is_some(),
            "no `in` (BIND) row with tx=0 rx={FILE_LEN} for the active data connection; rows seen: {rows:?}"
        );
        drop(poller);

        // "drop everything else": a destination port below 1024 other than 21 is denied.
        let mut c = tcp_connect(proxy).unwrap();
        c.write_all(&socks::request(socks::CONNECT, SocketAddrV4::new(ftp_ip, 20), b"")).unwrap();
        match socks::answer(&mut c, Duration::from_secs(5)) {
            Answer::Reply(r) => assert_eq!(r.code, socks::REJECTED, "CONNECT {ftp_ip}:20 should be denied: {r:?}"),
            other => panic!("CONNECT {ftp_ip}:20 should get reply 91: {other:?}"),
        }
        drop(ftp);
    }
}
