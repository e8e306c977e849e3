//! A fleet of Cisterns acting as one cache (`cluster`): three real
//! processes on 127.0.0.1, .2 and .3, one origin. Each object is fetched
//! from the origin once for the whole fleet; peer requests need the
//! cluster secret; a dead peer is skipped and its keys filled from the
//! origin. A file named by its SHA-256 (`by-hash/SHA256/…`) comes from a
//! peer that holds that content under any name, checked against the
//! digest; an owner whose upstream fails stays up; a node killed
//! mid-fill fails its readers visibly (or they resume) and the next
//! request succeeds through the others. The admin's Fleet page shows it.

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
forward {{
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

/// The index in [`NODES`] of `key`'s owner: the rendezvous hash of
/// `host/src/fetch/peer.rs` (FNV-1a, then SplitMix64's finalizer),
/// written out again so the test picks its nodes on purpose.
fn owner_of(key: &str) -> usize {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn hash(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        mix(h)
    }
    let file = hash(key.as_bytes());
    (0..NODES.len())
        .max_by_key(|i| mix(hash(NODES[*i].as_bytes()) ^ file))
        .unwrap()
}

/// The files below `root` whose name is `name`, with their SHA-256.
fn replica_files(root: &Path, name: &str) -> Vec<(String, [u8; 32])> {
    common::find_files(root)
        .into_iter()
        .filter(|f| f.ends_with(name))
        .map(|f| {
            let bytes = std::fs::read(root.join(&f)).unwrap();
            (f, sha(&bytes))
        })
        .collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_named_by_its_digest_comes_from_a_peer_that_holds_it() {
    const SIZE: usize = 300 * 1024;
    let origin = Origin::start().await;
    let body = pattern(31, SIZE);
    let want = sha(&body);
    // apt's two names for one index file: the canonical one, and the
    // content-addressed one it asks for with Acquire-By-Hash.
    let dir = "/dists/stable/main/binary-amd64";
    let canonical = format!("{dir}/Packages.xz");
    let by_hash = format!("{dir}/by-hash/SHA256/{}", hex::encode(want));
    origin.put(&canonical, Resource::new(body.clone()));
    origin.put(&by_hash, Resource::new(body));
    let fleet = start_fleet(&origin);

    let got = get(fleet.addr(0), &format!("/files{canonical}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(sha(got.bytes()), want);
    // Node a holds the content now; b and c ask for it by its name in
    // by-hash, and a peer that holds the digest serves it.
    for i in 1..3 {
        let got = get(fleet.addr(i), &format!("/files{by_hash}")).await;
        assert_eq!(got.status, 200, "node {i}");
        assert_eq!(sha(got.bytes()), want, "node {i}");
    }
    assert_eq!(
        origin.hits(&by_hash),
        0,
        "the origin was asked for content a peer held"
    );
    assert_eq!(origin.hits(&canonical), 1);
    let mut peer_bytes = 0;
    for i in 1..3 {
        peer_bytes += fleet.metric(i, "cistern_peer_bytes_total").await;
    }
    assert!(peer_bytes >= 2 * SIZE as u64, "{peer_bytes}");
    // And the copy is kept: a hit on each node now.
    for i in 1..3 {
        let got = get(fleet.addr(i), &format!("/files{by_hash}")).await;
        assert_eq!(got.header("cache-status"), "cistern; hit", "node {i}");
    }
}

/// A fleet member gone bad: a loopback server with the cluster's port
/// on node c's address that answers every request for content by digest
/// with `len` wrong bytes (and every other request with a 503); it
/// counts the requests by digest that carried the secret.
async fn fake_peer(addr: SocketAddr, len: usize) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let by_digest = head.starts_with("get /_cistern/peer/by-sha256/");
                if by_digest
                    && head.contains(&format!(
                        "cistern-peer-secret: {}",
                        SECRET.to_ascii_lowercase()
                    ))
                {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let answer = if by_digest {
                    let mut a = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\netag: \"v1\"\r\nconnection: close\r\n\r\n"
                    )
                    .into_bytes();
                    a.extend_from_slice(&pattern(99, len));
                    a
                } else {
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_vec()
                };
                let _ = conn.write_all(&answer).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    asked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_wrong_bytes_for_a_digest_is_refused_and_the_origin_serves() {
    const SIZE: usize = 200 * 1024;
    let origin = Origin::start().await;
    let body = pattern(41, SIZE);
    let want = sha(&body);
    let name = hex::encode(want);
    let path = format!("/dists/stable/main/by-hash/SHA256/{name}");
    origin.put(&path, Resource::new(body));
    let mut fleet = start_fleet(&origin);
    let c = fleet.addr(2);
    fleet.nodes[2].take().unwrap().kill9();
    let asked = fake_peer(c, SIZE).await;

    // Node a asks b (which has nothing) and the fake c by digest.
    let first = get(fleet.addr(0), &format!("/files{path}")).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the fake peer was asked by digest, with the secret"
    );
    // Its bytes never pass for the file: the length is known, so the
    // last byte waits for the digest, which fails: a failed transfer.
    if let Ok(bytes) = &first.body {
        assert_eq!(
            sha(bytes),
            want,
            "a client got the wrong peer's bytes as complete"
        );
    }
    assert!(first.body.is_err(), "the wrong bytes were not noticed");
    // The bad peer is marked down; the next request gets the origin's.
    let second = get(fleet.addr(0), &format!("/files{path}")).await;
    assert_eq!(second.status, 200);
    assert_eq!(sha(second.bytes()), want);
    assert_eq!(origin.hits(&path), 1);
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Nothing wrong is kept: every copy of the file on a is the origin's.
    let root = &fleet.nodes[0].as_ref().unwrap().root;
    let copies = replica_files(root, &name);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(copies.iter().all(|(_, d)| *d == want), "{copies:?}");
    let peers = get(fleet.admin[0], "/api/peers").await;
    let json: serde_json::Value = serde_json::from_slice(peers.bytes()).unwrap();
    let c = json["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "c")
        .unwrap();
    assert_eq!(c["down"], true, "{json}");
    assert!(
        c["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("wrong bytes"),
        "{json}"
    );
}

/// Node `asker` reads a 2 MiB file that its owner fills slowly from the
/// origin, through the mirror or (`forward`) the forward proxy; the owner
/// is killed with the client at 256 KiB. Returns what
/// the client's transfer came to (the whole body, or its error), after
/// checking that the next request on the asker and on the third node
/// succeeds through the nodes left.
async fn kill_the_owner_mid_fill(validators: bool, forward: bool) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    const SIZE: usize = 2 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(51, SIZE);
    let want = sha(&body);
    // 32 chunks of 64 KiB, 40 ms apart: about 1.3 s of filling.
    let mut file = Resource::new(body).slow(Duration::from_millis(40));
    if !validators {
        file.headers.clear();
    }
    origin.put("/big.bin", file);
    let mut fleet = start_fleet(&origin);
    let owner = owner_of(&format!("http://{}/big.bin", origin.addr));
    let (asker, third) = ((owner + 1) % 3, (owner + 2) % 3);
    let target = if forward {
        format!("http://{}/big.bin", origin.addr)
    } else {
        "/files/big.bin".to_owned()
    };

    let resp = common::send(fleet.addr(asker), "GET", &target, &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 256 * 1024 {
        let frame = body.frame().await.expect("more body").expect("a frame");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    // The owner, filling from the origin for the asker, dies.
    fleet.nodes[owner].take().unwrap().kill9();
    let outcome = match body.collect().await {
        Ok(rest) => {
            got.extend_from_slice(&rest.to_bytes());
            assert_eq!(got.len(), SIZE, "a short body that looked complete");
            assert_eq!(sha(&got), want, "a wrong body that looked complete");
            Ok(got)
        }
        Err(e) => Err(e.to_string()),
    };
    for node in [asker, third] {
        let again = get(fleet.addr(node), &target).await;
        assert_eq!(again.status, 200, "node {node}");
        assert_eq!(sha(again.bytes()), want, "node {node}");
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_fill_is_resumed_from_the_origin_when_the_file_is_provably_the_same() {
    // A known length and a strong ETag: the rest comes from the mirror
    // set's upstream (Range + If-Range), the client sees a pause.
    let got = kill_the_owner_mid_fill(true, false).await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_fill_of_the_forward_proxy_is_resumed_from_the_upstream() {
    // The forward proxy has one upstream, the URL itself: under the same
    // strong ETag it has the rest of what the dead owner was sending.
    let got = kill_the_owner_mid_fill(true, true).await;
    assert!(got.is_ok(), "{:?}", got.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_fill_without_validators_fails_its_clients_visibly() {
    // Nothing proves another server's bytes are the same file: the
    // client's transfer fails (never a short body that looks complete)
    // and the next request succeeds through the others.
    let got = kill_the_owner_mid_fill(false, false).await;
    assert!(got.is_err(), "the transfer went on without a validator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_upstream_fails_is_not_marked_down() {
    let origin = Origin::start().await;
    // The origin fails on this file: 500.
    let mut broken = Resource::new(pattern(5, 100));
    broken.status = http::StatusCode::INTERNAL_SERVER_ERROR;
    origin.put("/broken.bin", broken);
    let fleet = start_fleet(&origin);
    let owner = owner_of(&format!("http://{}/broken.bin", origin.addr));
    let asker = (owner + 1) % 3;
    let got = get(fleet.addr(asker), "/files/broken.bin").await;
    assert!(got.status.is_server_error(), "{}", got.status);
    assert_eq!(
        origin.hits("/broken.bin"),
        1,
        "the asker went to the origin again after the owner's answer"
    );
    assert_eq!(
        fleet.metric(asker, "cistern_peer_up").await,
        2,
        "an owner whose upstream failed was marked down"
    );
    assert_eq!(fleet.metric(asker, "cistern_peer_failures_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_nodes_health_shares_and_bytes() {
    let origin = Origin::start().await;
    for i in 0..30 {
        origin.put(&format!("/s{i}.bin"), Resource::new(pattern(i as u8, 4096)));
    }
    let mut fleet = start_fleet(&origin);
    for i in 0..30 {
        let got = get(fleet.addr(0), &format!("/files/s{i}.bin")).await;
        assert_eq!(got.status, 200);
    }
    fleet.nodes[2].take().unwrap().kill9();
    // Until a's fills have met the dead c.
    for i in 30..90 {
        origin.put(&format!("/s{i}.bin"), Resource::new(pattern(i as u8, 4096)));
        get(fleet.addr(0), &format!("/files/s{i}.bin")).await;
        if fleet.metric(0, "cistern_peer_failures_total").await > 0 {
            break;
        }
    }
    let page = get(fleet.admin[0], "/fleet").await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8_lossy(page.bytes()).into_owned();
    assert!(
        html.contains("<strong id=\"this-node\">a</strong>"),
        "{html}"
    );
    let row = |name: &str| {
        let at = html
            .find(&format!("data-node=\"{name}\""))
            .unwrap_or_else(|| panic!("no row for {name}: {html}"));
        html[at..html[at..].find("</tr>").unwrap() + at].to_owned()
    };
    assert!(row("a").contains("badge up"), "{}", row("a"));
    assert!(row("b").contains("badge up"), "{}", row("b"));
    assert!(row("c").contains("badge down"), "{}", row("c"));
    // Every node owns some of a's keys (a third each, give or take).
    for n in NODES {
        let r = row(n);
        let share: u32 = r
            .split("<td class=\"num\">")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no share in {r}"));
        assert!((10..=60).contains(&share), "{n}: {share} % in {r}");
    }
    // Peer bytes and upstream bytes, as /metrics counts them.
    let peer = fleet.metric(0, "cistern_peer_bytes_total").await;
    let upstream = fleet.metric(0, "cistern_upstream_bytes_total").await;
    assert!(peer > 0 && upstream > 0, "{peer} {upstream}");
    assert!(
        html.contains(&format!("id=\"peer-bytes\" data-bytes=\"{peer}\"")),
        "{html}"
    );
    assert!(
        html.contains(&format!("id=\"upstream-bytes\" data-bytes=\"{upstream}\"")),
        "{html}"
    );
    assert!(html.contains("href=\"/fleet\" class=\"current\""), "{html}");
}
