//! Destination servers for the tests: a TCP echo server that counts and records the
//! connections it accepts, a tiny HTTP server that serves one known body and counts
//! accepted connections, and the pyftpdlib FTP server (tests/scripts/ftpd.py).

use crate::{run_with_timeout, text};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A TCP echo server: each connection gets back what it sends, then its end of
/// stream once it has sent it all. A connection idle for 30 s is dropped, so no
/// thread outlives a test that forgot its tunnel. It counts the connections it
/// accepts and records where each came from.
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddrV4,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    /// An echo server on a free port of 127.0.0.1.
    pub fn start() -> EchoServer {
        EchoServer::on(TcpListener::bind("127.0.0.1:0").expect("bind echo"))
    }

    /// An echo server bound to `addr` (port 0 for any) in network namespace `ns`.
    pub fn start_in(ns: &str, addr: &str) -> EchoServer {
        EchoServer::on(crate::in_ns(ns, || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind echo {addr} in {ns}: {e}"))
        }))
    }

    /// Serves `listener` (an IPv4 one; it may be bound to any address).
    pub fn on(listener: TcpListener) -> EchoServer {
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else { panic!("echo server: not IPv4") };
        let (accepted, peers) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (count, seen) = (accepted.clone(), peers.clone());
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                // Counted even when the peer is already gone (no address to record).
                count.fetch_add(1, Ordering::SeqCst);
                seen.lock().unwrap().extend(s.peer_addr().ok());
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                    let mut b = vec![0u8; 64 << 10];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        EchoServer { addr, accepted, peers }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Where the accepted connections came from, in order (one whose peer was
    /// already gone has no address and is left out).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 server (on 127.0.0.1, or any address) that answers every request with `body`.
pub struct HttpServer {
    /// Where it listens.
    pub local: SocketAddr,
    /// The body it serves.
    pub body: Arc<Vec<u8>>,
    /// Connections accepted so far (to prove that nothing reached it).
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts serving `body` on a free port of 127.0.0.1.
    pub fn start(body: Vec<u8>) -> HttpServer {
        HttpServer::start_on("127.0.0.1:0", body)
    }

    /// Starts serving `body` on `bind` (e.g. `[::1]:0`).
    pub fn start_on(bind: &str, body: Vec<u8>) -> HttpServer {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind http {bind}: {e}"));
        let local = listener.local_addr().unwrap();
        let body = Arc::new(body);
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, a, st) = (body.clone(), accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                std::thread::spawn(move || serve_http(conn, &b));
            }
        });
        HttpServer { local, body, accepted, stop, thread: Some(thread) }
    }

    /// Where an IPv4 server listens (what SOCKS4 requests name).
    pub fn addr(&self) -> SocketAddrV4 {
        match self.local {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("the HTTP server on {a} has no IPv4 address"),
        }
    }

    /// Number of connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// `http://HOST:PORT/`, with `host` a name or an address (`[::1]` for IPv6).
    pub fn url(&self, host: &str) -> String {
        format!("http://{host}:{}/", self.local.port())
    }
}

fn serve_http(conn: TcpStream, body: &[u8]) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    conn.set_write_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    // Read one request head, answer it, then close (Connection: close).
    let mut head_len = 0;
    let mut saw_request = false;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) => head_len += n,
        }
        if head_len > 64 * 1024 {
            return;
        }
        if line == "\r\n" || line == "\n" {
            if saw_request {
                break;
            }
            continue;
        }
        saw_request = true;
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if conn.write_all(head.as_bytes()).is_err() || conn.write_all(body).is_err() {
        return;
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
    // Drain until the client closes, so the close is orderly.
    let mut sink = [0u8; 4096];
    while matches!(reader.get_mut().read(&mut sink), Ok(n) if n > 0) {}
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The path of a helper script under tests/scripts.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// A pyftpdlib server (tests/scripts/ftpd.py) serving a directory anonymously.
pub struct FtpServer {
    /// Its control address.
    pub addr: SocketAddrV4,
    child: Child,
    log: PathBuf,
}

impl FtpServer {
    /// Starts ftpd.py on `addr` serving `root`; after a download it keeps the data
    /// connection open `linger` seconds (see the script).
    pub fn start(addr: SocketAddrV4, root: &Path, linger: f64) -> FtpServer {
        let log = root.with_extension("ftpd.log");
        let logf = std::fs::File::create(&log).expect("ftpd log");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script("ftpd.py"))
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(root)
            .arg(linger.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("start ftpd.py");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        if !line.starts_with("ready") {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ftpd.py did not start on {addr}: {line:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        FtpServer { addr, child, log }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("==== ftpd.py log ====\n{}\n==== end ====", self.log());
        }
    }
}

/// Runs curl with a time limit; returns (exit code, stdout bytes, stderr text).
pub fn curl(args: &[&str], timeout: Duration) -> (Option<i32>, Vec<u8>, String) {
    let out = run_with_timeout(Command::new("curl").args(args), timeout);
    (out.status.code(), out.stdout, text(&out.stderr))
}
