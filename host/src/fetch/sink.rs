//! The body sink of a fill: gathers the upstream's frames, writes them at
//! the end of the partial file while hashing them, and publishes how far
//! the file goes to the fill's readers.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::store::{PartialFile, StoreError};

use super::{FetchError, Fill, FillState, Inner};

/// Bytes accepted from the upstream per positioned write; frames are
/// gathered up to this size so a fast upstream costs few blocking hops.
pub(super) const WRITE_BATCH: usize = 256 * 1024;

impl Inner {
    /// Writes the gathered frames at the end of the partial file and tells
    /// the readers how far the file goes.
    pub(super) async fn flush(&self, fill: &Fill, sink: &mut BodySink) -> Result<(), FetchError> {
        if sink.batch.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut sink.batch);
        let file = sink.partial.file.clone();
        let offset = sink.written;
        let mut h = sink.hasher.take();
        let result = tokio::task::spawn_blocking(move || {
            let mut at = offset;
            for chunk in &chunks {
                file.write_all_at(chunk, at)?;
                if let Some(h) = h.as_mut() {
                    h.update(chunk);
                }
                at += chunk.len() as u64;
            }
            Ok::<_, std::io::Error>((h, at))
        })
        .await;
        match result {
            Ok(Ok((h, at))) => {
                if sink.from_peer {
                    self.metrics.peer_bytes(at - offset);
                } else {
                    self.metrics.upstream_bytes(at - offset);
                }
                sink.partial.wrote(at - offset);
                sink.hasher = h;
                sink.written = at;
                sink.batch_len = 0;
                publish_written(fill, at);
                Ok(())
            }
            Ok(Err(e)) if crate::store::room::is_no_space(&e) => {
                self.metrics.store_refusal();
                let (key, path) = (sink.partial.key.clone(), sink.partial.path.clone());
                self.blocking(move |s| Err(s.ran_full(&key, path, offset)))
                    .await
            }
            Ok(Err(e)) => Err(FetchError::Store(StoreError::Io {
                op: "write partial file",
                path: sink.partial.path.clone(),
                source: e,
            })),
            Err(_) => Err(FetchError::Vanished),
        }
    }
}

/// The partial file a fill appends to, with the frames gathered for its
/// next write.
pub(super) struct BodySink {
    pub(super) partial: PartialFile,
    pub(super) batch: Vec<Bytes>,
    pub(super) batch_len: usize,
    /// Bytes in the file.
    pub(super) written: u64,
    /// SHA-256 of the bytes so far; `None` when resuming.
    pub(super) hasher: Option<Sha256>,
    /// The bytes come from a peer of the fleet, not an upstream.
    pub(super) from_peer: bool,
}

fn publish_written(fill: &Fill, now: u64) {
    fill.state.send_if_modified(|state| match state {
        FillState::Streaming { written, .. } if *written != now => {
            *written = now;
            true
        }
        _ => false,
    });
}

/// SHA-256 of the first `len` bytes of `file` (a resumed fill's whole body).
pub(super) fn hash_file(file: &File, len: u64) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let want = buf.len().min((len - at) as usize);
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "partial file shrank",
            ));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize().into())
}
