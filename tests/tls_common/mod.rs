//! TLS test fixtures: a certificate authority made at test time (rcgen),
//! site certificates signed by it, and a rustls client that speaks
//! HTTP/1.1 or HTTP/2 as ALPN decides.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub pem: String,
    der: CertificateDer<'static>,
}

/// A leaf certificate and its key.
#[derive(Clone)]
pub struct Leaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8).
    pub key_pem: String,
    /// Certificate, DER: what a client sees as the peer certificate.
    pub der: Vec<u8>,
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Cistern test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, valid now.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, |_| {})
    }

    /// A certificate for `names`, its parameters adjusted by `f` first.
    pub fn leaf_with(&self, names: &[&str], f: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "cistern test site");
        f(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A client trusting this CA, offering `alpn`, with rustls' default
    /// session cache (so a second connection can resume).
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        self.client_versions(alpn, rustls::DEFAULT_VERSIONS)
    }

    /// Like [`Ca::client`], limited to `versions`.
    pub fn client_versions(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Writes the CA certificate to `dir/ca.pem`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

impl Leaf {
    /// Writes `dir/NAME.pem` and `dir/NAME.key`, each replaced atomically
    /// (written beside, then renamed) as a careful operator or certbot does.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        replace_file(&key, self.key_pem.as_bytes());
        replace_file(&cert, self.cert_pem.as_bytes());
        (cert, key)
    }
}

/// Writes `path` through a temporary file and a rename.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS connection's facts and its HTTP sender.
pub struct TlsClient {
    /// The certificate the server presented (leaf, DER).
    pub peer: Vec<u8>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// Whether the handshake resumed an earlier session.
    pub resumed: bool,
    /// The TLS version.
    pub version: Option<rustls::ProtocolVersion>,
    sender: Sender,
    authority: String,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// HTTP version it came in.
    pub version: Version,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body (or the error that cut it short).
    pub body: Result<Bytes, String>,
}

/// Opens a TLS connection to `addr` naming `sni`, then HTTP/2 if ALPN
/// chose `h2`, else HTTP/1.1.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> Result<TlsClient, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, conn) = tls.get_ref();
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let version = conn.protocol_version();
    let io = TokioIo::new(tls);
    let sender = if alpn.as_deref() == Some(b"h2") {
        let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        Sender::H2(s)
    } else {
        let (s, c) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        Sender::H1(s)
    };
    Ok(TlsClient {
        peer,
        alpn,
        resumed,
        version,
        sender,
        authority: format!("{sni}:{}", addr.port()),
    })
}

impl TlsClient {
    /// GETs `path` for the host named at connect time.
    pub async fn get(&mut self, path: &str) -> Result<Answer, String> {
        let host = self.authority.clone();
        self.get_host(path, &host).await
    }

    /// GETs `path` naming `host` (`:authority` or `Host`), which may differ
    /// from the SNI.
    pub async fn get_host(&mut self, path: &str, host: &str) -> Result<Answer, String> {
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                let req = Request::get(path)
                    .header("host", host)
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                let req = Request::get(format!("https://{host}{path}"))
                    .version(Version::HTTP_2)
                    .body(Empty::new())
                    .unwrap();
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        Ok(Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most
/// `within`; panics with `what` if it never does.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
