//! The send deadline of HTTP/2 streams: a response whose client grants it
//! no flow-control window for `timeouts { send }` ends its connection.
//!
//! [`super::SendDeadline`] watches the socket, and an HTTP/2 client can
//! keep the socket draining (reading other streams, answering pings) while
//! it leaves one stream's window at zero. hyper then simply stops asking
//! that response's body for its next piece, and the body, with the replica
//! file or the place in a fill it reads, would be held for as long as the
//! client likes (bounded only by `http2-max-streams`).
//!
//! So each HTTP/2 response body carries a timestamp: when it last handed
//! hyper a piece (or was handed to hyper), cleared while hyper is polling
//! it (a body waiting on a slow upstream is not the client's fault) and
//! when it is done. The clock it reads runs only while the socket has
//! room: while a write waits for the client to read, the socket's own
//! deadline runs instead, and a stream waiting its turn behind the others
//! on a saturated link is not withheld window. So every moment counts for
//! one deadline or the other. One watch per connection sleeps until the
//! oldest timestamp is `send` old on that clock, and the connection is then
//! closed, which drops every stream's body. hyper offers no way to reset
//! a single stream whose body it does not poll, hence the whole connection.
//!
//! The hot path is an atomic store and a clock read per piece, and two
//! atomic updates when a socket write starts or stops waiting; a body is
//! registered once (one small allocation and a lock held for a push), and
//! the watch only wakes for deadlines, never on a fixed tick.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The stream watch of one HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct StreamWatch {
    shared: Arc<Shared>,
}

struct Shared {
    room: Arc<Room>,
    limit: Duration,
    /// The bodies handed to hyper; dead entries are pruned at each sweep.
    /// Locked for a push or a sweep, never across an await.
    bodies: Mutex<Vec<Weak<BodyClock>>>,
    /// Wakes the watch when a body is registered while it has none.
    first: Notify,
}

/// A connection's clock of time with room in its socket: milliseconds
/// since the connection began, less those a write spent waiting for room.
/// Written by [`super::SendDeadline`] on the connection's task, read by
/// the bodies on their streams' tasks.
pub(super) struct Room {
    epoch: Instant,
    /// Milliseconds spent waiting for room, up to the last wait's end.
    blocked_total: AtomicU64,
    /// 1 + the milliseconds since `epoch` at which the write waiting now
    /// began; 0 while none waits.
    blocked_since: AtomicU64,
}

impl Room {
    /// 1 + the milliseconds since `epoch` at `at`: 0 is kept for "none".
    /// A connection lives far less than the 584 million years a u64 of
    /// milliseconds allows.
    fn stamp(&self, at: Instant) -> u64 {
        at.duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// A write started waiting for room.
    pub(super) fn blocked(&self) {
        self.blocked_since
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
    }

    /// The waiting write made progress (or failed).
    pub(super) fn unblocked(&self) {
        let since = self.blocked_since.load(Ordering::Relaxed);
        if since == 0 {
            return;
        }
        let now = self.stamp(Instant::now());
        // The total first: a reader in between counts the wait twice,
        // which errs towards not cutting, never towards cutting.
        self.blocked_total
            .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        self.blocked_since.store(0, Ordering::Relaxed);
    }

    /// The clock at `at`: milliseconds with room since `epoch`, plus 1.
    fn with_room(&self, at: Instant) -> u64 {
        let now = self.stamp(at);
        let since = self.blocked_since.load(Ordering::Relaxed);
        let current = if since == 0 {
            0
        } else {
            now.saturating_sub(since)
        };
        let total = self.blocked_total.load(Ordering::Relaxed);
        now.saturating_sub(total + current).max(1)
    }
}

/// One response body's timestamp.
struct BodyClock {
    room: Arc<Room>,
    /// The [`Room`] clock when the body last handed hyper something and
    /// started waiting for hyper to ask again; 0 while hyper is polling it
    /// or once it is done.
    waiting_since: AtomicU64,
}

impl BodyClock {
    fn waiting(&self) {
        self.waiting_since
            .store(self.room.with_room(Instant::now()), Ordering::Relaxed);
    }

    fn not_waiting(&self) {
        self.waiting_since.store(0, Ordering::Relaxed);
    }
}

/// What a sweep found.
#[derive(Debug, PartialEq, Eq)]
enum Sweep {
    /// A body has waited for its client for the whole limit.
    Stalled,
    /// Nothing is registered: wait for a body.
    Idle,
    /// Look again at this instant.
    Next(Instant),
}

impl StreamWatch {
    /// A watch that closes its connection once a body has waited `limit`
    /// for its client.
    pub fn new(limit: Duration) -> StreamWatch {
        StreamWatch {
            shared: Arc::new(Shared {
                room: Arc::new(Room {
                    epoch: Instant::now(),
                    blocked_total: AtomicU64::new(0),
                    blocked_since: AtomicU64::new(0),
                }),
                limit,
                bodies: Mutex::new(Vec::new()),
                first: Notify::new(),
            }),
        }
    }

    /// Wraps `body` so that this watch keeps its deadline. Its clock starts
    /// now: hyper has it and has not asked for anything yet.
    pub fn watch<B: Body>(&self, body: B) -> WatchedBody<B> {
        if body.is_end_stream() {
            return WatchedBody::unwatched(body);
        }
        let clock = Arc::new(BodyClock {
            room: self.shared.room.clone(),
            waiting_since: AtomicU64::new(0),
        });
        clock.waiting();
        let mut bodies = self.shared.lock();
        let was_empty = bodies.is_empty();
        bodies.push(Arc::downgrade(&clock));
        drop(bodies);
        if was_empty {
            self.shared.first.notify_one();
        }
        WatchedBody {
            inner: body,
            clock: Some(clock),
        }
    }

    /// Returns once a body has waited for its client for the limit; never
    /// while none does.
    pub async fn stalled(&self) {
        loop {
            // Made before the sweep, so a registration after it is not
            // missed (`notify_one` keeps a permit for a later poll).
            let registered = self.shared.first.notified();
            match self.sweep(Instant::now()) {
                Sweep::Stalled => return,
                Sweep::Idle => registered.await,
                Sweep::Next(at) => tokio::time::sleep_until(at).await,
            }
        }
    }

    /// The limit this watch keeps.
    pub fn limit(&self) -> Duration {
        self.shared.limit
    }

    /// The clock the socket's deadline keeps up to date.
    pub(super) fn room(&self) -> Arc<Room> {
        self.shared.room.clone()
    }

    fn sweep(&self, now: Instant) -> Sweep {
        let s = &self.shared;
        let now_ms = s.room.with_room(now);
        let limit_ms = s.limit.as_millis() as u64;
        let mut bodies = s.lock();
        let mut oldest: Option<u64> = None;
        bodies.retain(|w| {
            let Some(clock) = w.upgrade() else {
                return false;
            };
            let since = clock.waiting_since.load(Ordering::Relaxed);
            if since != 0 {
                oldest = Some(oldest.map_or(since, |o| o.min(since)));
            }
            true
        });
        if bodies.is_empty() {
            return Sweep::Idle;
        }
        drop(bodies);
        match oldest {
            Some(since) if now_ms.saturating_sub(since) >= limit_ms => Sweep::Stalled,
            // The clock runs at most as fast as real time, so the oldest
            // deadline is no sooner than this; a body starting to wait
            // later has a later one. While the socket waits for room the
            // clock stands still: looks are spaced by at least a sixteenth
            // of the limit, so a long wait does not spin the watch.
            Some(since) => {
                let left = limit_ms - now_ms.saturating_sub(since);
                let left = Duration::from_millis(left).max(s.limit / 16);
                Sweep::Next(now + left)
            }
            None => Sweep::Next(now + s.limit),
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<BodyClock>>> {
        self.bodies.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A response body whose waits for its client a [`StreamWatch`] times;
/// unwatched (a plain pass-through) on HTTP/1, where the socket's own
/// deadline suffices.
pub struct WatchedBody<B> {
    inner: B,
    clock: Option<Arc<BodyClock>>,
}

impl<B> WatchedBody<B> {
    /// `body` as it is, with no deadline of its own.
    pub fn unwatched(body: B) -> WatchedBody<B> {
        WatchedBody {
            inner: body,
            clock: None,
        }
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(clock) = &this.clock {
            match &polled {
                // hyper has a piece to send; until it asks again, the
                // client is keeping it waiting. A last piece counts too:
                // the body (and its file) lives until hyper has sent it.
                Poll::Ready(Some(Ok(_))) => clock.waiting(),
                // Waiting on our side (a slow upstream), or done.
                Poll::Pending | Poll::Ready(_) => clock.not_waiting(),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body_of(chunks: usize) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames = (0..chunks).map(|_| Ok(Frame::data(Bytes::from_static(b"piece"))));
        StreamBody::new(futures_util::stream::iter(frames.collect::<Vec<_>>()))
    }

    #[test]
    fn a_body_waits_from_its_handover_and_between_pieces_while_the_socket_has_room() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let limit = Duration::from_secs(60);
            let ms = Duration::from_millis;
            let watch = StreamWatch::new(limit);
            assert_eq!(watch.sweep(Instant::now()), Sweep::Idle);
            let handed = Instant::now();
            let mut body = watch.watch(body_of(2));
            // Handed over and not polled yet: its deadline runs.
            assert!(matches!(
                watch.sweep(handed + limit - ms(100)),
                Sweep::Next(_)
            ));
            assert_eq!(watch.sweep(Instant::now() + limit + ms(5)), Sweep::Stalled);
            // While a write waits for room, the clock stands still.
            let room = watch.room();
            room.blocked();
            let Sweep::Next(at) = watch.sweep(Instant::now() + limit * 10) else {
                panic!("stalled while the socket was full");
            };
            assert!(at >= Instant::now() + limit * 10 + limit / 16 - ms(5));
            room.unblocked();
            assert_eq!(watch.sweep(Instant::now() + limit + ms(5)), Sweep::Stalled);
            // A piece handed over: the clock starts again from then.
            body.frame().await.unwrap().unwrap();
            let piece = Instant::now();
            let Sweep::Next(at) = watch.sweep(piece + limit / 2) else {
                panic!("stalled half-way");
            };
            assert!(at >= piece + limit - ms(5) && at <= Instant::now() + limit);
            // The last piece counts (hyper holds the body until it is sent);
            // once the body says it is done, nothing waits.
            body.frame().await.unwrap().unwrap();
            assert_eq!(watch.sweep(Instant::now() + limit + ms(5)), Sweep::Stalled);
            assert!(body.frame().await.is_none());
            let end = Instant::now();
            assert_eq!(watch.sweep(end), Sweep::Next(end + limit));
            drop(body);
            assert_eq!(watch.sweep(end), Sweep::Idle, "a dropped body is forgotten");
            // A body with nothing to send is not watched at all.
            let _empty = watch.watch(http_body_util::Empty::<Bytes>::new());
            assert_eq!(watch.sweep(end), Sweep::Idle);
        });
    }
}
