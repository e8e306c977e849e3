//! The upstream HTTP client: pooled connections, http and https (rustls
//! with the system roots and any CA files named in config), connect
//! timeout, `Via` on the way out, and never a connection to one of
//! Cistern's own listeners ([`GuardedConnector`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{Timeouts, UpstreamTls};
use crate::ours::OwnSockets;
use crate::via::ViaHop;

/// A request body on its way upstream.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

pub use crate::body::BoxError;

/// Errors building the upstream client from config.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// A CA file could not be read or holds no certificate.
    #[error("upstream CA file {path}: {reason}")]
    CaFile {
        /// The file named in config.
        path: std::path::PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// No trust anchors at all: https upstreams could never be verified.
    #[error("no trust anchors: system roots are off and no CA file is named")]
    NoRoots,
}

/// The pooled hyper client under [`UpstreamClient`].
type Pooled = Client<HttpsConnector<GuardedConnector>, UpstreamBody>;

/// The shared upstream client.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    client: Pooled,
    /// The same connector with no pool: every request on a new
    /// connection, for a request sent again after a reused connection
    /// failed under it (the pool may hold more of the same age).
    fresh: Pooled,
    /// HTTP/1.1 only and unpooled, for requests that switch protocols
    /// (`Upgrade`, e.g. WebSocket): HTTP/2 has no `Upgrade`, and an
    /// upgraded connection never goes back to a pool.
    upgrades: Pooled,
    /// `ftp://` URLs, answered by the in-process FTP gateway
    /// ([`super::ftp`]); unpooled, each request its own FTP session.
    ftp: Client<super::ftp::FtpConnector, UpstreamBody>,
    own: Arc<OwnSockets>,
    /// Our hop, added to `Via` on every request sent.
    via: Arc<ViaHop>,
}

impl UpstreamClient {
    /// Builds the client: trust anchors from `tls`, timeouts from
    /// `timeouts`; it refuses to connect to the sockets in `own` and names
    /// itself `via` in `Via`.
    pub fn new(
        tls: &UpstreamTls,
        timeouts: &Timeouts,
        own: Arc<OwnSockets>,
        via: Arc<ViaHop>,
    ) -> Result<UpstreamClient, ClientBuildError> {
        let mut roots = RootCertStore::empty();
        if tls.system_roots {
            // Unreadable individual system certificates are skipped, as every
            // TLS client does; an empty system store is caught below.
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
        for path in &tls.ca_files {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| ClientBuildError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .collect::<Result<_, _>>()
                .map_err(|e| ClientBuildError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(ClientBuildError::CaFile {
                    path: path.clone(),
                    reason: "no PEM certificate in it".into(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ClientBuildError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        if roots.is_empty() && !tls.ca_files.is_empty() {
            return Err(ClientBuildError::NoRoots);
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let ftp = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(super::ftp::FtpConnector {
                own: own.clone(),
                connect_timeout: timeouts.connect,
            });
        let http = GuardedConnector {
            own: own.clone(),
            connect_timeout: timeouts.connect,
        };
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls_config.clone())
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http.clone()),
            );
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        // Idle connections go before the server's own keep-alive timeout
        // would close them under a request; the timer reaps them so their
        // sockets do not linger until the next checkout.
        let idle = timeouts.upstream_idle;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(if idle.is_zero() { 0 } else { 64 })
            .build(https.clone());
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https);
        Ok(UpstreamClient {
            client,
            fresh,
            upgrades,
            ftp,
            own,
            via,
        })
    }

    /// Cistern's own sockets, which no upstream connection may reach.
    pub fn own_sockets(&self) -> &Arc<OwnSockets> {
        &self.own
    }

    /// This Cistern's `Via` hop.
    pub fn via(&self) -> &Arc<ViaHop> {
        &self.via
    }

    /// Sends one request upstream and returns the response head with its
    /// streaming body.
    pub async fn send(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        req.headers_mut()
            .append(http::header::VIA, self.via.value());
        if is_ftp(req.uri()) {
            return self.ftp.request(req).await;
        }
        self.client.request(req).await
    }

    /// Sends one request on a new connection, never a pooled one.
    pub async fn send_fresh(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        req.headers_mut()
            .append(http::header::VIA, self.via.value());
        if is_ftp(req.uri()) {
            return self.ftp.request(req).await;
        }
        self.fresh.request(req).await
    }

    /// Sends a request that asks to switch protocols, over HTTP/1.1 on a
    /// new connection; a `101` answer's connection is then the caller's
    /// (`hyper::upgrade::on`).
    pub async fn send_upgrade(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        req.headers_mut()
            .append(http::header::VIA, self.via.value());
        self.upgrades.request(req).await
    }
}

/// Whether `uri` is an `ftp://` URL, sent to the FTP gateway.
fn is_ftp(uri: &Uri) -> bool {
    uri.scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("ftp"))
}

/// Whether `error` is an upstream connection closed after the request
/// went out and before any byte of a response came back: the race a
/// kept-alive connection loses when the server's idle timer fires as the
/// request arrives. hyper-util says nothing of it beyond "not a connect
/// error" (a request it had not started yet it already retries itself),
/// so the hyper error under it is asked: an incomplete message (EOF
/// where the response head should be) or a request canceled because
/// the connection closed.
pub fn closed_before_answer(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message() || h.is_canceled();
        }
        source = e.source();
    }
    false
}

/// The TCP connector under the TLS one: it resolves the name itself,
/// refuses it when an address is one of Cistern's own listeners (a forward
/// request for `http://127.0.0.1:9090/` must not reach the admin listener,
/// nor one for our own proxy port loop), and connects to exactly the
/// addresses it checked, so a DNS answer cannot change in between.
#[derive(Clone, Debug)]
pub struct GuardedConnector {
    own: Arc<OwnSockets>,
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = dst.host().ok_or("upstream URL has no host")?;
            let default_port = if dst.scheme() == Some(&http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            };
            let port = dst.port_u16().unwrap_or(default_port);
            let addrs = this.own.resolve(host, port, this.connect_timeout).await?;
            // hyper's connector does the rest (happy eyeballs, timeouts,
            // socket options), fed the checked addresses instead of a
            // second lookup; an IP literal it parses itself, unchanged.
            let mut http = HttpConnector::new_with_resolver(Checked(Arc::new(addrs)));
            http.enforce_http(false);
            http.set_connect_timeout(Some(this.connect_timeout));
            http.set_nodelay(true);
            http.set_keepalive(Some(Duration::from_secs(60)));
            let stream = tower_service::Service::call(&mut http, dst).await?;
            Ok(stream)
        })
    }
}

/// A resolver that answers with addresses already resolved and checked.
#[derive(Clone)]
struct Checked(Arc<Vec<SocketAddr>>);

impl tower_service::Service<Name> for Checked {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, std::io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(self.0.as_ref().clone().into_iter()))
    }
}
