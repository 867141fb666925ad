//! Real SOCKS clients (curl, PySocks, proxychains4) fetch a page through proxyd, and the
//! access list's deny answers reply 91 without touching the destination.

use proxyd_tests::fixtures::{curl, HttpServer};
use proxyd_tests::socks::{self, Answer};
use proxyd_tests::{
    data_paths, pattern, require_program, require_python_module, run_with_timeout, sha256, tcp_connect, text, Daemon,
};
use std::io::Write;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Adds a deny rule for the HTTP server's port and checks that `fetch` now fails and
/// nothing reached the server: proof the client really went through proxyd.
fn assert_goes_through_proxy(d: &Daemon, http: &HttpServer, what: &str, fetch: impl Fn() -> bool) {
    let port = format!("dst-port={}", http.addr().port());
    d.cli_ok(&["ip", "socks", "access", "add", &port, "action=deny"]);
    let before = http.accepted();
    assert!(!fetch(), "{what} still fetched the page although proxyd denies it: it bypasses the proxy");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http.accepted(), before, "{what}: a denied request reached the destination");
    d.cmd("ip socks access remove 0");
}

/// curl --socks4 and --socks4a (hostname resolved by proxyd) fetch a page intact.
#[test]
fn curl_socks4_and_socks4a() {
    let test = "curl_socks4_and_socks4a";
    if require_program(test, "curl").is_none() {
        return;
    }
    let body = pattern(300_000, 1);
    let http = HttpServer::start(body.clone());
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]).to_string();
        for (flag, host) in [("--socks4", "127.0.0.1"), ("--socks4a", "localhost")] {
            let url = http.url(host);
            let (code, out, err) = curl(&["-sS", "--max-time", "20", flag, &proxy, &url], T);
            assert_eq!(code, Some(0), "curl {flag} {proxy} {url} failed: {err}");
            assert_eq!(
                sha256::hex(&out),
                sha256::hex(&body),
                "curl {flag}: body differs ({} bytes, want {})",
                out.len(),
                body.len()
            );
            assert_goes_through_proxy(&d, &http, &format!("curl {flag}"), || {
                curl(&["-sS", "--max-time", "20", flag, &proxy, &url], T).0 == Some(0)
            });
        }
    }
}

const PYSOCKS: &str = r#"
import sys, socks
proxy_port, host, port, rdns = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
s = socks.socksocket()
s.settimeout(20)
s.set_proxy(socks.SOCKS4, "127.0.0.1", proxy_port, rdns=rdns)
s.connect((host, port))
s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
s.close()
head, _, body = data.partition(b"\r\n\r\n")
sys.stdout.buffer.write(body)
"#;

/// PySocks (SOCKS4, and SOCKS4a with remote DNS) fetches a page intact.
#[test]
fn pysocks_socks4_and_socks4a() {
    if !require_python_module("pysocks_socks4_and_socks4a", "socks", "python3-socks") {
        return;
    }
    let body = pattern(200_000, 2);
    let http = HttpServer::start(body.clone());
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy_port = d.enable(&[]).port().to_string();
        let http_port = http.addr().port().to_string();
        let fetch = |host: &str, rdns: &str| {
            run_with_timeout(
                Command::new("/usr/bin/python3").args(["-c", PYSOCKS, &proxy_port, host, &http_port, rdns]),
                T,
            )
        };
        for (host, rdns) in [("127.0.0.1", "0"), ("localhost", "1")] {
            let out = fetch(host, rdns);
            assert!(out.status.success(), "PySocks {host} rdns={rdns} failed: {}", text(&out.stderr));
            assert_eq!(sha256::hex(&out.stdout), sha256::hex(&body), "PySocks {host} rdns={rdns}: body differs");
            assert_goes_through_proxy(&d, &http, &format!("PySocks {host} rdns={rdns}"), || {
                fetch(host, rdns).status.success()
            });
        }
    }
}

/// proxychains4 with a socks4 entry for proxyd makes plain curl fetch a page intact.
#[test]
fn proxychains4_socks4() {
    let test = "proxychains4_socks4";
    if require_program(test, "proxychains4").is_none() || require_program(test, "curl").is_none() {
        return;
    }
    let body = pattern(150_000, 3);
    let http = HttpServer::start(body.clone());
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let conf = d.dir.join("proxychains.conf");
        std::fs::write(
            &conf,
            format!(
                "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n\
                 [ProxyList]\nsocks4 127.0.0.1 {}\n",
                proxy.port()
            ),
        )
        .unwrap();
        let url = http.url("127.0.0.1");
        let fetch = || {
            run_with_timeout(
                Command::new("proxychains4").arg("-f").arg(&conf).args(["curl", "-sS", "--max-time", "20", &url]),
                T,
            )
        };
        let out = fetch();
        assert!(out.status.success(), "proxychains4 curl failed: {}", text(&out.stderr));
        assert_eq!(sha256::hex(&out.stdout), sha256::hex(&body), "proxychains4 curl: body differs");
        assert_goes_through_proxy(&d, &http, "proxychains4 curl", || fetch().status.success());
    }
}

/// A request the access list denies gets reply 91 (raw socket) and nothing reaches the
/// destination; SOCKS4a is judged on the resolved address; allowed ones still work.
#[test]
fn denied_request_gets_91_and_never_reaches_destination() {
    let http = HttpServer::start(b"should never be served".to_vec());
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let port = http.addr().port();
        d.cli_ok(&[
            "ip",
            "socks",
            "access",
            "add",
            "src-address=127.0.0.1",
            &format!("dst-port={port}"),
            "action=deny",
        ]);
        d.cmd("ip socks access add dst-address=127.0.0.0/8 action=deny");
        for (what, req) in [
            ("SOCKS4 CONNECT", socks::request(socks::CONNECT, http.addr(), b"u")),
            ("SOCKS4a CONNECT localhost", socks::request_4a(socks::CONNECT, port, b"localhost", b"u")),
        ] {
            let before = http.accepted();
            let mut c = tcp_connect(proxy).unwrap();
            c.write_all(&req).unwrap();
            match socks::answer(&mut c, Duration::from_secs(5)) {
                Answer::Reply(r) => {
                    assert_eq!((r.vn, r.code), (0, socks::REJECTED), "{what}: denied request got {r:?}")
                }
                other => panic!("{what}: denied request got no 8-byte reply 91: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(http.accepted(), before, "{what}: a denied request reached the destination");
        }
        // With the deny rules gone (removed, disabled) the same request is served.
        d.cmd("ip socks access remove 1");
        d.cmd("ip socks access disable 0");
        let before = http.accepted();
        let mut c = socks::connect(proxy, http.addr());
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(
            proxyd_tests::wait_until(Duration::from_secs(3), || http.accepted() > before),
            "an allowed request did not reach the destination"
        );
    }
}
