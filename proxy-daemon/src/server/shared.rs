//! What every connection task reads: the configuration in force, the data
//! path new tunnels take, the connections list, the counters, and the pacing
//! of rate-limited users. The [`Server`](super::Server) owns one and swaps
//! the configuration and data path in it; the connection tasks
//! ([`super::conn`]) see only this.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::task::TaskTracker;

use super::registry::Registry;
use crate::config::{Config, DataPathMode};
use crate::datapath::userspace::{Limits, RateLimit};
use crate::datapath::{DataPathKind, SharedDataPath};
use crate::metrics::Metrics;

pub struct Shared {
    config: RwLock<Arc<Config>>,
    pub registry: Arc<Registry>,
    /// The data path new tunnels take, with the `data-path` mode it serves:
    /// the saved setting, or the one `run --data-path` gave until a `set
    /// data-path=` names one. Swapped together, so the two never disagree.
    datapath: RwLock<(DataPathMode, SharedDataPath)>,
    /// Pacing of rate-limited users, by name, with the rate it was made for.
    user_limits: Mutex<HashMap<String, (u64, Limits)>>,
    /// Prometheus counters.
    pub metrics: Metrics,
    /// Every connection task (and so every tunnel: a connection task ends
    /// after its tunnel), for shutdown to wait on.
    pub tasks: TaskTracker,
}

impl Shared {
    pub fn new(config: Config, mode: DataPathMode, datapath: SharedDataPath) -> Self {
        Shared {
            config: RwLock::new(Arc::new(config)),
            registry: Arc::new(Registry::default()),
            datapath: RwLock::new((mode, datapath)),
            user_limits: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            tasks: TaskTracker::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// The data path new tunnels take.
    pub fn datapath(&self) -> SharedDataPath {
        self.datapath.read().unwrap().1.clone()
    }

    /// The `data-path` mode new tunnels follow.
    pub fn data_path_mode(&self) -> DataPathMode {
        self.datapath.read().unwrap().0
    }

    pub fn datapath_kind(&self) -> DataPathKind {
        self.datapath().kind()
    }

    pub(super) fn set_config(&self, config: Config) {
        *self.config.write().unwrap() = Arc::new(config);
    }

    pub(super) fn set_datapath(&self, mode: DataPathMode, datapath: SharedDataPath) {
        *self.datapath.write().unwrap() = (mode, datapath);
    }

    /// The pacing shared by all tunnels of `user` at `bits_per_sec` each way.
    pub fn user_limits(&self, user: &str, bits_per_sec: u64) -> Limits {
        let mut map = self.user_limits.lock().unwrap();
        match map.get(user) {
            Some((rate, limits)) if *rate == bits_per_sec => limits.clone(),
            _ => {
                let limits =
                    Limits { up: Arc::new(RateLimit::new(bits_per_sec)), down: Arc::new(RateLimit::new(bits_per_sec)) };
                map.insert(user.to_owned(), (bits_per_sec, limits.clone()));
                limits
            }
        }
    }
}
