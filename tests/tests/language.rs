//! RouterOS v7 language forms typed as operators type them (through a real
//! shell, so quoting and word splitting are the shell's): `[find ...]`
//! selection, `print where/count-only/terse/detail`, `add place-before` and
//! `copy-from`, every `export` form and `/import`, against the real daemon
//! with exact output.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proxyd_tests::daemon::proxyd_bin;
use proxyd_tests::{run_with_timeout, text, Daemon};

/// Runs `line` as typed after `proxyd` in a shell (`set -f`: `[find]` is
/// not a glob), in the daemon's folder; returns exit status, stdout, stderr.
fn typed(d: &Daemon, line: &str) -> (i32, String, String) {
    let script = format!("set -f; exec '{}' --control '{}' {line}", proxyd_bin().display(), d.cli.control.display());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]).current_dir(&d.dir);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// `typed`, which must succeed; its stdout.
fn ok(d: &Daemon, line: &str) -> String {
    let (code, out, err) = typed(d, line);
    assert_eq!(code, 0, "`{line}` failed: {err}");
    out
}

/// An export without its first line (`# <date> by proxyd <version>`), which
/// is checked to be that header.
fn body(export: &str) -> String {
    let (header, rest) = export.split_once('\n').unwrap_or((export, ""));
    assert!(header.starts_with("# ") && header.contains(" by proxyd "), "export header: {header:?}");
    let date = &header[2..21];
    assert!(
        date.len() == 19 && date.as_bytes()[4] == b'-' && date.as_bytes()[13] == b':',
        "export header date: {header:?}"
    );
    rest.to_owned()
}

/// Each form, typed, prints exactly what RouterOS would (the manual's three
/// rules first, unchanged).
#[test]
fn selection_print_and_placement_transcript() {
    let d = Daemon::start("userspace");
    let steps: &[(&str, &str)] = &[
        ("ip socks access add src-address=192.168.0.2 dst-port=21 action=allow comment=\"ftp client\"", ""),
        ("ip socks access add dst-port=1024-65535 action=allow", ""),
        ("ip socks access add action=deny", ""),
        (
            "ip socks access print",
            "Flags: X - disabled\n0 ;;; ftp client\n  src-address=192.168.0.2 dst-port=21 action=allow\n1 dst-port=1024-65535 action=allow\n2 action=deny\n",
        ),
        ("ip socks access print where action=deny", "Flags: X - disabled\n2 action=deny\n"),
        ("ip socks access print count-only where action=deny", "1\n"),
        ("ip socks access print count-only where 'action=allow and dst-port>1000'", "1\n"),
        ("ip socks access set [find comment=\"ftp client\"] dst-port=2121", ""),
        ("ip socks access add place-before=0 src-address=10.0.0.0/8 action=deny", ""),
        ("ip socks access disable [find where src-address=10.0.0.0/8]", ""),
        ("ip socks access add copy-from=2 dst-port=8080 comment=web", ""),
        (
            "ip socks access print",
            "Flags: X - disabled\n0 X src-address=10.0.0.0/8 action=deny\n1 ;;; ftp client\n  src-address=192.168.0.2 dst-port=2121 action=allow\n2 dst-port=1024-65535 action=allow\n3 action=deny\n4 ;;; web\n  dst-port=8080 action=allow\n",
        ),
        (
            "ip socks access print terse where '!disabled and (dst-port=2121 or comment~\"^w\")'",
            "1 src-address=192.168.0.2 src-port=\"\" dst-address=\"\" dst-port=2121 action=allow comment=\"ftp client\"\n4 src-address=\"\" src-port=\"\" dst-address=\"\" dst-port=8080 action=allow comment=web\n",
        ),
        (
            "ip socks access print detail where disabled",
            "Flags: X - disabled\n0 X src-address=10.0.0.0/8 src-port=\"\" dst-address=\"\" dst-port=\"\" action=deny\n",
        ),
        ("ip socks access remove [find action=deny]", ""),
        (
            "ip socks access print",
            "Flags: X - disabled\n0 ;;; ftp client\n  src-address=192.168.0.2 dst-port=2121 action=allow\n1 dst-port=1024-65535 action=allow\n2 ;;; web\n  dst-port=8080 action=allow\n",
        ),
        ("ip socks access move [find comment=web] 0", ""),
        ("ip socks access print count-only where comment=web", "1\n"),
        ("ip socks access print where comment=web", "Flags: X - disabled\n0 ;;; web\n  dst-port=8080 action=allow\n"),
        // Selecting nothing is not an error, and changes nothing.
        ("ip socks access remove [find comment=nothing]", ""),
        ("ip socks access print count-only", "3\n"),
        ("ip socks users add name=alice password=s3cret rate-limit=8M", ""),
        ("ip socks users add copy-from=0 name=bob only-one=yes", ""),
        ("ip socks users print where only-one", "Flags: X - disabled\n1 name=bob only-one=yes rate-limit=8M\n"),
        ("ip socks users print terse where name~\"^a\"", "0 name=alice only-one=no rate-limit=8M comment=\"\"\n"),
        ("ip socks users remove [find name=bob]", ""),
        ("ip socks users print count-only", "1\n"),
        ("ip socks connections print count-only where type=out", "0\n"),
        // Public hardening scripts run exactly this.
        ("/ip socks access remove [find]", ""),
        ("ip socks access print count-only", "0\n"),
    ];
    for (line, want) in steps {
        assert_eq!(&ok(&d, line), want, "`{line}`");
    }
    // An expression that does not parse is refused with its position, and changes nothing.
    ok(&d, "ip socks access add action=deny");
    let (code, _, err) = typed(&d, "ip socks access remove '[find where action=deny and (dst-port=1]'");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("column"), "{err}");
    let (code, _, err) = typed(&d, "ip socks access print where colour=red");
    assert_eq!(code, 2);
    assert!(err.contains("unknown property `colour`") && err.contains("column 1"), "{err}");
    assert_eq!(ok(&d, "ip socks access print count-only"), "1\n");
    // Errors that list menus mention users.
    let (_, _, err) = typed(&d, "/ip firewall filter print");
    assert!(err.contains("/ip socks users"), "{err}");
}

/// A configuration with rules, users and non-default settings, exported in
/// every form and imported into a fresh daemon, gives the same `export verbose`.
#[test]
fn every_export_form_imports_back() {
    let a = Daemon::start("userspace");
    for line in [
        "ip socks set port=1099 max-connections=50 connection-idle-timeout=1h version=5 auth-method=password data-path=userspace",
        "ip socks users add name=alice password=s3cret rate-limit=8M comment=\"first user\"",
        "ip socks users add name=bob password=x only-one=yes disabled=yes",
        "ip socks access add src-address=192.168.0.2 dst-port=21 action=allow comment=\"ftp client\"",
        "ip socks access add src-address=10.0.0.0/8 dst-address=example.com dst-port=1024-65535 src-port=1-1023",
        "ip socks access add action=deny disabled=yes",
        "ip socks access add action=deny",
    ] {
        ok(&a, line);
    }
    let want = body(&ok(&a, "export verbose"));
    assert!(want.contains("set enabled=no port=1099"), "{want}");
    assert!(!want.contains("password-hash"), "verbose export without show-sensitive shows no hashes:\n{want}");
    let compact = body(&ok(&a, "export"));
    assert!(compact.starts_with("/ip socks\nset port=1099 "), "compact shows only non-defaults:\n{compact}");
    assert!(!compact.contains("enabled=no"), "{compact}");
    for form in [
        "export",
        "export compact",
        "export verbose",
        "export terse",
        "export show-sensitive",
        "export verbose terse show-sensitive",
    ] {
        let script = ok(&a, form);
        let b = Daemon::start("userspace");
        let file = b.dir.join("from-a.rsc");
        std::fs::write(&file, &script).unwrap();
        let (code, _, err) = typed(&b, &format!("/import file={}", file.display()));
        assert_eq!(code, 0, "`{form}` does not import: {err}\n{script}");
        assert_eq!(body(&ok(&b, "export verbose")), want, "`{form}` imported back differs");
        if form.contains("show-sensitive") {
            // The hashes came along: alice logs in with the same password hash.
            assert_eq!(body(&ok(&b, "export show-sensitive")), body(&ok(&a, "export show-sensitive")), "{form}");
        }
    }
    // export file=NAME writes NAME.rsc next to the state file; import reads it by name.
    ok(&a, "export file=backup");
    let saved = std::fs::read_to_string(a.dir.join("backup.rsc")).unwrap();
    assert_eq!(body(&saved), body(&ok(&a, "export")));
    let b = Daemon::start("userspace");
    std::fs::copy(a.dir.join("backup.rsc"), b.dir.join("backup.rsc")).unwrap();
    let out = ok(&b, "import file=backup.rsc verbose=yes");
    assert!(out.contains("#3: set port=1099"), "verbose import lists the lines it ran:\n{out}");
    assert_eq!(body(&ok(&b, "export verbose")), want);
}

/// A script whose third line is invalid, imported, exits 1 naming line 3 and
/// changes nothing at all (its first two lines included).
#[test]
fn a_bad_script_line_changes_nothing() {
    let d = Daemon::start("userspace");
    ok(&d, "ip socks access add action=deny comment=keep");
    let before = body(&ok(&d, "export verbose"));
    let script = d.dir.join("bad.rsc");
    std::fs::write(
        &script,
        "/ip socks\nset port=1091 max-connections=7\n/ip socks access add action=maybe\nadd action=allow\n",
    )
    .unwrap();
    let (code, out, err) = typed(&d, "/import file=bad.rsc");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("bad.rsc:3:") && err.contains("action"), "{err}");
    assert_eq!(body(&ok(&d, "export verbose")), before);
    let state = std::fs::read_to_string(&d.state).unwrap();
    assert!(!state.contains("1091"), "the state file changed:\n{state}");
    // A line that does not parse at all is reported the same way.
    std::fs::write(&script, "/ip socks access\nadd action=deny\nremove [find where (action=deny]\n").unwrap();
    let (code, _, err) = typed(&d, "import file=bad.rsc");
    assert_eq!(code, 1);
    assert!(err.contains("bad.rsc:3:") && err.contains("column"), "{err}");
    assert_eq!(body(&ok(&d, "export verbose")), before);
    // A missing file names itself.
    let (code, _, err) = typed(&d, "import file=nothing-here");
    assert_eq!(code, 1);
    assert!(err.contains("nothing-here.rsc"), "{err}");
    assert!(Path::new(&d.dir).join("config.rsc").exists());
}

/// The manual's continued line (`... dst-port=21 \` then `\... action=...`) means one
/// command everywhere an operator pastes it: typed after `proxyd` in a shell (which
/// turns `\...` into `...`), piped into `proxyd console` (which must not run the first
/// half on its own: that added an allow rule where deny was typed), and in an imported
/// script. A script or console input that ends in a continued line is refused, naming
/// the line, and changes nothing.
#[test]
fn continued_lines_are_one_command_everywhere() {
    let d = Daemon::start("userspace");
    ok(&d, "ip socks access add src-address=192.168.0.2 dst-port=21 \\\n\\... action=allow");
    let console = format!(
        "printf '%s\\n' '/ip socks access' 'add src-address=10.7.7.7 dst-port=21 \\' '\\... action=deny' | '{}' --control '{}' console",
        proxyd_bin().display(),
        d.cli.control.display()
    );
    let out = run_with_timeout(Command::new("sh").args(["-c", &console]), Duration::from_secs(20));
    assert!(out.status.success(), "console: {}", text(&out.stderr));
    std::fs::write(d.dir.join("cont.rsc"), "/ip socks access\nadd src-address=10.8.8.8 \\\n    action=deny\n").unwrap();
    ok(&d, "import file=cont.rsc");
    assert_eq!(
        ok(&d, "ip socks access print"),
        "Flags: X - disabled\n0 src-address=192.168.0.2 dst-port=21 action=allow\n\
         1 src-address=10.7.7.7 dst-port=21 action=deny\n2 src-address=10.8.8.8 action=deny\n"
    );

    let before = body(&ok(&d, "export verbose"));
    std::fs::write(d.dir.join("cut.rsc"), "/ip socks\nset port=19331 \\\n").unwrap();
    let (code, out, err) = typed(&d, "import file=cut.rsc");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("cut.rsc:2:") && err.contains("continued line"), "{err}");
    let console = format!(
        "printf '%s\\n' '/ip socks access' 'add src-address=10.9.9.9 \\' | '{}' --control '{}' console",
        proxyd_bin().display(),
        d.cli.control.display()
    );
    let out = run_with_timeout(Command::new("sh").args(["-c", &console]), Duration::from_secs(20));
    assert!(!out.status.success(), "console input cut short exited 0");
    assert!(text(&out.stderr).contains("continued line"), "{}", text(&out.stderr));
    assert_eq!(body(&ok(&d, "export verbose")), before, "a command cut short changed the configuration");
}

/// RouterOS script forms pasted from a router or a forum post: a byte-order
/// mark, several commands on one line (`;`), `\XX` and `\_` escapes, and the
/// `unset` and `comment` commands, in an imported script and in the console,
/// with the same result; a `;` line whose second command is bad changes nothing.
#[test]
fn pasted_routeros_forms_run_in_scripts_and_the_console() {
    let script = "\u{feff}/ip socks access; add dst-port=22 src-address=10.0.0.0/8 comment=\"ssh\\_in\" action=deny\n\
                  /ip socks access unset [find comment=\"ssh in\"] value-name=src-address; comment 0 comment=\"\\41\\C3\\A9\"\n\
                  /ip socks set max-connections=33; /ip socks access add action=allow\n";
    let want = "Flags: X - disabled\n0 ;;; A\u{e9}\n  dst-port=22 action=deny\n1 action=allow\n";
    let d = Daemon::start("userspace");
    std::fs::write(d.dir.join("pasted.rsc"), script).unwrap();
    ok(&d, "/import file=pasted.rsc");
    assert_eq!(ok(&d, "ip socks access print"), want);
    assert!(ok(&d, "ip socks print").contains("max-connections: 33"));

    let c = Daemon::start("userspace");
    let out = c.console(script.trim_start_matches('\u{feff}').as_bytes());
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(ok(&c, "ip socks access print"), want, "console: {}", text(&out.stderr));

    // All or nothing: the bad second command of a line refuses the whole script.
    let before = body(&ok(&d, "export verbose"));
    std::fs::write(d.dir.join("bad.rsc"), "/ip socks access; add action=deny; add action=maybe\n").unwrap();
    let (code, _, err) = typed(&d, "/import file=bad.rsc");
    assert_eq!(code, 1);
    assert!(err.contains("bad.rsc:1:") && err.contains("action"), "{err}");
    assert_eq!(body(&ok(&d, "export verbose")), before);
}
