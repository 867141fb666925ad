//! `proxyd upgrade`: a new process takes over every socket and tunnel while
//! bytes flow (idle tunnels, bulk transfers on the relay and spliced, a
//! client opening a tunnel every 10 ms), and a failing new binary leaves the
//! old process serving everything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proxyd_tests::daemon::proxyd_bin;
use proxyd_tests::{data_paths, listen_local, socks, wait_until, Daemon};

/// Idle tunnels held across the upgrade.
const IDLE: usize = 2000;
/// Bulk transfers in flight during the upgrade, and the bytes of each.
const BULK: usize = 8;
const BULK_BYTES: u64 = 1 << 30;

/// Byte `i` of transfer `seed`'s stream (xorshift per 8-byte word), so the
/// reader checks what arrived without holding what was sent.
fn fill(seed: u64, pos: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = pos + k as u64;
        let mut x = (i / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        *b = (x >> ((i % 8) * 8)) as u8;
    }
}

/// The proxyd process serving `control`, other than `not` (the new one
/// after an upgrade), from /proc.
fn proxyd_serving(control: &Path, not: u32) -> Option<u32> {
    let needle = control.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (pid != not && cmdline.contains(&needle) && cmdline.contains(" run")).then_some(pid)
    })
}

/// The inodes of the sockets listening on TCP `port` (IPv4, /proc/net/tcp).
fn listening_on(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect();
    inodes.sort_unstable();
    inodes
}

/// Whether process `pid` holds socket `inode`.
fn holds(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == want)))
        .unwrap_or(false)
}

/// Stops a process that is not our child (SIGTERM, then waits for it).
fn stop_pid(pid: u32) {
    let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
    let gone = wait_until(Duration::from_secs(15), || !Path::new(&format!("/proc/{pid}")).exists());
    assert!(gone, "proxyd {pid} did not stop");
}

/// The new process, stopped at the end of a test even when it fails.
struct Adopter(Option<u32>);

impl Drop for Adopter {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            stop_pid(pid);
        }
    }
}

/// One bulk transfer: a writer and a reader thread; the reader checks every
/// byte and notes when each read returned.
struct Bulk {
    writer: thread::JoinHandle<()>,
    reader: thread::JoinHandle<(u64, bool, Vec<Instant>)>,
}

/// The longest time without a byte arriving that overlaps `from..to`.
fn longest_pause(reads: &[Instant], from: Instant, to: Instant) -> Duration {
    reads.windows(2).filter(|w| w[1] >= from && w[0] <= to).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

fn bulk(c: TcpStream, u: TcpStream, seed: u64, upload: bool) -> Bulk {
    let (mut from, mut to) = if upload { (c, u) } else { (u, c) };
    let writer = thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut pos = 0;
        while pos < BULK_BYTES {
            let n = buf.len().min((BULK_BYTES - pos) as usize);
            fill(seed, pos, &mut buf[..n]);
            from.write_all(&buf[..n]).expect("bulk write");
            pos += n as u64;
        }
        let _ = from.shutdown(std::net::Shutdown::Write);
    });
    let reader = thread::spawn(move || {
        to.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let mut want = vec![0u8; 256 << 10];
        let (mut got, mut intact, mut reads) = (0u64, true, Vec::new());
        loop {
            let n = match to.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reads.push(Instant::now());
            fill(seed, got, &mut want[..n]);
            intact &= buf[..n] == want[..n];
            got += n as u64;
        }
        (got, intact, reads)
    });
    Bulk { writer, reader }
}

/// During `proxyd upgrade`: the PID changes; every idle tunnel still
/// echoes both ways; every bulk transfer arrives whole; a tunnel opened every
/// 10 ms is never refused; the connections list keeps every tunnel under its
/// number with counters going on from where they were.
#[test]
fn upgrade_keeps_every_tunnel() {
    // `auto` too: its idle tunnels are relayed, some after promotion spliced,
    // and its bulk ones on the relay's pipe lane.
    let mut paths = data_paths();
    if paths.contains(&"kernel") {
        paths.push("auto");
    }
    for dp in paths {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&["max-connections=5000"]);
        let (l, dst) = listen_local();
        let old_pid = d.pid();
        // One listening socket per shard (a SO_REUSEPORT group, one shard per core).
        let group = listening_on(proxy.port());
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(group.len(), cores, "[{dp}] listening sockets on the port (one per core)");
        assert!(group.iter().all(|&i| holds(old_pid, i)), "[{dp}] the group is the daemon's");

        let mut idle: Vec<(TcpStream, TcpStream)> = (0..IDLE).map(|_| socks::tunnel(proxy, &l, dst)).collect();
        for (i, (c, u)) in idle.iter_mut().enumerate().step_by(97) {
            c.write_all(&[i as u8]).unwrap();
            let mut b = [0u8];
            u.read_exact(&mut b).unwrap();
        }
        // Under `auto` a tunnel that keeps exchanging small messages for 50 ms
        // is promoted into the sockhash: some idle tunnels are spliced there too.
        let talked = Instant::now();
        while dp == "auto" && talked.elapsed() < Duration::from_millis(120) {
            for (c, u) in idle.iter_mut().skip(1).step_by(97) {
                c.write_all(b"ping").unwrap();
                let mut b = [0u8; 4];
                u.read_exact(&mut b).unwrap();
                u.write_all(&b).unwrap();
                c.read_exact(&mut b).unwrap();
            }
        }
        let listed = d.cli.connections();
        let spliced = listed.iter().filter(|r| r.path == "kernel").count();
        let relayed = listed.iter().filter(|r| r.path == "userspace").count();
        eprintln!("[{dp}] before the upgrade: {spliced} tunnels spliced, {relayed} relayed");
        if dp == "auto" {
            assert!(spliced > 0 && relayed > 0, "[{dp}] idle tunnels should be both spliced and relayed");
        }
        let bulks: Vec<Bulk> = (0..BULK)
            .map(|i| {
                let (c, u) = socks::tunnel(proxy, &l, dst);
                bulk(c, u, i as u64 + 1, i % 2 == 0)
            })
            .collect();
        // New tunnels every 10 ms, to a second destination, through the upgrade.
        let (l2, dst2) = listen_local();
        let l2 = Arc::new(l2);
        let stop = Arc::new(AtomicBool::new(false));
        let probes = {
            let (stop, l2) = (stop.clone(), l2.clone());
            thread::spawn(move || {
                let (mut n, mut refused, mut times) = (0, Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match std::panic::catch_unwind(|| socks::tunnel(proxy, &l2, dst2)) {
                        Ok((mut c, mut u)) => {
                            c.write_all(b"p").unwrap();
                            let mut b = [0u8];
                            u.read_exact(&mut b).unwrap();
                        }
                        Err(_) => refused.push(n),
                    }
                    times.push((t, t.elapsed()));
                    n += 1;
                    thread::sleep(Duration::from_millis(10));
                }
                (n, refused, times)
            })
        };
        thread::sleep(Duration::from_millis(300));
        // The idle tunnels (the bulk ones end, the probes come and go).
        let idle_srcs: std::collections::HashSet<String> =
            idle.iter().map(|(c, _)| c.local_addr().unwrap().to_string()).collect();
        let ours = |list: Vec<proxyd_tests::daemon::Conn>| {
            list.into_iter().filter(|r| idle_srcs.contains(&r.src)).collect::<Vec<_>>()
        };
        let before = ours(d.cli.connections());
        assert_eq!(before.len(), IDLE, "[{dp}] idle tunnels listed before the upgrade");
        let started = Instant::now();
        let out = d.cli(&["upgrade"]);
        let took = started.elapsed();
        let ended = Instant::now();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "[{dp}] upgrade failed: {text}\n{}", d.log());
        let st = d.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| panic!("[{dp}] the old proxyd did not exit"));
        assert!(st.success(), "[{dp}] the old proxyd exited {st}");
        let new_pid = proxyd_serving(&d.cli.control, old_pid).unwrap_or_else(|| panic!("[{dp}] no new proxyd"));
        let _adopter = Adopter(Some(new_pid));
        assert_ne!(new_pid, old_pid);
        // The same sockets, all taken over: none was closed (its queued clients
        // reset) or bound anew.
        assert_eq!(listening_on(proxy.port()), group, "[{dp}] the listening sockets after the upgrade");
        assert!(group.iter().all(|&i| holds(new_pid, i)), "[{dp}] the new proxyd holds the whole group");
        eprintln!("[{dp}] upgrade: {} in {took:?}", text.trim());
        // The log names the mode and the path in use at start-up and at the take-over.
        for line in [format!("starting (data-path={dp}, in use: "), format!(" tunnel(s) (data-path={dp}, in use: ")] {
            assert!(
                wait_until(Duration::from_secs(5), || d.log().contains(&line)),
                "[{dp}] the log has no {line:?}:\n{}",
                d.log()
            );
        }

        // Every idle tunnel, both ways.
        for (i, (c, u)) in idle.iter_mut().enumerate() {
            let tag = (i as u32).to_be_bytes();
            c.write_all(&tag).unwrap();
            let mut b = [0u8; 4];
            u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            u.read_exact(&mut b).unwrap_or_else(|e| panic!("[{dp}] idle tunnel {i} after the upgrade: {e}"));
            assert_eq!(b, tag);
            u.write_all(&tag).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.read_exact(&mut b).unwrap_or_else(|e| panic!("[{dp}] idle tunnel {i} back: {e}"));
            assert_eq!(b, tag);
        }
        // The list: the same tunnels under the same numbers, counters going on.
        let after = ours(d.cli.connections());
        for row in &before {
            let now = after.iter().find(|r| r.src == row.src);
            let now = now.unwrap_or_else(|| panic!("[{dp}] {} left the connections list", row.src));
            assert!(now.tx >= row.tx && now.rx >= row.rx, "[{dp}] counters went back: {row:?} -> {now:?}");
            assert_eq!(now.kind, row.kind, "[{dp}]");
        }
        let order = |list: &[proxyd_tests::daemon::Conn]| {
            list.iter().filter(|r| before.iter().any(|b| b.src == r.src)).map(|r| r.src.clone()).collect::<Vec<_>>()
        };
        assert_eq!(order(&after), order(&before), "[{dp}] the connections list changed its order");
        for (i, b) in bulks.into_iter().enumerate() {
            b.writer.join().unwrap();
            let (got, intact, reads) = b.reader.join().unwrap();
            assert_eq!(got, BULK_BYTES, "[{dp}] bulk transfer {i} lost bytes");
            assert!(intact, "[{dp}] bulk transfer {i} arrived altered");
            let during = longest_pause(&reads, started, ended);
            let before = longest_pause(&reads, reads[0], started);
            eprintln!(
                "[{dp}] bulk transfer {i} ({}): longest pause during the upgrade {during:?} (before it: {before:?})",
                if i % 2 == 0 { "upload" } else { "download" }
            );
        }
        stop.store(true, Ordering::Relaxed);
        let (n, refused, times) = probes.join().unwrap();
        // A probe overlaps the upgrade if it started before the command
        // returned and ended after it was given.
        let (during, outside): (Vec<_>, Vec<_>) =
            times.iter().partition(|(t, took)| *t <= ended && *t + *took >= started);
        let slowest = |v: &[&(Instant, Duration)]| v.iter().map(|(_, took)| *took).max().unwrap_or_default();
        let (slowest_during, slowest_outside) = (slowest(&during), slowest(&outside));
        eprintln!(
            "[{dp}] {n} new tunnels during the test: {} overlapping the upgrade, slowest {slowest_during:?}; \
             slowest of the others {slowest_outside:?}",
            during.len()
        );
        assert!(refused.is_empty(), "[{dp}] new tunnels refused: {refused:?}");
        assert!(slowest_during < Duration::from_secs(2), "[{dp}] a new tunnel waited {slowest_during:?}");
        drop(idle);
    }
}

/// A new binary that exits at once, or that cannot take the tunnels over,
/// leaves the old process serving every tunnel; the command exits 1 with
/// the reason.
#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let mut tunnels: Vec<_> = (0..20).map(|_| socks::tunnel(proxy, &l, dst)).collect();
        let pid = d.pid();
        let wrapper = d.dir.join("proxyd-userspace.sh");
        // The same proxyd with `--data-path userspace` in place of the one it
        // is given: it cannot carry spliced tunnels on.
        let script = format!(
            "#!/bin/sh\nseen=\nfor a; do shift; if [ \"$prev\" = --data-path ]; then a=userspace; seen=1; fi; set -- \"$@\" \"$a\"; prev=$a; done\n[ -n \"$seen\" ] || set -- \"$@\" --data-path userspace\nexec '{}' \"$@\"\n",
            proxyd_bin().display()
        );
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let mut cases = vec![("/bin/false".to_string(), "exited")];
        if dp != "userspace" {
            cases.push((wrapper.display().to_string(), "cannot adopt"));
        }
        for (binary, why) in cases {
            let out = d.cli(&["upgrade", &format!("binary={binary}")]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "[{dp}] upgrade to {binary}: {err}");
            assert!(err.contains(why) && err.contains("serves on"), "[{dp}] upgrade to {binary}: {err}");
            assert!(d.wait_exit(Duration::from_millis(200)).is_none(), "[{dp}] the old proxyd exited");
            assert_eq!(d.pid(), pid);
            for (i, (c, u)) in tunnels.iter_mut().enumerate() {
                c.write_all(b"still").unwrap();
                let mut b = [0u8; 5];
                u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                u.read_exact(&mut b).unwrap_or_else(|e| panic!("[{dp}] tunnel {i} after a failed upgrade: {e}"));
            }
            // New clients and commands are served as before.
            let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
            c.write_all(b"n").unwrap();
            let mut b = [0u8];
            u.read_exact(&mut b).unwrap();
            assert_eq!(d.cli.connections().len(), tunnels.len() + 1, "[{dp}]");
        }
    }
}

/// Every listening socket of the port has `SO_REUSEPORT` (the group), yet a
/// second daemon cannot join the port: its bind is refused with the reason,
/// on the same address and on the wildcard one.
#[test]
fn a_second_daemon_cannot_take_the_port() {
    let mut first = Daemon::start("userspace");
    let proxy = first.enable(&[]);
    let mut second = Daemon::start("userspace");
    for listen in ["127.0.0.1", "0.0.0.0"] {
        let refused = second.try_enable(listen, proxy.port(), &[], &[]);
        let reason = refused.expect_err("a second daemon bound the first one's port");
        assert!(reason.contains("cannot listen") && reason.contains("in use"), "the reason: {reason}");
    }
    let (l, dst) = listen_local();
    let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
    c.write_all(b"x").unwrap();
    let mut b = [0u8];
    u.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x", "the first daemon still serves");
}
