//! CONNECT tunnelling: bytes in both directions, never cached.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Connects to `authority` within `connect_timeout`; the caller answers 200
/// and then hands the upgraded client connection to [`splice`].
pub async fn connect(authority: &str, connect_timeout: Duration) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(connect_timeout, TcpStream::connect(authority)).await {
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
