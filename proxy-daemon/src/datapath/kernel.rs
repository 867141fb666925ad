//! The kernel data path: sockhash + `sk_skb` stream verdict (see issue 3).
//! Until it lands, loading always fails and `auto` falls back to the relay.

use std::io;
use std::path::Path;

use super::{DataPath, DataPathKind, Pair, Tunnel};
use tokio_util::sync::CancellationToken;

pub struct KernelDataPath {
    _private: (),
}

impl KernelDataPath {
    /// Loads and attaches the BPF programs, pinning maps under `pin_dir`.
    pub fn load(_pin_dir: &Path) -> Result<Self, io::Error> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel data path is not built yet"))
    }
}

impl DataPath for KernelDataPath {
    fn kind(&self) -> DataPathKind {
        DataPathKind::Kernel
    }
    fn attach(&self, _pair: Pair, _cancel: CancellationToken) -> io::Result<Tunnel> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel data path is not built yet"))
    }
}
