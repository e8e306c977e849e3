//! The in-memory index of complete replicas.

/// The index.
#[derive(Debug, Default)]
pub(crate) struct Index;
