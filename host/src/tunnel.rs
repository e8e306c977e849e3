//! CONNECT tunnelling: bytes in both directions, never cached, and closed
//! once no byte has moved either way for the idle timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use http::uri::Authority;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::gate::ConnPermit;

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

/// Copies bytes both ways between the client connection `req` is upgraded
/// to and `upstream` (a CONNECT target's socket, or an upstream
/// connection that switched protocols), in a task of its own, until
/// either side closes or nothing has moved either way for `idle`. The connection's
/// [`ConnPermit`], when the listener put one in `req`'s extensions, goes
/// with the tunnel: it counts against the connection caps while it is open.
pub fn splice<B, U>(req: &mut Request<B>, upstream: U, authority: String, idle: Duration)
where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upgrade = hyper::upgrade::on(&mut *req);
    let permit = req.extensions_mut().remove::<Arc<ConnPermit>>();
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(target: "cistern::tunnel", %authority, "client upgrade failed: {e}");
                return;
            }
        };
        let activity = Activity::new();
        let mut client = Watched {
            io: TokioIo::new(upgraded),
            activity: &activity,
        };
        let mut upstream = Watched {
            io: upstream,
            activity: &activity,
        };
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => {
                    match r {
                        Ok((up, down)) => tracing::debug!(target: "cistern::tunnel", %authority, up, down, "tunnel closed"),
                        Err(e) => tracing::debug!(target: "cistern::tunnel", %authority, "tunnel broke: {e}"),
                    }
                    return;
                }
                // Wakes when the tunnel would have been quiet for `idle`
                // since the last byte seen; bytes since then push it on.
                _ = tokio::time::sleep_until(activity.last() + idle) => {
                    if activity.last() + idle <= Instant::now() {
                        tracing::debug!(target: "cistern::tunnel", %authority, "tunnel idle for {idle:?}; closing it");
                        if let Some(p) = &permit {
                            p.closed_idle_tunnel();
                        }
                        return;
                    }
                }
            }
        }
    });
}

/// When a tunnel last moved a byte, shared by its two ends.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// One end of a tunnel, noting every byte it reads or writes.
struct Watched<'a, T> {
    io: T,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
