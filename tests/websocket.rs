//! WebSocket (and any `Upgrade`) through Cistern: the handshake goes to the
//! upstream, a `101` turns both connections into one tunnel, messages flow
//! both ways, nothing is cached, an idle tunnel is closed, and an upstream
//! that declines the upgrade is answered as it answered.

mod common;
mod tls_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Cistern, Origin, Resource, files_mirror, find_files};
use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tls_common::Ca;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// A WebSocket echo server on loopback that keeps each handshake's
/// request headers.
struct EchoOrigin {
    addr: std::net::SocketAddr,
    handshakes: Arc<Mutex<Vec<(String, HeaderMap)>>>,
}

impl EchoOrigin {
    // tungstenite's handshake callback returns its HTTP response as the error.
    #[allow(clippy::result_large_err)]
    async fn start() -> EchoOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let record = |req: &Request, resp: Response| {
                        seen.lock()
                            .unwrap()
                            .push((req.uri().path().to_owned(), req.headers().clone()));
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_text() || msg.is_binary() {
                            if ws.send(msg).await.is_err() {
                                return;
                            }
                        } else if msg.is_close() {
                            return;
                        }
                    }
                });
            }
        });
        EchoOrigin { addr, handshakes }
    }

    fn handshakes(&self) -> Vec<(String, HeaderMap)> {
        self.handshakes.lock().unwrap().clone()
    }
}

fn mirror_of(origin: std::net::SocketAddr, extra_args: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
{extra_args}
mirror "live" {{
    prefix "/live/"
    upstream "http://{origin}/"
}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_a_mirror_echoes_both_ways_and_stores_nothing() {
    let origin = EchoOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &mirror_of(origin.addr, ""), &[]);
    let url = format!("ws://{}/live/chat?room=1", cistern.addr);
    let (mut ws, resp) = tokio_tungstenite::connect_async(&url)
        .await
        .unwrap_or_else(|e| panic!("handshake through Cistern: {e}\n{}", cistern.log()));
    assert_eq!(resp.status(), 101);
    assert!(
        resp.headers()["via"].to_str().unwrap().contains("cistern-"),
        "{:?}",
        resp.headers()
    );
    ws.send(Message::text("hello")).await.unwrap();
    let echoed = ws.next().await.expect("an answer").unwrap();
    assert_eq!(echoed, Message::text("hello"));
    // A message bigger than any buffer on the way, both directions.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = ws.next().await.expect("an answer").unwrap();
    assert_eq!(echoed.into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();

    let seen = origin.handshakes();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (path, headers) = &seen[0];
    assert_eq!(path, "/chat");
    // The upstream learns who the client is, and that we are in the way.
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert!(headers["via"].to_str().unwrap().contains("cistern-"));
    assert!(find_files(&cistern.root).is_empty(), "nothing stored");
    let log = cistern
        .log_when("the handshake's access line", |l| {
            l.contains("pass:upgrade")
        })
        .await;
    assert!(log.contains("/live/chat"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_a_tls_site_works_over_http1() {
    let origin = EchoOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["one.test"]).write(dir.path(), "one");
    let text = format!(
        r#"
store {{
    root "{{ROOT}}"
}}
site "one.test" {{
    listen "127.0.0.1:{{PORT}}"
    tls cert="one.pem" key="one.key"
    upstream "http://{}/"
}}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let tcp = TcpStream::connect(cistern.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("one.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(ca.client(&[b"http/1.1"]))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://one.test/socket", tls)
        .await
        .unwrap_or_else(|e| panic!("handshake through the site: {e}\n{}", cistern.log()));
    assert_eq!(resp.status(), 101);
    for n in 0..3 {
        let text = format!("message {n}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    ws.close(None).await.unwrap();
    assert_eq!(origin.handshakes()[0].0, "/socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_after_the_idle_timeout() {
    let origin = EchoOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &mirror_of(origin.addr, ""), &["-t", "2"]);
    let url = format!("ws://{}/live/quiet", cistern.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
    // Then nothing either way: Cistern closes the tunnel after -t 2.
    let ended = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    match ended {
        Ok(None) | Ok(Some(Err(_))) => {}
        Ok(Some(Ok(msg))) if msg.is_close() => {}
        other => panic!("the idle tunnel was not closed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_declines_the_upgrade_is_answered_as_it_answered() {
    // An ordinary web server: it ignores Upgrade and answers 200.
    let origin = Origin::start().await;
    origin.put(
        "/page",
        Resource::new(bytes::Bytes::from_static(b"no sockets here\n")),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);
    let mut tcp = TcpStream::connect(cistern.addr).await.unwrap();
    tcp.write_all(
        b"GET /files/page HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            if n == 0 || got.ends_with(b"no sockets here\n") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("pass; detail=upgrade") || text.contains("detail=upgrade"),
        "{text}"
    );
    // The origin saw the handshake it ignored, once.
    assert_eq!(origin.hits("/page"), 1);
    let seen = origin.seen();
    assert_eq!(seen[0].headers["upgrade"], "websocket");
}
