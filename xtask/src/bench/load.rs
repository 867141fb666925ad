//! The load generator: threads with blocking sockets (the hot loops are one
//! large system call per iteration, so the debug build of xtask is not the
//! bottleneck; the bench shows that against iperf3).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// How the load generator reaches the echo server.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Direct,
    Socks4(SocketAddrV4),
    Socks5(SocketAddrV4),
}

#[derive(Clone, Debug)]
pub struct Target {
    pub via: Via,
    /// Echo server addresses (same port, several loopback IPs).
    pub dsts: Vec<SocketAddrV4>,
}

const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// A blocking TCP connection, optionally from a chosen loopback source address
/// (spreads the 4-tuples so that TIME_WAIT never runs out of ports).
pub fn tcp_connect(dst: SocketAddrV4, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    // SAFETY: plain socket syscalls; the fd is owned by the TcpStream at once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        if let Some(ip) = src {
            let one: libc::c_int = 1;
            libc::setsockopt(fd, libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one as *const _ as *const libc::c_void, 4);
            let sa = sockaddr(SocketAddrV4::new(ip, 0));
            if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32)
                < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let sa = sockaddr(dst);
        if libc::connect(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32)
            < 0
        {
            return Err(io::Error::last_os_error());
        }
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    }
}

/// Source address number `i` (127.0.1.1 .. 127.0.4.250).
pub fn src_ip(i: usize) -> Ipv4Addr {
    let i = i % 1000;
    Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// Opens a connection to `dst` through the target's path (SOCKS4 CONNECT when proxied).
pub fn open(t: &Target, dst: SocketAddrV4, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    match t.via {
        Via::Direct => tcp_connect(dst, src),
        Via::Socks4(proxy) => {
            let mut s = tcp_connect(proxy, src)?;
            let mut req = [0u8; 9];
            req[0] = 4;
            req[1] = 1;
            req[2..4].copy_from_slice(&dst.port().to_be_bytes());
            req[4..8].copy_from_slice(&dst.ip().octets());
            s.write_all(&req)?;
            let mut rep = [0u8; 8];
            s.read_exact(&mut rep)?;
            if rep[1] != 90 {
                return Err(io::Error::other(format!("SOCKS4 reply {} (not granted)", rep[1])));
            }
            Ok(s)
        }
        Via::Socks5(proxy) => {
            let mut s = tcp_connect(proxy, src)?;
            // No authentication, then CONNECT to an IPv4 address, each
            // message after the reply to the one before (as curl does).
            s.write_all(&[5, 1, 0])?;
            let mut method = [0u8; 2];
            s.read_exact(&mut method)?;
            let mut req = vec![5, 1, 0, 1];
            req.extend_from_slice(&dst.ip().octets());
            req.extend_from_slice(&dst.port().to_be_bytes());
            s.write_all(&req)?;
            let mut rep = [0u8; 10];
            s.read_exact(&mut rep)?;
            if method != [5, 0] || rep[..2] != [5, 0] || rep[3] != 1 {
                return Err(io::Error::other(format!("SOCKS5 replies {method:?} {:?} (not granted)", &rep[..4])));
            }
            Ok(s)
        }
    }
}

pub struct BulkResult {
    /// Bytes the sink counted (end to end).
    pub bytes: u64,
    pub secs: f64,
    /// Flows whose sink count differed from what was sent.
    pub mismatches: usize,
    pub error: Option<String>,
}

impl BulkResult {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
}

/// `flows` parallel uploads into the sink for `dur`; the clock stops when the
/// sink's byte count (sent after end of stream) arrives, so every counted
/// byte really crossed the path.
pub fn bulk(t: &Target, flows: usize, dur: Duration, mid: impl FnOnce()) -> io::Result<BulkResult> {
    let mut streams = Vec::new();
    for i in 0..flows {
        streams.push(open(t, t.dsts[i % t.dsts.len()], Some(src_ip(900 + i)))?);
    }
    let barrier = Arc::new(Barrier::new(flows + 1));
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> io::Result<(u64, u64, Instant, Instant)> {
                let buf = vec![0x5au8; 256 * 1024];
                barrier.wait();
                let start = Instant::now();
                s.write_all(b"S")?;
                let mut sent = 0u64;
                while start.elapsed() < dur {
                    let n = s.write(&buf)?;
                    sent += n as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut c = [0u8; 8];
                s.read_exact(&mut c)?;
                Ok((u64::from_le_bytes(c), sent, start, Instant::now()))
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(dur / 2);
    mid();
    let mut res = BulkResult { bytes: 0, secs: 0.0, mismatches: 0, error: None };
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for h in handles {
        match h.join().unwrap() {
            Ok((count, sent, start, end)) => {
                res.bytes += count;
                if count != sent {
                    res.mismatches += 1;
                }
                first = Some(first.map_or(start, |f| f.min(start)));
                last = Some(last.map_or(end, |l| l.max(end)));
            }
            Err(e) => res.error = Some(e.to_string()),
        }
    }
    if let Some(e) = &res.error {
        return Err(io::Error::other(e.clone()));
    }
    res.secs = (last.unwrap() - first.unwrap()).as_secs_f64();
    Ok(res)
}

pub struct LatResult {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub n: usize,
}

/// One 64-byte message out and its echo back, checked.
fn ping(s: &mut TcpStream) -> io::Result<()> {
    const MSG: [u8; 64] = {
        let mut m = [0x61u8; 64];
        m[0] = b'p';
        m
    };
    let mut back = [0u8; 64];
    s.write_all(&MSG)?;
    s.read_exact(&mut back)?;
    if back != MSG {
        return Err(io::Error::other("echo returned different bytes"));
    }
    Ok(())
}

/// 100 ms of uncounted ping-pong, long enough for `auto` to settle the
/// tunnel on a path (it promotes at 50 ms).
fn warm_up(s: &mut TcpStream) -> io::Result<()> {
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(100) {
        ping(s)?;
    }
    Ok(())
}

/// 64-byte request/response ping-pong over one established tunnel for `dur`,
/// after 100 ms of it uncounted (as [`pingpong`]: long enough for `auto` to
/// settle the tunnel on a path).
pub fn latency(t: &Target, dur: Duration) -> io::Result<LatResult> {
    let mut s = open(t, t.dsts[0], Some(src_ip(950)))?;
    warm_up(&mut s)?;
    let mut samples = Vec::with_capacity(100_000);
    let start = Instant::now();
    while start.elapsed() < dur && samples.len() < 1_000_000 {
        let t0 = Instant::now();
        ping(&mut s)?;
        samples.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = samples.len();
    let mean = samples.iter().sum::<f64>() / n as f64;
    Ok(LatResult { mean, p50: samples[n / 2], p99: samples[(n * 99 / 100).min(n - 1)], n })
}

/// 64-byte ping-pongs on `tunnels` tunnels at once, one client thread each:
/// interactive tunnels competing for the cores. Each tunnel first ping-pongs
/// for 100 ms (long enough for `auto` to settle it on a path); then all count
/// for `dur`, and `during` is called as that window opens and as it closes
/// (CPU snapshots). Returns the messages answered in the window.
pub fn pingpong(t: &Target, tunnels: usize, dur: Duration, mut during: impl FnMut()) -> io::Result<u64> {
    let mut streams = Vec::with_capacity(tunnels);
    for i in 0..tunnels {
        streams.push(open(t, t.dsts[i % t.dsts.len()], Some(src_ip(900 + i)))?);
    }
    let (start, stop) = (Arc::new(Barrier::new(tunnels + 1)), Arc::new(AtomicBool::new(false)));
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (start, stop) = (start.clone(), stop.clone());
            std::thread::spawn(move || -> io::Result<u64> {
                warm_up(&mut s)?;
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    ping(&mut s)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    start.wait();
    during();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    during();
    let mut total = 0;
    for h in handles {
        total += h.join().unwrap()?;
    }
    Ok(total)
}

pub struct RateResult {
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    pub first_error: Option<String>,
}

/// `conc` threads, each in a loop: (SOCKS4 CONNECT +) one echoed byte + close.
pub fn connrate(t: &Target, conc: usize, dur: Duration) -> RateResult {
    let stop = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let barrier = Arc::new(Barrier::new(conc + 1));
    let handles: Vec<_> = (0..conc)
        .map(|i| {
            let (t, stop, first_error, barrier) = (t.clone(), stop.clone(), first_error.clone(), barrier.clone());
            std::thread::spawn(move || {
                let (mut ok, mut errors) = (0u64, 0u64);
                let dst = t.dsts[i % t.dsts.len()];
                let src = src_ip(i);
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let r = (|| -> io::Result<()> {
                        let mut s = open(&t, dst, Some(src))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            errors += 1;
                            first_error.lock().unwrap().get_or_insert_with(|| e.to_string());
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors) = (0, 0);
    for h in handles {
        let (o, e) = h.join().unwrap();
        ok += o;
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let first_error = first_error.lock().unwrap().take();
    RateResult { ok, errors, secs, first_error }
}

/// Opens `n` more tunnels (in `threads` parallel openers), each proven with one
/// echoed byte. Returns the streams opened and the first error, if any.
pub fn open_tunnels(
    t: &Target,
    base: usize,
    n: usize,
    threads: usize,
    deadline: Instant,
) -> (Vec<TcpStream>, Option<String>) {
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let mut i = base + k;
                while i < base + n {
                    if Instant::now() > deadline {
                        return (v, Some("time limit for opening tunnels reached".to_string()));
                    }
                    let r = (|| -> io::Result<TcpStream> {
                        let mut s = open(&t, t.dsts[i % t.dsts.len()], Some(src_ip(i)))?;
                        s.write_all(b"i")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(s)
                    })();
                    match r {
                        Ok(s) => v.push(s),
                        Err(e) => return (v, Some(format!("tunnel {}: {e}", i + 1))),
                    }
                    i += threads;
                }
                (v, None)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut err = None;
    for h in handles {
        let (v, e) = h.join().unwrap();
        all.extend(v);
        if err.is_none() {
            err = e;
        }
    }
    (all, err)
}

/// Sends one byte on every tunnel, then reads every echo: how many answered
/// (bounded: after 30 s, silent tunnels get 10 ms each).
pub fn verify_tunnels(streams: &mut [TcpStream]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = vec![false; streams.len()];
    for (i, s) in streams.iter_mut().enumerate() {
        sent[i] = s.write_all(b"v").is_ok();
    }
    let mut ok = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        let wait = if Instant::now() > deadline { Duration::from_millis(10) } else { Duration::from_secs(2) };
        let _ = s.set_read_timeout(Some(wait));
        if sent[i] && s.read_exact(&mut b).is_ok() && b[0] == b'v' {
            ok += 1;
        }
    }
    ok
}

/// Bytes charged to TCP sockets machine-wide (`/proc/net/sockstat`, `TCP: ... mem` pages).
pub fn tcp_mem_bytes() -> u64 {
    sockstat_tcp("mem") * 4096
}

/// One field of `/proc/net/sockstat`'s `TCP:` line (`inuse`, `orphan`, `tw`,
/// `alloc`, `mem`); 0 when absent. The counts are the caller's network
/// namespace's, except `mem`, which is machine-wide.
pub fn sockstat_tcp(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else { return 0 };
    let f: Vec<&str> = line.split_whitespace().collect();
    f.iter().position(|w| *w == field).and_then(|i| f.get(i + 1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// TCP memory per tunnel while one side of every tunnel stops reading.
pub struct SlowPeer {
    /// MiB per tunnel after `early`, and at the end.
    pub early_mib: f64,
    pub end_mib: f64,
}

/// `n` tunnels to a listener of this process whose client (`client_stalls`)
/// or destination stops reading while the other side writes as fast as it
/// can, for `dur`: the TCP memory they hold (machine-wide `TCP mem`, so the
/// kernel's buffers, queued psock bytes excluded) per tunnel.
pub fn slow_peer(t: &Target, n: usize, client_stalls: bool, dur: Duration, early: Duration) -> io::Result<SlowPeer> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dst = match listener.local_addr()? {
        std::net::SocketAddr::V4(a) => a,
        _ => return Err(io::Error::other("no IPv4 listener")),
    };
    let mut senders = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..n {
        let c = open(t, dst, None)?;
        let (d, _) = listener.accept()?;
        let (w, r) = if client_stalls { (d, c) } else { (c, d) };
        w.set_nonblocking(true)?;
        senders.push(w);
        stalled.push(r);
    }
    let base = tcp_mem_bytes();
    let start = Instant::now();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut early_mem = None;
    while start.elapsed() < dur {
        let mut wrote = false;
        for mut s in &senders {
            match s.write(&chunk) {
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if !wrote {
            std::thread::sleep(Duration::from_millis(5));
        }
        if early_mem.is_none() && start.elapsed() >= early {
            early_mem = Some(tcp_mem_bytes());
        }
    }
    let end_mem = tcp_mem_bytes();
    let per = |m: u64| m.saturating_sub(base) as f64 / n as f64 / (1 << 20) as f64;
    Ok(SlowPeer { early_mib: per(early_mem.unwrap_or(end_mem)), end_mib: per(end_mem) })
}

/// Short requests while 8 bulk flows run.
pub struct Mixed {
    pub bulk_gbps: f64,
    /// Connect (+ SOCKS CONNECT) + one echoed byte + close, in µs.
    pub p99_us: f64,
    pub requests: usize,
}

/// 8 bulk uploads for `dur` and, meanwhile, one client doing short
/// request/response connections back to back: their p99 and the bulk rate.
pub fn mixed(t: &Target, dur: Duration) -> io::Result<Mixed> {
    let t2 = t.clone();
    let bulk = std::thread::spawn(move || bulk(&t2, 8, dur, || {}));
    let start = Instant::now();
    let mut times = Vec::new();
    let mut i = 0;
    while start.elapsed() < dur {
        let t0 = Instant::now();
        let dst = t.dsts[i % t.dsts.len()];
        let mut s = open(t, dst, Some(src_ip(500 + i % 200)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        drop(s);
        times.push(t0.elapsed().as_secs_f64() * 1e6);
        i += 1;
    }
    let b = bulk.join().map_err(|_| io::Error::other("bulk thread panicked"))??;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p99 = times.get(times.len() * 99 / 100).copied().unwrap_or(f64::NAN);
    Ok(Mixed { bulk_gbps: b.gbps(), p99_us: p99, requests: times.len() })
}
