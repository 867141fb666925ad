//! Operator experience: the console through a real terminal (tmux), metrics through a
//! real Prometheus parser, the systemd unit through `systemd-analyze verify`, readiness
//! through `$NOTIFY_SOCKET`, `connections print interval=`/`remove`, bash completion and
//! the man page.

use proxyd_tests::daemon::proxyd_bin;
use proxyd_tests::socks::{self, Answer, CONNECT, REJECTED};
use proxyd_tests::{
    data_paths, free_port, listen_local, require_program, require_python_module, run_with_timeout, scrape, tcp_connect,
    text, wait_until, Daemon,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tmux server of its own (`tmux -L NAME`) running one window; killed on drop.
struct Tmux {
    tmux: PathBuf,
    name: String,
}

impl Tmux {
    /// Starts `shell_command` in a detached 200x50 terminal.
    fn start(tmux: PathBuf, shell_command: &str) -> Tmux {
        let name = format!("proxyd-test-{}-{}", std::process::id(), free_port());
        let t = Tmux { tmux, name };
        let out = t.run(&["new-session", "-d", "-x", "200", "-y", "50", shell_command]);
        assert!(out.status.success(), "tmux new-session failed: {}", text(&out.stderr));
        t
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(&self.tmux);
        cmd.args(["-L", &self.name, "-f", "/dev/null"]).args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(10))
    }

    /// Types keys (tmux key names such as `Enter`, `Tab`, `Up`, `C-d`, or literal text).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend_from_slice(keys);
        let out = self.run(&args);
        assert!(out.status.success(), "tmux send-keys failed: {}", text(&out.stderr));
    }

    /// The visible screen.
    fn screen(&self) -> String {
        text(&self.run(&["capture-pane", "-p", "-t", "0"]).stdout)
    }

    /// Waits (5 s at most) until the screen satisfies `cond`; panics with the screen otherwise.
    fn wait_for(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("terminal never showed {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last non-empty line of a screen (where the prompt is), without trailing blanks.
fn last_line(screen: &str) -> &str {
    screen.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim_end()
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The console in a real terminal: menu navigation changes the prompt, `add` and `print`
/// reach the daemon, Tab completes menus, commands and properties, Up recalls history,
/// Ctrl-D leaves and the history file keeps the lines.
#[test]
fn console_in_a_terminal() {
    let Some(tmux) = require_program("console_in_a_terminal", "tmux") else {
        return;
    };
    let d = Daemon::start("userspace");
    let history = d.dir.join("history");
    let command = format!(
        "PROXYD_HISTORY={} {} --control {} console",
        history.display(),
        proxyd_bin().display(),
        d.cli.control.display()
    );
    let t = Tmux::start(tmux, &command);
    t.wait_for("the top prompt `] > `", |s| s.lines().any(|l| l.starts_with('[') && l.ends_with("] >")));

    // Tab completes a menu in a path; Enter on a bare path enters the menu.
    t.keys(&["/ip socks acc", "Tab"]);
    t.wait_for("`/ip socks acc` completed to `access`", |s| s.contains("/ip socks access"));
    t.keys(&["Enter"]);
    t.wait_for("the prompt `/ip socks access>`", |s| s.lines().any(|l| l.trim_end().ends_with("/ip socks access>")));

    // Commands go to the daemon in the current menu.
    t.keys(&["add action=deny comment=console-rule", "Enter"]);
    t.keys(&["print", "Enter"]);
    let s = t.wait_for("the new rule in print", |s| s.contains("0 ;;; console-rule") || s.contains("action=deny"));
    assert!(s.contains("action=deny"), "print does not show the rule:\n{s}");
    let saved = d.cmd("ip socks access print detail");
    assert!(saved.contains("action=deny"), "the daemon does not have the rule: {saved}");

    // Tab completes a command, then a property name (with `=`), then a listed value.
    t.keys(&["mo", "Tab"]);
    t.wait_for("`mo` completed to `move`", |s| s.lines().any(|l| l.trim_end().ends_with("access> move")));
    t.keys(&["C-u", "add dst-p", "Tab"]);
    t.wait_for("`dst-p` completed to `dst-port=`", |s| s.lines().any(|l| l.trim_end().ends_with("add dst-port=")));
    t.keys(&["C-u", "add action=al", "Tab"]);
    t.wait_for("`action=al` completed to `action=allow`", |s| {
        s.lines().any(|l| l.trim_end().ends_with("add action=allow"))
    });
    t.keys(&["C-u"]);

    // `..` goes up; an error from the daemon is shown and the console goes on.
    t.keys(&["..", "Enter"]);
    t.wait_for("the prompt `/ip socks>`", |s| s.lines().any(|l| l.trim_end().ends_with("/ip socks>")));
    t.keys(&["set port=0", "Enter"]);
    t.wait_for("the daemon's error for port=0", |s| s.contains("invalid value for port"));

    // History: Up recalls the last line.
    t.keys(&["Up"]);
    t.wait_for("history recall of `set port=0`", |s| last_line(s).ends_with("/ip socks> set port=0"));
    t.keys(&["C-u", "C-d"]);
    let gone = wait_until(Duration::from_secs(5), || !t.run(&["has-session", "-t", "0"]).status.success());
    assert!(gone, "Ctrl-D did not leave the console:\n{}", t.screen());
    let h = std::fs::read_to_string(&history).unwrap_or_default();
    assert!(h.contains("add action=deny comment=console-rule") && h.contains("set port=0"), "history file: {h:?}");
}

/// Commands piped into the console run in order, with menu changes (a script pasted in).
#[test]
fn console_reads_a_script_on_stdin() {
    let d = Daemon::start("userspace");
    let out = d.console(b"/ip socks access\nadd action=deny dst-port=25\n/ip socks\naccess print\nquit\nprint\n");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "console failed: {stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("0 dst-port=25 action=deny"), "{stdout}");
    assert!(!stdout.contains("enabled:"), "`quit` did not stop the script: {stdout}");
}

/// Sends `n` bytes one way and reads them on the other end.
fn pump(from: &mut TcpStream, to: &mut TcpStream, n: usize) {
    let data = proxyd_tests::pattern(n, n as u64);
    from.write_all(&data).unwrap();
    let mut got = vec![0u8; n];
    to.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
}

/// Parses exposition text with prometheus_client's parser; returns `name{k="v",...}` -> value.
fn parse_with_prometheus_client(dir: &Path, body: &str) -> HashMap<String, f64> {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, body).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps(out))
"#;
    let out =
        run_with_timeout(Command::new("/usr/bin/python3").arg("-c").arg(script).arg(&file), Duration::from_secs(30));
    assert!(out.status.success(), "prometheus_client rejected the exposition:\n{}\n{body}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect()
}

/// A new `metrics-address` on the same port (127.0.0.1:P to 0.0.0.0:P, as an operator
/// opens the endpoint to a scrape network) moves the endpoint instead of failing with
/// "address in use", and back again; the SOCKS port stays out of reach.
#[test]
fn metrics_address_moves_on_the_same_port() {
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&[]);
    let port = free_port();
    let (local, other) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let answers = |addr: &str| wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_ok());
    d.cmd(&format!("ip socks set metrics-address={local}"));
    assert!(answers(&local), "nothing listens on metrics-address={local}");
    assert!(TcpStream::connect(&other).is_err(), "{other} answers while metrics-address={local}");

    d.cmd(&format!("ip socks set metrics-address=0.0.0.0:{port}"));
    assert!(answers(&other), "{other} does not answer after `set metrics-address=0.0.0.0:{port}`");
    assert!(scrape(&other).contains("proxyd_connections_accepted_total"), "scrape through {other}");

    d.cmd(&format!("ip socks set metrics-address={local}"));
    let gone = wait_until(Duration::from_secs(3), || TcpStream::connect(&other).is_err());
    assert!(gone, "{other} still answers after the move back to {local}");
    assert!(scrape(&local).contains("proxyd_connections_accepted_total"), "scrape through {local}");
    assert!(std::net::TcpListener::bind(&local).is_err(), "another socket could bind {local} after the moves");

    let out = d.cli(&["ip", "socks", "set", &format!("metrics-address=127.0.0.1:{}", proxy.port())]);
    assert!(!out.status.success(), "metrics-address on the SOCKS port was accepted");
    assert!(text(&out.stderr).contains("metrics-address"), "the error names the property: {}", text(&out.stderr));
    assert!(scrape(&local).contains("proxyd_connections_accepted_total"), "the refused change moved the endpoint");
}

/// After 3 tunnels with known byte counts and 2 requests the access list denies, a real
/// Prometheus parser reads accepted +5, refused{access} +2, bytes tx/rx exact, 3 handshakes.
#[test]
fn metrics_parse_with_prometheus_client() {
    if !require_python_module("metrics_parse_with_prometheus_client", "prometheus_client", "python3-prometheus-client")
    {
        return;
    }
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let metrics = format!("127.0.0.1:{}", free_port());
        let proxy = d.enable(&[&format!("metrics-address={metrics}")]);
        let (l, dst) = listen_local();
        let (_deny_l, denied) = listen_local();
        d.cli_ok(&["ip", "socks", "access", "add", &format!("dst-port={}", denied.port()), "action=deny"]);
        let up = wait_until(Duration::from_secs(5), || TcpStream::connect(&metrics).is_ok());
        assert!(up, "{dp}: nothing listens on metrics-address={metrics}");
        let before = parse_with_prometheus_client(&d.dir, &scrape(&metrics));

        let (mut tx, mut rx) = (0u64, 0u64);
        let mut tunnels = Vec::new();
        for i in 1..=3usize {
            let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
            pump(&mut c, &mut u, 1000 * i);
            pump(&mut u, &mut c, 300 * i);
            tx += 1000 * i as u64;
            rx += 300 * i as u64;
            tunnels.push((c, u));
        }
        for _ in 0..2 {
            let mut c = tcp_connect(proxy).unwrap();
            c.write_all(&socks::request(CONNECT, denied, b"test")).unwrap();
            match socks::answer(&mut c, Duration::from_secs(5)) {
                Answer::Reply(r) => assert_eq!(r.code, REJECTED, "{dp}: denied request got {r:?}"),
                other => panic!("{dp}: denied request: {other:?}"),
            }
        }
        // The three tunnels are still open: bytes of open tunnels count too. Let the
        // relay publish its counters, then compare.
        let key = |k: &str| k.to_string();
        let mut after = HashMap::new();
        let settled = wait_until(Duration::from_secs(5), || {
            after = parse_with_prometheus_client(&d.dir, &scrape(&metrics));
            let delta =
                |k: &str| after.get(k).copied().unwrap_or(f64::NAN) - before.get(k).copied().unwrap_or(f64::NAN);
            delta("proxyd_bytes_total{direction=\"tx\"}") == tx as f64
                && delta("proxyd_bytes_total{direction=\"rx\"}") == rx as f64
        });
        let delta = |k: &str| after.get(k).copied().unwrap_or(f64::NAN) - before.get(k).copied().unwrap_or(f64::NAN);
        assert!(
            settled,
            "{dp}: bytes tx/rx deltas {} / {}, want {tx} / {rx}; {after:?}",
            delta("proxyd_bytes_total{direction=\"tx\"}"),
            delta("proxyd_bytes_total{direction=\"rx\"}")
        );
        assert_eq!(delta("proxyd_connections_accepted_total{}"), 5.0, "{dp}: accepted; {after:?}");
        assert_eq!(delta("proxyd_connections_refused_total{reason=\"access\"}"), 2.0, "{dp}: refused; {after:?}");
        for reason in ["limit", "handshake", "auth", "dial"] {
            assert_eq!(
                delta(&format!("proxyd_connections_refused_total{{reason=\"{reason}\"}}")),
                0.0,
                "{dp}: refused {reason}"
            );
        }
        assert_eq!(delta("proxyd_handshake_duration_seconds_count{}"), 3.0, "{dp}: handshakes; {after:?}");
        assert_eq!(after.get(&key("proxyd_connections_active{type=\"out\"}")), Some(&3.0), "{dp}: {after:?}");
        assert!(after.keys().any(|k| k.starts_with("proxyd_data_path_info{")), "{dp}: no data path info: {after:?}");
        // Closed tunnels keep their bytes in the totals and leave the active gauge.
        drop(tunnels);
        let mut last = HashMap::new();
        let closed = wait_until(Duration::from_secs(5), || {
            last = parse_with_prometheus_client(&d.dir, &scrape(&metrics));
            last.get("proxyd_connections_active{type=\"out\"}") == Some(&0.0)
        });
        assert!(closed, "{dp}: tunnels still active: {last:?}");
        for k in ["proxyd_bytes_total{direction=\"tx\"}", "proxyd_bytes_total{direction=\"rx\"}"] {
            assert_eq!(last.get(k), after.get(k), "{dp}: {k} changed when the tunnels closed");
        }
        drop(l);
    }
}

/// `connections print interval=1s` prints again every second (run under `timeout 2.5`),
/// without screen codes into a pipe.
#[test]
fn connections_print_interval_refreshes() {
    let Some(timeout) = require_program("connections_print_interval_refreshes", "timeout") else {
        return;
    };
    let mut d = Daemon::start("userspace");
    let proxy = d.enable(&[]);
    let (l, dst) = listen_local();
    let (_c, _u) = socks::tunnel(proxy, &l, dst);
    let mut cmd = Command::new(timeout);
    cmd.arg("2.5").arg(proxyd_bin()).arg("--control").arg(&d.cli.control).args([
        "ip",
        "socks",
        "connections",
        "print",
        "interval=1s",
    ]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
    let stdout = text(&out.stdout);
    let headers = stdout.lines().filter(|l| l.contains("SRC-ADDRESS")).count();
    assert!(headers >= 2, "{headers} refresh(es) in 2.5 s:\n{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains(&dst.to_string()), "the tunnel is not listed:\n{stdout}");
    // Into a pipe, the rounds follow each other: no screen-clearing codes.
    assert!(!stdout.contains('\x1b'), "terminal escape codes written into a pipe:\n{stdout:?}");
    assert!(stdout.contains("\n\n"), "no blank line between the rounds:\n{stdout:?}");
}

/// `connections remove 0` closes a live tunnel: the client and the destination see EOF.
#[test]
fn connections_remove_closes_a_tunnel() {
    for dp in data_paths() {
        let mut d = Daemon::start(dp);
        let proxy = d.enable(&[]);
        let (l, dst) = listen_local();
        let (mut c, mut u) = socks::tunnel(proxy, &l, dst);
        pump(&mut c, &mut u, 10);
        let listed = d.cmd("ip socks connections print");
        assert!(listed.contains(&dst.to_string()), "{dp}: {listed}");
        d.cmd("ip socks connections remove 0");
        assert!(socks::closed_within(&mut c, Duration::from_secs(5)), "{dp}: the client never saw EOF");
        assert!(socks::closed_within(&mut u, Duration::from_secs(5)), "{dp}: the destination never saw EOF");
        assert!(
            wait_until(Duration::from_secs(5), || d.cli.connections().is_empty()),
            "{dp}: still listed: {:?}",
            d.cli.connections()
        );
        let out = d.cli(&["ip", "socks", "connections", "remove", "0"]);
        assert_eq!(out.status.code(), Some(1), "{dp}: removing a missing connection: {}", text(&out.stderr));
    }
}

/// The unit in packaging/ passes `systemd-analyze verify` (with ExecStart pointed at the
/// built binary and the generated man page on MANPATH for `Documentation=man:proxyd(8)`).
#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = require_program("unit_passes_systemd_analyze_verify", "systemd-analyze") else {
        return;
    };
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/proxyd.service");
    let original = std::fs::read_to_string(&unit).expect("packaging/proxyd.service");
    for want in [
        "Type=notify",
        "ExecStart=/usr/local/bin/proxyd run",
        "StateDirectory=proxyd",
        "RuntimeDirectory=proxyd",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
    ] {
        assert!(original.lines().any(|l| l == want), "the unit lacks `{want}`");
    }
    let dir = std::env::temp_dir().join(format!("proxyd-unit-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(dir.join("man/man8")).unwrap();
    let bin = proxyd_bin().canonicalize().unwrap();
    std::fs::write(dir.join("proxyd.service"), original.replace("/usr/local/bin/proxyd", bin.to_str().unwrap()))
        .unwrap();
    let page = Command::new(&bin).arg("man").output().unwrap();
    std::fs::write(dir.join("man/man8/proxyd.8"), &page.stdout).unwrap();
    let out = run_with_timeout(
        Command::new(analyze).arg("verify").arg(dir.join("proxyd.service")).env("MANPATH", dir.join("man")),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {:?}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `proxyd run` under `$NOTIFY_SOCKET` sends `READY=1` once its control socket answers.
#[test]
fn run_notifies_systemd_when_ready() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("proxyd-notify-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let control = dir.join("control.sock");
    let mut child = Command::new(proxyd_bin())
        .arg("run")
        .arg("--state")
        .arg(dir.join("config.rsc"))
        .arg("--control")
        .arg(&control)
        .args(["--data-path", "userspace"])
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf).map(|n| text(&buf[..n]));
    let answered = Command::new(proxyd_bin())
        .arg("--control")
        .arg(&control)
        .args(["ip", "socks", "print"])
        .output()
        .map(|o| o.status.success());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = notify.recv(&mut buf).map(|n| text(&buf[..n]));
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(got.ok().as_deref(), Some("READY=1"));
    assert_eq!(answered.ok(), Some(true), "READY=1 came before the control socket answered");
    assert_eq!(stopping.ok().as_deref(), Some("STOPPING=1"));
}

/// `proxyd completions bash`, loaded in bash, completes menus, commands, properties and
/// values from the schema (the completion function run as bash runs it on Tab).
#[test]
fn bash_completion_completes_the_command_tree() {
    let Some(bash) = require_program("bash_completion_completes_the_command_tree", "bash") else {
        return;
    };
    let script = Command::new(proxyd_bin()).args(["completions", "bash"]).output().unwrap();
    assert!(script.status.success());
    let dir = std::env::temp_dir().join(format!("proxyd-compl-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("proxyd.bash"), &script.stdout).unwrap();
    // COMP_WORDS split as readline does: `=` and `:` are word breaks.
    let harness = format!(
        r#"source {}
complete -p proxyd >/dev/null || exit 3
t() {{
    COMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}
    local s="${{1//=/ = }}"; s="${{s//:/ : }}"
    read -r -a COMP_WORDS <<< "$s"
    [[ "$1" =~ [[:space:]]$ ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
    COMPREPLY=()
    _proxyd 2>/dev/null
    echo "$1|${{COMPREPLY[*]}}"
}}
t "proxyd ip socks ac"
t "proxyd "
t "proxyd ip socks "
t "proxyd --control /tmp/x ip so"
t "proxyd ip socks access add act"
t "proxyd ip socks access add action=d"
t "proxyd /ip/socks/c"
t "proxyd run --data-path "
t "proxyd ip socks connections print "
"#,
        dir.join("proxyd.bash").display()
    );
    let out = run_with_timeout(Command::new(bash).arg("--norc").arg("-c").arg(&harness), Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "bash: {:?}\n{stdout}\n{}", out.status, text(&out.stderr));
    let got: HashMap<&str, Vec<&str>> =
        stdout.lines().filter_map(|l| l.split_once('|')).map(|(k, v)| (k, v.split_whitespace().collect())).collect();
    let check = |line: &str, want: &[&str]| {
        let have = got.get(line).unwrap_or_else(|| panic!("no answer for `{line}`:\n{stdout}"));
        for w in want {
            assert!(have.contains(w), "`{line}` + Tab offers {have:?}, not `{w}`");
        }
    };
    check("proxyd ip socks ac", &["access"]);
    assert_eq!(got["proxyd ip socks ac"], ["access"]);
    check("proxyd ", &["run", "console", "completions", "ip", "export"]);
    check("proxyd ip socks ", &["access", "connections", "users", "set", "print", "export"]);
    check("proxyd --control /tmp/x ip so", &["socks"]);
    check("proxyd ip socks access add act", &["action="]);
    check("proxyd ip socks access add action=d", &["deny"]);
    check("proxyd /ip/socks/c", &["/ip/socks/connections"]);
    check("proxyd run --data-path ", &["auto", "kernel", "userspace"]);
    check("proxyd ip socks connections print ", &["detail", "count-only", "interval=", "where", "dst-address="]);
}

/// `proxyd man` is a roff page groff renders without a warning, listing every menu.
#[test]
fn man_page_renders_without_warnings() {
    let Some(groff) = require_program("man_page_renders_without_warnings", "groff") else {
        return;
    };
    let page = Command::new(proxyd_bin()).arg("man").output().unwrap();
    assert!(page.status.success());
    let render = |extra: &[&str]| {
        let mut child = Command::new(&groff)
            .args(["-man", "-Tutf8", "-ww"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&page.stdout).unwrap();
        child.wait_with_output().unwrap()
    };
    let checked = render(&["-z"]);
    assert!(checked.status.success() && checked.stderr.is_empty(), "groff warns:\n{}", text(&checked.stderr));
    let shown = text(&render(&[]).stdout);
    // groff marks bold by overstriking; drop that to read the text.
    let plain: String = {
        let mut out = String::new();
        for c in shown.chars() {
            if c == '\u{8}' {
                out.pop();
            } else {
                out.push(c);
            }
        }
        out
    };
    for want in [
        "PROXYD(8)",
        "SYNOPSIS",
        "/ip socks access",
        "connection-idle-timeout",
        "--state",
        "EXIT STATUS",
        "PROXYD_CONTROL",
        "/run/proxyd/control.sock",
    ] {
        assert!(plain.contains(want), "the rendered page lacks `{want}`:\n{plain}");
    }
}
