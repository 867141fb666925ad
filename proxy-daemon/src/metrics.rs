//! Prometheus metrics: counters the server bumps as connections come and
//! go, and the text exposition (format 0.0.4) served on `metrics-address`
//! by a minimal HTTP/1.x responder (`GET /metrics`).
//!
//! This module owns its label values ([`RefusalReason`]) and renders from
//! [`Metrics`] plus a plain [`Snapshot`] of what is open, which the server
//! provides through [`Source`]: metrics knows nothing of the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::datapath::DataPathKind;

/// Upper bounds (seconds) of the handshake latency histogram buckets.
const HANDSHAKE_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

/// Why a connection got no tunnel, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The access list denied the request.
    Access,
    /// `max-connections` was reached.
    Limit,
    /// A malformed, slow, abandoned or unsupported handshake.
    Handshake,
    /// SOCKS5 login failed, or the method/version was refused.
    Auth,
    /// The destination could not be resolved or reached.
    Dial,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 5] = [Self::Access, Self::Limit, Self::Handshake, Self::Auth, Self::Dial];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::Limit => "limit",
            Self::Handshake => "handshake",
            Self::Auth => "auth",
            Self::Dial => "dial",
        }
    }
}

/// What is open at scrape time, counted by the server.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Open client connections by type label (`unknown`, `out`, `in`, `udp`), in print order.
    pub connections: Vec<(&'static str, u64)>,
    /// Bytes moved so far by the open tunnels, each way.
    pub open_tx: u64,
    pub open_rx: u64,
    /// Open tunnels on each data path right now.
    pub tunnels_kernel: u64,
    pub tunnels_userspace: u64,
    /// Tunnels promoted into the kernel splice and demoted back, so far.
    pub promoted: u64,
    pub demoted: u64,
    /// Retransmitted skbs whose already delivered head the kernel path cut
    /// off, and the bytes cut.
    pub retransmit_cut_skbs: u64,
    pub retransmit_cut_bytes: u64,
    /// The data path new tunnels use.
    pub data_path: DataPathKind,
}

/// Where the metrics endpoint gets its numbers.
pub trait Source: Send + Sync + 'static {
    fn metrics(&self) -> &Metrics;
    fn snapshot(&self) -> Snapshot;
}

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    accepted: AtomicU64,
    refused: [AtomicU64; RefusalReason::ALL.len()],
    /// Bytes of tunnels that have ended (open tunnels are added at scrape time).
    closed_tx: AtomicU64,
    closed_rx: AtomicU64,
    handshake_buckets: [AtomicU64; HANDSHAKE_BUCKETS.len()],
    handshake_count: AtomicU64,
    handshake_sum_ns: AtomicU64,
    /// New versions of the `--config` file that were refused.
    config_reload_errors: AtomicU64,
}

impl Metrics {
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, reason: RefusalReason) {
        let i = RefusalReason::ALL.iter().position(|r| *r == reason).expect("listed");
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A handshake ended in a tunnel after `took`.
    pub fn handshake_done(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (i, bound) in HANDSHAKE_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.handshake_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.handshake_count.fetch_add(1, Ordering::Relaxed);
        self.handshake_sum_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A new version of the `--config` file was refused.
    pub fn config_reload_failed(&self) {
        self.config_reload_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel ended having moved these bytes.
    pub fn tunnel_closed(&self, tx: u64, rx: u64) {
        self.closed_tx.fetch_add(tx, Ordering::Relaxed);
        self.closed_rx.fetch_add(rx, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in samples {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        metric(
            "proxyd_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            vec![(String::new(), load(&self.accepted))],
        );
        metric(
            "proxyd_connections_refused_total",
            "counter",
            "Client connections that got no tunnel, by reason.",
            RefusalReason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("{{reason=\"{}\"}}", r.as_str()), load(&self.refused[i])))
                .collect(),
        );
        metric(
            "proxyd_connections_active",
            "gauge",
            "Open client connections, by type.",
            snap.connections.iter().map(|(t, n)| (format!("{{type=\"{t}\"}}"), n.to_string())).collect(),
        );
        metric(
            "proxyd_bytes_total",
            "counter",
            "Bytes relayed: tx from clients towards destinations, rx back.",
            vec![
                ("{direction=\"tx\"}".into(), (self.closed_tx.load(Ordering::Relaxed) + snap.open_tx).to_string()),
                ("{direction=\"rx\"}".into(), (self.closed_rx.load(Ordering::Relaxed) + snap.open_rx).to_string()),
            ],
        );
        let (promoted, demoted) = (snap.promoted, snap.demoted);
        metric(
            "proxyd_tunnel_path_switches_total",
            "counter",
            "Tunnels moved between the relay and the kernel splice: promoted (into the sockhash from the relay: interactive under auto; under kernel, spliced again after the relay carried it) and demoted (a peer fell behind).",
            vec![("{switch=\"promoted\"}".into(), promoted.to_string()), ("{switch=\"demoted\"}".into(), demoted.to_string())],
        );
        metric(
            "proxyd_kernel_retransmit_cuts_total",
            "counter",
            "Retransmitted segments overlapping bytes a spliced socket had already received, whose old head the kernel path cut off before forwarding: segments and bytes.",
            vec![
                ("{unit=\"segments\"}".into(), snap.retransmit_cut_skbs.to_string()),
                ("{unit=\"bytes\"}".into(), snap.retransmit_cut_bytes.to_string()),
            ],
        );
        metric(
            "proxyd_tunnels_active",
            "gauge",
            "Open tunnels, by what moves their bytes right now.",
            [(DataPathKind::Kernel, snap.tunnels_kernel), (DataPathKind::Userspace, snap.tunnels_userspace)]
                .iter()
                .map(|(p, n)| (format!("{{path=\"{p}\"}}"), n.to_string()))
                .collect(),
        );
        metric(
            "proxyd_config_reload_errors_total",
            "counter",
            "New versions of the --config file that were refused (the running configuration stayed).",
            vec![(String::new(), load(&self.config_reload_errors))],
        );
        let mut hist: Vec<(String, String)> = HANDSHAKE_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("_bucket{{le=\"{b}\"}}"), load(&self.handshake_buckets[i])))
            .collect();
        hist.push(("_bucket{le=\"+Inf\"}".into(), load(&self.handshake_count)));
        hist.push(("_sum".into(), format!("{}", self.handshake_sum_ns.load(Ordering::Relaxed) as f64 / 1e9)));
        hist.push(("_count".into(), load(&self.handshake_count)));
        out.push_str("# HELP proxyd_handshake_duration_seconds From accept to tunnel up.\n# TYPE proxyd_handshake_duration_seconds histogram\n");
        for (suffix, v) in hist {
            out.push_str(&format!("proxyd_handshake_duration_seconds{suffix} {v}\n"));
        }
        let kind = snap.data_path;
        out.push_str(&format!(
            "# HELP proxyd_data_path_info The data path new tunnels use.\n# TYPE proxyd_data_path_info gauge\nproxyd_data_path_info{{path=\"{kind}\"}} 1\n"
        ));
        out
    }
}

/// Serves `GET /metrics` until the task is aborted.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut req)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let line = String::from_utf8_lossy(&req[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
                ("200 OK", source.metrics().render(&source.snapshot()))
            } else {
                ("404 Not Found", "see /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition text: every family with HELP and TYPE, counters plus
    /// what the snapshot says is open, the histogram's cumulative buckets.
    #[test]
    fn renders_counters_and_snapshot() {
        let m = Metrics::default();
        m.accepted();
        m.accepted();
        m.refused(RefusalReason::Access);
        m.refused(RefusalReason::Dial);
        m.refused(RefusalReason::Dial);
        m.handshake_done(Duration::from_micros(700));
        m.tunnel_closed(100, 2000);
        let snap = Snapshot {
            connections: vec![("unknown", 1), ("out", 3), ("in", 0), ("udp", 0)],
            open_tx: 5,
            open_rx: 7,
            tunnels_kernel: 2,
            tunnels_userspace: 1,
            promoted: 4,
            demoted: 1,
            retransmit_cut_skbs: 2,
            retransmit_cut_bytes: 3000,
            data_path: DataPathKind::Kernel,
        };
        let text = m.render(&snap);
        for line in [
            "# TYPE proxyd_connections_accepted_total counter",
            "proxyd_connections_accepted_total 2",
            "proxyd_connections_refused_total{reason=\"access\"} 1",
            "proxyd_connections_refused_total{reason=\"limit\"} 0",
            "proxyd_connections_refused_total{reason=\"dial\"} 2",
            "proxyd_connections_active{type=\"out\"} 3",
            "proxyd_bytes_total{direction=\"tx\"} 105",
            "proxyd_bytes_total{direction=\"rx\"} 2007",
            "proxyd_tunnel_path_switches_total{switch=\"promoted\"} 4",
            "proxyd_kernel_retransmit_cuts_total{unit=\"segments\"} 2",
            "proxyd_kernel_retransmit_cuts_total{unit=\"bytes\"} 3000",
            "proxyd_tunnels_active{path=\"kernel\"} 2",
            "proxyd_tunnels_active{path=\"userspace\"} 1",
            "proxyd_handshake_duration_seconds_bucket{le=\"0.0005\"} 0",
            "proxyd_handshake_duration_seconds_bucket{le=\"0.001\"} 1",
            "proxyd_handshake_duration_seconds_bucket{le=\"+Inf\"} 1",
            "proxyd_handshake_duration_seconds_sum 0.0007",
            "proxyd_handshake_duration_seconds_count 1",
            "proxyd_data_path_info{path=\"kernel\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        // Every sample's family was announced before it.
        let mut announced = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                announced.push(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(announced.iter().any(|f| name.starts_with(f.as_str())), "{name} before its TYPE");
            }
        }
    }
}
