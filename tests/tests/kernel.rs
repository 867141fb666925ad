//! The kernel data path's own promises (issue 3): no payload through userspace,
//! flow counters visible in bpftool, no loss at close over many transfers, the
//! fallback to the relay without BPF privilege, and a clean error when the
//! kernel path cannot start.

use proxyd_tests::{
    accept_timeout, daemon::proxyd_bin, data_paths, free_port, in_ci, is_root, kernel_under_test, listen_local,
    pattern, require_program, run_with_timeout, sample, scrape, sha256, socks, wait_until, Daemon, Options,
};
use std::io::{Read, Write};
use std::net::Shutdown;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `rchar + wchar` of a process: every byte it read or wrote through syscalls.
fn io_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// 4 GiB through a tunnel moves the daemon's rchar+wchar by less than 1 MiB
/// on every path that does not copy: spliced at once (`kernel`, in the
/// sockhash at the end, or back in it after at most 2 GiB more when a reader
/// that fell behind demoted it: each demotion doubles the bytes the relay
/// waits for before splicing again, up to 1 GiB); under `auto` promoted into the sockhash by an
/// interactive start (64-byte ping-pongs for 100 ms), then bulk (which may
/// demote it if the reader falls behind: then it continues on the relay's
/// `splice(2)` lane); and bulk from the first byte under `auto`, which keeps
/// it on that lane (pages handed on, never read into the daemon) without a
/// single promotion: a pause or a short read in the middle of bulk is no
/// sign of an interactive tunnel.
#[test]
fn four_gib_pass_without_touching_userspace() {
    const T: &str = "four_gib_pass_without_touching_userspace";
    if !kernel_under_test(T) {
        return;
    }
    const TOTAL: u64 = 4 << 30;
    let paths = [("kernel", false, Some("kernel")), ("auto", true, None), ("auto", false, Some("userspace"))];
    for (dp, interactive, path) in paths {
        let what = format!("{dp}{}", if interactive { " after an interactive start" } else { "" });
        let mut d = Daemon::start(dp);
        let metrics = format!("127.0.0.1:{}", free_port());
        let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
        let (l, dst) = listen_local();
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        let mut echoed = 0u64;
        if interactive {
            let started = Instant::now();
            let (mut ping, mut pong) = ([0x70u8; 64], [0u8; 64]);
            while started.elapsed() < Duration::from_millis(100) {
                c.write_all(&ping).unwrap();
                u.read_exact(&mut pong).unwrap();
                u.write_all(&pong).unwrap();
                c.read_exact(&mut ping).unwrap();
                echoed += 64;
            }
            let promoted =
                wait_until(Duration::from_secs(5), || d.cli.connections().iter().any(|r| r.path == "kernel"));
            assert!(promoted, "{what}: not promoted by an interactive start: {:?}", d.cli.connections());
        }
        // A first MiB, the way the bulk goes, lets the splice (or the relay's
        // pipe) settle before measuring; the other direction stays quiet.
        let warm = vec![0x5au8; 1 << 20];
        let w = std::thread::spawn(move || {
            u.write_all(&warm).unwrap();
            u
        });
        let mut sink = vec![0u8; 1 << 20];
        c.read_exact(&mut sink).unwrap();
        let mut u = w.join().unwrap();
        let before = io_bytes(d.pid());
        let sender = std::thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 20];
            let mut sent = 0u64;
            while sent < TOTAL {
                u.write_all(&chunk).unwrap();
                sent += chunk.len() as u64;
            }
            u
        });
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let started = Instant::now();
        while got < TOTAL {
            let n = c.read(&mut buf).expect("read through the tunnel");
            assert!(n > 0, "{what}: end of stream after {got} bytes");
            got += n as u64;
        }
        let took = started.elapsed();
        let mut u = sender.join().unwrap();
        let delta = io_bytes(d.pid()) - before;
        eprintln!("{what}: 4 GiB in {took:?}; daemon rchar+wchar moved by {delta} bytes");
        assert!(delta < 1 << 20, "{what}: the daemon read/wrote {delta} bytes during a 4 GiB transfer");
        // A reader that falls behind (this machine is shared, and other tests
        // run beside this one) demotes a spliced tunnel; `kernel` splices it
        // again after 16 MiB on the relay, doubled per demotion up to 1 GiB, so
        // a recent demotion leaves it on the relay. More bulk must bring it back.
        let mut extra = 0u64;
        while dp == "kernel" && extra < 2 << 30 && !d.cli.connections().iter().any(|r| r.path == "kernel") {
            let chunk = vec![0x5au8; 32 << 20];
            let w = std::thread::spawn(move || {
                u.write_all(&chunk).unwrap();
                u
            });
            c.read_exact(&mut vec![0u8; 32 << 20]).expect("read through the tunnel");
            u = w.join().unwrap();
            extra += 32 << 20;
        }
        if extra > 0 {
            let demoted = sample(&scrape(&metrics), "proxyd_tunnel_path_switches_total{switch=\"demoted\"}");
            eprintln!(
                "{what}: {demoted} demotions; was on the relay at the end, spliced again after {} MiB more",
                extra >> 20
            );
        }
        let rows = d.cli.connections();
        let rx = (1 << 20) + TOTAL + echoed + extra;
        assert!(
            rows.iter().any(|r| r.rx == rx && r.tx == echoed && path.is_none_or(|p| r.path == p)),
            "{what}: counters must be exact (rx {rx} B) and the tunnel on the {path:?} path: {rows:?}",
        );
        if dp == "auto" && !interactive {
            let promoted = sample(&scrape(&metrics), "proxyd_tunnel_path_switches_total{switch=\"promoted\"}");
            assert_eq!(promoted, 0, "{what}: a bulk tunnel was promoted into the sockhash");
        }
        drop((c, u));
    }
}

#[test]
fn bpftool_dumps_flow_fields_by_name() {
    const T: &str = "bpftool_dumps_flow_fields_by_name";
    if !kernel_under_test(T) {
        return;
    }
    let Some(bpftool) = require_program(T, "bpftool") else { return };
    let mut d = Daemon::start("kernel");
    let proxy = d.enable(&[]);
    let (l, dst) = listen_local();
    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
    // The first bytes may be handed over in userspace while the pair is
    // spliced; after a round trip the verdict moves (and counts) everything.
    c.write_all(b"p").unwrap();
    let mut one = [0u8; 1];
    u.read_exact(&mut one).unwrap();
    u.write_all(b"q").unwrap();
    c.read_exact(&mut one).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c.write_all(&[7u8; 12_345]).unwrap();
    let mut got = vec![0u8; 12_345];
    u.read_exact(&mut got).unwrap();
    let flows = d.pin_dir().expect("kernel daemons have a pin dir").join("FLOWS");
    let out = run_with_timeout(
        Command::new(bpftool).args(["-j", "map", "dump", "pinned"]).arg(&flows),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON");
    let entries = dump.as_array().expect("an array of entries");
    let values: Vec<&serde_json::Value> = entries
        .iter()
        .filter_map(|e| e.get("formatted").and_then(|f| f.get("value")).or_else(|| e.get("value")))
        .collect();
    assert!(
        values.iter().any(|v| {
            let bytes = v.get("bytes").and_then(|b| b.as_u64()).unwrap_or(0);
            // 12,345, plus the first byte when the verdict (not the hand-over) moved it.
            (12_345..=12_346).contains(&bytes) && v.get("packets").is_some() && v.get("last_ns").is_some()
        }),
        "no flow with bytes=12345 and named fields in {dump:#}"
    );
    drop(c);
}

/// Log-uniform sizes from 1 B to 8 MiB, deterministic.
fn sizes(n: usize, seed: u64) -> Vec<usize> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let exp = (x % 24) as u32; // 2^0 .. 2^23 = 8 MiB
            let base = 1usize << exp;
            (base + (x >> 8) as usize % base).min(8 << 20)
        })
        .collect()
}

/// One transfer: the sender writes `len` bytes and closes at once (or half-closes
/// and then waits for the other side's EOF); the receiver checks the hash.
fn transfer(proxy: std::net::SocketAddr, l: &std::net::TcpListener, dst: std::net::SocketAddrV4, len: usize, i: usize) {
    let c = socks::connect(proxy, dst);
    let u = accept_timeout(l, Duration::from_secs(10)).expect("accept");
    let data = pattern(len, i as u64);
    let (mut sender, mut receiver) = if i.is_multiple_of(2) { (c, u) } else { (u, c) };
    receiver.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let half_close = i % 4 >= 2;
    let want = sha256::hex(&data);
    let writer = std::thread::spawn(move || {
        sender.write_all(&data).unwrap();
        if half_close {
            sender.shutdown(Shutdown::Write).unwrap();
            // Wait for the receiver's EOF back before closing fully.
            sender.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut rest = Vec::new();
            let _ = sender.read_to_end(&mut rest);
        }
        drop(sender);
    });
    let mut got = Vec::with_capacity(len);
    receiver
        .read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("transfer {i} ({len} B): read failed after {} bytes: {e}", got.len()));
    receiver.shutdown(Shutdown::Write).ok();
    drop(receiver);
    writer.join().unwrap();
    assert_eq!(got.len(), len, "transfer {i}: length");
    assert_eq!(sha256::hex(&got), want, "transfer {i}: content");
}

/// 1000 transfers of random sizes (1 B to 8 MiB), sender closing right after its last
/// write, alternating directions and half-closes, all arrive whole.
#[test]
fn thousand_transfers_arrive_whole() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=100"]);
        let sizes = sizes(1000, 0x9e3779b97f4a7c15);
        let total: usize = sizes.iter().sum();
        let started = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let sizes = sizes.clone();
                std::thread::spawn(move || {
                    let (l, dst) = listen_local();
                    for (i, len) in sizes.iter().enumerate().filter(|(i, _)| i % 4 == w) {
                        transfer(proxy, &l, dst, *len, i);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a transfer failed");
        }
        eprintln!("{dp}: 1000 transfers, {} MiB, in {:?}", total >> 20, started.elapsed());
        assert!(
            wait_until(Duration::from_secs(10), || d.cli.connections().is_empty()),
            "rows left after the transfers"
        );
    }
}

/// Spliced tunnels whose reader stalls now and then (so they brake, demote and are
/// promoted again, and their senders retransmit) deliver every byte once, in order, with
/// exact counters. Before the verdict cut off bytes a socket had already delivered,
/// about one run in 10 to 40 of a heavier form of this load (40 tunnels of 256 MiB)
/// delivered a 64-130 KB stretch twice right after a promotion
/// (docs/kernel-data-path.md, "Bytes the socket had already delivered").
#[test]
fn stalling_readers_get_every_byte_once() {
    const T: &str = "stalling_readers_get_every_byte_once";
    if !kernel_under_test(T) {
        return;
    }
    const BACK: usize = 192 << 20;
    const WARM: usize = 1 << 20;
    let mut d = Daemon::start("kernel");
    let metrics = format!("127.0.0.1:{}", free_port());
    let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
    let data = std::sync::Arc::new(pattern(BACK, 0x5eed));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (data, cli) = (data.clone(), d.cli.clone());
            std::thread::spawn(move || {
                let (l, dst) = listen_local();
                for i in 0..8 {
                    let what = format!("tunnel {w}.{i}");
                    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
                    let src = c.local_addr().unwrap().to_string();
                    // A first MiB client -> destination while the pair enters the maps.
                    let warm = pattern(WARM, (w * 100 + i) as u64);
                    let sent = warm.clone();
                    let writer = std::thread::spawn(move || c.write_all(&sent).map(|()| c));
                    let mut got = vec![0u8; WARM];
                    u.read_exact(&mut got).unwrap();
                    let mut c = writer.join().unwrap().unwrap();
                    assert!(got == warm, "{what}: the first MiB differs");
                    let back = data.clone();
                    let sender = std::thread::spawn(move || {
                        u.write_all(&back).unwrap();
                        u.shutdown(Shutdown::Write).unwrap();
                        u
                    });
                    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut buf = vec![0u8; 1 << 20];
                    let (mut n, mut reads) = (0usize, 0usize);
                    loop {
                        let r = c.read(&mut buf).unwrap_or_else(|e| panic!("{what}: read after {n} bytes: {e}"));
                        if r == 0 {
                            break;
                        }
                        assert!(n + r <= BACK, "{what}: {} bytes more than were sent", n + r - BACK);
                        if buf[..r] != data[n..n + r] {
                            let at = (0..r).find(|&k| buf[k] != data[n + k]).unwrap();
                            panic!("{what}: byte {} differs from what was sent", n + at);
                        }
                        n += r;
                        reads += 1;
                        // A stall of 30 ms every 64 reads, at a different phase per tunnel.
                        if reads % 64 == (w * 7 + i) % 64 {
                            std::thread::sleep(Duration::from_millis(30));
                        }
                    }
                    assert_eq!(n, BACK, "{what}: end of stream early");
                    let u = sender.join().unwrap();
                    let rows: Vec<_> = cli.connections().into_iter().filter(|r| r.src == src).collect();
                    assert!(
                        rows.len() == 1 && rows[0].tx == WARM as u64 && rows[0].rx == BACK as u64,
                        "{what}: counters must be exact (tx {WARM}, rx {BACK}): {rows:?}"
                    );
                    drop((c, u));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a tunnel lost or repeated bytes");
    }
    let text = scrape(&metrics);
    let promoted = sample(&text, "proxyd_tunnel_path_switches_total{switch=\"promoted\"}");
    let cuts = sample(&text, "proxyd_kernel_retransmit_cuts_total{unit=\"bytes\"}");
    eprintln!("{T}: 32 tunnels, {promoted} promotions after a demotion, {cuts} retransmitted bytes cut");
    assert!(promoted > 0, "the stalls never demoted a tunnel: the test does not cross promotions");
}

/// A segment that overlaps bytes a spliced socket already received (a retransmission
/// cut differently from the original) reaches the peer once: the verdict cuts its old
/// head. The test sees the destination's segments on `lo` (`AF_PACKET`), then injects a
/// copy of the last one that starts 10 bytes before its end and carries the next 10
/// bytes the destination is about to send; the destination's own next segment then
/// overlaps those 10. The client must get every byte exactly once.
#[test]
fn overlapping_segment_reaches_the_peer_once() {
    const T: &str = "overlapping_segment_reaches_the_peer_once";
    if !kernel_under_test(T) {
        return;
    }
    let mut d = Daemon::start("kernel");
    let metrics = format!("127.0.0.1:{}", free_port());
    let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
    // 10 bytes the socket has delivered, then the 10 the destination sends next.
    let Overlapped { mut c, mut u, next, .. } = overlap(proxy, 10, 10);
    let mut early = vec![0u8; 10];
    c.read_exact(&mut early).unwrap();
    assert_eq!(early, next[..10], "the injected segment's new bytes, without the 10 already delivered");
    u.write_all(&next).unwrap();
    u.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("the rest, then end of stream");
    assert!(
        rest == next[10..],
        "after the injected bytes the client got {} bytes, want the 90 not yet seen",
        rest.len()
    );
    let cut = sample(&scrape(&metrics), "proxyd_kernel_retransmit_cuts_total{unit=\"bytes\"}");
    assert!(cut >= 10, "the verdict cut {cut} bytes, want at least the 10 injected again");
    let rows = d.cli.connections();
    assert!(rows.iter().any(|r| r.rx == 1100), "rx must count each byte once (1100): {rows:?}");
}

/// A spliced tunnel whose verdict could not cut an overlapping segment (it had
/// to drop it, new bytes and all) is reset on both sides, and its client never
/// gets a byte from after the gap: with the verdict's event, and with the event
/// lost to a full ring, when the destination's FIN must not be passed on as a
/// clean end. Both faults are injected (`PROXYD_BPF_FAULTS`): a cut fails in
/// service only past 640 KiB of overlap, which no test can make TCP queue.
///
/// The kernel moves the socket's `copied_seq` by a dropped skb's whole length,
/// 16 bytes past what TCP received here; so the next in-order segment (10
/// bytes) looks delivered and is cut away whole, and the one after it (20)
/// only in part: without the broken mark its last 14 bytes would reach the
/// client, after a gap.
#[test]
fn a_cut_that_fails_resets_the_tunnel_even_if_its_event_is_lost() {
    const T: &str = "a_cut_that_fails_resets_the_tunnel_even_if_its_event_is_lost";
    if !kernel_under_test(T) {
        return;
    }
    for faults in ["cut-max=15", "cut-max=15,ring-full"] {
        let env = vec![("PROXYD_BPF_FAULTS".to_string(), faults.to_string())];
        let mut d = Daemon::start_with("kernel", Options { env, ..Options::default() });
        let proxy = d.enable(&[]);
        // 16 delivered bytes and 1 new: more than cut-max, so dropped.
        let Overlapped { mut c, mut u, next, sniffer, last } = overlap(proxy, 16, 1);
        let end = last.seq_end();
        sniffer.inject(&last, end.wrapping_add(1), &next[1..11]);
        sniffer.inject(&last, end.wrapping_add(11), &next[11..31]);
        // The destination's own next segment starts before all of these: its
        // cut fails as well.
        // The reset reaches the destination as the error of one of its calls
        // (a socket reports it once): the write if it came first, else the read.
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut calls = vec![u.write_all(&next).map(|_| 0)];
        calls.push(u.shutdown(Shutdown::Write).map(|_| 0));
        let mut got = Vec::new();
        let closed = c.read_to_end(&mut got);
        assert!(got.is_empty(), "{faults}: the client got {} bytes from after the gap", got.len());
        let err = closed.expect_err(&format!("{faults}: the client saw a clean end of a stream with a gap"));
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{faults}: the client's read: {err}");
        calls.push(u.read(&mut [0u8; 64]));
        assert!(
            calls.iter().any(|r| r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)),
            "{faults}: the destination saw no reset (write, shutdown, read: {calls:?})"
        );
        assert!(d.log().contains("PROXYD_BPF_FAULTS is set"), "{faults}: the daemon did not say it injects faults");
    }
}

/// A spliced tunnel right after the injection of a segment that overlaps the
/// bytes its client already got (see `overlapping_segment_reaches_the_peer_once`).
struct Overlapped {
    c: std::net::TcpStream,
    u: std::net::TcpStream,
    /// The 100 bytes the destination sends next; the injected segment carried
    /// the first of them after bytes already delivered.
    next: Vec<u8>,
    /// What sees and injects the destination's segments, and the last one it
    /// sent before the injection.
    sniffer: raw::Lo,
    last: raw::Segment,
}

/// Opens a tunnel through `proxy` (a `kernel` daemon), moves 1000 bytes from
/// the destination to the client, and injects a segment of the last `old` of
/// them followed by the first `new` bytes the destination sends next.
fn overlap(proxy: std::net::SocketAddr, old: usize, new: usize) -> Overlapped {
    let (l, dst) = listen_local();
    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (from, to) = (u.local_addr().unwrap().port(), u.peer_addr().unwrap().port());
    let sniffer = raw::Lo::open(from, to);
    let first = pattern(1000, 1);
    let next = pattern(100, 2);
    u.write_all(&first).unwrap();
    let mut got = vec![0u8; first.len()];
    c.read_exact(&mut got).unwrap();
    assert!(got == first, "the first 1000 bytes");
    let last = sniffer.last_data_segment(Duration::from_secs(5)).expect("the destination's segment on lo");
    let overlap = [&first[first.len() - old..], &next[..new]].concat();
    sniffer.inject(&last, last.seq_end().wrapping_sub(old as u32), &overlap);
    Overlapped { c, u, next, sniffer, last }
}

/// Seeing and injecting IPv4 TCP segments on `lo` through an `AF_PACKET` socket.
mod raw {
    use std::time::{Duration, Instant};

    /// An IPv4 TCP segment seen on `lo`: the whole frame (Ethernet header first).
    pub struct Segment {
        frame: Vec<u8>,
        ip: usize,
        tcp: usize,
        payload: usize,
    }

    impl Segment {
        fn parse(frame: &[u8]) -> Option<Segment> {
            let ip = 14;
            if frame.len() < ip + 20 || frame[12..14] != [0x08, 0x00] || frame[ip] >> 4 != 4 || frame[ip + 9] != 6 {
                return None;
            }
            let tcp = ip + usize::from(frame[ip] & 0x0f) * 4;
            let total = ip + usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
            let payload = tcp + usize::from(frame.get(tcp + 12)? >> 4) * 4;
            (total <= frame.len() && payload <= total).then(|| Segment {
                frame: frame[..total].to_vec(),
                ip,
                tcp,
                payload,
            })
        }
        fn seq(&self) -> u32 {
            u32::from_be_bytes(self.frame[self.tcp + 4..self.tcp + 8].try_into().unwrap())
        }
        fn len(&self) -> usize {
            self.frame.len() - self.payload
        }
        /// The sequence number after this segment's data.
        pub fn seq_end(&self) -> u32 {
            self.seq().wrapping_add(self.len() as u32)
        }
    }

    /// The one's-complement sum of `data` folded to 16 bits, added to `sum`.
    fn fold(mut sum: u32, data: &[u8]) -> u32 {
        for pair in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    }

    /// An `AF_PACKET` socket bound to `lo` that sees only the TCP segments
    /// from port `from` to port `to` (a socket filter: other tests may move
    /// gigabytes over `lo` meanwhile).
    pub struct Lo {
        fd: std::os::fd::OwnedFd,
        ifindex: i32,
    }

    impl Lo {
        pub fn open(from: u16, to: u16) -> Lo {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_IP as u16).to_be();
            // SAFETY: plain socket(2); the descriptor is owned at once.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` was just returned by socket(2).
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) } as i32;
            let addr = Self::address(ifindex, proto);
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let rc = unsafe {
                libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET to lo: {}", std::io::Error::last_os_error());
            // tcpdump's `ip and tcp and src port FROM and dst port TO` (no fragments).
            let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
            let filter = [
                op(0x28, 0, 0, 12),     // ldh [12]: ethertype
                op(0x15, 0, 9, 0x0800), // IPv4, else drop
                op(0x30, 0, 0, 23),     // ldb [23]: protocol
                op(0x15, 0, 7, 6),      // TCP, else drop
                op(0x28, 0, 0, 20),     // ldh [20]: fragment offset
                op(0x45, 5, 0, 0x1fff), // a fragment: drop
                op(0xb1, 0, 0, 14),     // ldxb 4*([14]&0xf): IP header length
                op(0x48, 0, 0, 14),     // ldh [x+14]: source port
                op(0x15, 0, 2, u32::from(from)),
                op(0x48, 0, 0, 16),            // ldh [x+16]: destination port
                op(0x15, 1, 0, u32::from(to)), // keep
                op(0x06, 0, 0, 0),             // drop
                op(0x06, 0, 0, 0x0004_0000),   // keep (up to 256 KiB)
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            // SAFETY: `prog` points to `filter`, alive for the call.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&prog as *const libc::sock_fprog).cast(),
                    std::mem::size_of::<libc::sock_fprog>() as u32,
                )
            };
            assert_eq!(rc, 0, "SO_ATTACH_FILTER: {}", std::io::Error::last_os_error());
            // Frames queued before the filter: dropped.
            let mut scratch = vec![0u8; 1 << 17];
            // SAFETY: `scratch` is writable for its length.
            while unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            } > 0
            {}
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            // SAFETY: a timeval of the size passed.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Lo { fd, ifindex }
        }

        fn address(ifindex: i32, proto: u16) -> libc::sockaddr_ll {
            // SAFETY: sockaddr_ll is plain data; all zeros is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex;
            addr.sll_halen = 6;
            addr
        }

        /// The data segment with the highest end seen until nothing more comes
        /// for 100 ms (or `timeout`).
        pub fn last_data_segment(&self, timeout: Duration) -> Option<Segment> {
            let started = Instant::now();
            let mut best: Option<Segment> = None;
            let mut buf = vec![0u8; 1 << 17];
            while started.elapsed() < timeout {
                // SAFETY: `buf` is writable for its length.
                let n = unsafe {
                    libc::recv(std::os::fd::AsRawFd::as_raw_fd(&self.fd), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n <= 0 {
                    if best.is_some() {
                        break;
                    }
                    continue;
                }
                let Some(seg) = Segment::parse(&buf[..n as usize]) else { continue };
                if seg.len() > 0 && best.as_ref().is_none_or(|b| (seg.seq_end().wrapping_sub(b.seq_end()) as i32) > 0) {
                    best = Some(seg);
                }
            }
            best
        }

        /// Sends a copy of `like` (same addresses, ports, ACK and options)
        /// carrying `payload` at sequence number `seq`, as if it arrived on `lo`.
        pub fn inject(&self, like: &Segment, seq: u32, payload: &[u8]) {
            let mut f = like.frame[..like.payload].to_vec();
            f.extend_from_slice(payload);
            let (ip, tcp) = (like.ip, like.tcp);
            let total = (f.len() - ip) as u16;
            f[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
            let ip_sum = !(fold(0, &f[ip..tcp]) as u16);
            f[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
            f[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
            f[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
            let tcp_len = (f.len() - tcp) as u16;
            let mut pseudo = f[ip + 12..ip + 20].to_vec();
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&tcp_len.to_be_bytes());
            let tcp_sum = !(fold(fold(0, &pseudo), &f[tcp..]) as u16);
            f[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
            let addr = Self::address(self.ifindex, (libc::ETH_P_IP as u16).to_be());
            // SAFETY: `f` and `addr` are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(n, f.len() as isize, "inject on lo: {}", std::io::Error::last_os_error());
        }
    }
}

/// Without BPF privilege, `data-path=auto` serves through the userspace relay and says so.
#[test]
fn auto_without_bpf_privilege_uses_the_relay() {
    const T: &str = "auto_without_bpf_privilege_uses_the_relay";
    if !is_root() {
        // Not root: this process itself lacks BPF privilege, which is the case under test.
        eprintln!("running unprivileged: the daemon inherits no BPF privilege");
    }
    let setpriv = if is_root() {
        match require_program(T, "setpriv") {
            Some(p) => Some(p),
            None => return,
        }
    } else {
        None
    };
    let dir = std::env::temp_dir().join(format!("proxyd-noprivs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let control = dir.join("control.sock");
    let mut cmd = match &setpriv {
        // nobody, no capabilities at all.
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
                .arg(proxyd_bin());
            c
        }
        None => Command::new(proxyd_bin()),
    };
    cmd.args(["run", "--data-path", "auto", "--bpf-pin-dir"])
        .arg(dir.join("pins"))
        .arg("--state")
        .arg(dir.join("config.rsc"))
        .arg("--control")
        .arg(&control)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start proxyd");
    let up = wait_until(Duration::from_secs(10), || control.exists());
    let cli = |args: &[&str]| Command::new(proxyd_bin()).arg("--control").arg(&control).args(args).output().unwrap();
    let printed =
        if up { String::from_utf8_lossy(&cli(&["ip", "socks", "print"]).stdout).into_owned() } else { String::new() };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(up, "the daemon did not start without privilege:\n{log}");
    assert!(printed.contains("data-path: auto (in use: userspace)"), "print must say the relay is in use:\n{printed}");
    assert!(log.contains("using the userspace relay"), "the log must say why and which path:\n{log}");
}

/// A kernel-path failure at start (pin dir on a filesystem that is not bpffs) is one clear error line.
#[test]
fn kernel_failure_at_start_is_one_line() {
    const T: &str = "kernel_failure_at_start_is_one_line";
    if !is_root() && !in_ci() {
        eprintln!("SKIP {T}: needs root to get as far as the pin dir");
        return;
    }
    let dir = std::env::temp_dir().join(format!("proxyd-badpin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = run_with_timeout(
        Command::new(proxyd_bin())
            .args(["run", "--data-path", "kernel", "--bpf-pin-dir", "/proc/proxyd-not-bpffs", "--state"])
            .arg(dir.join("config.rsc"))
            .arg("--control")
            .arg(dir.join("control.sock"))
            .env("PROXYD_LOG", "error"),
        Duration::from_secs(20),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon must not start:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want exactly one line, got:\n{err}");
    assert!(
        lines[0].contains("ERROR") && lines[0].contains("/proc/proxyd-not-bpffs"),
        "the line must say what failed:\n{err}"
    );
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

/// A second `proxyd run` by mistake leaves the running one alone: on the same pin dir
/// it refuses to start (one line naming the dir) and the first daemon's pins stay and
/// its tunnels keep working; on the same control socket it refuses before loading
/// anything.
#[test]
fn second_daemon_on_the_same_pin_dir_or_socket_is_refused() {
    const T: &str = "second_daemon_on_the_same_pin_dir_or_socket_is_refused";
    if !kernel_under_test(T) {
        return;
    }
    let mut d = Daemon::start("kernel");
    let proxy = d.enable(&[]);
    let pin = d.pin_dir().expect("kernel daemons have a pin dir").to_path_buf();
    let pins = |p: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(p).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let before = pins(&pin);
    assert!(before.contains(&"FLOWS".to_string()), "the first daemon pins its maps: {before:?}");
    let dir = std::env::temp_dir().join(format!("proxyd-second-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let second = |control: &std::path::Path, pin_dir: &std::path::Path| {
        run_with_timeout(
            Command::new(proxyd_bin())
                .args(["run", "--data-path", "kernel", "--bpf-pin-dir"])
                .arg(pin_dir)
                .arg("--state")
                .arg(dir.join("config.rsc"))
                .arg("--control")
                .arg(control)
                .env("PROXYD_LOG", "error"),
            Duration::from_secs(20),
        )
    };
    let out = second(&dir.join("control.sock"), &pin);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a second daemon on {} must not start:\n{err}", pin.display());
    assert!(
        err.contains("in use by another running proxyd") && err.contains(&*pin.to_string_lossy()),
        "the error must name the pin dir:\n{err}"
    );
    let other_pin = std::path::PathBuf::from(format!("{}-other", pin.display()));
    let out = second(&d.cli.control, &other_pin);
    let err2 = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "a second daemon on the same control socket must not start:\n{err2}");
    assert!(err2.contains("another proxyd is running on this control socket"), "{err2}");
    assert!(!other_pin.exists(), "refused before loading BPF, yet {} was made", other_pin.display());
    assert_eq!(pins(&pin), before, "the first daemon's pins changed");
    let (l, dst) = listen_local();
    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
    c.write_all(b"still here").unwrap();
    let mut got = [0u8; 10];
    u.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    drop((c, u));
    drop(d);
    assert!(!pin.exists(), "the first daemon removes its pin dir at a clean stop");
}
