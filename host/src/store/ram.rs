//! A bounded copy in RAM of small, frequently served replicas.
//!
//! A hit on a small file would otherwise cost a hop to the blocking pool
//! for `open` + `read` on every request; with the bytes in memory a hit is
//! answered on the worker that parsed the request. The disk file stays the
//! replica: the copy is made from it, belongs to one [`super::Replica`]
//! version, and gives its bytes back to the budget when that version is
//! dropped (replaced, refreshed, evicted or removed).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;

/// Replicas up to this size are kept in RAM once served.
pub const MAX_RAM_OBJECT: u64 = 64 * 1024;

/// Total RAM for copies of small replicas.
pub const RAM_BUDGET: i64 = 64 * 1024 * 1024;

/// Bytes of RAM left for copies.
#[derive(Debug)]
pub struct RamBudget {
    left: AtomicI64,
}

impl RamBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: i64) -> Arc<RamBudget> {
        Arc::new(RamBudget {
            left: AtomicI64::new(bytes),
        })
    }

    /// Bytes not yet taken.
    pub fn left(&self) -> i64 {
        self.left.load(Ordering::Relaxed)
    }

    /// Takes `bytes` from the budget if they fit.
    fn take(&self, bytes: i64) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left >= bytes).then(|| left - bytes)
            })
            .is_ok()
    }
}

/// A replica's body in RAM; returns its size to the budget when dropped.
#[derive(Debug)]
pub struct RamBody {
    bytes: Bytes,
    budget: Arc<RamBudget>,
}

impl RamBody {
    /// A copy of `bytes`, if the budget has room for it.
    pub fn new(bytes: Bytes, budget: &Arc<RamBudget>) -> Option<RamBody> {
        budget.take(bytes.len() as i64).then(|| RamBody {
            bytes,
            budget: budget.clone(),
        })
    }

    /// The bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl Drop for RamBody {
    fn drop(&mut self) {
        self.budget
            .left
            .fetch_add(self.bytes.len() as i64, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_come_out_of_the_budget_and_go_back_when_dropped() {
        let budget = RamBudget::new(10);
        let a = RamBody::new(Bytes::from_static(b"123456"), &budget).unwrap();
        assert_eq!(budget.left(), 4);
        assert!(
            RamBody::new(Bytes::from_static(b"12345"), &budget).is_none(),
            "over budget"
        );
        drop(a);
        assert_eq!(budget.left(), 10);
        assert!(RamBody::new(Bytes::from_static(b"12345"), &budget).is_some());
    }
}
