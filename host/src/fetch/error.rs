//! Why a fetch failed: [`FetchError`] with its kind, side and whether a
//! retry can help (in the spirit of pingora-error), and [`error_chain`]
//! to render an error and its sources on one line.

use std::time::Duration;

use http::StatusCode;

use crate::store::StoreError;

/// Which side of the proxy an error came from (pingora-error's
/// `ErrorSource`): decides the status the client sees and the wording of
/// the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The upstream misbehaved or could not be reached.
    Upstream,
    /// The clients: every one of them went away.
    Downstream,
    /// Cistern itself (disk, configuration, policies).
    Internal,
}

impl Side {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Upstream => "upstream",
            Side::Downstream => "downstream",
            Side::Internal => "internal",
        }
    }
}

/// Whether trying the same request again can help (pingora-error's
/// `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryType {
    /// A transient failure (connection refused, reset or closed, timeout):
    /// another attempt may succeed, and a fill may resume its partial.
    Retryable,
    /// Trying again gives the same answer (a wrong length or digest, a
    /// policy's refusal, a full disk).
    Final,
}

/// What kind of failure a [`FetchError`] is, without its details: for
/// logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection or no response head.
    Connect,
    /// Inactivity past the timeout.
    Timeout,
    /// The connection broke in the middle of the body.
    BodyCut,
    /// The body's length or digest is not what the upstream announced.
    Integrity,
    /// A resume was answered with other content than the partial's.
    ResumeMismatch,
    /// Offline mode.
    Offline,
    /// Nobody reads the fill any more.
    Orphaned,
    /// The replica store failed.
    Store,
    /// A policy refused the response.
    Policy,
    /// The target is one of Cistern's own listeners.
    SelfTarget,
    /// A bug: a task ended without saying how.
    Vanished,
}

impl ErrorKind {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BodyCut => "body-cut",
            ErrorKind::Integrity => "integrity",
            ErrorKind::ResumeMismatch => "resume-mismatch",
            ErrorKind::Offline => "offline",
            ErrorKind::Orphaned => "orphaned",
            ErrorKind::Store => "store",
            ErrorKind::Policy => "policy",
            ErrorKind::SelfTarget => "self-target",
            ErrorKind::Vanished => "vanished",
        }
    }
}

/// Why a fetch failed. The causes are kept typed (`source()`);
/// [`error_chain`] renders them on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No upstream could be reached, or it gave no response head.
    #[error("upstream {url} unreachable")]
    Connect {
        /// The last URL tried.
        url: String,
        /// The client's error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The upstream set had no URL to try.
    #[error("no upstream to ask for {url}")]
    NoUpstream {
        /// The primary URL.
        url: String,
    },
    /// The upstream is one of Cistern's own listeners: never connected to.
    #[error("{0}")]
    SelfTarget(crate::ours::SelfTarget),
    /// The upstream did not answer or stalled past the inactivity timeout.
    #[error("upstream {url} timed out after {after:?} of inactivity")]
    Timeout {
        /// The URL being fetched.
        url: String,
        /// The inactivity timeout.
        after: Duration,
    },
    /// The upstream connection broke in the middle of the body.
    #[error("upstream {url} failed after {written} bytes")]
    Body {
        /// The URL being fetched.
        url: String,
        /// Bytes of the body received (and kept in the partial file).
        written: u64,
        /// The transport error.
        #[source]
        source: hyper::Error,
    },
    /// Resuming a partial was answered with bytes that may not continue it.
    #[error("cannot resume {url} at byte {written}: {why}")]
    ResumeMismatch {
        /// The URL being fetched.
        url: String,
        /// Bytes in the partial file.
        written: u64,
        /// What did not match.
        why: &'static str,
    },
    /// The body is shorter or longer than the upstream announced.
    #[error("upstream {url} sent {written} bytes of {expected}")]
    Length {
        /// The URL being fetched.
        url: String,
        /// Bytes received.
        written: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The body does not match the digest the upstream sent, or the one
    /// its content-addressed URL names.
    #[error(
        "upstream {url} body has SHA-256 {actual}, but {announced} was announced or named by the URL; not stored"
    )]
    DigestMismatch {
        /// The URL fetched.
        url: String,
        /// Hex SHA-256 announced by `Repr-Digest`/`Digest`, or named by
        /// a `by-hash/SHA256/` URL.
        announced: String,
        /// Hex SHA-256 of what arrived.
        actual: String,
    },
    /// Offline mode: nothing may be fetched.
    #[error("offline mode: {url} is not in the replica")]
    Offline {
        /// The URL asked for.
        url: String,
    },
    /// Every client left and the fill ran past `orphan-fill`; the partial
    /// is kept for a later resume.
    #[error("no client left for {url} after {after:?}; partial kept")]
    Orphaned {
        /// The URL being fetched.
        url: String,
        /// The orphan-fill limit.
        after: Duration,
    },
    /// Every client left while more was still to come than the
    /// quick-abort rules let an orphan finish (`orphan-finish-left`,
    /// `orphan-finish-done`); the partial is kept for a later resume.
    #[error(
        "no client left for {url} with {written} of {total} bytes in: not worth finishing \
         (orphan-finish-left, orphan-finish-done); partial kept"
    )]
    Abandoned {
        /// The URL being fetched.
        url: String,
        /// Bytes in the partial file.
        written: u64,
        /// The full length, or "an unknown number of" when not announced.
        total: String,
    },
    /// The replica store failed (full disk, permissions).
    #[error("replica store: {0}")]
    Store(#[from] StoreError),
    /// A policy with `on-error="deny"` failed on the response.
    #[error("a policy refused the response from {url}")]
    PolicyDenied {
        /// The URL fetched.
        url: String,
    },
    /// A body read for a policy's body hook (rewritten or not) that the
    /// replica then could not take (the disk refused it): its bytes were
    /// read from the upstream, so it cannot be passed on as it came.
    #[error("the body from {url} was read for a policy's body hook but could not be stored")]
    RewriteUnstored {
        /// The URL fetched.
        url: String,
    },
    /// A worker task died (a bug); followers are released.
    #[error("fill task ended unexpectedly")]
    Vanished,
}

impl FetchError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FetchError::Connect { .. } | FetchError::NoUpstream { .. } => ErrorKind::Connect,
            FetchError::Timeout { .. } => ErrorKind::Timeout,
            FetchError::Body { .. } => ErrorKind::BodyCut,
            FetchError::ResumeMismatch { .. } => ErrorKind::ResumeMismatch,
            FetchError::Length { .. } | FetchError::DigestMismatch { .. } => ErrorKind::Integrity,
            FetchError::Offline { .. } => ErrorKind::Offline,
            FetchError::Orphaned { .. } | FetchError::Abandoned { .. } => ErrorKind::Orphaned,
            FetchError::Store(_) => ErrorKind::Store,
            FetchError::PolicyDenied { .. } | FetchError::RewriteUnstored { .. } => {
                ErrorKind::Policy
            }
            FetchError::SelfTarget(_) => ErrorKind::SelfTarget,
            FetchError::Vanished => ErrorKind::Vanished,
        }
    }

    /// The side the error came from.
    pub fn side(&self) -> Side {
        match self {
            FetchError::Store(_)
            | FetchError::Vanished
            | FetchError::Offline { .. }
            | FetchError::NoUpstream { .. }
            | FetchError::SelfTarget(_)
            | FetchError::PolicyDenied { .. }
            | FetchError::RewriteUnstored { .. } => Side::Internal,
            FetchError::Orphaned { .. } | FetchError::Abandoned { .. } => Side::Downstream,
            _ => Side::Upstream,
        }
    }

    /// Whether another attempt can help.
    pub fn retry(&self) -> RetryType {
        match self {
            FetchError::Connect { .. } | FetchError::Timeout { .. } => RetryType::Retryable,
            // A reset or closed connection is transient; a body that does
            // not parse (bad chunking) comes back the same.
            FetchError::Body { source, .. } if !source.is_parse() && !source.is_user() => {
                RetryType::Retryable
            }
            _ => RetryType::Final,
        }
    }

    /// The status a client sees when nothing was sent yet.
    pub fn status(&self) -> StatusCode {
        match self {
            FetchError::Timeout { .. } | FetchError::Offline { .. } => StatusCode::GATEWAY_TIMEOUT,
            FetchError::Store(_) | FetchError::Vanished | FetchError::NoUpstream { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            FetchError::SelfTarget(_) => StatusCode::LOOP_DETECTED,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// An error and its sources on one line, for logs and error pages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_their_kind_side_and_whether_to_retry() {
        let timeout = FetchError::Timeout {
            url: "u".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.kind(), ErrorKind::Timeout);
        assert_eq!(timeout.side(), Side::Upstream);
        assert_eq!(timeout.retry(), RetryType::Retryable);
        let digest = FetchError::DigestMismatch {
            url: "u".into(),
            announced: "a".into(),
            actual: "b".into(),
        };
        assert_eq!(digest.kind(), ErrorKind::Integrity);
        assert_eq!(digest.retry(), RetryType::Final);
        let orphan = FetchError::Orphaned {
            url: "u".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(orphan.side(), Side::Downstream);
        assert_eq!(orphan.retry(), RetryType::Final);
    }
}
