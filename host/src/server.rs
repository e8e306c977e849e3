//! Listeners and connections: HTTP/1.1 and HTTP/2 (h2c, prior knowledge)
//! on one port, header and idle timeouts, and a graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::proxy::{ConnInfo, Proxy};

/// A bound listener, ready to serve.
pub struct BoundListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl BoundListener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<BoundListener> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(BoundListener { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serves `listeners` until `shutdown` turns true, then stops accepting and
/// waits up to `drain` for connections in flight.
pub async fn serve(
    listeners: Vec<BoundListener>,
    proxy: Arc<Proxy>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
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
        .keep_alive_timeout(idle);
    let builder = Arc::new(builder);

    let (conn_tx, mut conn_rx) =
        tokio::sync::mpsc::channel::<(TcpStream, SocketAddr, SocketAddr)>(1024);
    let mut accept_tasks = Vec::new();
    for l in listeners {
        let tx = conn_tx.clone();
        let mut stop = shutdown.clone();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    accepted = l.listener.accept() => match accepted {
                        Ok((stream, client)) => {
                            if tx.send((stream, client, l.addr)).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off
                            // instead of spinning.
                            tracing::warn!(target: "cistern::server", "accept on {}: {e}", l.addr);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        }));
    }
    drop(conn_tx);

    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            next = conn_rx.recv() => {
                let Some((stream, client, local)) = next else { break };
                let _ = stream.set_nodelay(true);
                let info = ConnInfo { client, local };
                let proxy = proxy.clone();
                let service = service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, info).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(target: "cistern::server", %client, "connection ended: {e}");
                    }
                });
            }
        }
    }
    for t in accept_tasks {
        t.abort();
    }
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(target: "cistern::server", "all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(target: "cistern::server", "drain timed out after {drain:?}; closing"),
    }
}
