//! Upstreams over https: the rustls client trusts the CA file named in
//! config (tests generate one), speaks HTTP/2 where the origin offers it,
//! and refuses an origin it cannot verify.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Cistern, find_files, get, pattern};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, KeyPair};
use tokio::net::TcpListener;

/// The HTTP versions of the requests a TLS origin answered.
type Versions = Arc<Mutex<Vec<http::Version>>>;

/// A TLS origin for `localhost` (ALPN h2 and http/1.1) with a certificate
/// signed by a fresh CA; returns its port, the CA's PEM and the versions of
/// the requests it sees.
async fn tls_origin(body: Bytes) -> (u16, String, Versions) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let versions = Versions::default();
    let seen = versions.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let acceptor = acceptor.clone();
            let body = body.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    seen.lock().unwrap().push(req.version());
                    let body = body.clone();
                    async move {
                        let mut resp = http::Response::new(Full::new(body));
                        resp.headers_mut()
                            .insert("cache-control", "max-age=600".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca.pem(), versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_mirror_is_verified_with_the_configured_ca_and_cached() {
    let body = pattern(1, 100_000);
    let (port, ca_pem, versions) = tls_origin(body.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
upstream-tls {{ system-roots #false; ca-file "ca.pem"; }}
mirror "secure" {{ prefix "/s/"; upstream "https://localhost:{port}/"; }}
"#
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let first = get(cistern.addr, "/s/file.bin").await;
    assert_eq!(first.status, 200, "{}", cistern.log());
    assert_eq!(first.bytes(), &body);
    assert_eq!(
        get(cistern.addr, "/s/file.bin")
            .await
            .header("cache-status"),
        "cistern; hit"
    );
    assert_eq!(
        find_files(&cistern.root),
        vec![format!("localhost:{port}/file.bin")]
    );
    assert_eq!(
        *versions.lock().unwrap(),
        vec![http::Version::HTTP_2],
        "one upstream request, in HTTP/2 as the origin offers it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_origin_signed_by_an_unknown_ca_is_refused_with_502() {
    let (port, _ca_pem, _) = tls_origin(pattern(2, 10)).await;
    let (_, other_ca, _) = tls_origin(pattern(3, 10)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), other_ca).unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
upstream-tls {{ system-roots #false; ca-file "ca.pem"; }}
mirror "secure" {{ prefix "/s/"; upstream "https://localhost:{port}/"; }}
"#
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let refused = get(cistern.addr, "/s/file.bin").await;
    assert_eq!(refused.status, 502);
    let text = String::from_utf8_lossy(refused.bytes()).to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("unknownissuer"),
        "{text}"
    );
    assert!(find_files(&cistern.root).is_empty());
}
