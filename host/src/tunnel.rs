//! CONNECT tunnelling: bytes in both directions, never cached.

use std::time::Duration;

use http::uri::Authority;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::ours::OwnSockets;

/// Connects to `authority` within `connect_timeout`, never to one of the
/// sockets in `own` (a nested CONNECT through Cistern itself, or a tunnel
/// to its admin listener): the error then wraps a
/// [`crate::ours::SelfTarget`]. The caller answers 200 and then hands the
/// upgraded client connection to [`splice`].
pub async fn connect(
    own: &OwnSockets,
    authority: &Authority,
    connect_timeout: Duration,
) -> std::io::Result<TcpStream> {
    let port = authority.port_u16().unwrap_or(443);
    let connect = async {
        let addrs = own
            .resolve(authority.host(), port, connect_timeout)
            .await
            .map_err(std::io::Error::other)?;
        // The addresses checked, in the resolver's order.
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address to connect to")))
    };
    match tokio::time::timeout(connect_timeout, connect).await {
        Ok(r) => {
            let stream = r?;
            stream.set_nodelay(true)?;
            Ok(stream)
        }
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Copies bytes both ways between the upgraded client connection and the
/// upstream until either side closes; runs as its own task.
pub fn splice(upgrade: OnUpgrade, mut upstream: TcpStream, authority: String) {
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(target: "cistern::tunnel", %authority, "client upgrade failed: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(upgraded);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => {
                tracing::debug!(target: "cistern::tunnel", %authority, up, down, "tunnel closed")
            }
            Err(e) => tracing::debug!(target: "cistern::tunnel", %authority, "tunnel broke: {e}"),
        }
    });
}
