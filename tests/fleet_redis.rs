//! The fleet's shared state in Redis (`cluster { redis }`): three real
//! Cistern processes on loopback and a real `redis-server` (Debian's,
//! installed by `.ci/run`) started here on a free port. A file committed
//! on one node is in the fleet's digest index for the others; a named
//! limiter holds across the nodes; redirect counters add up over the
//! fleet; Redis killed mid-run costs no request, shows in `/metrics`, and
//! once it is back the index is written again.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Cistern, Origin, Resource, get, pattern};
use sha2::{Digest, Sha256};

const SECRET: &str = "fleet-secret-0123456789";
const NODES: [&str; 3] = ["a", "b", "c"];
const REDIS_SERVER: &str = "redis-server";

/// A policy that asks the limiter `fleet` about one key for every request
/// and answers itself: 200 `ok` when allowed, 429 with `Retry-After` when
/// not. No upstream and no peer is involved, so each request is one check.
const LIMIT_WAT: &str = r#"(module
  (import "cistern" "limiter_check" (func $check (param i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "fleet")
  (data (i32.const 16) "all")
  (data (i32.const 32) "ok\n")
  (data (i32.const 48) "limited\n")
  (data (i32.const 64) "retry-after")
  (data (i32.const 80) "1")
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func (export "on_request") (result i32)
    (local $wait i32)
    (local.set $wait (call $check (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 3)))
    (if (i32.lt_s (local.get $wait) (i32.const 0)) (then (return (i32.const 1))))
    (if (i32.eqz (local.get $wait))
      (then (drop (call $respond (i32.const 200) (i32.const 32) (i32.const 3))))
      (else
        (drop (call $header_set (i32.const 1) (i32.const 64) (i32.const 11) (i32.const 80) (i32.const 1)))
        (drop (call $respond (i32.const 429) (i32.const 48) (i32.const 8)))))
    (i32.const 0)))"#;

/// The fleet limiter's rate in the tests.
const RATE: usize = 6;

/// A `redis-server` on a free loopback port, without persistence, killed
/// by its pid when dropped.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one, or `None` (after [`common::skip`]) where Debian's
    /// `redis-server` is not installed.
    fn start() -> Option<RedisServer> {
        if Command::new(REDIS_SERVER)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            common::skip("redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let mut r = RedisServer {
            child: None,
            port: common::free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again) on its port, and waits until it answers.
    fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (its data goes with it: no persistence).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A connection for reading what Cistern wrote.
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three nodes on 127.0.0.1, each with its proxy and admin port.
struct Fleet {
    nodes: Vec<Cistern>,
    admin: Vec<SocketAddr>,
    _dirs: Vec<tempfile::TempDir>,
}

/// What a node's config says beyond its own addresses.
struct Setup<'a> {
    origin: &'a Origin,
    /// `cluster { redis … }`, or nothing for local state.
    redis: Option<String>,
}

fn config(s: &Setup<'_>, node: &str, ports: &[(u16, u16)], me: usize, root: &Path) -> String {
    let peers: String = NODES
        .iter()
        .zip(ports)
        .map(|(n, (p, _))| format!("    peer \"{n}\" \"http://127.0.0.1:{p}\"\n"))
        .collect();
    let redis = s
        .redis
        .as_ref()
        .map(|u| format!("    redis \"{u}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
listen "127.0.0.1:{port}"
admin {{
    listen "127.0.0.1:{admin}"
}}
store {{
    root "{root}"
}}
limiter "fleet" rate={RATE} per="1h"
policy "lim" path="lim.wat"
mirror "files" {{
    prefix "/files/"
    upstream "http://{origin}/"
}}
mirror "lim" {{
    prefix "/lim/"
    upstream "http://{origin}/"
    policies "lim"
}}
mirror "r" mode="redirect" {{
    prefix "/r/"
    upstream "http://{origin}/pub/"
}}
cluster {{
    node "{node}"
{peers}    secret "{SECRET}"
{redis}}}
"#,
        port = ports[me].0,
        admin = ports[me].1,
        origin = s.origin.addr,
        root = root.display(),
    )
}

fn start_fleet(s: &Setup<'_>) -> Fleet {
    let ports: Vec<(u16, u16)> = NODES
        .iter()
        .map(|_| (common::free_port(), common::free_port()))
        .collect();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for (i, name) in NODES.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let root: PathBuf = dir.path().join("replica");
        std::fs::write(dir.path().join("lim.wat"), LIMIT_WAT).unwrap();
        std::fs::write(
            dir.path().join("config.kdl"),
            config(s, name, &ports, i, &root),
        )
        .unwrap();
        nodes.push(Cistern::spawn(
            dir.path(),
            ports[i].0,
            root,
            &["--config", "config.kdl"],
            &[],
        ));
        dirs.push(dir);
    }
    Fleet {
        nodes,
        admin: ports
            .iter()
            .map(|(_, a)| format!("127.0.0.1:{a}").parse().unwrap())
            .collect(),
        _dirs: dirs,
    }
}

impl Fleet {
    /// A metric of node `i`'s `/metrics`, summed over its samples; `None`
    /// when it is not there.
    async fn metric(&self, i: usize, name: &str) -> Option<u64> {
        let text = get(self.admin[i], "/metrics").await;
        let text = String::from_utf8_lossy(text.bytes()).into_owned();
        let values: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Waits until `cistern_redis_up` is `want` on every node.
    async fn wait_redis_up(&self, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut all = true;
            for i in 0..NODES.len() {
                all &= self.metric(i, "cistern_redis_up").await == Some(want);
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cistern_redis_up never became {want} on every node; node a's log:\n{}",
                self.nodes[0].log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn json(&self, i: usize, target: &str) -> serde_json::Value {
        let got = get(self.admin[i], target).await;
        assert_eq!(got.status, 200, "{target}");
        serde_json::from_slice(got.bytes()).unwrap()
    }
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The node names the digest index in `redis` lists for `digest`.
async fn holders_in_redis(redis: &RedisServer, digest: &str) -> Vec<String> {
    let mut c = redis.conn().await;
    let mut nodes: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("cistern:digest:{digest}"))
        .query_async(&mut c)
        .await
        .unwrap();
    nodes.sort();
    nodes
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_committed_on_one_node_is_in_the_fleets_digest_index() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let origin = Origin::start().await;
    let body = pattern(41, 200_000);
    let digest = sha_hex(&body);
    origin.put("/one.bin", Resource::new(body));
    let fleet = start_fleet(&Setup {
        origin: &origin,
        redis: Some(redis.url()),
    });
    fleet.wait_redis_up(1).await;

    let got = get(fleet.nodes[0].addr, "/files/one.bin").await;
    assert_eq!(got.status, 200);
    // Node a stored it (`store-on "every"`), and so did its owner.
    eventually("node a is listed for the digest in Redis", || async {
        holders_in_redis(&redis, &digest)
            .await
            .contains(&"a".to_owned())
    })
    .await;
    let listed = holders_in_redis(&redis, &digest).await;
    let mut c = redis.conn().await;
    let value: String = redis::cmd("HGET")
        .arg(format!("cistern:digest:{digest}"))
        .arg("a")
        .query_async(&mut c)
        .await
        .unwrap();
    let held: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(held["size"], 200_000, "{held}");
    assert!(
        held["key"].as_str().unwrap().ends_with("/one.bin"),
        "{held}"
    );
    // A node that holds nothing sees the fleet's holders through its
    // admin API (the lookup fetch-by-hash uses).
    let idle = NODES
        .iter()
        .position(|n| !listed.contains(&(*n).to_owned()))
        .expect("two nodes at most hold it");
    let answer = fleet
        .json(idle, &format!("/api/fleet/digest?sha256={digest}"))
        .await;
    assert_eq!(answer["source"], "redis", "{answer}");
    let names: Vec<&str> = answer["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["node"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"a"), "{answer}");
    assert_eq!(fleet.metric(0, "cistern_redis_errors_total").await, Some(0));

    // Node a stops: its entry stays, but within seconds it is no longer
    // named a holder (it stopped saying it is alive).
    let mut fleet = fleet;
    fleet.nodes.remove(0).kill9();
    eventually("the stopped node a is no longer a holder", || async {
        let answer = fleet
            .json(idle, &format!("/api/fleet/digest?sha256={digest}"))
            .await;
        !answer["holders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["node"] == "a")
    })
    .await;
    assert!(
        holders_in_redis(&redis, &digest)
            .await
            .contains(&"a".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_limiter_holds_across_the_fleet() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let origin = Origin::start().await;
    let fleet = start_fleet(&Setup {
        origin: &origin,
        redis: Some(redis.url()),
    });
    fleet.wait_redis_up(1).await;
    // The window is an hour aligned to the epoch: not across its end.
    let into_hour = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 3600;
    if into_hour > 3590 {
        tokio::time::sleep(Duration::from_secs(3601 - into_hour)).await;
    }
    let allowed = allowed_round_robin(&fleet).await;
    // Each node decides from the fleet's count as Redis last answered it:
    // it may miss what the two others allowed since, so up to two more
    // than the rate (two more again of headroom for a flusher slower than
    // a client's round trip on a loaded machine); never the 3 × rate that
    // three local limiters allow.
    assert!(
        (RATE..=RATE + 4).contains(&allowed),
        "{allowed} allowed over the fleet for a rate of {RATE}"
    );
    let mut c = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cistern:limit:fleet:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");

    // The same fleet without Redis: three limiters of their own.
    let local = start_fleet(&Setup {
        origin: &origin,
        redis: None,
    });
    assert_eq!(allowed_round_robin(&local).await, 3 * RATE);
}

/// 10 × [`RATE`] requests to the `/lim/` policy, one client at a time,
/// round robin over the nodes: how many were allowed.
async fn allowed_round_robin(fleet: &Fleet) -> usize {
    let mut allowed = 0;
    for n in 0..10 * RATE {
        let got = get(fleet.nodes[n % 3].addr, "/lim/x").await;
        match got.status.as_u16() {
            200 => allowed += 1,
            429 => assert!(!got.header("retry-after").is_empty()),
            other => panic!("request {n}: status {other}"),
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_counters_add_up_over_the_fleet() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let origin = Origin::start().await;
    // The mirror has the file: a redirector checks in the background that
    // the mirror it sent a client to has it, and learns its 404s.
    origin.put("/pub/iso/x.iso", Resource::new(pattern(1, 1000)));
    let fleet = start_fleet(&Setup {
        origin: &origin,
        redis: Some(redis.url()),
    });
    fleet.wait_redis_up(1).await;
    for i in 0..3 {
        for _ in 0..2 {
            let got = get(fleet.nodes[i].addr, "/r/iso/x.iso").await;
            assert_eq!(got.status, 302);
        }
    }
    let total = |v: &serde_json::Value| -> u64 {
        v["redirects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["redirects"].as_u64().unwrap())
            .sum()
    };
    // Flushed every second: each node's API shows the fleet's six.
    for i in 0..3 {
        eventually("the fleet's redirect total reaches 6", || async {
            total(&fleet.json(i, "/api/fleet/counters").await) == 6
        })
        .await;
    }
    let counters = fleet.json(0, "/api/fleet/counters").await;
    assert_eq!(counters["source"], "redis", "{counters}");
    let files = counters["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{counters}");
    assert_eq!(files[0]["file"], "iso/x.iso");
    assert_eq!(files[0]["redirects"], 6);
    // This node's own view is unchanged.
    let local = fleet.json(0, "/api/redirects").await;
    assert_eq!(local["days"][0]["mirrors"][0]["redirects"], 2, "{local}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_requests_still_succeed_and_it_recovers() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let origin = Origin::start().await;
    for i in 0..12 {
        origin.put(
            &format!("/f{i}.bin"),
            Resource::new(pattern(i as u8, 20_000)),
        );
    }
    origin.put("/pub/y.iso", Resource::new(pattern(2, 1000)));
    let fleet = start_fleet(&Setup {
        origin: &origin,
        redis: Some(redis.url()),
    });
    fleet.wait_redis_up(1).await;
    for i in 0..4 {
        let got = get(fleet.nodes[i % 3].addr, &format!("/files/f{i}.bin")).await;
        assert_eq!(got.status, 200);
    }

    redis.stop();
    // Misses, hits, the limiter and redirects all keep being answered:
    // nothing on a request's path waits for Redis.
    let started = Instant::now();
    for round in 0..3 {
        for i in 0..12 {
            let node = (i + round) % 3;
            let got = get(fleet.nodes[node].addr, &format!("/files/f{i}.bin")).await;
            assert_eq!(got.status, 200, "f{i} through node {node}, round {round}");
            assert_eq!(got.bytes(), &pattern(i as u8, 20_000));
            let lim = get(fleet.nodes[node].addr, "/lim/x").await;
            assert!(
                [200, 429].contains(&lim.status.as_u16()),
                "the limiter answered {}",
                lim.status
            );
            assert_eq!(get(fleet.nodes[node].addr, "/r/y.iso").await.status, 302);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "requests were slow without Redis: {:?}",
        started.elapsed()
    );
    fleet.wait_redis_up(0).await;
    for i in 0..3 {
        assert!(
            fleet.metric(i, "cistern_redis_errors_total").await > Some(0),
            "node {i}"
        );
        let counters = fleet.json(i, "/api/fleet/counters").await;
        assert_eq!(counters["source"], "local", "{counters}");
        let d = fleet
            .json(
                i,
                &format!("/api/fleet/digest?sha256={}", sha_hex(&pattern(0, 20_000))),
            )
            .await;
        assert_eq!(d["source"], "local", "{d}");
    }
    // One warning per outage, not one per request.
    let log = fleet.nodes[0].log();
    assert_eq!(log.matches("is unreachable").count(), 1, "{log}");

    // Back on the same port, empty: every node connects again and writes
    // its whole digest index, the files filled during the outage included.
    redis.restart();
    fleet.wait_redis_up(1).await;
    for i in 0..12 {
        let digest = sha_hex(&pattern(i as u8, 20_000));
        eventually(
            &format!("f{i}.bin is in the digest index again"),
            || async { !holders_in_redis(&redis, &digest).await.is_empty() },
        )
        .await;
    }
    let log = fleet.nodes[0].log();
    assert!(log.contains("Redis is reachable again"), "{log}");
    let d = fleet
        .json(
            2,
            &format!("/api/fleet/digest?sha256={}", sha_hex(&pattern(7, 20_000))),
        )
        .await;
    assert_eq!(d["source"], "redis", "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_comes_and_goes_with_a_reload_and_a_bad_url_is_refused_at_its_position() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let admin = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let text = |port: &str, redis: &str| {
        format!(
            "listen \"127.0.0.1:{port}\"\nadmin {{\n    listen \"127.0.0.1:{admin}\"\n}}\nstore {{ root \"{{ROOT}}\"; }}\ncluster {{\n    node \"a\"\n    peer \"b\" \"http://127.0.0.1:9\"\n    secret \"{SECRET}\"\n{redis}}}\n"
        )
    };
    let cistern = Cistern::start(dir.path(), &text("{PORT}", ""), &[]);
    let port = cistern.addr.port().to_string();
    let root = cistern.root.display().to_string();
    let write = |t: String| {
        std::fs::write(dir.path().join("config.kdl"), t.replace("{ROOT}", &root)).unwrap()
    };
    let fleet = Fleet {
        nodes: vec![cistern],
        admin: vec![format!("127.0.0.1:{admin}").parse().unwrap()],
        _dirs: Vec::new(),
    };
    assert_eq!(fleet.metric(0, "cistern_redis_up").await, None);

    write(text(&port, &format!("    redis \"{}\"\n", redis.url())));
    eventually("the reload connects to Redis", || async {
        fleet.metric(0, "cistern_redis_up").await == Some(1)
    })
    .await;

    // Line 10, column 11: the URL.
    write(text(&port, "    redis \"http://127.0.0.1:6379/\"\n"));
    eventually("the refused reload in the log", || async {
        fleet.nodes[0].log().contains("config.kdl:10:11: `redis`: ")
    })
    .await;
    assert_eq!(fleet.metric(0, "cistern_redis_up").await, Some(1));

    write(text(&port, ""));
    eventually("the reload drops Redis", || async {
        fleet.metric(0, "cistern_redis_up").await.is_none()
    })
    .await;
    assert!(!fleet.nodes[0].log().contains("is unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_by_hash_asks_only_the_nodes_the_digest_index_names() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let origin = Origin::start().await;
    // Content nobody holds, and content one node will hold under its
    // canonical name, each also at its by-hash name.
    let dir = "/dists/stable/main/binary-amd64";
    let lone = pattern(61, 100_000);
    let lone_path = format!("{dir}/by-hash/SHA256/{}", sha_hex(&lone));
    origin.put(&lone_path, Resource::new(lone.clone()));
    let held = pattern(62, 100_000);
    let digest = sha_hex(&held);
    let canonical = format!("{dir}/Packages.xz");
    let by_hash = format!("{dir}/by-hash/SHA256/{digest}");
    origin.put(&canonical, Resource::new(held.clone()));
    origin.put(&by_hash, Resource::new(held.clone()));
    let fleet = start_fleet(&Setup {
        origin: &origin,
        redis: Some(redis.url()),
    });
    fleet.wait_redis_up(1).await;

    // The index names no holder: node a asks no peer by digest, only
    // the key's owner (when that is not a itself), so at most one
    // request; asking every peer first would make two or three.
    let got = get(fleet.nodes[0].addr, &format!("/files{lone_path}")).await;
    assert_eq!(
        Sha256::digest(got.bytes()).as_slice(),
        Sha256::digest(&lone).as_slice()
    );
    let asked = fleet.metric(0, "cistern_peer_requests_total").await;
    assert!(asked.unwrap_or(0) <= 1, "node a asked {asked:?} peers");

    // Node a keeps the canonical file; once the index names it, a node
    // holding nothing gets the by-hash name from a holder, not the origin.
    get(fleet.nodes[0].addr, &format!("/files{canonical}")).await;
    eventually("node a is listed for the digest in Redis", || async {
        holders_in_redis(&redis, &digest)
            .await
            .contains(&"a".to_owned())
    })
    .await;
    let listed = holders_in_redis(&redis, &digest).await;
    let idle = NODES
        .iter()
        .position(|n| !listed.contains(&(*n).to_owned()))
        .expect("two nodes at most hold it");
    let got = get(fleet.nodes[idle].addr, &format!("/files{by_hash}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(sha_hex(got.bytes()), digest);
    assert_eq!(
        origin.hits(&by_hash),
        0,
        "the origin was asked for held content"
    );
}
