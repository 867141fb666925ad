//! A fleet of three proxyd nodes behind one virtual address, as Kubernetes
//! runs it: each node in its own network namespace on a bridge, all given
//! the same `--config` file; a load-balancer namespace spreads new
//! connections to the virtual address over the nodes with nftables
//! (`numgen` + DNAT, the mechanism of kube-proxy's nftables mode); clients
//! in another namespace. Addresses: 10.231.0.0/16, only inside the
//! namespaces the test makes.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use proxyd_tests::in_ns;
use proxyd_tests::{find_program, require_root, skip_or_fail, text, wait_until, Daemon, Options};

const VIP: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 231, 9, 9), 1080);
const NODES: [&str; 3] = ["10.231.2.11", "10.231.2.12", "10.231.2.13"];
const CLIENTS: usize = 300;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {} failed: {}", args.join(" "), text(&out.stderr));
    text(&out.stdout)
}

/// The namespaces: `lb` (a bridge to the nodes, a veth to the clients, the
/// virtual address's DNAT), `n0`..`n2` (one node each) and `cl` (clients).
struct Fleet {
    lb: String,
    cl: String,
    nodes: Vec<String>,
    dir: PathBuf,
}

impl Fleet {
    fn new() -> Fleet {
        let tag = proxyd_tests::unique_tag();
        let f = Fleet {
            lb: format!("proxyd-fleet-{tag}-lb"),
            cl: format!("proxyd-fleet-{tag}-cl"),
            nodes: (0..3).map(|i| format!("proxyd-fleet-{tag}-n{i}")).collect(),
            dir: std::env::temp_dir().join(format!("proxyd-fleet-{tag}")),
        };
        std::fs::create_dir_all(&f.dir).unwrap();
        for ns in [&f.lb, &f.cl].into_iter().chain(&f.nodes) {
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        let lb = f.lb.as_str();
        run("ip", &["-n", lb, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", lb, "addr", "add", "10.231.2.1/24", "dev", "br0"]);
        run("ip", &["-n", lb, "link", "set", "br0", "up"]);
        for (i, ns) in f.nodes.iter().enumerate() {
            let (outer, inner) = (format!("nb{i}"), format!("eth{i}"));
            run("ip", &["-n", lb, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", ns]);
            run("ip", &["-n", lb, "link", "set", &outer, "master", "br0", "up"]);
            run("ip", &["-n", ns, "addr", "add", &format!("{}/24", NODES[i]), "dev", &inner]);
            run("ip", &["-n", ns, "link", "set", &inner, "up"]);
            // Replies go back through the load balancer, which undoes its DNAT.
            run("ip", &["-n", ns, "route", "add", "default", "via", "10.231.2.1"]);
        }
        run("ip", &["-n", lb, "link", "add", "lbc", "type", "veth", "peer", "name", "cle", "netns", &f.cl]);
        run("ip", &["-n", lb, "addr", "add", "10.231.1.1/24", "dev", "lbc"]);
        run("ip", &["-n", lb, "link", "set", "lbc", "up"]);
        run("ip", &["-n", &f.cl, "addr", "add", "10.231.1.2/24", "dev", "cle"]);
        run("ip", &["-n", &f.cl, "link", "set", "cle", "up"]);
        run("ip", &["-n", &f.cl, "route", "add", "default", "via", "10.231.1.1"]);
        run("ip", &["netns", "exec", lb, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        f.balance(&NODES);
        f
    }

    /// Spreads new connections to the virtual address over `nodes`, round
    /// robin (what kube-proxy does with a Service's ready endpoints).
    fn balance(&self, nodes: &[&str]) {
        let map: Vec<String> = nodes.iter().enumerate().map(|(i, a)| format!("{i} : {a}")).collect();
        let rules = format!(
            "flush ruleset\ntable ip fleet {{\n  chain pre {{\n    type nat hook prerouting priority -100;\n    ip daddr {} tcp dport {} dnat to numgen inc mod {} map {{ {} }}\n  }}\n}}\n",
            VIP.ip(),
            VIP.port(),
            nodes.len(),
            map.join(", ")
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.lb, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft: {}\n{rules}", text(&out.stderr));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for ns in [&self.cl, &self.lb].into_iter().chain(&self.nodes) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SOCKS4 CONNECT through the virtual address from the client namespace:
/// the reply code (90 granted, 91 refused, 0 no answer) and the stream.
fn connect(dst: SocketAddrV4) -> (u8, Option<TcpStream>) {
    let Ok(mut c) = TcpStream::connect_timeout(&SocketAddr::V4(VIP), Duration::from_secs(3)) else {
        return (0, None);
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = vec![4, 1];
    req.extend_from_slice(&dst.port().to_be_bytes());
    req.extend_from_slice(&dst.ip().octets());
    req.push(0);
    if c.write_all(&req).is_err() {
        return (0, None);
    }
    let mut reply = [0u8; 8];
    match c.read_exact(&mut reply) {
        Ok(()) => (reply[1], Some(c)),
        Err(_) => (0, None),
    }
}

fn config(rules: &str) -> String {
    format!(
        "/ip socks\nset enabled=yes port=1080 listen-address=0.0.0.0 max-connections=1000\n/ip socks access\n{rules}"
    )
}

#[test]
fn three_nodes_one_config_behind_one_address() {
    if !require_root("three_nodes_one_config_behind_one_address") {
        return;
    }
    for program in ["ip", "nft"] {
        if find_program(program).is_none() {
            skip_or_fail(
                "three_nodes_one_config_behind_one_address",
                &format!("`{program}` not found (cargo xtask setup)"),
            );
            return;
        }
    }
    let fleet = Fleet::new();
    let file = fleet.dir.join("config.rsc");
    std::fs::write(&file, config("add src-address=10.231.1.0/24 action=allow\nadd action=deny\n")).unwrap();
    let mut daemons: Vec<Daemon> = fleet
        .nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let tag = fleet.dir.file_name().unwrap().to_string_lossy().into_owned();
            let args = vec![
                "--config".into(),
                file.display().to_string(),
                "--bpf-pin-dir".into(),
                format!("/sys/fs/bpf/{tag}-{i}"),
            ];
            in_ns(ns, || Daemon::start_with("userspace", Options { args, ..Options::default() }))
        })
        .collect();
    // The destination: an echo server on the load balancer's bridge address.
    let dst = proxyd_tests::fixtures::EchoServer::start_in(&fleet.lb, "10.231.2.1:0").addr;
    let ready = in_ns(&fleet.cl, || wait_until(Duration::from_secs(10), || connect(dst).0 == 90));
    assert!(ready, "no node answers through {VIP}:\n{}", daemons[0].log());

    // 300 clients through the virtual address, spread over the three nodes.
    let mut tunnels: Vec<TcpStream> = in_ns(&fleet.cl, || {
        (0..CLIENTS)
            .map(|i| {
                let (code, s) = connect(dst);
                assert_eq!(code, 90, "client {i} was refused");
                let mut s = s.unwrap();
                s.write_all(b"hi").unwrap();
                let mut b = [0u8; 2];
                s.read_exact(&mut b).unwrap();
                s
            })
            .collect()
    });
    let counts: Vec<usize> =
        daemons.iter().map(|d| d.cmd("ip socks connections print count-only").trim().parse().unwrap()).collect();
    eprintln!("fleet: {CLIENTS} tunnels over the nodes: {counts:?}");
    assert!(counts.iter().all(|&n| n > 0), "a node got no client: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), CLIENTS, "the nodes' lists do not add up to the open tunnels: {counts:?}");

    // One change to the file changes the decision on all three within 2 s.
    let t = std::time::Instant::now();
    std::fs::write(&file, config("add src-address=10.231.1.0/24 action=deny\nadd action=allow\n")).unwrap();
    let denied = in_ns(&fleet.cl, || wait_until(Duration::from_secs(2), || (0..6).all(|_| connect(dst).0 == 91)));
    assert!(denied, "the new file was not applied on every node within 2 s");
    eprintln!("fleet: the deny reached all three nodes in {:?}", t.elapsed());
    // Open tunnels stay (no --config-enforce).
    for s in tunnels.iter_mut().step_by(37) {
        s.write_all(b"ok").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
    }

    // A file with a bad line is refused on all three, with its line number; nothing changes.
    std::fs::write(&file, "/ip socks access\nadd action=allow\nadd action=perhaps\n").unwrap();
    for d in &daemons {
        assert!(
            wait_until(Duration::from_secs(3), || d.log().contains("config.rsc:3:")),
            "a node did not report line 3:\n{}",
            d.log()
        );
    }
    assert!(in_ns(&fleet.cl, || (0..6).all(|_| connect(dst).0 == 91)), "a refused file changed a decision");

    // Back to allowing, then one node dies: with its endpoint gone from the
    // balancer (as kube-proxy does for a pod that is not ready), new
    // connections succeed on the other two.
    std::fs::write(&file, config("add src-address=10.231.1.0/24 action=allow\nadd action=deny\n")).unwrap();
    assert!(in_ns(&fleet.cl, || wait_until(Duration::from_secs(2), || (0..6).all(|_| connect(dst).0 == 90))));
    daemons[2].kill9();
    fleet.balance(&NODES[..2]);
    let ok = in_ns(&fleet.cl, || (0..20).filter(|_| connect(dst).0 == 90).count());
    assert_eq!(ok, 20, "new connections failed with one node down");
    drop(tunnels);
}
