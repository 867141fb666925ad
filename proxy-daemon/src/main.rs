//! The `proxyd` binary: `proxyd run` starts the daemon; every other command
//! (`proxyd ip socks ...`, `proxyd export`) is sent to the running daemon
//! over its control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use proxyd::config::{schema, store, DataPathMode};
use proxyd::control::{self, client, Controller};
use proxyd::server::Server;

const DEFAULT_CONTROL: &str = "/run/proxyd/control.sock";
/// How long cancelled connections get to close after the grace period.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

/// The CLI. Its `--help` ends with [`after_help`], generated from the
/// command schema (menus, commands, properties); see [`cli`].
#[derive(Parser)]
#[command(
    name = "proxyd",
    version,
    about = "SOCKS4, SOCKS4a and SOCKS5 proxy daemon with RouterOS /ip socks semantics and an eBPF data path"
)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "PROXYD_CONTROL", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// Print the answer as JSON (print commands).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground (logs to stderr).
    Run(RunArgs),
    /// Interactive shell: a RouterOS-style prompt with menus, Tab completion and history.
    Console,
    /// Print a shell completion script (`proxyd completions bash > /etc/bash_completion.d/proxyd`).
    Completions {
        #[arg(value_parser = proxyd::completions::SHELLS.to_vec())]
        shell: String,
    },
    /// Print the proxyd(8) manual page (roff): `proxyd man | man -l -`.
    #[command(hide = true)]
    Man,
    /// A RouterOS-style command for the running daemon, e.g. `ip socks print`.
    #[command(external_subcommand)]
    Menu(Vec<String>),
}

#[derive(Args)]
struct RunArgs {
    /// State file: the configuration as a RouterOS script, rewritten on every change.
    #[arg(long, default_value = "/var/lib/proxyd/config.rsc")]
    state: PathBuf,
    /// Folder under bpffs where the kernel data path pins its maps.
    #[arg(long, default_value = "/sys/fs/bpf/proxyd")]
    bpf_pin_dir: PathBuf,
    /// Data path for tunnels; overrides the saved `data-path` setting for this run, until a `set data-path=`.
    #[arg(long, value_parser = ["auto", "kernel", "userspace"])]
    data_path: Option<String>,
    /// How long open tunnels may go on after SIGTERM/SIGINT/SIGHUP before they are closed.
    #[arg(long, default_value = "10s", value_parser = parse_time)]
    shutdown_grace: Duration,
    /// Declarative mode: the configuration is this RouterOS script (e.g. a
    /// mounted ConfigMap), applied at start and whenever it changes; changes
    /// through the control socket are refused and no state file is written.
    #[arg(long)]
    config: Option<PathBuf>,
    /// With --config: close open tunnels that a new version's access list denies.
    #[arg(long, requires = "config")]
    config_enforce: bool,
}

fn parse_time(s: &str) -> Result<Duration, String> {
    proxyd::config::time::parse(s).ok_or_else(|| format!("`{s}` is not a time (e.g. 10s, 1m)"))
}

/// The command line with its generated help.
fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().after_help(after_help())
}

/// What `--help` says after the options: every menu, command and property
/// of the schema, and the exit statuses.
fn after_help() -> String {
    format!(
        "{}\nThe first enabled matching access rule decides; no match allows.\n\nExit status: 0 success, 1 refused or failed command, 2 usage error.",
        schema::overview()
    )
}

fn main() -> ExitCode {
    let cli = {
        use clap::FromArgMatches;
        Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
    };
    match cli.command {
        Cmd::Run(args) => {
            init_logging();
            match run(cli.control, args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Console => ExitCode::from(proxyd::console::run(&cli.control, cli.json).clamp(0, 255) as u8),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let script = proxyd::completions::script(&shell, &Cli::command()).expect("clap checked the shell");
            let _ = std::io::Write::write_all(&mut std::io::stdout(), script.as_bytes());
            ExitCode::SUCCESS
        }
        Cmd::Man => {
            let _ = std::io::Write::write_all(&mut std::io::stdout(), proxyd::manpage::render(&command()).as_bytes());
            ExitCode::SUCCESS
        }
        Cmd::Menu(words) if words.iter().any(|w| w == "--help" || w == "-h" || w == "help") => menu_help(words),
        Cmd::Menu(words) => ExitCode::from(client::run(&cli.control, words, cli.json).clamp(0, 255) as u8),
    }
}

/// `proxyd ip socks access --help`: the menu's commands and properties, from
/// the schema, without asking the daemon. The one parser finds the menu.
fn menu_help(words: Vec<String>) -> ExitCode {
    use proxyd::config::command::{parse, Command};
    let path: Vec<String> = words.into_iter().filter(|w| w != "--help" && w != "-h" && w != "help").collect();
    match parse(proxyd::config::command::Menu::Root, &path) {
        Ok((menu, cmd)) => {
            let menu = if let Command::Enter(m) = cmd { m } else { menu };
            print!("{}", schema::help(schema::menu(menu)));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("proxyd: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PROXYD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run(control_path: PathBuf, args: RunArgs) -> anyhow::Result<()> {
    // Started by `proxyd upgrade`: the running proxyd hands everything over.
    let handover = proxyd::upgrade::incoming();
    if handover.is_none() {
        control::ensure_not_running(&control_path).context("cannot start")?;
    }
    let config = match &args.config {
        Some(file) => proxyd::control::declarative::load(file)
            .map_err(anyhow::Error::msg)
            .context("cannot start: the --config file is broken")?,
        None => store::load(&args.state).context("cannot start: the state file is broken")?,
    };
    proxyd::server::raise_nofile_limit(config.settings.max_connections);
    // Mounting bpffs needs CAP_SYS_ADMIN, which is about to go.
    proxyd::bpf::mount_if_missing();
    // Before the runtime starts its threads: capabilities are per thread.
    proxyd::privileges::drop_privileges()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async move {
        let mode = match &args.data_path {
            Some(m) => m.parse::<DataPathMode>().expect("clap checked the value"),
            None => config.settings.data_path,
        };
        let (server, listener) = match handover {
            Some(fd) => adopt(fd, &config, mode, &args).await?,
            None => {
                let server = Server::new(config.clone(), mode, args.bpf_pin_dir.clone())?;
                tracing::info!(state = %args.state.display(), data_path = %mode, in_use = %server.datapath_kind(), "proxyd {} starting (data-path={mode}, in use: {})", env!("CARGO_PKG_VERSION"), server.datapath_kind());
                server.apply_initial();
                let listener = control::bind(&control_path).with_context(|| format!("cannot create the control socket {}", control_path.display()))?;
                (server, listener)
            }
        };
        if config.settings.enabled && config.access.is_open() {
            tracing::warn!("the access list allows any client to any destination: this is an open proxy");
        }
        let socket = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned().ok();
        let mut controller = Controller::new(server.clone(), args.state.clone(), socket);
        if let Some(file) = &args.config {
            controller = controller.declarative(file.clone());
        }
        let controller = Arc::new(controller);
        if let Some(file) = &args.config {
            tracing::info!(config = %file.display(), "declarative: the configuration is this file, applied when it changes");
            tokio::spawn(control::declarative::watch(controller.clone(), file.clone(), args.config_enforce));
        }
        tokio::spawn(control::serve(listener, controller.clone()));
        tokio::spawn(server.clone().reap_idle_forever());
        tracing::info!(control = %control_path.display(), "ready");
        proxyd::sdnotify::notify_ready();

        tokio::select! {
            _ = shutdown_signal() => {}
            _ = controller.upgraded.cancelled() => {
                // A new proxyd serves everything now; what is left here (UDP
                // associations) ends with this process.
                tokio::time::sleep(Duration::from_millis(100)).await;
                tracing::info!("upgraded: exiting");
                return Ok(());
            }
        }
        proxyd::sdnotify::notify_stopping();
        tracing::info!("shutting down: no new clients; {} open connection(s) get {:?}", server.shared.registry.len(), args.shutdown_grace);
        // Bounded: a shard that does not answer must not hold the exit up.
        let _ = tokio::time::timeout(CLOSE_DEADLINE, server.stop_listening()).await;
        let _ = std::fs::remove_file(&control_path);
        // Every connection task (each ends after its tunnel) is tracked:
        // wait for them all, up to the grace, then cancel the rest and wait
        // for them to close their sockets (and leave the BPF maps).
        let tasks = &server.shared.tasks;
        tasks.close();
        if tokio::time::timeout(args.shutdown_grace, tasks.wait()).await.is_err() {
            tracing::info!("grace period over: closing {} connection(s)", server.shared.registry.len());
            server.shared.registry.cancel_all();
            if tokio::time::timeout(CLOSE_DEADLINE, tasks.wait()).await.is_err() {
                tracing::warn!("{} connection(s) still closing after {CLOSE_DEADLINE:?}; exiting", tasks.len());
            }
        }
        server.stop_prefilter();
        tracing::info!("stopped");
        Ok::<(), anyhow::Error>(())
    })
}

/// The new process of an upgrade: takes the running proxyd's sockets,
/// tunnels and kernel data path over (see `proxyd::upgrade`).
async fn adopt(
    fd: std::os::fd::OwnedFd,
    config: &proxyd::config::Config,
    mode: DataPathMode,
    args: &RunArgs,
) -> anyhow::Result<(Arc<Server>, tokio::net::UnixListener)> {
    let mut offered = proxyd::upgrade::receive_offer(fd).await.map_err(anyhow::Error::msg).context("upgrade")?;
    tracing::info!("proxyd {} taking over from the running proxyd", env!("CARGO_PKG_VERSION"));
    // Until the old process detaches its BPF programs: this binary's kernel
    // path is loaded on its maps but not attached, no XDP prefilter here,
    // and no accepting (the old one still does).
    let lock = offered.kernel.take();
    let ready = (|| {
        if lock.is_some() && mode == DataPathMode::Userspace {
            return Err(
                "the running proxyd splices tunnels in the kernel; this one runs data-path=userspace".to_string()
            );
        }
        let server = Server::new(config.clone(), DataPathMode::Userspace, args.bpf_pin_dir.clone())
            .map_err(|e| e.to_string())?;
        if let Some(lock) = lock {
            server.adopt_kernel(lock).map_err(|e| format!("cannot load the kernel data path: {e}"))?;
        }
        Ok(server)
    })();
    let server = match ready {
        Ok(s) => s,
        Err(reason) => {
            let _ = offered.answer(Err(reason.clone())).await;
            anyhow::bail!("upgrade refused: {reason}");
        }
    };
    let socks =
        offered.socks.as_ref().map(|(a, d, fds)| (*a, d.clone(), fds.iter().map(|fd| fd.try_clone()).collect()));
    let metrics = offered.metrics.as_ref().map(|(a, fd)| (*a, fd.try_clone()));
    let socks = socks.map(|(a, d, fds): (_, _, std::io::Result<Vec<_>>)| fds.map(|fds| (a, d, fds))).transpose()?;
    let metrics = metrics.map(|(a, fd)| fd.map(|fd| (a, fd))).transpose()?;
    server.adopt_listeners(socks, metrics, false);
    let control = std::os::unix::net::UnixListener::from(offered.control.try_clone()?);
    control.set_nonblocking(true)?;
    let control = tokio::net::UnixListener::from_std(control)?;
    offered.answer(Ok(())).await.map_err(anyhow::Error::msg)?;
    let tunnels = offered.adopt(&server, mode).await.map_err(anyhow::Error::msg).context("upgrade")?;
    // Everything else the configuration asks for (the XDP prefilter), now
    // that the old process let go of it; the listeners stay as they are.
    match server.prepare(&config.settings, false) {
        Ok(p) => server.commit(config.clone(), p),
        Err(e) => tracing::error!("after the upgrade: {e}"),
    }
    let _ = proxyd::sdnotify::notify(&format!("MAINPID={}", std::process::id()));
    let (mode, in_use) = (server.data_path_mode(), server.datapath_kind());
    tracing::info!(tunnels, data_path = %mode, %in_use, "upgrade: took over {tunnels} tunnel(s) (data-path={mode}, in use: {in_use})");
    Ok((server, control))
}

/// SIGTERM, SIGINT, or SIGHUP (the terminal of a foreground `proxyd run`
/// closed: by default it killed the daemon at once, dropping its tunnels and
/// leaving the control socket behind).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    let mut hup = signal(SignalKind::hangup()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` and the man page name every menu, command and property the
    /// schema describes (and the parser takes its names from the schema).
    #[test]
    fn help_and_man_page_cover_the_schema() {
        let help = command().render_long_help().to_string();
        let man = proxyd::manpage::render(&command());
        for def in schema::MENUS {
            let path = def.menu.to_string();
            let words = path.trim_start_matches('/');
            for c in def.commands {
                let line = format!("proxyd {words}{}{}", if words.is_empty() { "" } else { " " }, c.usage);
                assert!(help.contains(&line), "--help lacks `{line}`:\n{help}");
                assert!(man.contains(&roff_free(c.usage)), "the man page lacks {path} {}", c.usage);
            }
            for p in def.properties {
                assert!(
                    help.lines().any(|l| l.trim_start().starts_with(p.name) && l.contains(p.values)),
                    "--help lacks {path} property {} ({})",
                    p.name,
                    p.values
                );
                assert!(man.contains(&roff_free(p.name)), "the man page lacks {path} property {}", p.name);
            }
        }
        assert!(help.contains("SOCKS5"), "{help}");
    }

    /// The text as roff would have it (hyphens escaped).
    fn roff_free(s: &str) -> String {
        s.replace('-', "\\-")
    }
}
