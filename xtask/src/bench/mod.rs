//! `cargo xtask bench`: proxyd (kernel and userspace paths) against Dante and
//! the direct path, side by side in one run, with one load generator.
//!
//! - `echo`: the echo/sink server (forked worker processes, epoll).
//! - `load`: the load generator (threads, blocking sockets).
//! - `procs`: the proxies as child processes; /proc and `ss` readings.
//! - `report`: target/bench/results.{md,json,svg}.
//!
//! Every run is bounded in time; each figure is the median of the repeats.

mod echo;
mod load;
mod procs;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use load::{Target, Via};
use procs::Proxy;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A few seconds' run of every measurement, to check that the bench works.
    #[arg(long)]
    pub smoke: bool,
    /// Repeats of every measurement (the figure is their median). Default 3 (smoke: 1).
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Seconds per bulk run (latency and connection-rate runs take half). Default 2.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Systems to measure, comma-separated: direct,dante,userspace,kernel.
    #[arg(long, default_value = "direct,dante,userspace,kernel")]
    pub systems: String,
    /// Idle-tunnel counts for the scale test, comma-separated (at most 8000 here:
    /// 16,000 sockets in the proxy under a 20,000 open-files limit).
    #[arg(long)]
    pub tunnels: Option<String>,
    /// Skip the iperf3 reference runs.
    #[arg(long)]
    pub no_iperf: bool,
}

pub struct Cfg {
    pub smoke: bool,
    pub repeats: usize,
    pub bulk: Duration,
    pub lat: Duration,
    pub conn: Duration,
    pub concs: Vec<usize>,
    pub tunnels: Vec<usize>,
    pub scale_limit: Duration,
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
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Dante => "dante".into(),
            Kind::Proxyd(p) => format!("proxyd-{p}"),
        }
    }
}

struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    dsts: Vec<std::net::SocketAddrV4>,
}

fn median(v: &[f64]) -> f64 {
    Metric { samples: v.to_vec(), note: None }.median().unwrap_or(f64::NAN)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    // Fork the echo server first, while this process has no other thread.
    let mut echo = echo::EchoServer::spawn(2)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let out = root.join("target/bench");
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let work = PathBuf::from(format!("/tmp/proxyd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let secs = args.seconds.unwrap_or(if args.smoke { 0.3 } else { 2.0 });
    let cfg = Cfg {
        smoke: args.smoke,
        repeats: args.repeats.unwrap_or(if args.smoke { 1 } else { 3 }).max(1),
        bulk: Duration::from_secs_f64(secs),
        lat: Duration::from_secs_f64(secs / 2.0),
        conn: Duration::from_secs_f64(secs / 2.0),
        concs: vec![1, 16, 64],
        tunnels: match &args.tunnels {
            Some(s) => s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<Vec<_>, _>>().context("--tunnels: numbers, e.g. 1000,4000,8000")?,
            None if args.smoke => vec![50, 100, 200],
            None => vec![1000, 4000, 8000],
        },
        scale_limit: Duration::from_secs(if args.smoke { 15 } else { 90 }),
    };
    let ctx = Ctx { bin: root.join("target/release/proxyd"), work: work.clone(), logs, dsts: echo.addrs.clone() };
    let machine = report::machine_info(&root, &ctx.bin);
    eprintln!("bench: {}", machine.summary());
    if machine.load1 > 0.5 {
        eprintln!("bench: warning: load average {:.2} at start; other work on this 2-core machine skews the figures", machine.load1);
    }

    let iperf = if args.no_iperf || cfg.smoke { None } else { Some(iperf3(&cfg)) };

    let mut results = Vec::new();
    let wanted: Vec<&str> = args.systems.split(',').map(str::trim).collect();
    for kind in [Kind::Direct, Kind::Dante, Kind::Proxyd("userspace"), Kind::Proxyd("kernel")] {
        let short = match kind {
            Kind::Proxyd(p) => p.to_string(),
            k => k.name(),
        };
        if !wanted.iter().any(|w| *w == short || *w == kind.name()) {
            continue;
        }
        eprintln!("bench: {} ...", kind.name());
        let t = Instant::now();
        let r = run_system(kind, &ctx, &cfg);
        match &r.reason {
            Some(why) if !r.available => eprintln!("bench: {} unavailable: {why}", r.name),
            _ => eprintln!("bench: {} done in {:.0} s", r.name, t.elapsed().as_secs_f64()),
        }
        results.push(r);
    }
    echo.stop();
    let _ = std::fs::remove_dir_all(&work);

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
    let server = Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let Ok(mut server) = server else { return fail("iperf3 is not installed (`cargo xtask setup`)".into()) };
    std::thread::sleep(Duration::from_millis(300));
    let secs = cfg.bulk.as_secs_f64().ceil().max(1.0) as u64;
    let mut one_flow = |flows: usize| -> Result<f64, String> {
        let mut v = Vec::new();
        for _ in 0..cfg.repeats {
            let out = Command::new("iperf3")
                .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", &secs.to_string(), "-P", &flows.to_string(), "-J"])
                .output()
                .map_err(|e| e.to_string())?;
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let bps = j["end"]["sum_received"]["bits_per_second"].as_f64().ok_or_else(|| format!("iperf3: {}", j["error"]))?;
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
        Kind::Proxyd(p) => Some(Proxy::proxyd(&ctx.bin, &ctx.work, &ctx.logs, p)?),
    })
}

fn run_system(kind: Kind, ctx: &Ctx, cfg: &Cfg) -> SysResult {
    let mut r = SysResult { name: kind.name(), available: true, ..Default::default() };
    let mut proxy = match start(kind, ctx) {
        Ok(p) => p,
        Err(e) => {
            r.available = false;
            r.reason = Some(format!("{e:#}"));
            return r;
        }
    };
    r.check = match &proxy {
        Some(p) => p.path_check.clone(),
        None => "no proxy: the load generator connects to the echo/sink server".into(),
    };
    let target = Target { via: proxy.as_ref().map_or(Via::Direct, |p| Via::Socks4(p.addr)), dsts: ctx.dsts.clone() };
    let pid = proxy.as_ref().map(|p| p.pid);
    let proxy_cpu = || pid.map_or(0.0, procs::tree_cpu_secs);
    if let Some(pid) = pid {
        r.diag_json.insert("threads_at_start".into(), procs::threads(pid).into());
    }

    // Bulk throughput, and CPU per GiB from the same runs.
    for (key, flows) in [("bulk1_gbps", 1usize), ("bulk8_gbps", 8)] {
        let (mut pcores, mut mcores, mut socks, mut threads) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for rep in 0..cfg.repeats {
            let (c0, m0) = (proxy_cpu(), procs::machine_cpu());
            let mut sampled = Vec::new();
            let res = load::bulk(&target, flows, cfg.bulk, || {
                if let (0, Some(pid)) = (rep, pid) {
                    sampled = procs::socket_info(&procs::tree_pids(pid));
                    threads = procs::threads(pid);
                }
            });
            let (c1, m1) = (proxy_cpu(), procs::machine_cpu());
            match res {
                Ok(b) => {
                    r.push(key, b.gbps());
                    let gib = b.bytes as f64 / (1u64 << 30) as f64;
                    if pid.is_some() {
                        r.push("cpu_proxy_s_per_gib", (c1 - c0) / gib);
                    }
                    r.push("cpu_machine_s_per_gib", (m1.0 - m0.0) / gib);
                    pcores.push((c1 - c0) / b.secs);
                    mcores.push((m1.0 - m0.0) / (m1.1 - m0.1) * cores());
                    if b.mismatches > 0 {
                        r.note(key, format!("{} flow(s): sink count differs from bytes sent", b.mismatches));
                    }
                }
                Err(e) => r.note(key, format!("run {}: {e}", rep + 1)),
            }
            if rep == 0 {
                socks = sampled;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let label = if flows == 1 { "bulk 1 flow" } else { "bulk 8 flows" };
        let mut line = format!("{label}: machine busy {:.2} of {} cores", median(&mcores), cores());
        if pid.is_some() {
            line += &format!(", proxy {:.2} cores ({} threads)", median(&pcores), threads);
            if !socks.is_empty() {
                line += &format!("; proxy sockets mid-run: {}", socks.join("; "));
            }
        }
        r.diag.push(line);
        r.diag_json.insert(
            key.into(),
            serde_json::json!({"proxy_cores": median(&pcores), "machine_cores": median(&mcores), "proxy_threads": threads, "proxy_sockets": socks}),
        );
    }

    // Latency.
    for rep in 0..cfg.repeats {
        match load::latency(&target, cfg.lat) {
            Ok(l) => {
                r.push("lat_mean_us", l.mean);
                r.push("lat_p50_us", l.p50);
                r.push("lat_p99_us", l.p99);
                r.push("lat_samples", l.n as f64);
            }
            Err(e) => r.note("lat_mean_us", format!("run {}: {e}", rep + 1)),
        }
    }

    // Connection rate.
    for &c in &cfg.concs {
        let key = format!("conn_c{c}");
        let (mut pcores, mut mcores, mut errs) = (Vec::new(), Vec::new(), 0);
        for rep in 0..cfg.repeats {
            let (c0, m0) = (proxy_cpu(), procs::machine_cpu());
            let res = load::connrate(&target, c, cfg.conn);
            let (c1, m1) = (proxy_cpu(), procs::machine_cpu());
            r.push(&key, res.ok as f64 / res.secs);
            pcores.push((c1 - c0) / res.secs);
            mcores.push((m1.0 - m0.0) / (m1.1 - m0.1) * cores());
            errs += res.errors;
            if let Some(e) = res.first_error {
                r.note(&key, format!("run {}: {} failed ({e})", rep + 1, res.errors));
            }
            // Let the proxy reap the closed tunnels before the next run.
            std::thread::sleep(Duration::from_millis(if cfg.smoke { 100 } else { 500 }));
        }
        let mut line = format!("connections c={c}: machine busy {:.2} of {} cores", median(&mcores), cores());
        if pid.is_some() {
            line += &format!(", proxy {:.2} cores", median(&pcores));
        }
        if errs > 0 {
            line += &format!(", {errs} failed attempts");
        }
        r.diag.push(line);
        r.diag_json.insert(key.clone(), serde_json::json!({"proxy_cores": median(&pcores), "machine_cores": median(&mcores), "failed": errs}));
    }
    if let Some(p) = proxy.as_mut() {
        p.stop();
    }

    // Scale: a fresh proxy, so earlier runs' buffers do not blur its memory.
    std::thread::sleep(Duration::from_millis(500));
    let proxy = match start(kind, ctx) {
        Ok(p) => p,
        Err(e) => {
            r.note("tunnels_ok", format!("restart for the scale test failed: {e:#}"));
            return r;
        }
    };
    scale(&mut r, proxy, ctx, cfg);
    r
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn scale(r: &mut SysResult, mut proxy: Option<Proxy>, ctx: &Ctx, cfg: &Cfg) {
    let target = Target { via: proxy.as_ref().map_or(Via::Direct, |p| Via::Socks4(p.addr)), dsts: ctx.dsts.clone() };
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
    let mut first: Option<(usize, u64)> = None;
    let mut last: Option<(usize, u64)> = None;
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
                first.get_or_insert((n, rss));
                last = Some((n, rss));
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
    let t = Instant::now();
    let ok = load::verify_tunnels(&mut streams);
    let max = *cfg.tunnels.last().unwrap_or(&0);
    r.push("tunnels_ok", ok as f64);
    dline += &format!(" {ok} of {} answered one byte each afterwards ({:.2} s)", streams.len(), t.elapsed().as_secs_f64());
    if let Some(e) = err {
        r.note("tunnels_ok", e);
    } else if ok < max {
        r.note("tunnels_ok", format!("{ok} of {max} answered"));
    }
    if let (Some((n0, m0)), Some((n1, m1))) = (first, last) {
        if n1 > n0 {
            r.push("rss_slope_kib", (m1 as f64 - m0 as f64) / (n1 - n0) as f64);
        }
    }
    r.diag.push(dline);
    r.diag_json.insert("scale".into(), steps.into());
    drop(streams);
    if let Some(p) = proxy.as_mut() {
        p.stop();
    }
}
