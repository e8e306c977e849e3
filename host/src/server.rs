//! Listeners and connections: plaintext HTTP/1.1 and HTTP/2 (h2c, prior
//! knowledge) on one port, TLS with ALPN `h2`/`http/1.1` and SNI on site
//! listeners, header and idle timeouts, and a graceful drain.
//!
//! The [`Server`] keeps a registry of running listeners keyed by their
//! configured address and kind, so a reload can bind new addresses, drain
//! and close removed ones, and leave the others (and their connections)
//! untouched. Each listener drains on its own: closing one stops its
//! accepting at once and gives its connections up to the drain time to
//! finish what they are doing.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::body::ClientBody;
use crate::config::Config;
use crate::gate::{AcceptBackoff, ConnCaps, ConnPermit, SendDeadline, StreamWatch, WatchedBody};
use crate::ours::{OwnSocket, OwnSockets, SocketKind};
use crate::pipeline::{ConnInfo, Proxy};

mod lane;

/// A listener as config names it: an address (port 0 picks a free one)
/// and whether it terminates TLS for sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerSpec {
    /// The address in config.
    pub addr: SocketAddr,
    /// A TLS site listener (`site { listen … }`) rather than plaintext.
    pub tls: bool,
}

impl ListenerSpec {
    /// Every listener `config` asks for: plaintext ones, then TLS ones, in
    /// file order.
    pub fn all(config: &Config) -> Vec<ListenerSpec> {
        let plain = config.listeners.iter().map(|l| ListenerSpec {
            addr: l.addr,
            tls: false,
        });
        let tls = config
            .tls_listeners()
            .into_iter()
            .map(|addr| ListenerSpec { addr, tls: true });
        plain.chain(tls).collect()
    }
}

impl fmt::Display for ListenerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// A listener that is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerInfo {
    /// What config asked for.
    pub spec: ListenerSpec,
    /// The address actually bound.
    pub local: SocketAddr,
}

impl ListenerInfo {
    /// This listener as the self-connection guard knows it.
    pub fn own_socket(&self) -> OwnSocket {
        OwnSocket {
            addr: self.local,
            kind: if self.spec.tls {
                SocketKind::TlsSite
            } else {
                SocketKind::Proxy
            },
        }
    }
}

/// Why listeners could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address in config.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("setting up TLS on {addr}: {source}")]
    Tls {
        /// The address in config.
        addr: SocketAddr,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// A bound listener, ready to serve.
pub struct BoundListener {
    listener: TcpListener,
    info: ListenerInfo,
    tls: Option<TlsAcceptor>,
}

impl BoundListener {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.info.local
    }
}

/// How far a listener is in closing. Ordered: each phase implies the
/// earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Not accepting; connections finish their requests and close.
    Draining,
    /// The drain time is over: connections are dropped.
    Closed,
}

struct Active {
    info: ListenerInfo,
    phase: Arc<watch::Sender<Phase>>,
    task: JoinHandle<()>,
}

/// The running listeners of one Cistern.
pub struct Server {
    proxy: Arc<Proxy>,
    drain: Duration,
    active: Mutex<Vec<Active>>,
    /// Listeners removed by a reload that may still be draining.
    closing: Mutex<Vec<JoinHandle<()>>>,
    /// The addresses the proxy may never connect to, kept in step with
    /// `active`.
    own: Arc<OwnSockets>,
}

/// Streams an HTTP/2 connection may make Cistern reset for its errors
/// before it is closed: hyper's default, set here so an upgrade cannot
/// silently lift it (RUSTSEC-2024-0003).
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// How long a reload waits for a listener it closed to let go of an
/// address that a new listener (plaintext turned TLS or back) needs.
const REBIND_WAIT: Duration = Duration::from_secs(2);

impl Server {
    /// A server with no listeners yet; connections go to `proxy`, and
    /// closing listeners wait up to `drain` for their connections.
    pub fn new(proxy: Arc<Proxy>, drain: Duration) -> Arc<Server> {
        Arc::new(Server {
            own: proxy.engine().own_sockets().clone(),
            proxy,
            drain,
            active: Mutex::new(Vec::new()),
            closing: Mutex::new(Vec::new()),
        })
    }

    /// The listeners serving now, in the order they were started.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.lock_active().iter().map(|a| a.info).collect()
    }

    /// Which of `wanted` are not running yet, and which running ones are
    /// not wanted any more.
    pub fn plan(&self, wanted: &[ListenerSpec]) -> (Vec<ListenerSpec>, Vec<ListenerSpec>) {
        let running: Vec<ListenerSpec> = self.lock_active().iter().map(|a| a.info.spec).collect();
        let add = wanted
            .iter()
            .filter(|s| !running.contains(s))
            .copied()
            .collect();
        let remove = running
            .into_iter()
            .filter(|s| !wanted.contains(s))
            .collect();
        (add, remove)
    }

    /// Binds `specs` (without serving them yet). A failure binds nothing.
    pub async fn bind(&self, specs: &[ListenerSpec]) -> Result<Vec<BoundListener>, BindError> {
        let mut out = Vec::new();
        for spec in specs {
            let listener = bind_retrying(spec.addr)
                .await
                .map_err(|source| BindError::Bind {
                    addr: spec.addr,
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| BindError::Bind {
                addr: spec.addr,
                source,
            })?;
            let tls = if spec.tls {
                let resolver = Arc::new(SniResolver {
                    proxy: self.proxy.clone(),
                    listener: spec.addr,
                });
                let config =
                    crate::tls::server_config(resolver).map_err(|source| BindError::Tls {
                        addr: spec.addr,
                        source,
                    })?;
                Some(TlsAcceptor::from(config))
            } else {
                None
            };
            out.push(BoundListener {
                listener,
                info: ListenerInfo { spec: *spec, local },
                tls,
            });
        }
        Ok(out)
    }

    /// Starts serving `bound`.
    pub fn serve(&self, bound: Vec<BoundListener>) {
        let mut active = self.lock_active();
        for b in bound {
            let (phase, rx) = watch::channel(Phase::Serving);
            let phase = Arc::new(phase);
            let info = b.info;
            let task = tokio::spawn(run_listener(
                b,
                self.proxy.clone(),
                phase.clone(),
                rx,
                self.drain,
            ));
            tracing::info!(target: "cistern::server", "listening on {} ({})", info.spec, info.local);
            active.push(Active { info, phase, task });
        }
        self.own
            .set_listeners(active.iter().map(|a| a.info.own_socket()));
    }

    /// Stops accepting on `specs` at once; their connections drain in the
    /// background.
    pub fn close(&self, specs: &[ListenerSpec]) {
        let mut active = self.lock_active();
        let (gone, kept): (Vec<Active>, Vec<Active>) =
            active.drain(..).partition(|a| specs.contains(&a.info.spec));
        *active = kept;
        self.own
            .set_listeners(active.iter().map(|a| a.info.own_socket()));
        drop(active);
        let mut closing = self.closing.lock().unwrap_or_else(PoisonError::into_inner);
        closing.retain(|t| !t.is_finished());
        for a in gone {
            tracing::info!(target: "cistern::server", "closing {} ({}); draining its connections", a.info.spec, a.info.local);
            a.phase.send_replace(Phase::Draining);
            closing.push(a.task);
        }
    }

    /// Stops accepting everywhere and returns when every connection is
    /// done or the drain time is over.
    pub async fn shutdown(&self) {
        let specs: Vec<ListenerSpec> = self.listeners().iter().map(|l| l.spec).collect();
        self.close(&specs);
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.closing.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            let _ = t.await;
        }
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, Vec<Active>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds `addr`; while it is in use, retries for a short while, since a
/// listener this reload closed may still be letting go of it.
async fn bind_retrying(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + REBIND_WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Waits until the listener's phase reaches `at_least` (or its owner is
/// gone, which means closed).
async fn reached(phase: &mut watch::Receiver<Phase>, at_least: Phase) {
    let _ = phase.wait_for(|p| *p >= at_least).await;
}

/// Accepts until told to drain, then waits for the connections.
async fn run_listener(
    bound: BoundListener,
    proxy: Arc<Proxy>,
    phase_tx: Arc<watch::Sender<Phase>>,
    mut phase: watch::Receiver<Phase>,
    drain: Duration,
) {
    let BoundListener {
        listener,
        info,
        tls,
    } = bound;
    // Every connection holds a clone; `recv` yields `None` once all are gone.
    let (guard, mut drained) = mpsc::channel::<()>(1);
    let mut backoff = AcceptBackoff::new();
    loop {
        let wait = tokio::select! {
            _ = reached(&mut phase, Phase::Draining) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    backoff.succeeded();
                    admit(&proxy, info, stream, client, &phase, &guard, &tls);
                    continue;
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off
                    // instead of spinning.
                    let wait = backoff.failed();
                    tracing::warn!(target: "cistern::server", "accept on {}: {e}; retrying in {wait:?}", info.local);
                    wait
                }
            },
        };
        tokio::select! {
            _ = reached(&mut phase, Phase::Draining) => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    drop(listener);
    drop(guard);
    match tokio::time::timeout(drain, drained.recv()).await {
        Ok(_) => tracing::info!(target: "cistern::server", "{} drained", info.spec),
        Err(_) => {
            tracing::warn!(target: "cistern::server", "{}: drain timed out after {drain:?}; closing its connections", info.spec);
            phase_tx.send_replace(Phase::Closed);
        }
    }
}

/// Lets an accepted connection in if the caps allow it, else closes it at
/// once (see [`crate::gate`] for why without an answer).
fn admit(
    proxy: &Arc<Proxy>,
    info: ListenerInfo,
    stream: TcpStream,
    client: SocketAddr,
    phase: &watch::Receiver<Phase>,
    guard: &mpsc::Sender<()>,
    tls: &Option<TlsAcceptor>,
) {
    let snap = proxy.snapshot();
    let caps = ConnCaps::from_config(&snap.config.limits);
    let permit = match proxy.connections().admit(client.ip(), caps) {
        Ok(p) => Arc::new(p),
        Err(why) => {
            tracing::debug!(target: "cistern::server", %client, "refusing a connection on {}: {why}", info.spec);
            return;
        }
    };
    let conn = Connection {
        proxy: proxy.clone(),
        info,
        client,
        phase: phase.clone(),
        first_by: Instant::now() + snap.config.timeouts.idle,
        permit,
        _guard: guard.clone(),
    };
    tokio::spawn(conn.run(stream, tls.clone()));
}

/// One accepted connection.
struct Connection {
    proxy: Arc<Proxy>,
    info: ListenerInfo,
    client: SocketAddr,
    phase: watch::Receiver<Phase>,
    /// The idle timeout after accept: by then the TLS handshake is done and
    /// a first whole request head has arrived, or the connection is closed.
    first_by: Instant,
    /// Its place under the connection caps; CONNECT tunnels share it.
    permit: Arc<ConnPermit>,
    _guard: mpsc::Sender<()>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = tls else {
            let info = self.conn_info();
            return match self.lane(&stream, info).await {
                lane::Left::Closed => {}
                lane::Left::ToHyper { read, served } => {
                    self.serve(lane::Rewind::new(read, stream), !served).await
                }
            };
        };
        // The first-request deadline bounds the handshake too, so a client
        // that opens a connection and says nothing does not hold it.
        let handshake = tokio::time::timeout_at(self.first_by.into(), acceptor.accept(stream));
        let accepted = tokio::select! {
            r = handshake => r,
            _ = reached(&mut self.phase, Phase::Draining) => return,
        };
        match accepted {
            Ok(Ok(stream)) => self.serve(stream, true).await,
            Ok(Err(e)) => {
                tracing::debug!(target: "cistern::server", client = %self.client, "TLS handshake on {} failed: {e}", self.info.spec);
            }
            Err(_) => {
                self.proxy.connections().closed_silent();
                tracing::debug!(target: "cistern::server", client = %self.client, "TLS handshake on {} timed out", self.info.spec);
            }
        }
    }

    /// This connection as the pipeline knows it.
    fn conn_info(&self) -> ConnInfo {
        ConnInfo {
            client: self.client,
            local: self.info.local,
            site_listener: self.info.spec.tls.then_some(self.info.spec.addr),
        }
    }

    /// Serves the connection with hyper; `first_due` while no request has
    /// been answered on it yet (the first-read deadline applies).
    async fn serve<I>(mut self, io: I, first_due: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Read per connection, so a reload's new timeouts and caps apply to
        // the connections that come after it.
        let config = self.proxy.snapshot().config.clone();
        let idle = config.timeouts.idle;
        let limits = &config.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(idle)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(idle))
            .keep_alive_timeout(idle)
            .max_concurrent_streams(limits.http2_max_streams)
            .max_pending_accept_reset_streams(limits.http2_max_resets as usize)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
        // HTTP/2 responses keep a deadline of their own (see `gate`): the
        // socket can drain while one stream gets no window.
        let watch = StreamWatch::new(config.timeouts.send);
        let io = SendDeadline::new(io, config.timeouts.send, self.permit.clone()).pausing(&watch);
        let info = self.conn_info();
        let proxy = self.proxy.clone();
        let permit = self.permit.clone();
        let started = Arc::new(AtomicBool::new(false));
        let first = started.clone();
        let bodies = watch.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            first.store(true, Ordering::Relaxed);
            if req.method() == Method::CONNECT {
                // The tunnel outlives this connection's task: it takes a
                // share of the permit so it still counts.
                req.extensions_mut().insert(permit.clone());
            }
            let h2 = req.version() == Version::HTTP_2;
            let proxy = proxy.clone();
            let req = req.map(ClientBody::Wire);
            let bodies = bodies.clone();
            async move {
                // Boxed: hyper moves this future into a task of its own per
                // HTTP/2 stream, and the pipeline's state inline made every
                // such move (and the spawn) copy kilobytes.
                let mut resp = Box::pin(proxy.handle(req, info)).await;
                // hyper polls the body; the slice's place among a fill's
                // readers would count this reader twice while the head lives.
                resp.extensions_mut().remove::<crate::serve::FillSlice>();
                Ok::<_, Infallible>(resp.map(|b| {
                    if h2 {
                        bodies.watch(b)
                    } else {
                        WatchedBody::unwatched(b)
                    }
                }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let client = self.client;
        // hyper's header timeout only starts once the auto builder has seen
        // enough bytes to pick HTTP/1 or HTTP/2: a silent client, or one
        // that stops inside the HTTP/2 preface, would be held for ever.
        // So the whole first read has a deadline of its own.
        let mut first_due = first_due;
        let ended = loop {
            tokio::select! {
                // First: hyper's own header timer, started later, fires in
                // the same tick at the earliest; the close is ours to count.
                biased;
                _ = tokio::time::sleep_until(self.first_by.into()), if first_due => {
                    if !started.load(Ordering::Relaxed) {
                        self.proxy.connections().closed_silent();
                        tracing::debug!(target: "cistern::server", %client, "no request within the idle timeout on {}; closing", self.info.spec);
                        return;
                    }
                    first_due = false;
                }
                r = conn.as_mut() => break Some(r),
                _ = watch.stalled() => return self.stalled_stream(&watch),
                _ = reached(&mut self.phase, Phase::Draining) => break None,
            }
        };
        let result = match ended {
            Some(r) => r,
            None => {
                // Finish the requests in flight, then close; past the
                // drain time, drop the connection.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = watch.stalled() => return self.stalled_stream(&watch),
                    _ = reached(&mut self.phase, Phase::Closed) => return,
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(target: "cistern::server", %client, "connection ended: {e}");
        }
    }
}

impl Connection {
    /// An HTTP/2 response waited for its client's window for the send
    /// timeout: the connection is dropped on return, and with it every
    /// stream's body (hyper cannot reset the one stream whose body it no
    /// longer polls).
    fn stalled_stream(&self, watch: &StreamWatch) {
        self.permit.closed_stalled_stream();
        tracing::debug!(target: "cistern::server", client = %self.client, "an HTTP/2 response on {} got no flow-control window for {:?} (timeouts {{ send }}); closing", self.info.spec, watch.limit());
    }
}

/// Picks a site's certificate by SNI from the snapshot serving now, so a
/// reload changes the certificate of the next handshake and never that of
/// an established connection.
struct SniResolver {
    proxy: Arc<Proxy>,
    /// The listener's address as configured.
    listener: SocketAddr,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("listener", &self.listener)
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let found = self.proxy.snapshot().certs.resolve(self.listener, sni);
        if found.is_none() {
            tracing::debug!(target: "cistern::server", "TLS on {}: no site for SNI {sni:?}; refusing the handshake", self.listener);
        }
        found
    }
}
