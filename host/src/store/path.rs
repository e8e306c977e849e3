//! Mapping a cache key to a safe path under the replica root.

/// A path relative to the replica root that is known to stay inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaPath(std::path::PathBuf);

/// Why a key has no safe replica path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The URL is not absolute http(s).
    #[error("not an absolute http(s) URL")]
    NotAbsolute,
}
