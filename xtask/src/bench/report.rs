//! target/bench/results.md, results.json and results.svg.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::Result;
use serde_json::{json, Value};

use super::{Cfg, Iperf, Metric, SysResult, PINGPONG_TUNNELS};

pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub mem_gib: f64,
    pub date: String,
    pub load1: f64,
    pub load_end: f64,
    pub git: String,
    pub proxyd: String,
    pub fd_limit: String,
    /// Where the run's sockets live (see `netns`).
    pub network: String,
}

impl Machine {
    pub fn summary(&self) -> String {
        format!(
            "{} cores ({}), Linux {}, {:.0} GiB RAM, open files {}, load {:.2}, {}, git {}",
            self.cores, self.cpu, self.kernel, self.mem_gib, self.fd_limit, self.load1, self.date, self.git
        )
    }
}

fn cmd_out(c: &mut Command) -> String {
    c.output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn machine_info(root: &Path, bin: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let fd_limit = read("/proc/self/limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("?")
        .to_string();
    let mut git = cmd_out(Command::new("git").arg("-C").arg(root).args(["rev-parse", "--short", "HEAD"]));
    if !cmd_out(Command::new("git").arg("-C").arg(root).args(["status", "--porcelain", "--untracked-files=no"]))
        .is_empty()
    {
        git += " (with uncommitted changes)";
    }
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        mem_gib: mem_kib / 1024.0 / 1024.0,
        date: cmd_out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        load_end: 0.0,
        load1: read("/proc/loadavg").split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0),
        git,
        proxyd: cmd_out(Command::new(bin).arg("--version")),
        fd_limit,
        network: String::new(),
    }
}

/// (key, column label, unit, higher is better).
fn metric_defs(cfg: &Cfg) -> Vec<(String, String, &'static str, bool)> {
    let mut v: Vec<(String, String, &'static str, bool)> = vec![
        ("bulk1_gbps".into(), "bulk 1 flow".into(), "Gbit/s", true),
        ("bulk8_gbps".into(), "bulk 8 flows".into(), "Gbit/s", true),
        ("bulk8_threaded_gbps".into(), "bulk 8 flows, thread-per-connection server".into(), "Gbit/s", true),
        ("lat_mean_us".into(), "latency mean".into(), "µs", false),
        ("lat_p50_us".into(), "latency p50".into(), "µs", false),
        ("lat_p99_us".into(), "latency p99".into(), "µs", false),
        ("lat_threaded_mean_us".into(), "latency mean, thread-per-connection server".into(), "µs", false),
        ("pp8_msgs".into(), format!("ping-pong on {PINGPONG_TUNNELS} tunnels"), "msg/s", true),
        ("pp8_cpu_us".into(), "machine CPU per message".into(), "µs", false),
    ];
    for c in &cfg.concs {
        v.push((format!("conn_c{c}"), format!("connections c={c}"), "/s", true));
    }
    v.push(("conn_c1_threaded".into(), "connections c=1, thread-per-connection server".into(), "/s", true));
    for (i, n) in cfg.tunnels.iter().enumerate() {
        v.push((format!("rss_{}", i + 1), format!("RSS @{n} tunnels"), "MiB", false));
    }
    v.push(("rss_slope_kib".into(), "memory per tunnel".into(), "KiB", false));
    v.push(("tunnels_ok".into(), format!("of {} tunnels answering", cfg.tunnels.last().unwrap_or(&0)), "", true));
    v.push((
        "upgrade_secs".into(),
        format!("`proxyd upgrade` with {} tunnels", cfg.tunnels.last().unwrap_or(&0)),
        "s",
        false,
    ));
    v.push(("upgrade_ok".into(), "of them answering after it".into(), "", true));
    v.push(("slow_client_mib".into(), "client stops reading: TCP mem per tunnel".into(), "MiB", false));
    v.push(("slow_client_growth_mib".into(), "its growth".into(), "MiB", false));
    v.push(("slow_dest_mib".into(), "destination stops reading: TCP mem per tunnel".into(), "MiB", false));
    v.push(("slow_dest_growth_mib".into(), "its growth".into(), "MiB", false));
    v.push(("mixed_p99_us".into(), "short requests beside 8 bulk flows: p99".into(), "µs", false));
    v.push(("mixed_bulk_gbps".into(), "the 8 flows meanwhile".into(), "Gbit/s", true));
    v.push(("cpu_proxy_s_per_gib".into(), "proxy CPU per GiB".into(), "s", false));
    v.push(("cpu_machine_s_per_gib".into(), "machine CPU per GiB".into(), "s", false));
    v.push((
        "cpu_machine_threaded_s_per_gib".into(),
        "machine CPU per GiB, 8 flows to the thread-per-connection server".into(),
        "s",
        false,
    ));
    v
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn find<'a>(results: &'a [SysResult], name: &str) -> Option<&'a SysResult> {
    results.iter().find(|r| r.name == name && r.available)
}

pub fn write(
    out: &Path,
    m: &Machine,
    cfg: &Cfg,
    iperf: Option<&Iperf>,
    results: &[SysResult],
    elapsed: f64,
) -> Result<String> {
    let defs = metric_defs(cfg);
    let direct = find(results, "direct");
    let dante = find(results, "dante");
    let mut md = String::new();
    let cmdline = if cfg.smoke { "cargo xtask bench --smoke".to_string() } else { "cargo xtask bench".to_string() };
    writeln!(
        md,
        "## Benchmark results{}\n",
        if cfg.smoke { " (smoke run: tiny sizes, not figures to quote)" } else { "" }
    )?;
    writeln!(
        md,
        "Machine: {} cores ({}), Linux {}, {:.0} GiB RAM, open files per process {}; {}; git {}; {}. Load average (1 min) at start {:.2}, at end {:.2} (the bench itself adds about 2 on this machine; more means other work shared the cores).\n",
        m.cores, m.cpu, m.kernel, m.mem_gib, m.fd_limit, m.date, m.git, m.proxyd, m.load1, m.load_end
    )?;
    writeln!(
        md,
        "Made by `{cmdline}` in {elapsed:.0} s: medians of {} repeat(s) of {:.1} s for bulk, of {} of {:.2} s for latency and connection rates; idle tunnels {:?}. \
         Everything on loopback, in {}; one Rust load generator; the far end is the bench's own echo/sink server.\n",
        cfg.repeats,
        cfg.bulk.as_secs_f64(),
        cfg.short_repeats,
        cfg.lat.as_secs_f64(),
        cfg.tunnels,
        m.network
    )?;

    // Values.
    let header = |md: &mut String| -> std::fmt::Result {
        write!(md, "| system |")?;
        for (_, label, unit, _) in &defs {
            if unit.is_empty() {
                write!(md, " {label} |")?;
            } else {
                write!(md, " {label} ({unit}) |")?;
            }
        }
        writeln!(md)?;
        write!(md, "|---|")?;
        for _ in &defs {
            write!(md, "---:|")?;
        }
        writeln!(md)
    };
    header(&mut md)?;
    for r in results {
        write!(md, "| {} |", r.name)?;
        for (key, _, _, _) in &defs {
            let cell =
                if !r.available { "n/a".to_string() } else { r.get(key).map(num).unwrap_or_else(|| "—".into()) };
            write!(md, " {cell} |")?;
        }
        writeln!(md)?;
    }
    for (title, reference) in [("Ratio to the direct path", direct), ("Ratio to Dante", dante)] {
        writeln!(md, "\n{title} (system ÷ reference; above 1 is better for throughput and connections, below 1 for latency, memory and CPU):\n")?;
        header(&mut md)?;
        for r in results {
            write!(md, "| {} |", r.name)?;
            for (key, _, _, _) in &defs {
                let cell = if !r.available {
                    "n/a".into()
                } else {
                    ratio(r.get(key), reference.and_then(|x| x.get(key)))
                        .map(|x| format!("{}×", num(x)))
                        .unwrap_or_else(|| "—".into())
                };
                write!(md, " {cell} |")?;
            }
            writeln!(md)?;
        }
    }

    // What each row is.
    writeln!(md, "\nSystems:\n")?;
    for r in results {
        if r.available {
            writeln!(md, "- **{}**: {}", r.name, r.check)?;
        } else {
            writeln!(md, "- **{}**: unavailable: {}", r.name, r.reason.as_deref().unwrap_or("?"))?;
        }
    }
    let notes: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.metrics.iter().filter_map(move |(k, v)| v.note.as_ref().map(|n| format!("- {} {k}: {n}", r.name)))
        })
        .collect();
    if !notes.is_empty() {
        writeln!(md, "\nNotes and errors:\n\n{}", notes.join("\n"))?;
    }

    // Load generator against iperf3.
    if let Some(ip) = iperf {
        let f = |x: &Result<f64, String>| {
            x.as_ref().map(|v| format!("{} Gbit/s", num(*v))).unwrap_or_else(|e| format!("failed: {e}"))
        };
        let d1 = direct.and_then(|d| d.get("bulk1_gbps"));
        let d8 = direct.and_then(|d| d.get("bulk8_gbps"));
        writeln!(
            md,
            "\nLoad generator check (direct path against `iperf3 -c 127.0.0.1`): 1 flow {} vs iperf3 {}{}; 8 flows {} vs iperf3 `-P 8` {}{}.",
            d1.map(|v| format!("{} Gbit/s", num(v))).unwrap_or("—".into()),
            f(&ip.one),
            ratio(d1, ip.one.as_ref().ok().copied()).map(|x| format!(" ({}×)", num(x))).unwrap_or_default(),
            d8.map(|v| format!("{} Gbit/s", num(v))).unwrap_or("—".into()),
            f(&ip.eight),
            ratio(d8, ip.eight.as_ref().ok().copied()).map(|x| format!(" ({}×)", num(x))).unwrap_or_default(),
        )?;
    }

    // Goals of the kernel path.
    let goals = goals(results, cfg);
    if !goals.is_empty() {
        writeln!(
            md,
            "\nGoals (proxyd-auto, the default, medians of this run; a ratio is judged on the median of the ratios of the samples from the same round of the rotation, given first, then the ratio of the two medians and the range over the rounds):\n\n| goal | measured | met |\n|---|---|---|"
        )?;
        for (goal, measured, met) in &goals {
            writeln!(
                md,
                "| {goal} | {measured} | {} |",
                match met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "n/a",
                }
            )?;
        }
    }

    // Diagnostics.
    writeln!(md, "\nWhat limits the figures (measured during the runs above):\n")?;
    for r in results.iter().filter(|r| r.available) {
        writeln!(md, "- **{}**", r.name)?;
        for d in &r.diag {
            writeln!(md, "  - {d}")?;
        }
    }
    writeln!(
        md,
        "\nHow to read: bulk is an upload into a sink that reports its byte count at end of stream (the clock stops when it arrives), in Gbit/s. \
         Latency is a 64-byte ping-pong over one established tunnel (the far end: the epoll echo server, and in its own column an echo server \
         with a thread per connection and blocking sockets); ping-pong on 8 tunnels is the same on 8 tunnels at once (one client thread each), \
         in messages answered per second, with the whole machine's CPU per message. Connections per second: SOCKS4 CONNECT + one echoed byte + close, \
         by 1, 16 or 64 client threads (and by 1 against the thread-per-connection server). Memory: VmRSS of the proxy's process tree (Dante forks: the sum over its processes counts shared pages \
         once per process; the PSS in the diagnostics does not), with that many idle tunnels open; per tunnel is the slope between the \
         first and the last step. CPU per GiB: user+system seconds of the proxy's process tree (proxy) or of the whole machine (machine), \
         over the bulk runs, per GiB relayed. This kernel has no IRQ time accounting: softirq work (where the kernel data path's \
         sk_skb verdict and redirect run) is charged to whatever task the CPU was running, mostly the load generator and the echo server, \
         so the proxy figure of the kernel path leaves its relay work out; the machine figure includes it (and any other work on the machine: \
         the diagnostics split it by process)."
    )?;

    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&to_json(m, cfg, iperf, results, &defs, &goals, elapsed))?,
    )?;
    std::fs::write(out.join("results.svg"), svg(results, &defs, m))?;
    Ok(md)
}

type Goal = (String, String, Option<bool>);

/// `a`'s sample over `b`'s from each round of the rotation (the systems take
/// turns within a round, so a round's load falls on both alike): their
/// median, lowest and highest. `None` unless both have one sample per round.
fn round_ratios(key: &str, a: Option<&SysResult>, b: Option<&SysResult>) -> Option<(f64, f64, f64)> {
    fn samples<'a>(r: Option<&'a SysResult>, key: &str) -> &'a [f64] {
        r.and_then(|r| r.metrics.get(key)).map_or(&[], |m| &m.samples[..])
    }
    let (a, b) = (samples(a, key), samples(b, key));
    if a.len() < 2 || a.len() != b.len() {
        return None;
    }
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    let (lo, hi) = r.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let median = Metric { samples: r, note: None }.median()?;
    Some((median, lo, hi))
}

/// One system's figure over another's in a run, as a goal judges it.
struct Versus {
    /// The ratio of the two medians.
    of_medians: Option<f64>,
    /// The rounds' ratios (see [`round_ratios`]): median, lowest, highest.
    rounds: Option<(f64, f64, f64)>,
}

impl Versus {
    fn new(key: &str, a: Option<&SysResult>, b: Option<&SysResult>) -> Versus {
        let g = |r: Option<&SysResult>| r.and_then(|r| r.get(key));
        Versus { of_medians: ratio(g(a), g(b)), rounds: round_ratios(key, a, b) }
    }

    /// The ratio a goal is judged on: the median of the rounds' ratios where
    /// the rounds pair. It cancels what a round's load does to both systems;
    /// over resampled rounds of the README's run it spread about half as far
    /// as the ratio of the medians in most columns (docs/decisions.md,
    /// "Benchmark").
    fn judged(&self) -> Option<f64> {
        self.rounds.map(|r| r.0).or(self.of_medians)
    }

    /// "2.07× (medians 2.05×, rounds 1.78-2.43)".
    fn text(&self) -> String {
        match (self.rounds, self.of_medians) {
            (Some((m, lo, hi)), Some(r)) => format!("{m:.3}× (medians {r:.3}×, rounds {lo:.2}-{hi:.2})"),
            (_, Some(r)) => format!("{r:.3}×"),
            _ => "—".into(),
        }
    }
}

fn goals(results: &[SysResult], cfg: &Cfg) -> Vec<Goal> {
    let Some(a) = results.iter().find(|r| r.name == "proxyd-auto") else { return vec![] };
    let auto = a.available.then_some(a);
    let direct = find(results, "direct");
    let dante = find(results, "dante");
    let (user, kernel) = (find(results, "proxyd-userspace"), find(results, "proxyd-kernel"));
    let g = |key: &str, r: Option<&SysResult>| r.and_then(|r| r.get(key));
    let mut v = Vec::new();
    // `auto` within 5% of the better forced path on every speed column.
    let mut columns = vec![
        ("bulk1_gbps", true),
        ("bulk8_gbps", true),
        ("bulk8_threaded_gbps", true),
        ("lat_mean_us", false),
        ("lat_threaded_mean_us", false),
        ("pp8_msgs", true),
    ];
    let conn_keys: Vec<String> = cfg.concs.iter().map(|c| format!("conn_c{c}")).collect();
    columns.extend(conn_keys.iter().map(|k| (k.as_str(), true)));
    columns.push(("conn_c1_threaded", true));
    for (key, higher) in columns {
        let (u, k) = (g(key, user), g(key, kernel));
        let better_is_user = match (u, k) {
            (Some(u), Some(k)) => (u >= k) == higher,
            (u, _) => u.is_some(),
        };
        let (best_name, best_sys) = if better_is_user { ("userspace", user) } else { ("kernel", kernel) };
        let vs = Versus::new(key, auto, best_sys);
        v.push((
            format!("{key}: auto within 5% of the better of userspace and kernel"),
            format!(
                "{} vs {} for {best_name}: {}",
                g(key, auto).map(num).unwrap_or("—".into()),
                g(key, best_sys).map(num).unwrap_or("—".into()),
                vs.text()
            ),
            vs.judged().map(|r| if higher { r >= 0.95 } else { r <= 1.05 }),
        ));
    }
    let cpu_per_conn = |r: Option<&SysResult>, key: &str| {
        r.and_then(|r| r.diag_json.get(&format!("{key}_proxy_cpu_us_per_conn"))?.as_f64()).filter(|x| x.is_finite())
    };
    let (auto5, microsocks) = (find(results, "proxyd-auto-socks5"), find(results, "microsocks"));
    for c in &cfg.concs {
        let key = format!("conn_c{c}");
        let vs = Versus::new(&key, auto, dante);
        v.push((
            format!("connections c={c} ≥ 2× Dante"),
            format!("{} Dante", vs.text()),
            vs.judged().map(|r| r >= 2.0),
        ));
        let (x, n) = (cpu_per_conn(auto, &key), cpu_per_conn(dante, &key));
        v.push((
            format!("proxy CPU per connection at c={c} ≤ 0.4× Dante's"),
            format!(
                "{} against {} µs: {}",
                x.map(num).unwrap_or("—".into()),
                n.map(num).unwrap_or("—".into()),
                ratio(x, n).map_or("—".into(), |r| format!("{r:.2}×"))
            ),
            ratio(x, n).map(|r| r <= 0.4),
        ));
        let vs = Versus::new(&key, auto5, microsocks);
        v.push((
            format!("SOCKS5 connections c={c} ≥ microsocks"),
            format!("{} microsocks", vs.text()),
            vs.judged().map(|r| r >= 1.0),
        ));
    }
    let (d1, n1) = (Versus::new("bulk1_gbps", auto, direct), Versus::new("bulk1_gbps", auto, dante));
    v.push((
        "bulk 1 flow ≥ 0.55× direct and ≥ 1.5× Dante".to_string(),
        format!("{} direct, {} Dante", d1.text(), n1.text()),
        d1.judged().zip(n1.judged()).map(|(d, n)| d >= 0.55 && n >= 1.5),
    ));
    let n8 = Versus::new("bulk8_gbps", auto, dante);
    v.push(("bulk 8 flows ≥ 1.6× Dante".into(), format!("{} Dante", n8.text()), n8.judged().map(|n| n >= 1.6)));
    let (km, um) = (g("cpu_machine_s_per_gib", kernel), g("cpu_machine_s_per_gib", user));
    v.push((
        "forced kernel path: machine CPU per GiB ≤ the relay's".into(),
        format!("{} vs {} s/GiB", km.map(num).unwrap_or("—".into()), um.map(num).unwrap_or("—".into())),
        km.zip(um).map(|(k, u)| k <= u),
    ));
    let (k8, u8) = (g("bulk8_gbps", kernel), g("bulk8_gbps", user));
    v.push((
        "forced kernel path: bulk 8 flows ≥ the relay's".into(),
        format!("{} vs {} Gbit/s", k8.map(num).unwrap_or("—".into()), u8.map(num).unwrap_or("—".into())),
        k8.zip(u8).map(|(k, u)| k >= u),
    ));
    let max = *cfg.tunnels.last().unwrap_or(&0) as f64;
    let (ok, slope) = (g("tunnels_ok", auto), g("rss_slope_kib", auto));
    v.push((
        format!("{max} idle tunnels held, ≤ 4 KiB per tunnel"),
        format!(
            "{} answering, {} KiB per tunnel",
            ok.map(num).unwrap_or("—".into()),
            slope.map(num).unwrap_or("—".into())
        ),
        ok.zip(slope).map(|(o, s)| o >= max && s <= 4.0),
    ));
    if auto.is_none() {
        for g in &mut v {
            g.1 = "proxyd-auto unavailable (see Systems)".into();
        }
    }
    v
}

fn to_json(
    m: &Machine,
    cfg: &Cfg,
    iperf: Option<&Iperf>,
    results: &[SysResult],
    defs: &[(String, String, &'static str, bool)],
    goals: &[Goal],
    elapsed: f64,
) -> Value {
    let direct = find(results, "direct");
    let dante = find(results, "dante");
    let systems: Vec<Value> = results
        .iter()
        .map(|r| {
            let mut metrics = serde_json::Map::new();
            for (key, label, unit, higher) in defs {
                let mm = r.metrics.get(key);
                metrics.insert(
                    key.clone(),
                    json!({
                        "label": label, "unit": unit, "higher_is_better": higher,
                        "median": r.get(key), "samples": mm.map(|x| x.samples.clone()).unwrap_or_default(),
                        "ratio_to_direct": ratio(r.get(key), direct.and_then(|d| d.get(key))),
                        "ratio_to_dante": ratio(r.get(key), dante.and_then(|d| d.get(key))),
                        "note": mm.and_then(|x| x.note.clone()),
                    }),
                );
            }
            json!({
                "name": r.name, "available": r.available, "reason": r.reason, "check": r.check,
                "metrics": metrics, "diagnostics": r.diag, "details": r.diag_json,
            })
        })
        .collect();
    json!({
        "machine": {"cores": m.cores, "cpu": m.cpu, "kernel": m.kernel, "mem_gib": m.mem_gib, "date": m.date,
                    "load_average_at_start": m.load1, "load_average_at_end": m.load_end, "git": m.git, "proxyd": m.proxyd, "open_files_limit": m.fd_limit, "network": m.network},
        "config": {"smoke": cfg.smoke, "repeats": cfg.repeats, "short_repeats": cfg.short_repeats, "bulk_secs": cfg.bulk.as_secs_f64(), "latency_secs": cfg.lat.as_secs_f64(),
                   "connrate_secs": cfg.conn.as_secs_f64(), "concurrency": cfg.concs, "tunnels": cfg.tunnels, "elapsed_secs": elapsed},
        "iperf3": iperf.map(|i| json!({"one_flow_gbps": i.one.as_ref().ok(), "eight_flows_gbps": i.eight.as_ref().ok(),
                                       "error": i.one.as_ref().err().or(i.eight.as_ref().err())})),
        "systems": systems,
        "goals": goals.iter().map(|(g, m, ok)| json!({"goal": g, "measured": m, "met": ok})).collect::<Vec<_>>(),
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A grid of small bar charts, one per figure, one bar per system.
fn svg(results: &[SysResult], defs: &[(String, String, &'static str, bool)], m: &Machine) -> String {
    let colors = |name: &str| match name {
        "direct" => "#7f7f7f",
        "dante" => "#d62728",
        "proxyd-userspace" => "#1f77b4",
        "proxyd-kernel" => "#2ca02c",
        "proxyd-auto" => "#9467bd",
        _ => "#9467bd",
    };
    let panels: Vec<&(String, String, &'static str, bool)> = defs
        .iter()
        .filter(|d| {
            d.0.starts_with("bulk")
                || d.0 == "lat_mean_us"
                || d.0 == "lat_p99_us"
                || d.0.starts_with("conn_")
                || d.0 == "rss_slope_kib"
                || d.0.starts_with("cpu_")
        })
        .collect();
    let (pw, ph, cols) = (300.0, 210.0, 3usize);
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (pw * cols as f64 + 20.0, ph * rows as f64 + 90.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\n");
    s += &format!("<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n");
    s += &format!("<text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">proxyd benchmark — {} cores, Linux {}, {}</text>\n", m.cores, esc(&m.kernel), esc(&m.date));
    // Legend.
    let mut lx = 10.0;
    for r in results {
        s += &format!(
            "<rect x=\"{lx}\" y=\"32\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"42\">{}{}</text>\n",
            colors(&r.name),
            lx + 16.0,
            esc(&r.name),
            if r.available { "" } else { " (n/a)" }
        );
        lx += 150.0;
    }
    for (i, (key, label, unit, higher)) in panels.iter().enumerate() {
        let (x0, y0) = (10.0 + pw * (i % cols) as f64, 60.0 + ph * (i / cols) as f64);
        let title = format!(
            "{label}{} — {} is better",
            if unit.is_empty() { String::new() } else { format!(" ({unit})") },
            if *higher { "higher" } else { "lower" }
        );
        s += &format!("<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text>\n", x0 + 5.0, y0 + 14.0, esc(&title));
        let vals: Vec<Option<f64>> = results.iter().map(|r| if r.available { r.get(key) } else { None }).collect();
        let max = vals.iter().flatten().cloned().fold(0.0f64, f64::max);
        let (bx, by, bw, bh) = (x0 + 10.0, y0 + 35.0, pw - 30.0, ph - 75.0);
        s += &format!("<line x1=\"{bx}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>\n", by + bh, bx + bw, by + bh);
        let slot = bw / results.len().max(1) as f64;
        for (j, (r, v)) in results.iter().zip(&vals).enumerate() {
            let x = bx + slot * j as f64 + slot * 0.15;
            let bwid = slot * 0.7;
            match v {
                Some(v) if max > 0.0 => {
                    let hh = (v / max * bh).max(1.0);
                    s += &format!(
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bwid:.1}\" height=\"{hh:.1}\" fill=\"{}\"/>\n",
                        by + bh - hh,
                        colors(&r.name)
                    );
                    s += &format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                        x + bwid / 2.0,
                        by + bh - hh - 3.0,
                        num(*v)
                    );
                }
                _ => {
                    s += &format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#999\">n/a</text>\n",
                        x + bwid / 2.0,
                        by + bh - 3.0
                    )
                }
            }
            let short = r.name.trim_start_matches("proxyd-");
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333\">{}</text>\n",
                x + bwid / 2.0,
                by + bh + 13.0,
                esc(short)
            );
        }
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sys(samples: &[f64]) -> SysResult {
        let mut r = SysResult { name: "s".into(), available: true, ..Default::default() };
        r.metrics.insert("k".into(), Metric { samples: samples.to_vec(), note: None });
        r
    }

    #[test]
    fn round_ratios_pair_the_samples_of_each_round() {
        let (a, b) = (sys(&[90.0, 110.0, 100.0]), sys(&[100.0, 100.0, 80.0]));
        assert_eq!(round_ratios("k", Some(&a), Some(&b)), Some((1.1, 0.9, 1.25)));
    }

    #[test]
    fn a_goal_is_judged_on_the_rounds_where_they_pair() {
        // Medians 100 and 100, but the rounds 0.9, 1.1 and 1.25.
        let (a, b) = (sys(&[90.0, 110.0, 100.0]), sys(&[100.0, 100.0, 80.0]));
        let vs = Versus::new("k", Some(&a), Some(&b));
        assert_eq!(vs.judged(), Some(1.1));
        assert_eq!(vs.text(), "1.100× (medians 1.000×, rounds 0.90-1.25)");
        let unpaired = Versus::new("k", Some(&a), Some(&sys(&[100.0])));
        assert_eq!(unpaired.judged(), Some(1.0));
        assert_eq!(unpaired.text(), "1.000×");
    }

    #[test]
    fn connection_goals_judge_cpu_against_dante_and_socks5_against_microsocks() {
        let named = |name: &str, conn: &[f64], cpu_us: f64| {
            let mut r = SysResult { name: name.into(), available: true, ..Default::default() };
            r.metrics.insert("conn_c1".into(), Metric { samples: conn.to_vec(), note: None });
            r.diag_json.insert("conn_c1_proxy_cpu_us_per_conn".into(), cpu_us.into());
            r
        };
        let results = [
            named("proxyd-auto", &[4000.0, 4200.0], 150.0),
            named("dante", &[2000.0, 2000.0], 400.0),
            named("proxyd-auto-socks5", &[3000.0, 3300.0], 160.0),
            named("microsocks", &[3100.0, 3100.0], 0.0),
        ];
        let cfg = Cfg {
            smoke: true,
            repeats: 2,
            short_repeats: 2,
            bulk: Duration::ZERO,
            lat: Duration::ZERO,
            conn: Duration::ZERO,
            concs: vec![1],
            tunnels: vec![],
            scale_limit: Duration::ZERO,
            slow: Duration::ZERO,
            slow_tunnels: 0,
            tests: vec![],
        };
        let goals = goals(&results, &cfg);
        let find = |g: &str| goals.iter().find(|(goal, ..)| goal == g).unwrap();
        let cpu = find("proxy CPU per connection at c=1 ≤ 0.4× Dante's");
        assert_eq!((cpu.1.as_str(), cpu.2), ("150 against 400 µs: 0.38×", Some(true)));
        // Rounds 3000/3100 and 3300/3100: median 1.016.
        let socks5 = find("SOCKS5 connections c=1 ≥ microsocks");
        assert_eq!(socks5.2, Some(true));
        assert!(socks5.1.starts_with("1.016× (medians 1.016×"), "{}", socks5.1);
        assert_eq!(find("connections c=1 ≥ 2× Dante").2, Some(true));
    }

    #[test]
    fn round_ratios_say_nothing_when_the_rounds_do_not_pair() {
        let (a, b, one) = (sys(&[1.0, 2.0, 3.0]), sys(&[1.0, 2.0]), sys(&[1.0]));
        assert_eq!(round_ratios("k", Some(&a), Some(&b)), None);
        assert_eq!(round_ratios("k", Some(&one), Some(&one)), None);
        assert_eq!(round_ratios("k", Some(&a), None), None);
        assert_eq!(round_ratios("other", Some(&a), Some(&a)), None);
    }
}
