//! `proxyd run --config FILE`: the configuration is a RouterOS script the
//! operator owns (a file in Git, a Kubernetes ConfigMap). It is applied at
//! start and whenever the file changes: inotify on its folder sees an edit in
//! place and the symlink swap Kubernetes does for a mounted ConfigMap
//! (`..data` replaced). The new file is parsed and checked whole and applied
//! as one change, or refused whole (its line number in the log, and
//! `proxyd_config_reload_errors_total`), the running configuration untouched.
//! Control-socket changes are refused meanwhile (see `Controller`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::Controller;
use crate::config::{store, Config};

/// Reads and checks `path` whole: the configuration it describes, from the
/// defaults. Errors name the file and line.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    store::run_script(&text, path, Config::default(), &mut |_, _| {}).map_err(|e| e.to_string())
}

/// Watches `path`'s folder and applies the file each time it changes, until
/// the process ends.
pub async fn watch(controller: Arc<Controller>, path: PathBuf, enforce: bool) {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => return tracing::error!("--config: inotify: {e}; changes to {} are not seen", path.display()),
    };
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY;
    if let Err(e) = inotify.add_watch(&dir, mask) {
        return tracing::error!(
            "--config: watching {}: {e}; changes to {} are not seen",
            dir.display(),
            path.display()
        );
    }
    // Through a symlink (a ConfigMap's `..data/...`), the folder the file
    // really is in too, so an edit there is seen; again after each change.
    let follow = |inotify: &Inotify| {
        if let Some(real) = std::fs::canonicalize(&path).ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
            let _ = inotify.add_watch(&real, mask);
        }
    };
    follow(&inotify);
    let readiness = match std::os::fd::AsFd::as_fd(&inotify).try_clone_to_owned().and_then(crate::sys::async_fd) {
        Ok(fd) => fd,
        Err(e) => return tracing::error!("--config: {e}; changes to {} are not seen", path.display()),
    };
    let mut last = std::fs::read(&path).ok();
    loop {
        let Ok(mut guard) = readiness.readable().await else { return };
        guard.clear_ready();
        while inotify.read_events().is_ok_and(|events| !events.is_empty()) {}
        // A ConfigMap update is several renames: let them land.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while inotify.read_events().is_ok_and(|events| !events.is_empty()) {}
        follow(&inotify);
        let now = std::fs::read(&path).ok();
        if now.is_none() || now == last {
            continue;
        }
        last = now;
        match load(&path) {
            Ok(config) => {
                let response = controller.apply_declarative(config, enforce).await;
                if response.exit == 0 {
                    tracing::info!(config = %path.display(), "configuration reloaded");
                } else {
                    controller.reload_failed(&format!("{}: {}", path.display(), response.stderr.trim()));
                }
            }
            Err(e) => controller.reload_failed(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The ConfigMap in packaging/kubernetes holds a script this parser
    /// takes whole (the fleet's nodes would refuse it otherwise).
    #[test]
    fn the_kubernetes_configmap_loads() {
        let yaml = include_str!("../../../packaging/kubernetes/configmap.yaml");
        let start = yaml.find("config.rsc: |\n").expect("the ConfigMap has config.rsc") + "config.rsc: |\n".len();
        let script: String = yaml[start..]
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        let dir = std::env::temp_dir().join(format!("proxyd-configmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.rsc");
        std::fs::write(&file, &script).unwrap();
        let config = super::load(&file).unwrap_or_else(|e| panic!("{e}\n{script}"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(config.settings.enabled && config.settings.port == 1080, "{script}");
        assert_eq!(config.access.rules.len(), 2, "{script}");
        assert!(config.settings.metrics_address.is_some(), "the probes and the scrape need metrics-address");
    }
}
