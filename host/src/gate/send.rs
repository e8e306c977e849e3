//! The send deadline (`timeouts { send }`, nginx's `send_timeout`): a
//! connection whose client takes none of the bytes Cistern has for it for
//! that long is closed.
//!
//! The idle timeout covers a client that sends nothing; this covers one
//! that reads nothing, or one byte a minute, and would otherwise hold its
//! connection, the replica file it reads and its place in a fill for ever.
//! The clock only runs while a write is waiting for room in the socket: a
//! response waiting on a slow upstream writes nothing and is not the
//! client's fault. It wraps the connection's I/O, under TLS and whichever
//! HTTP version hyper speaks on it, so HTTP/1 and HTTP/2 connections alike
//! are closed when their socket stops draining.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::ConnPermit;
use super::stream::{Room, StreamWatch};

/// A connection's I/O with the send deadline kept on its writes.
pub struct SendDeadline<I> {
    io: I,
    limit: Duration,
    /// The deadline of the write waiting now; `armed` says whether one is.
    /// The timer is kept and reset rather than made anew at each stall.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// The connection's place under the caps, where the close is counted.
    permit: Arc<ConnPermit>,
    counted: bool,
    /// The HTTP/2 streams' clock, told when writes wait for room.
    room: Option<Arc<Room>>,
}

impl<I> SendDeadline<I> {
    /// Wraps `io`: a write that can make no progress for `limit` fails
    /// with `TimedOut`, which ends the connection; the close is counted on
    /// `permit`'s gate.
    pub fn new(io: I, limit: Duration, permit: Arc<ConnPermit>) -> SendDeadline<I> {
        SendDeadline {
            io,
            limit,
            timer: None,
            armed: false,
            permit,
            counted: false,
            room: None,
        }
    }

    /// Tells `watch` when writes wait for room: its streams' deadlines
    /// stand still meanwhile, since this one runs.
    pub fn pausing(mut self, watch: &StreamWatch) -> SendDeadline<I> {
        self.room = Some(watch.room());
        self
    }

    /// A write made progress (or failed): no deadline runs.
    fn progressed<T>(&mut self, r: Poll<T>) -> Poll<T> {
        if self.armed {
            self.armed = false;
            if let Some(room) = &self.room {
                room.unblocked();
            }
        }
        r
    }

    /// A write is waiting for room: starts the deadline if none runs, and
    /// fails the write once it has passed.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
            if let Some(room) = &self.room {
                room.blocked();
            }
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                if !self.counted {
                    self.counted = true;
                    self.permit.closed_stalled();
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client took no data for {:?} (timeouts {{ send }})",
                        self.limit
                    ),
                )))
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SendDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SendDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => this.waiting(cx),
            ready => this.progressed(ready),
        }
    }
}
