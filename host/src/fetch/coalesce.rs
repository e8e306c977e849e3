//! Coalescing: the one [`Fill`] of a key that every reader follows, the
//! [`FillState`] it publishes, the [`FillTicket`] a request gets, and the
//! in-flight registry with the [`FillGuard`] that always releases it.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Response};
use hyper::body::Incoming;
use tokio::sync::{oneshot, watch};

use crate::observe::NoCacheReason;
use crate::store::{CacheKey, Replica};

use super::{FetchError, Inner};

/// What readers need to serve a fill's bytes.
#[derive(Debug)]
pub struct FillHead {
    /// The response's status: 200, or a status kept aside (a 404 …).
    pub status: http::StatusCode,
    /// The upstream URL.
    pub url: String,
    /// Headers to send to clients (stored form: no hop-by-hop, no cookies).
    pub headers: HeaderMap,
    /// Full body length, if announced.
    pub length: Option<u64>,
    /// The partial file, read with positioned reads.
    pub file: Arc<File>,
    /// The RFC 9111 state of the response (Vary checks for joiners).
    pub policy: http_cache_semantics::CachePolicy,
    /// When the head arrived (for `Age`).
    pub received: SystemTime,
    /// Bytes already in the partial file when this fill began (a resume);
    /// zero otherwise. The admin UI's transfer rate leaves them out.
    pub start: u64,
}

/// The state of a fill, published to its readers.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Asking the upstream; no head yet.
    Waiting,
    /// Writing the body; `written` bytes are in the file.
    Streaming {
        /// The response head.
        head: Arc<FillHead>,
        /// Bytes in the partial file so far.
        written: u64,
    },
    /// The body is complete, verified and committed.
    Complete {
        /// The response head.
        head: Arc<FillHead>,
        /// The committed replica.
        replica: Arc<Replica>,
    },
    /// The body ended with the upstream connection and nothing proves it
    /// complete: readers get all `length` bytes, nothing is stored.
    Unverified {
        /// The response head.
        head: Arc<FillHead>,
        /// Bytes of the body, all in the (no longer stored) partial file.
        length: u64,
    },
    /// The upstream said 304: the stored replica is good again.
    Revalidated(Arc<Replica>),
    /// The response is not stored, for the reason given; every client
    /// fetches on its own.
    Unshared(NoCacheReason),
    /// The fill failed; readers abort their transfers.
    Failed(Arc<FetchError>),
}

impl FillState {
    /// A short name for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            FillState::Waiting => "waiting",
            FillState::Streaming { .. } => "streaming",
            FillState::Complete { .. } => "complete",
            FillState::Unverified { .. } => "unverified",
            FillState::Revalidated(_) => "revalidated",
            FillState::Unshared(_) => "unshared",
            FillState::Failed(_) => "failed",
        }
    }
}

/// The one upstream fetch of a key.
#[derive(Debug)]
pub struct Fill {
    /// The key being filled.
    pub key: CacheKey,
    pub(super) state: watch::Sender<FillState>,
    pub(super) started: Instant,
}

impl Fill {
    /// Subscribes to the fill's progress.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// Clients currently reading.
    pub fn readers(&self) -> usize {
        self.state.receiver_count()
    }

    /// When the fill started.
    pub fn started(&self) -> Instant {
        self.started
    }
}

/// The answer to [`super::FetchEngine::fill`].
pub enum FillTicket {
    /// A complete replica appeared meanwhile: serve it.
    Ready(Arc<Replica>),
    /// This request started the fill. If the response turns out not to be
    /// shareable, its head and body arrive on `passthrough`.
    Leader {
        /// The fill.
        fill: Arc<Fill>,
        /// The unshareable response, for this client only.
        passthrough: oneshot::Receiver<Response<Incoming>>,
    },
    /// Another request's fill is under way: read along.
    Follower(Arc<Fill>),
    /// No fill was started: a fill cap is reached.
    Refused(super::FillRefused),
}

/// Releases a fill's key and its readers however the fill task ends
/// (return, error or panic): readers never wait on a vanished writer.
pub(super) struct FillGuard {
    pub(super) inner: Arc<Inner>,
    pub(super) fill: Arc<Fill>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.fill.state.send_if_modified(|state| match state {
            FillState::Waiting | FillState::Streaming { .. } => {
                *state = FillState::Failed(Arc::new(FetchError::Vanished));
                true
            }
            _ => false,
        });
        let mut map = self.inner.inflight.lock();
        if map
            .get(&self.fill.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            map.remove(&self.fill.key);
        }
    }
}

/// The in-flight registry: the fill in progress of each key.
#[derive(Debug, Default)]
pub(super) struct Inflight(Mutex<HashMap<CacheKey, Arc<Fill>>>);

impl Inflight {
    /// The registry, locked. A panic while it was held cannot leave it
    /// half-changed (each change is one insert or remove), so a poisoned
    /// lock is taken over rather than propagated.
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, Arc<Fill>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
