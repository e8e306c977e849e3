//! A fleet of Cisterns acting as one cache (`cluster`): three real
//! processes on 127.0.0.1, .2 and .3, one origin. Each object is fetched
//! from the origin once for the whole fleet; peer requests need the
//! cluster secret; a dead peer is skipped and its keys filled from the
//! origin.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cistern, Origin, Resource, get, pattern, request};
use sha2::{Digest, Sha256};

const SECRET: &str = "fleet-secret-0123456789";
const NODES: [&str; 3] = ["a", "b", "c"];

/// The three nodes, node `i` on 127.0.0.(i+1), all on one port, each
/// with its admin listener on one other port of its own address.
struct Fleet {
    nodes: Vec<Option<Cistern>>,
    admin: Vec<SocketAddr>,
    _dirs: Vec<tempfile::TempDir>,
}

fn config(
    origin: &Origin,
    node: &str,
    ip: &str,
    (port, admin): (u16, u16),
    root: &Path,
    extra: &str,
) -> String {
    let peers: String = NODES
        .iter()
        .enumerate()
        .map(|(i, n)| format!("    peer \"{n}\" \"http://127.0.0.{}:{port}\"\n", i + 1))
        .collect();
    format!(
        r#"
listen "{ip}:{port}"
admin {{
    listen "{ip}:{admin}"
}}
store {{
    root "{root}"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{origin}/"
}}
cluster {{
    node "{node}"
{peers}    secret "{SECRET}"
    {extra}
}}
"#,
        origin = origin.addr,
        root = root.display(),
    )
}

fn start_fleet(origin: &Origin) -> Fleet {
    start_fleet_with(origin, "")
}

/// [`start_fleet`] with `extra` added to every node's `cluster` block.
fn start_fleet_with(origin: &Origin, extra: &str) -> Fleet {
    let port = common::free_port();
    let admin_port = common::free_port();
    let mut nodes = Vec::new();
    let mut admin = Vec::new();
    let mut dirs = Vec::new();
    for (i, name) in NODES.iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 1);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replica");
        let text = config(origin, name, &ip, (port, admin_port), &root, extra);
        std::fs::write(dir.path().join("config.kdl"), text).unwrap();
        let log = std::fs::File::create(dir.path().join("cistern.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["--config", "config.kdl"])
            .current_dir(dir.path())
            .env("CISTERN_LOG", "info,cistern=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cistern");
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let node = Cistern {
            child,
            addr,
            dir: dir.path().to_owned(),
            root,
        };
        wait_listening(&node);
        nodes.push(Some(node));
        admin.push(format!("{ip}:{admin_port}").parse().unwrap());
        dirs.push(dir);
    }
    Fleet {
        nodes,
        admin,
        _dirs: dirs,
    }
}

fn wait_listening(node: &Cistern) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(node.addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cistern did not start; log:\n{}", node.log());
}

impl Fleet {
    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].as_ref().expect("node is running").addr
    }

    /// A counter of node `i`'s `/metrics`, summed over its samples.
    async fn metric(&self, i: usize, name: &str) -> u64 {
        let text = get(self.admin[i], "/metrics").await;
        let text = String::from_utf8_lossy(text.bytes()).into_owned();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_clients_over_three_nodes_cause_one_upstream_fetch() {
    const SIZE: usize = 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(13, SIZE);
    let want = sha(&body);
    // 16 chunks of 64 KiB, 25 ms apart: the fills overlap.
    origin.put(
        "/cold.bin",
        Resource::new(body).slow(Duration::from_millis(25)),
    );
    let fleet = start_fleet(&origin);

    let mut clients = Vec::new();
    for n in 0..30 {
        let addr = fleet.addr(n % 3);
        clients.push(tokio::spawn(
            async move { get(addr, "/files/cold.bin").await },
        ));
    }
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.bytes().len(), SIZE);
        assert_eq!(sha(got.bytes()), want, "a client got other bytes");
    }
    assert_eq!(
        origin.hits("/cold.bin"),
        1,
        "the fleet fetched the object from the origin more than once"
    );
    // Two nodes filled from the owner, one from the origin.
    let mut peer_bytes = Vec::new();
    let mut upstream_bytes = Vec::new();
    for i in 0..3 {
        peer_bytes.push(fleet.metric(i, "cistern_peer_bytes_total").await);
        upstream_bytes.push(fleet.metric(i, "cistern_upstream_bytes_total").await);
    }
    assert_eq!(
        peer_bytes.iter().sum::<u64>(),
        2 * SIZE as u64,
        "{peer_bytes:?}"
    );
    assert_eq!(
        upstream_bytes.iter().sum::<u64>(),
        SIZE as u64,
        "{upstream_bytes:?}"
    );
    // Every node stored its own copy (`store-on` every node): a hit now.
    for i in 0..3 {
        let got = get(fleet.addr(i), "/files/cold.bin").await;
        assert_eq!(
            got.header("cache-status").split(';').nth(1),
            Some(" hit"),
            "node {i}"
        );
        assert_eq!(sha(got.bytes()), want);
    }
    assert_eq!(origin.hits("/cold.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_path_is_refused_without_the_secret() {
    let origin = Origin::start().await;
    origin.put("/p.bin", Resource::new(pattern(3, 4096)));
    let fleet = start_fleet(&origin);
    let b = fleet.addr(1);
    let target = "/_cistern/peer//files/p.bin";
    let none = request(b, "GET", target, &[]).await;
    assert_eq!(none.status, 403);
    let wrong = request(
        b,
        "GET",
        target,
        &[("cistern-peer-secret", "fleet-secret-0123456780")],
    )
    .await;
    assert_eq!(wrong.status, 403);
    assert_eq!(
        origin.hits("/p.bin"),
        0,
        "a refused peer request reached the origin"
    );
    // With the secret the owner serves it (from the origin, never a peer).
    let right = request(b, "GET", target, &[("cistern-peer-secret", SECRET)]).await;
    assert_eq!(right.status, 200);
    assert_eq!(sha(right.bytes()), sha(&pattern(3, 4096)));
    assert_eq!(origin.hits("/p.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_is_skipped_and_its_keys_come_from_the_origin() {
    let origin = Origin::start().await;
    for i in 0..40 {
        origin.put(&format!("/f{i}.bin"), Resource::new(pattern(i as u8, 8192)));
    }
    let mut fleet = start_fleet(&origin);
    fleet.nodes[2].take().unwrap().kill9();
    // Files until node a has met the dead owner c at least once (each
    // file is c's with odds 1/3, so 40 are plenty).
    let mut met_dead_owner = false;
    for i in 0..40 {
        let path = format!("/files/f{i}.bin");
        for node in 0..2 {
            let got = get(fleet.addr(node), &path).await;
            assert_eq!(got.status, 200, "{path} through node {node}");
            assert_eq!(sha(got.bytes()), sha(&pattern(i as u8, 8192)), "{path}");
        }
        if fleet.metric(0, "cistern_peer_failures_total").await > 0 {
            met_dead_owner = true;
            break;
        }
    }
    assert!(met_dead_owner, "no file was owned by the dead node");
    let peers = get(fleet.admin[0], "/api/peers").await;
    let json: serde_json::Value = serde_json::from_slice(peers.bytes()).unwrap();
    assert_eq!(json["node"], "a");
    let c = json["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "c")
        .expect("c is listed");
    assert_eq!(c["down"], true, "{json}");
    // A file c owns, asked again through a: c is skipped at once.
    let up = fleet.metric(0, "cistern_peer_up").await;
    assert_eq!(up, 1, "b is up, c is down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_store_on_owner_only_the_owner_keeps_the_file() {
    const SIZE: usize = 256 * 1024;
    let origin = Origin::start().await;
    let body = pattern(21, SIZE);
    let want = sha(&body);
    origin.put("/once.bin", Resource::new(body));
    let fleet = start_fleet_with(&origin, "store-on \"owner\"");
    let mut hits = 0;
    for round in 0..2 {
        for i in 0..3 {
            let got = get(fleet.addr(i), "/files/once.bin").await;
            assert_eq!(got.status, 200);
            assert_eq!(sha(got.bytes()), want, "round {round}, node {i}");
            if round == 1 && got.header("cache-status") == "cistern; hit" {
                hits += 1;
            }
        }
    }
    assert_eq!(hits, 1, "only the owner kept the file");
    assert_eq!(origin.hits("/once.bin"), 1);
    let mut peer_bytes = 0;
    for i in 0..3 {
        peer_bytes += fleet.metric(i, "cistern_peer_bytes_total").await;
    }
    // Two non-owners, each served it twice through the owner.
    assert_eq!(peer_bytes, 4 * SIZE as u64);
}
