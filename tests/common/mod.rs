//! Test fixtures: an in-process origin server, a Cistern process started
//! from the real binary, and a small HTTP client that can speak both
//! origin-form and absolute-form (proxy) requests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// A body chunk type for origin responses.
type OriginBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Deterministic content: byte `i` of object `seed` is a function of both,
/// so a spliced or shifted body never passes for the right one.
pub fn pattern(seed: u8, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    for i in 0..len {
        v.push(
            ((i as u64)
                .wrapping_mul(2654435761)
                .wrapping_add(u64::from(seed) * 97)
                >> 7) as u8,
        );
    }
    Bytes::from(v)
}

/// One resource the origin serves.
#[derive(Clone)]
pub struct Resource {
    /// Status to answer with.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Pause between 64 KiB chunks (a slow upstream).
    pub chunk_delay: Option<Duration>,
    /// Break the connection after this many body bytes, the next N times.
    pub die_after: Option<(u64, u32)>,
    /// Honour Range requests (206).
    pub ranges: bool,
    /// Send `Content-Length` (otherwise the body is chunked).
    pub length: bool,
}

impl Resource {
    /// A 200 with `body`, a strong ETag, a Last-Modified long ago (so it
    /// is fresh by the RFC 9111 heuristic, like a real static file) and
    /// Range support.
    pub fn new(body: Bytes) -> Resource {
        Resource {
            status: StatusCode::OK,
            body,
            headers: vec![
                ("etag".into(), "\"v1\"".into()),
                (
                    "last-modified".into(),
                    "Wed, 01 Jan 2020 00:00:00 GMT".into(),
                ),
            ],
            chunk_delay: None,
            die_after: None,
            ranges: true,
            length: true,
        }
    }

    /// Sets a response header (replacing one of the same name).
    pub fn header(mut self, k: &str, v: &str) -> Resource {
        self.headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case(k));
        self.headers.push((k.into(), v.into()));
        self
    }

    /// Streams slowly.
    pub fn slow(mut self, per_64k: Duration) -> Resource {
        self.chunk_delay = Some(per_64k);
        self
    }

    /// Sends the body chunked, without announcing its length.
    pub fn unknown_length(mut self) -> Resource {
        self.length = false;
        self
    }

    /// Dies after `bytes` of body, `times` times.
    pub fn die_after(mut self, bytes: u64, times: u32) -> Resource {
        self.die_after = Some((bytes, times));
        self
    }
}

/// A request the origin saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
}

/// An in-process origin server on 127.0.0.1.
#[derive(Clone)]
pub struct Origin {
    /// Its address.
    pub addr: SocketAddr,
    resources: Arc<Mutex<HashMap<String, Resource>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    first_byte: Arc<Mutex<HashMap<String, Instant>>>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    /// Look resources up by the path nginx would resolve (see [`nginx_path`]).
    nginx_paths: Arc<std::sync::atomic::AtomicBool>,
    /// Bodies being sent now, the most at once, and when a body was cut
    /// by its client (the connection closed) before its end, by path.
    bodies: Arc<BodyCounts>,
}

/// What an [`Origin`] counts of the bodies it sends.
#[derive(Default)]
struct BodyCounts {
    now: AtomicU64,
    most: AtomicU64,
    cut: Mutex<HashMap<String, Instant>>,
}

/// Held by a body being sent; counts it out when dropped, as cut unless
/// it reached its end.
struct BodyGuard {
    counts: Arc<BodyCounts>,
    path: String,
    finished: bool,
}

impl BodyGuard {
    fn new(counts: &Arc<BodyCounts>, path: &str) -> BodyGuard {
        let now = counts.now.fetch_add(1, Ordering::SeqCst) + 1;
        counts.most.fetch_max(now, Ordering::SeqCst);
        BodyGuard {
            counts: counts.clone(),
            path: path.to_owned(),
            finished: false,
        }
    }
}

impl BodyGuard {
    /// The body reached its end (or the origin cut it on purpose).
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        self.counts.now.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.counts
                .cut
                .lock()
                .unwrap()
                .insert(self.path.clone(), Instant::now());
        }
    }
}

/// The path nginx serves for a request target: the path percent-decoded
/// (`%2e` → `.`, `%2f` → `/`), `//` merged, dot segments resolved, the
/// query kept. `None` when it climbs above `/` (nginx answers 400).
pub fn nginx_path(target: &str) -> Option<String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            decoded.push((h * 16 + l) as u8);
            i += 3;
        } else {
            decoded.push(raw[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/') {
        trailing = true;
        match seg {
            "" | "." => {}
            ".." => {
                kept.pop()?;
            }
            s => {
                kept.push(s);
                trailing = false;
            }
        }
    }
    let mut out = format!("/{}", kept.join("/"));
    if trailing && !kept.is_empty() {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

impl Origin {
    /// Starts an origin with no resources (404 for everything).
    pub async fn start() -> Origin {
        Origin::start_on("127.0.0.1:0").await
    }

    /// Starts an origin bound at `addr` (another loopback address, a
    /// chosen port).
    pub async fn start_on(addr: &str) -> Origin {
        let listener = TcpListener::bind(addr).await.unwrap();
        let origin = Origin {
            addr: listener.local_addr().unwrap(),
            resources: Arc::default(),
            seen: Arc::default(),
            first_byte: Arc::default(),
            connections: Arc::default(),
            nginx_paths: Arc::default(),
            bodies: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                o.connections.fetch_add(1, Ordering::Relaxed);
                let o = o.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let o = o.clone();
                        async move { Ok::<_, Infallible>(o.answer(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        origin
    }

    /// Resolves request paths the way nginx does before looking them up
    /// (`/pub/../x` serves `/x`); [`Origin::seen`] keeps what was sent.
    pub fn normalise_like_nginx(&self) {
        self.nginx_paths.store(true, Ordering::Relaxed);
    }

    /// Serves `resource` at `path`.
    pub fn put(&self, path: &str, resource: Resource) {
        self.resources
            .lock()
            .unwrap()
            .insert(path.to_owned(), resource);
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Requests seen for `path` (any method).
    pub fn hits(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .count()
    }

    /// Every request seen.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Bodies being sent now.
    pub fn bodies_in_flight(&self) -> u64 {
        self.bodies.now.load(Ordering::SeqCst)
    }

    /// The most bodies the origin was sending at once.
    pub fn most_bodies_in_flight(&self) -> u64 {
        self.bodies.most.load(Ordering::SeqCst)
    }

    /// When a body for `path` was last cut before its end (its connection
    /// closed by the other side).
    pub fn cut_at(&self, path: &str) -> Option<Instant> {
        self.bodies.cut.lock().unwrap().get(path).copied()
    }

    /// When the origin sent the first body byte for `path`.
    pub fn first_byte_at(&self, path: &str) -> Option<Instant> {
        self.first_byte.lock().unwrap().get(path).copied()
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<OriginBody> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        self.seen.lock().unwrap().push(Seen {
            method: req.method().to_string(),
            path: path.clone(),
            headers: req.headers().clone(),
        });
        let lookup = if self.nginx_paths.load(Ordering::Relaxed) {
            let Some(resolved) = nginx_path(&path) else {
                let mut resp = Response::new(full(Bytes::from_static(b"400 Bad Request\n")));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                return resp;
            };
            resolved
        } else {
            path.clone()
        };
        let resource = {
            let mut map = self.resources.lock().unwrap();
            let Some(r) = map.get_mut(&lookup) else {
                let mut resp = Response::new(full(Bytes::from_static(b"no such resource\n")));
                *resp.status_mut() = StatusCode::NOT_FOUND;
                return resp;
            };
            let snapshot = r.clone();
            if let Some((bytes, times)) = r.die_after
                && times > 0
            {
                r.die_after = if times > 1 {
                    Some((bytes, times - 1))
                } else {
                    None
                };
            }
            snapshot
        };
        let etag = resource
            .headers
            .iter()
            .find(|(k, _)| k == "etag")
            .map(|(_, v)| v.clone());
        // Conditional GET.
        if let (Some(inm), Some(etag)) = (req.headers().get("if-none-match"), &etag)
            && inm.to_str().unwrap_or("") == etag
        {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            for (k, v) in &resource.headers {
                resp.headers_mut().append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            return resp;
        }
        let total = resource.body.len() as u64;
        let mut start = 0u64;
        let mut status = resource.status;
        let range = req
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let if_range_ok = match req.headers().get("if-range") {
            None => true,
            Some(v) => etag.as_deref() == v.to_str().ok(),
        };
        if resource.ranges
            && if_range_ok
            && let Some(r) = range
            && let Some(from) = r.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-'))
            && let Ok(from) = from.parse::<u64>()
            && from < total
        {
            start = from;
            status = StatusCode::PARTIAL_CONTENT;
        }
        let body = resource.body.slice(start as usize..);
        let mut resp = Response::new(self.stream_body(
            &path,
            body,
            resource.chunk_delay,
            resource.die_after.map(|d| d.0),
        ));
        *resp.status_mut() = status;
        for (k, v) in &resource.headers {
            resp.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        if resource.length {
            resp.headers_mut()
                .insert("content-length", (total - start).into());
        }
        if status == StatusCode::PARTIAL_CONTENT {
            resp.headers_mut().insert(
                "content-range",
                format!("bytes {start}-{}/{total}", total - 1)
                    .parse()
                    .unwrap(),
            );
        }
        resp
    }

    fn stream_body(
        &self,
        path: &str,
        body: Bytes,
        delay: Option<Duration>,
        die_after: Option<u64>,
    ) -> OriginBody {
        let first_byte = self.first_byte.clone();
        let guard = BodyGuard::new(&self.bodies, path);
        let path = path.to_owned();
        let stream = futures_util::stream::unfold(
            (body, 0u64, false, guard),
            move |(body, sent, dead, mut guard)| {
                let first_byte = first_byte.clone();
                let path = path.clone();
                async move {
                    if dead || body.is_empty() {
                        guard.finish();
                        return None;
                    }
                    if let Some(limit) = die_after
                        && sent >= limit
                    {
                        let err = std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "origin dies on purpose",
                        );
                        // Cut by the origin, not by its client.
                        guard.finish();
                        return Some((Err(err), (Bytes::new(), sent, true, guard)));
                    }
                    if sent > 0
                        && let Some(d) = delay
                    {
                        tokio::time::sleep(d).await;
                    }
                    let mut n = body.len().min(64 * 1024);
                    if let Some(limit) = die_after {
                        n = n.min((limit - sent) as usize).max(1);
                    }
                    let mut body = body;
                    let chunk = body.split_to(n);
                    if body.is_empty() {
                        // All handed over: hyper may stop polling once a
                        // Content-Length is met.
                        guard.finish();
                    }
                    first_byte
                        .lock()
                        .unwrap()
                        .entry(path)
                        .or_insert_with(Instant::now);
                    Some((
                        Ok(Frame::data(chunk)),
                        (body, sent + n as u64, false, guard),
                    ))
                }
            },
        );
        StreamBody::new(stream).boxed()
    }
}

fn full(b: Bytes) -> OriginBody {
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed()
}

/// A response read whole by the test client.
#[derive(Debug)]
pub struct Got {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body, or the error that cut it short.
    pub body: Result<Bytes, String>,
}

impl Got {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body; panics if the transfer failed.
    pub fn bytes(&self) -> &Bytes {
        self.body.as_ref().expect("transfer failed")
    }
}

/// Sends one HTTP/1.1 request to `proxy` on a new connection. `target` is
/// sent as is: a path (origin-form) or a full URL (absolute-form, like an
/// `http_proxy=` client).
pub async fn request(
    proxy: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Got {
    let resp = send(proxy, method, target, headers).await;
    read(resp).await
}

/// GET shorthand.
pub async fn get(proxy: SocketAddr, target: &str) -> Got {
    request(proxy, "GET", target, &[]).await
}

/// Sends a request and returns the response with its body unread.
pub async fn send(
    proxy: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let stream = TcpStream::connect(proxy).await.expect("connect to cistern");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder().method(method).uri(target);
    let host = target
        .strip_prefix("http://")
        .map(|r| r.split('/').next().unwrap_or("").to_owned())
        .unwrap_or_else(|| proxy.to_string());
    b = b.header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Empty::<Bytes>::new()).unwrap();
    sender.send_request(req).await.expect("send request")
}

/// Reads a response whole.
pub async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A Cistern process started from the real binary.
pub struct Cistern {
    /// The process.
    pub child: Child,
    /// Its proxy address.
    pub addr: SocketAddr,
    /// Its working directory (holds config.kdl, the replica, the log).
    pub dir: PathBuf,
    /// The replica root.
    pub root: PathBuf,
}

impl Cistern {
    /// Starts `cistern --config DIR/config.kdl` with `config` as the file's
    /// text (`{PORT}` is replaced with a free port, `{ROOT}` with DIR/replica).
    pub fn start(dir: &Path, config: &str, extra_args: &[&str]) -> Cistern {
        let port = free_port();
        let root = dir.join("replica");
        let text = config
            .replace("{PORT}", &port.to_string())
            .replace("{ROOT}", &root.display().to_string());
        std::fs::write(dir.join("config.kdl"), text).unwrap();
        Self::spawn(dir, port, root, &["--config", "config.kdl"], extra_args)
    }

    /// [`Cistern::start`] with `env` added to the process's environment
    /// (e.g. `TOKIO_WORKER_THREADS=1` for a runtime with one worker).
    pub fn start_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Cistern {
        let port = free_port();
        let root = dir.join("replica");
        let text = config
            .replace("{PORT}", &port.to_string())
            .replace("{ROOT}", &root.display().to_string());
        std::fs::write(dir.join("config.kdl"), text).unwrap();
        Self::spawn_env(dir, port, root, &["--config", "config.kdl"], &[], env)
    }

    /// Starts plain mode (no config.kdl, HTTP Replicator's session):
    /// `cistern -p PORT -r replica` in `dir`, then `extra` arguments.
    pub fn plain(dir: &Path, extra: &[&str]) -> Cistern {
        let port = free_port();
        let port_s = port.to_string();
        let args = ["-p", port_s.as_str(), "-r", "replica"];
        Self::spawn(dir, port, dir.join("replica"), &args, extra)
    }

    /// Starts the binary with `args` in `dir`, expecting it on `port`.
    pub fn spawn(dir: &Path, port: u16, root: PathBuf, args: &[&str], extra: &[&str]) -> Cistern {
        Self::spawn_env(dir, port, root, args, extra, &[])
    }

    /// [`Cistern::spawn`] with `env` added to the process's environment.
    pub fn spawn_env(
        dir: &Path,
        port: u16,
        root: PathBuf,
        args: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cistern {
        let log = std::fs::File::create(dir.join("cistern.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(args)
            .args(extra)
            .current_dir(dir)
            .envs(env.iter().copied())
            .env("CISTERN_LOG", "info,cistern=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cistern");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let c = Cistern {
            child,
            addr,
            dir: dir.to_owned(),
            root,
        };
        c.wait_ready();
        c
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("cistern did not start; log:\n{}", self.log());
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cistern.log")).unwrap_or_default()
    }

    /// The log once `done` holds for it, waiting up to 20 s: the access log
    /// and messages about work that goes on after a response are written
    /// a little later than the response arrives.
    pub async fn log_when(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("the log never showed {what}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Cistern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config serving `origin`'s root as the mirror `/files/`, for
/// [`Cistern::start`].
pub fn files_mirror(origin: &Origin) -> String {
    files_mirror_of(origin.addr)
}

/// [`files_mirror`] for any server on `upstream` (a raw-TCP origin, an
/// FTP or WebSocket server).
pub fn files_mirror_of(upstream: SocketAddr) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{upstream}/"
}}
"#
    )
}

/// A config with two mirrors, `/a/` and `/b/`, of `origin`'s
/// `/mirror-a/` and `/mirror-b/`, whose `pool/` files the `store-id`
/// policy keys as one (`http://pool.cistern/pool/...`); `extra` is added
/// at the end (an admin listener).
pub fn store_id_mirrors(origin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "store-id" path="builtin:store-id" {{
    param "rule" "http://*/mirror-*/pool/* http://pool.cistern/pool/$3"
}}
mirror "a" {{ prefix "/a/"; upstream "http://{origin}/mirror-a/"; policies "store-id"; }}
mirror "b" {{ prefix "/b/"; upstream "http://{origin}/mirror-b/"; policies "store-id"; }}
{extra}
"#
    )
}

/// A free TCP port on loopback, never the same one twice in a test process.
///
/// Asking the kernel for port 0 and letting go of it is not enough: two calls
/// can get the same port back (CI once saw a proxy and its admin listener
/// handed one port), and the kernel may give it to an origin or an outgoing
/// connection before the child process binds it. So ports come from 20000 to
/// 32767, below Linux's ephemeral range (32768 and up) that port 0 and
/// outgoing connections draw from, each probed by binding it once. The start
/// depends on the process id so that test binaries run one after another do
/// not walk the same ports while an earlier child may still be exiting.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_768;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(613) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port between {FIRST} and {}",
        FIRST + SPAN - 1
    );
}

/// How a run of the binary to its end went: see [`run_to_end`].
pub struct Ran {
    /// It exited with status 0.
    pub ok: bool,
    /// What it wrote to stdout.
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
}

/// Runs `cistern ARGS` in `dir` to its end (a refused config, `check`).
pub fn run_to_end(dir: &Path, args: &[&str]) -> Ran {
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run cistern");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every file under `root`, relative, sorted: what `find root -type f` shows.
pub fn find_files(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Skips the rest of a test because something it needs is missing here:
/// prints why and returns, except where `CISTERN_REQUIRE_ALL_TOOLCHAINS` is
/// set (CI installs everything), where a skip is a failure.
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("CISTERN_REQUIRE_ALL_TOOLCHAINS").is_none(),
        "cannot skip here (CISTERN_REQUIRE_ALL_TOOLCHAINS is set): {why}"
    );
    eprintln!("skipped: {why}");
}

/// Starts Cistern in this process from config `text` (as if read from
/// `config_path`), on `clock`: for tests that move time instead of
/// sleeping.
pub async fn start_on_clock(
    text: &str,
    config_path: &Path,
    clock: &cistern::clock::Clock,
) -> cistern::app::Running {
    let config = cistern::config::Config::parse(text, config_path).expect("valid config");
    cistern::app::start(
        config,
        cistern::app::StartOptions {
            clock: Some(clock.clone()),
            ..cistern::app::StartOptions::default()
        },
    )
    .await
    .expect("start")
}

/// A child process killed when the test ends, passed or failed, so a
/// failing assertion leaves no Cistern running behind it.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
