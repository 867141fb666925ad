//! `cargo xtask bench`: proxyd (`auto`, the default and headline, and the
//! forced kernel and userspace paths) against Dante and the direct path, side
//! by side in one run, with one load generator.
//!
//! - `echo`: the echo/sink server (forked worker processes, epoll).
//! - `load`: the load generator (threads, blocking sockets).
//! - `procs`: the proxies as child processes; /proc and `ss` readings.
//! - `report`: target/bench/results.{md,json,svg}.
//!
//! Every run is bounded in time; each figure is the median of the repeats
//! (nine by default, and four times as many, each a quarter as long, for the
//! latency and connection-rate runs): a run's figure swings by where its
//! threads land on the two vCPUs, which mostly holds for the whole run, so
//! more runs narrow a median further than longer ones of the same total time
//! (docs/decisions.md, "Benchmark").

mod echo;
mod load;
mod netns;
mod procs;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use load::{Target, Via};
use procs::Proxy;

/// Tunnels of the many-interactive-tunnels run (`pp8_*`).
pub const PINGPONG_TUNNELS: usize = 8;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A few seconds' run of every measurement, to check that the bench works.
    #[arg(long)]
    pub smoke: bool,
    /// Repeats of every measurement (the figure is their median); latency and
    /// connection-rate runs take four times as many. Default 9 (smoke: 1).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Seconds per bulk run (latency and connection-rate runs take an eighth;
    /// smoke: half). Default 2.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Systems to measure, comma-separated: direct,dante,auto,userspace,kernel
    /// (proxyd's data paths, SOCKS4), microsocks,auto-socks5 (SOCKS5 runs).
    #[arg(long, default_value = "direct,dante,auto,userspace,kernel,microsocks,auto-socks5")]
    pub systems: String,
    /// Idle-tunnel counts for the scale test, comma-separated (at most 8000 here:
    /// 16,000 sockets in the proxy under a 20,000 open-files limit).
    #[arg(long)]
    pub tunnels: Option<String>,
    /// Measurements to run, comma-separated: bulk,latency,slow,mixed,scale,conn
    /// (bulk also gives CPU per GiB). Default all; a partial run's table shows
    /// "—" for the rest.
    #[arg(long, default_value = "bulk,latency,slow,mixed,scale,conn")]
    pub tests: String,
    /// Skip the iperf3 reference runs.
    #[arg(long)]
    pub no_iperf: bool,
    /// Output folder. Default target/bench (smoke runs: target/bench/smoke, so
    /// they never overwrite a real run's results).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The proxyd binary to measure. Default target/release/proxyd.
    #[arg(long)]
    pub proxyd: Option<PathBuf>,
}

pub struct Cfg {
    pub smoke: bool,
    pub repeats: usize,
    /// Repeats of the latency and connection-rate runs, each `lat` or `conn` long.
    pub short_repeats: usize,
    pub bulk: Duration,
    pub lat: Duration,
    pub conn: Duration,
    pub concs: Vec<usize>,
    pub tunnels: Vec<usize>,
    pub scale_limit: Duration,
    /// How long the slow-peer runs hold their tunnels, and how many.
    pub slow: Duration,
    pub slow_tunnels: usize,
    /// Which measurements run (`--tests`).
    pub tests: Vec<String>,
}

impl Cfg {
    fn runs(&self, test: &str) -> bool {
        self.tests.iter().any(|t| t == test)
    }
}

/// One measured figure: the median of its samples.
#[derive(Default, Clone, Debug)]
pub struct Metric {
    pub samples: Vec<f64>,
    pub note: Option<String>,
}

impl Metric {
    pub fn median(&self) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v = self.samples.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
    }
}

#[derive(Default, Debug)]
pub struct SysResult {
    pub name: String,
    pub available: bool,
    pub reason: Option<String>,
    /// How the bench knows it measured what it asked for (proxyd's `data-path:` line).
    pub check: String,
    pub metrics: BTreeMap<String, Metric>,
    /// What limits the figures: CPU per process, threads, socket buffers.
    pub diag: Vec<String>,
    pub diag_json: serde_json::Map<String, serde_json::Value>,
}

impl SysResult {
    fn push(&mut self, key: &str, v: f64) {
        self.metrics.entry(key.to_string()).or_default().samples.push(v);
    }
    fn note(&mut self, key: &str, n: String) {
        let m = self.metrics.entry(key.to_string()).or_default();
        if m.note.is_none() {
            m.note = Some(n);
        }
    }
    pub fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).and_then(|m| m.median())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Dante,
    Proxyd(&'static str),
    Microsocks,
    /// proxyd on a data path, measured over SOCKS5.
    Proxyd5(&'static str),
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Dante => "dante".into(),
            Kind::Proxyd(p) => format!("proxyd-{p}"),
            Kind::Microsocks => "microsocks".into(),
            Kind::Proxyd5(p) => format!("proxyd-{p}-socks5"),
        }
    }
}

struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    dsts: Vec<std::net::SocketAddrV4>,
    /// The thread-per-connection echo server (`EchoServer::threaded`).
    threaded_echo: std::net::SocketAddrV4,
    echo_pids: Vec<i32>,
}

/// CPU seconds so far: the proxy's tree, the load generator (this process),
/// the echo server, and the machine (busy, total, irq+softirq).
#[derive(Clone, Copy)]
struct Snap {
    proxy: f64,
    gen: f64,
    echo: f64,
    busy: f64,
    total: f64,
    softirq: f64,
}

fn snap(ctx: &Ctx, pid: Option<i32>) -> Snap {
    let (busy, total, softirq) = procs::machine_cpu();
    Snap {
        proxy: pid.map_or(0.0, procs::tree_cpu_secs),
        gen: procs::proc_cpu_secs(std::process::id() as i32),
        echo: ctx.echo_pids.iter().map(|&p| procs::proc_cpu_secs(p)).sum(),
        busy,
        total,
        softirq,
    }
}

/// Cores in use between snapshots, per party (medians over runs when printed).
#[derive(Default)]
struct Cores {
    proxy: Vec<f64>,
    gen: Vec<f64>,
    echo: Vec<f64>,
    softirq: Vec<f64>,
    other: Vec<f64>,
    busy: Vec<f64>,
}

impl Cores {
    fn add(&mut self, a: &Snap, b: &Snap) {
        let wall = ((b.total - a.total) / cores()).max(1e-3);
        let d = |x: f64, y: f64| (y - x) / wall;
        let (p, g, e, s, busy) =
            (d(a.proxy, b.proxy), d(a.gen, b.gen), d(a.echo, b.echo), d(a.softirq, b.softirq), d(a.busy, b.busy));
        self.proxy.push(p);
        self.gen.push(g);
        self.echo.push(e);
        self.softirq.push(s);
        self.busy.push(busy);
        // No IRQ time accounting on this kernel kind: softirq work is inside
        // the times of whichever tasks ran, so it is a share, not an addend.
        self.other.push((busy - p - g - e).max(0.0));
    }
    fn text(&self, proxied: bool) -> String {
        format!(
            "machine busy {:.2} of {} cores = {}load generator {:.2} + echo server {:.2} + other processes and kernel threads {:.2} (irq/softirq share of the busy time, sampled: {:.2} cores)",
            median(&self.busy),
            cores(),
            if proxied { format!("proxy {:.2} + ", median(&self.proxy)) } else { String::new() },
            median(&self.gen),
            median(&self.echo),
            median(&self.other),
            median(&self.softirq)
        )
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"machine_busy": median(&self.busy), "proxy": median(&self.proxy), "load_generator": median(&self.gen),
                           "echo_server": median(&self.echo), "irq_softirq": median(&self.softirq), "other_processes": median(&self.other)})
    }
}

fn median(v: &[f64]) -> f64 {
    Metric { samples: v.to_vec(), note: None }.median().unwrap_or(f64::NAN)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    // A network namespace of the run's own, and the echo server forked into
    // it, first, while this process has no other thread.
    let network = netns::enter();
    let mut echo = echo::EchoServer::spawn(2)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let out =
        args.out.clone().unwrap_or_else(|| root.join(if args.smoke { "target/bench/smoke" } else { "target/bench" }));
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let work = PathBuf::from(format!("/tmp/proxyd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let secs = args.seconds.unwrap_or(if args.smoke { 0.3 } else { 2.0 });
    let repeats = args.repeats.unwrap_or(if args.smoke { 1 } else { 9 }).max(1);
    // Latency and connection rates: four runs of a quarter the time for each
    // bulk repeat (measured: the spread of `auto` over `userspace` by round
    // halved against nine runs of a second).
    let split = if args.smoke { 1 } else { 4 };
    let cfg = Cfg {
        smoke: args.smoke,
        repeats,
        short_repeats: repeats * split,
        bulk: Duration::from_secs_f64(secs),
        lat: Duration::from_secs_f64(secs / 2.0 / split as f64),
        conn: Duration::from_secs_f64(secs / 2.0 / split as f64),
        concs: vec![1, 16, 64],
        tunnels: match &args.tunnels {
            Some(s) => s
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .context("--tunnels: numbers, e.g. 1000,4000,8000")?,
            None if args.smoke => vec![50, 100, 200],
            None => vec![1000, 4000, 8000],
        },
        scale_limit: Duration::from_secs(if args.smoke { 15 } else { 90 }),
        slow: Duration::from_secs(if args.smoke { 1 } else { 20 }),
        slow_tunnels: if args.smoke { 4 } else { 20 },
        tests: args.tests.split(',').map(|t| t.trim().to_string()).collect(),
    };
    if let Some(bad) =
        cfg.tests.iter().find(|t| !["bulk", "latency", "slow", "mixed", "scale", "conn"].contains(&t.as_str()))
    {
        anyhow::bail!("--tests: unknown measurement {bad:?} (allowed: bulk, latency, slow, mixed, scale, conn)");
    }
    let bin = args.proxyd.clone().unwrap_or_else(|| root.join("target/release/proxyd"));
    let ctx = Ctx {
        bin,
        work: work.clone(),
        logs,
        dsts: echo.addrs.clone(),
        threaded_echo: echo.threaded,
        echo_pids: echo.pids.clone(),
    };
    let mut machine = report::machine_info(&root, &ctx.bin);
    machine.network = network.describe();
    eprintln!("bench: {}; sockets in {}", machine.summary(), machine.network);
    if machine.load1 > 0.5 {
        eprintln!(
            "bench: warning: load average {:.2} at start; other work on this 2-core machine skews the figures",
            machine.load1
        );
    }

    let iperf = if args.no_iperf || cfg.smoke { None } else { Some(iperf3(&cfg)) };

    let wanted: Vec<&str> = args.systems.split(',').map(str::trim).collect();
    let kinds: Vec<Kind> = [
        Kind::Direct,
        Kind::Dante,
        Kind::Proxyd("auto"),
        Kind::Proxyd("userspace"),
        Kind::Proxyd("kernel"),
        Kind::Microsocks,
        Kind::Proxyd5("auto"),
    ]
    .into_iter()
    .filter(|k| {
        let short = match k {
            Kind::Proxyd(p) => p.to_string(),
            Kind::Proxyd5(p) => format!("{p}-socks5"),
            k => k.name(),
        };
        wanted.iter().any(|w| *w == short || *w == k.name())
    })
    .collect();
    let results = run_systems(&kinds, &ctx, &cfg);
    echo.stop();
    let _ = std::fs::remove_dir_all(&work);

    machine.load_end = report::load_average();
    let elapsed = started.elapsed().as_secs_f64();
    let md = report::write(&out, &machine, &cfg, iperf.as_ref(), &results, elapsed)?;
    println!("{md}");
    eprintln!("bench: wrote {0}/results.md, {0}/results.json, {0}/results.svg in {elapsed:.0} s", out.display());
    Ok(())
}

/// iperf3 on loopback, 1 and 8 flows: (1-flow Gbit/s, 8-flow Gbit/s) medians, or why not.
pub struct Iperf {
    pub one: Result<f64, String>,
    pub eight: Result<f64, String>,
}

fn iperf3(cfg: &Cfg) -> Iperf {
    let fail = |e: String| Iperf { one: Err(e.clone()), eight: Err(e) };
    let Ok(port) = procs::free_port() else { return fail("no free port".into()) };
    let server = Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut server) = server else { return fail("iperf3 is not installed (`cargo xtask setup`)".into()) };
    std::thread::sleep(Duration::from_millis(300));
    let secs = cfg.bulk.as_secs_f64().ceil().max(1.0) as u64;
    let one_flow = |flows: usize| -> Result<f64, String> {
        let mut v = Vec::new();
        for _ in 0..cfg.repeats {
            // The server listens again only a moment after each test ends: a
            // client that comes too soon is refused (seen once in a full run).
            let mut tries = 0;
            let bps = loop {
                let out = Command::new("iperf3")
                    .args([
                        "-c",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-t",
                        &secs.to_string(),
                        "-P",
                        &flows.to_string(),
                        "-J",
                    ])
                    .output()
                    .map_err(|e| e.to_string())?;
                let j: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
                match j["end"]["sum_received"]["bits_per_second"].as_f64() {
                    Some(bps) => break bps,
                    None if tries < 3 && j["error"].as_str().is_some_and(|e| e.contains("unable to connect")) => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    None => return Err(format!("iperf3: {}", j["error"])),
                }
            };
            v.push(bps / 1e9);
        }
        Ok(median(&v))
    };
    let one = one_flow(1);
    let eight = one_flow(8);
    let _ = server.kill();
    let _ = server.wait();
    eprintln!("bench: iperf3 loopback: 1 flow {:?} Gbit/s, 8 flows {:?} Gbit/s", one, eight);
    Iperf { one, eight }
}

fn start(kind: Kind, ctx: &Ctx) -> Result<Option<Proxy>> {
    Ok(match kind {
        Kind::Direct => None,
        Kind::Dante => Some(Proxy::dante(&ctx.work, &ctx.logs)?),
        Kind::Proxyd(p) => Some(Proxy::proxyd(&ctx.bin, &ctx.work, &ctx.logs, p, false)?),
        Kind::Microsocks => Some(Proxy::microsocks(&ctx.logs)?),
        Kind::Proxyd5(p) => Some(Proxy::proxyd(&ctx.bin, &ctx.work, &ctx.logs, p, true)?),
    })
}

/// How the load generator reaches the echo server through `proxy`.
fn target(proxy: Option<&Proxy>, ctx: &Ctx) -> Target {
    let via = match proxy {
        None => Via::Direct,
        Some(p) if p.socks5 => Via::Socks5(p.addr),
        Some(p) => Via::Socks4(p.addr),
    };
    Target { via, dsts: ctx.dsts.clone() }
}

/// A system under test during the performance phase.
struct Sys {
    kind: Kind,
    r: SysResult,
    proxy: Option<Proxy>,
    target: Option<Target>,
    cpu: BTreeMap<String, Cores>,
    socks: BTreeMap<String, Vec<procs::Sock>>,
    threads: BTreeMap<String, (u64, usize)>,
    failed: BTreeMap<String, u64>,
    drops: BTreeMap<String, u64>,
}

impl Sys {
    fn pid(&self) -> Option<i32> {
        self.proxy.as_ref().map(|p| p.pid)
    }
}

/// Every system side by side: all proxies run at once and every repeat of a
/// measurement visits each system in turn (rotating the order), so changing
/// background load on the machine falls on all of them alike. Order: bulk and
/// latency; the scale test per system on a freshly started proxy; then the
/// connection rates on fresh proxies (last, because of their TIME_WAITs).
fn run_systems(kinds: &[Kind], ctx: &Ctx, cfg: &Cfg) -> Vec<SysResult> {
    let mut systems: Vec<Sys> = kinds
        .iter()
        .map(|&kind| {
            let mut r = SysResult { name: kind.name(), available: true, ..Default::default() };
            let (proxy, target) = match start(kind, ctx) {
                Ok(p) => {
                    r.check = match &p {
                        Some(p) => p.path_check.clone(),
                        None => "no proxy: the load generator connects to the echo/sink server".into(),
                    };
                    if let Some(p) = &p {
                        r.diag_json.insert("threads_at_start".into(), procs::threads(p.pid).into());
                    }
                    let t = target(p.as_ref(), ctx);
                    (p, Some(t))
                }
                Err(e) => {
                    r.available = false;
                    r.reason = Some(format!("{e:#}"));
                    eprintln!("bench: {} unavailable: {e:#}", r.name);
                    (None, None)
                }
            };
            Sys {
                kind,
                r,
                proxy,
                target,
                cpu: BTreeMap::new(),
                socks: BTreeMap::new(),
                threads: BTreeMap::new(),
                failed: BTreeMap::new(),
                drops: BTreeMap::new(),
            }
        })
        .collect();
    let n = systems.len();
    let order = |rep: usize| (0..n).map(move |i| (i + rep) % n);

    for (key, flows) in [("bulk1_gbps", 1usize), ("bulk8_gbps", 8), ("bulk8_threaded_gbps", 8)] {
        if !cfg.runs("bulk") {
            break;
        }
        eprintln!("bench: {key} ...");
        for rep in 0..cfg.repeats {
            for i in order(rep) {
                if systems[i].target.is_some() {
                    bulk_once(&mut systems[i], key, flows, rep, ctx, cfg);
                }
            }
        }
    }
    eprintln!("bench: latency ...");
    for rep in 0..if cfg.runs("latency") { cfg.short_repeats } else { 0 } {
        for i in order(rep) {
            let s = &mut systems[i];
            let Some(target) = &s.target else { continue };
            match load::latency(target, cfg.lat) {
                Ok(l) => {
                    s.r.push("lat_mean_us", l.mean);
                    s.r.push("lat_p50_us", l.p50);
                    s.r.push("lat_p99_us", l.p99);
                    s.r.push("lat_samples", l.n as f64);
                }
                Err(e) => s.r.note("lat_mean_us", format!("run {}: {e}", rep + 1)),
            }
            let threaded = Target { dsts: vec![ctx.threaded_echo], ..target.clone() };
            match load::latency(&threaded, cfg.lat) {
                Ok(l) => s.r.push("lat_threaded_mean_us", l.mean),
                Err(e) => s.r.note("lat_threaded_mean_us", format!("run {}: {e}", rep + 1)),
            }
        }
    }
    // Many interactive tunnels at once: where the splice's fewer copies and
    // wake-ups show (one tunnel's ping-pong mostly measures where the
    // threads happen to run).
    for rep in 0..if cfg.runs("latency") { cfg.short_repeats } else { 0 } {
        for i in order(rep) {
            let s = &mut systems[i];
            let Some(target) = s.target.clone() else { continue };
            let pid = s.pid();
            let mut snaps = Vec::new();
            match load::pingpong(&target, PINGPONG_TUNNELS, cfg.lat, || snaps.push(snap(ctx, pid))) {
                Ok(n) if n > 0 => {
                    let (a, b) = (&snaps[0], &snaps[1]);
                    let secs = (b.total - a.total) / cores();
                    s.r.push("pp8_msgs", n as f64 / secs);
                    s.r.push("pp8_cpu_us", (b.busy - a.busy) * 1e6 / n as f64);
                }
                Ok(_) => s.r.note("pp8_msgs", format!("run {}: no message answered", rep + 1)),
                Err(e) => s.r.note("pp8_msgs", format!("run {}: {e}", rep + 1)),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Short requests beside bulk flows.
    for rep in 0..if cfg.runs("mixed") { cfg.repeats } else { 0 } {
        eprintln!("bench: mixed ...");
        for i in order(rep) {
            let s = &mut systems[i];
            let Some(target) = &s.target else { continue };
            match load::mixed(target, cfg.bulk) {
                Ok(m) => {
                    s.r.push("mixed_p99_us", m.p99_us);
                    s.r.push("mixed_bulk_gbps", m.bulk_gbps);
                    s.r.diag_json.insert(format!("mixed_requests_run{}", rep + 1), m.requests.into());
                }
                Err(e) => s.r.note("mixed_p99_us", format!("run {}: {e}", rep + 1)),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Slow peers: one system at a time (the figure is machine-wide TCP memory).
    // The SOCKS5 runs compare speed; microsocks cannot be held this way.
    for s in systems.iter_mut().filter(|_| cfg.runs("slow")) {
        let Some(target) = &s.target else { continue };
        if matches!(s.kind, Kind::Microsocks | Kind::Proxyd5(_)) {
            continue;
        }
        eprintln!("bench: slow peers, {} ...", s.r.name);
        for (client_stalls, key) in [(true, "slow_client"), (false, "slow_dest")] {
            match load::slow_peer(target, cfg.slow_tunnels, client_stalls, cfg.slow, cfg.slow / 4) {
                Ok(m) => {
                    s.r.push(&format!("{key}_mib"), m.end_mib);
                    s.r.push(&format!("{key}_growth_mib"), m.end_mib - m.early_mib);
                }
                Err(e) => s.r.note(&format!("{key}_mib"), format!("{e}")),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Bulk diagnostics, then stop the proxies.
    for s in &mut systems {
        if s.target.is_none() {
            continue;
        }
        let proxied = s.proxy.is_some();
        let port = s.proxy.as_ref().map_or(0, |p| p.addr.port());
        for (key, label) in [
            ("bulk1_gbps", "bulk 1 flow"),
            ("bulk8_gbps", "bulk 8 flows"),
            ("bulk8_threaded_gbps", "bulk 8 flows to the thread-per-connection server"),
        ] {
            let Some(cpu) = s.cpu.get(key) else { continue };
            let mut line = format!("{label}: {}", cpu.text(proxied));
            let socks = s.socks.get(key).cloned().unwrap_or_default();
            let threads = s.threads.get(key).copied().unwrap_or((0, 0));
            if proxied {
                line += &format!("; proxy has {} threads in {} process(es)", threads.0, threads.1);
                line += &sock_summary(&socks, port);
            }
            s.r.diag.push(line);
            let socks_json: Vec<_> = socks
                .iter()
                .map(|x| serde_json::json!({"local": x.local, "client_side": x.local.ends_with(&format!(":{port}")), "recv_queued": x.r, "rcvbuf": x.rb, "send_queued": x.t, "sndbuf": x.tb}))
                .collect();
            s.r.diag_json.insert(key.into(), serde_json::json!({"cores": cpu.json(), "proxy_threads": threads.0, "proxy_processes": threads.1, "proxy_sockets_mid_run": socks_json}));
        }
        if let Some(p) = s.proxy.as_mut() {
            p.stop();
        }
        s.proxy = None;
    }

    // Scale: one system at a time, each on a fresh proxy, so earlier runs'
    // buffers do not blur its memory. Before the connection-rate runs: their
    // TIME_WAIT sockets hold 127.0.0.1 ports for a minute, and Dante binds
    // its upstream sockets to 127.0.0.1 port 0 (no 4-tuple reuse for bind).
    for s in &mut systems {
        // The SOCKS5 runs compare speed (microsocks holds a thread per client).
        if s.target.is_none() || !cfg.runs("scale") || matches!(s.kind, Kind::Microsocks | Kind::Proxyd5(_)) {
            continue;
        }
        eprintln!("bench: scale, {} ...", s.r.name);
        std::thread::sleep(Duration::from_millis(300));
        match start(s.kind, ctx) {
            Ok(p) => scale(&mut s.r, p, ctx, cfg),
            Err(e) => s.r.note("tunnels_ok", format!("restart for the scale test failed: {e:#}")),
        }
    }

    // Connection rate, on freshly started proxies again.
    for s in &mut systems {
        if s.target.is_none() || !cfg.runs("conn") {
            continue;
        }
        match start(s.kind, ctx) {
            Ok(p) => {
                s.target = Some(target(p.as_ref(), ctx));
                s.proxy = p;
            }
            Err(e) => {
                s.r.note("conn_c1", format!("restart for the connection-rate runs failed: {e:#}"));
                s.target = None;
            }
        }
    }
    let mut settled = BTreeMap::new();
    for &c in cfg.concs.iter().filter(|_| cfg.runs("conn")) {
        let key = format!("conn_c{c}");
        settled.insert(key.clone(), drain_time_wait(cfg));
        eprintln!("bench: connections c={c} ...");
        for rep in 0..cfg.short_repeats {
            for i in order(rep) {
                let s = &mut systems[i];
                let Some(target) = s.target.clone() else { continue };
                let pid = s.pid();
                let (s0, d0) = (snap(ctx, pid), procs::listen_drops());
                let res = load::connrate(&target, c, cfg.conn);
                let (s1, d1) = (snap(ctx, pid), procs::listen_drops());
                s.cpu.entry(key.clone()).or_default().add(&s0, &s1);
                *s.drops.entry(key.clone()).or_default() += d1.saturating_sub(d0);
                *s.failed.entry(key.clone()).or_default() += res.errors;
                s.r.push(&key, res.ok as f64 / res.secs);
                if let Some(e) = res.first_error {
                    s.r.note(&key, format!("run {}: {} failed ({e})", rep + 1, res.errors));
                }
                // Let the proxy reap the closed tunnels before the next run.
                std::thread::sleep(Duration::from_millis(if cfg.smoke { 100 } else { 300 }));
            }
        }
    }
    // One client against the thread-per-connection server: at c=1 the rate is
    // a chain of wake-ups, and where the far end's threads run moves it.
    if cfg.runs("conn") {
        drain_time_wait(cfg);
    }
    for rep in 0..if cfg.runs("conn") { cfg.short_repeats } else { 0 } {
        for i in order(rep) {
            let s = &mut systems[i];
            let Some(target) = s.target.clone() else { continue };
            let res = load::connrate(&Target { dsts: vec![ctx.threaded_echo], ..target }, 1, cfg.conn);
            s.r.push("conn_c1_threaded", res.ok as f64 / res.secs);
            if let Some(e) = res.first_error {
                s.r.note("conn_c1_threaded", format!("run {}: {} failed ({e})", rep + 1, res.errors));
            }
            std::thread::sleep(Duration::from_millis(if cfg.smoke { 100 } else { 300 }));
        }
    }

    for s in &mut systems {
        if s.target.is_none() {
            continue;
        }
        let proxied = s.proxy.is_some();
        for &c in &cfg.concs {
            let key = format!("conn_c{c}");
            let Some(cpu) = s.cpu.get(&key) else { continue };
            let (failed, drops) = (s.failed.get(&key).copied().unwrap_or(0), s.drops.get(&key).copied().unwrap_or(0));
            let mut line = format!("connections c={c}: {}", cpu.text(proxied));
            let rate = s.r.get(&key).unwrap_or(0.0);
            let per_conn_us = if rate > 0.0 { median(&cpu.proxy) / rate * 1e6 } else { f64::NAN };
            if proxied {
                line += &format!("; proxy CPU {per_conn_us:.0} µs per connection");
            }
            s.r.diag_json.insert(format!("{key}_proxy_cpu_us_per_conn"), per_conn_us.into());
            if failed > 0 {
                line += &format!("; {failed} failed attempts");
            }
            line += &format!("; {drops} listen-queue drops (TcpExt ListenDrops, all runs)");
            let (waited, tw) = settled.get(&key).copied().unwrap_or_default();
            line += &format!("; {tw} TIME_WAIT sockets at the start, after a wait of {:.0} s", waited.as_secs_f64());
            s.r.diag.push(line);
            s.r.diag_json.insert(
                key.clone(),
                serde_json::json!({"cores": cpu.json(), "failed": failed, "listen_drops": drops,
                    "time_wait_at_start": tw, "time_wait_wait_s": waited.as_secs_f64()}),
            );
        }
        if let Some(p) = s.proxy.as_mut() {
            p.stop();
        }
        s.proxy = None;
    }
    systems.into_iter().map(|s| s.r).collect()
}

/// Waits until the TIME_WAIT sockets of earlier runs have expired (fewer than
/// 1,000 left; at most 65 s, Linux keeps them 60 s), so that every
/// connection-rate level starts from the same empty table instead of
/// inheriting the previous level's (as many as its rate times a minute): a
/// connect's port search, and Dante's `bind` to port 0, cost more the fuller
/// the table is. Within a level every system meets the same table (the runs
/// rotate). Returns the time waited and the count left. Smoke runs do not wait.
fn drain_time_wait(cfg: &Cfg) -> (Duration, u64) {
    let start = Instant::now();
    let limit = Duration::from_secs(if cfg.smoke { 0 } else { 65 });
    let mut tw = load::sockstat_tcp("tw");
    if tw >= 1_000 && !limit.is_zero() {
        eprintln!("bench: waiting for {tw} TIME_WAIT sockets to expire (at most {} s) ...", limit.as_secs());
    }
    while tw >= 1_000 && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(500));
        tw = load::sockstat_tcp("tw");
    }
    (start.elapsed(), tw)
}

/// One bulk run of one system: throughput, CPU per GiB, and (first repeat)
/// the proxy's socket buffers mid-run. A `*_threaded_*` key sends to the
/// thread-per-connection sink, whose machine CPU per GiB is a figure of its own.
fn bulk_once(s: &mut Sys, key: &str, flows: usize, rep: usize, ctx: &Ctx, cfg: &Cfg) {
    let Some(mut target) = s.target.clone() else { return };
    let threaded = key.contains("_threaded_");
    if threaded {
        target.dsts = vec![ctx.threaded_echo];
    }
    let pid = s.pid();
    let s0 = snap(ctx, pid);
    let mut sampled = Vec::new();
    let mut threads = (0, 0);
    let res = load::bulk(&target, flows, cfg.bulk, || {
        if let (0, Some(pid)) = (rep, pid) {
            sampled = procs::socket_info(&procs::tree_pids(pid));
            threads = procs::tree_threads(pid);
        }
    });
    let s1 = snap(ctx, pid);
    match res {
        Ok(b) => {
            s.cpu.entry(key.to_string()).or_default().add(&s0, &s1);
            s.r.push(key, b.gbps());
            let gib = b.bytes as f64 / (1u64 << 30) as f64;
            if threaded {
                s.r.push("cpu_machine_threaded_s_per_gib", (s1.busy - s0.busy) / gib);
            } else {
                if pid.is_some() {
                    s.r.push("cpu_proxy_s_per_gib", (s1.proxy - s0.proxy) / gib);
                }
                s.r.push("cpu_machine_s_per_gib", (s1.busy - s0.busy) / gib);
            }
            if b.mismatches > 0 {
                s.r.note(key, format!("{} flow(s): sink count differs from bytes sent", b.mismatches));
            }
        }
        Err(e) => s.r.note(key, format!("run {}: {e}", rep + 1)),
    }
    if rep == 0 {
        s.socks.insert(key.to_string(), sampled);
        s.threads.insert(key.to_string(), threads);
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// "client side: rcvbuf .. (queued ..), sndbuf ..; upstream: ..." (medians over the sockets).
fn sock_summary(socks: &[procs::Sock], port: u16) -> String {
    let kib = |v: f64| {
        if v >= 1024.0 * 1024.0 {
            format!("{:.1} MiB", v / 1048576.0)
        } else {
            format!("{:.0} KiB", v / 1024.0)
        }
    };
    let mut out = String::new();
    for (label, client) in [("client-side", true), ("upstream", false)] {
        let v: Vec<&procs::Sock> = socks.iter().filter(|s| s.local.ends_with(&format!(":{port}")) == client).collect();
        if v.is_empty() {
            continue;
        }
        let m = |f: fn(&procs::Sock) -> u64| median(&v.iter().map(|s| f(s) as f64).collect::<Vec<_>>());
        out += &format!(
            "; {label} sockets ({}): rcvbuf {} with {} queued, sndbuf {} with {} queued",
            v.len(),
            kib(m(|s| s.rb)),
            kib(m(|s| s.r)),
            kib(m(|s| s.tb)),
            kib(m(|s| s.t))
        );
    }
    if !out.is_empty() {
        out = format!(" — mid-run medians{out}");
    }
    out
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn scale(r: &mut SysResult, mut proxy: Option<Proxy>, ctx: &Ctx, cfg: &Cfg) {
    let target = target(proxy.as_ref(), ctx);
    let pid = proxy.as_ref().map(|p| p.pid);
    std::thread::sleep(Duration::from_millis(300));
    let mut steps = Vec::new();
    if let Some(pid) = pid {
        let (rss, pss, fds, procs) = procs::tree_mem(pid);
        steps.push(serde_json::json!({"tunnels": 0, "rss_kib": rss, "pss_kib": pss, "fds": fds, "processes": procs}));
        r.diag_json.insert("rss_idle_kib".into(), rss.into());
    }
    let deadline = Instant::now() + cfg.scale_limit;
    let mut streams = Vec::new();
    let mut err = None;
    let mut first: Option<(usize, u64, u64)> = None;
    let mut last: Option<(usize, u64, u64)> = None;
    let mut dline = String::from("scale:");
    for (i, &n) in cfg.tunnels.iter().enumerate() {
        let t = Instant::now();
        let (v, e) = load::open_tunnels(&target, streams.len(), n.saturating_sub(streams.len()), 8, deadline);
        streams.extend(v);
        let open_s = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(if cfg.smoke { 100 } else { 700 }));
        let held = streams.len();
        let key = format!("rss_{}", i + 1);
        if let Some(pid) = pid {
            let (rss, pss, fds, procs) = procs::tree_mem(pid);
            if held == n {
                r.push(&key, rss as f64 / 1024.0);
                first.get_or_insert((n, rss, pss));
                last = Some((n, rss, pss));
            }
            steps.push(serde_json::json!({"tunnels": held, "rss_kib": rss, "pss_kib": pss, "fds": fds, "processes": procs, "open_secs": open_s}));
            dline += &format!(" {held} tunnels: RSS {:.1} MiB (PSS {:.1} MiB, {procs} processes, {fds} fds), opened in {open_s:.1} s;", rss as f64 / 1024.0, pss as f64 / 1024.0);
        } else {
            dline += &format!(" {held} tunnels opened in {open_s:.1} s;");
        }
        if let Some(e) = e {
            r.note(&key, format!("held {held} of {n}: {e}"));
            err = Some(format!("held {held} of {n}: {e}"));
            break;
        }
    }
    if let Some(pid) = pid {
        let kinds = procs::fd_kinds(pid);
        dline += &format!(
            " proxy fds at {} tunnels: {};",
            streams.len(),
            kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
        );
        r.diag_json.insert(
            "fd_kinds_at_max".into(),
            kinds.iter().map(|(k, n)| serde_json::json!({"kind": k, "count": n})).collect::<Vec<_>>().into(),
        );
    }
    let t = Instant::now();
    let ok = load::verify_tunnels(&mut streams);
    let max = *cfg.tunnels.last().unwrap_or(&0);
    r.push("tunnels_ok", ok as f64);
    dline +=
        &format!(" {ok} of {} answered one byte each afterwards ({:.2} s)", streams.len(), t.elapsed().as_secs_f64());
    let failed = err.is_some();
    if let Some(e) = err {
        r.note("tunnels_ok", e);
    } else if ok < max {
        r.note("tunnels_ok", format!("{ok} of {max} answered"));
    }
    if let (Some((n0, m0, p0)), Some((n1, m1, p1))) = (first, last) {
        if n1 > n0 {
            r.push("rss_slope_kib", (m1 as f64 - m0 as f64) / (n1 - n0) as f64);
            let pss_slope = (p1 as f64 - p0 as f64) / (n1 - n0) as f64;
            dline += &format!(
                "; slope {n0}->{n1}: VmRSS {:.2} KiB, PSS {pss_slope:.2} KiB per tunnel",
                (m1 as f64 - m0 as f64) / (n1 - n0) as f64
            );
            r.diag_json.insert("pss_slope_kib".into(), pss_slope.into());
        }
    }
    // `proxyd upgrade` with every tunnel open: how long the hand-over takes,
    // and whether every tunnel still answers afterwards.
    if let Some(p) = proxy.as_mut().filter(|p| p.control.is_some() && !failed) {
        match p.upgrade() {
            Ok(took) => {
                std::thread::sleep(Duration::from_millis(200));
                let ok = load::verify_tunnels(&mut streams);
                r.push("upgrade_secs", took.as_secs_f64());
                r.push("upgrade_ok", ok as f64);
                dline += &format!(
                    "; `proxyd upgrade` with {} tunnels took {:.2} s, {ok} answered after it",
                    streams.len(),
                    took.as_secs_f64()
                );
            }
            Err(e) => r.note("upgrade_secs", format!("{e:#}")),
        }
    }
    r.diag.push(dline);
    r.diag_json.insert("scale".into(), steps.into());
    drop(streams);
    if let Some(p) = proxy.as_mut() {
        p.stop();
    }
}
