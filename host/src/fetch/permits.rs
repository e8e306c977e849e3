//! Fill permits: the caps on fills in flight, over all and per client
//! address (`limit { max-fills … }`).
//!
//! A fill outlives the request that started it, so without a cap a client
//! that asks for N distinct large objects and hangs up leaves N upstream
//! downloads behind. Every fill holds a [`FillPermit`] from the moment it is
//! registered until its task ends, whichever way it ends (commit, error,
//! abort, panic): the permit is moved into the task and dropped with it.
//! Followers of a fill under way read a file that is being written anyway
//! and never need one.
//!
//! The counts are kept under one lock, like [`crate::gate::ConnGate`]'s,
//! rather than in a `tokio::sync::Semaphore`: the caps come from the
//! snapshot serving when a fill starts, so a reload that lowers or raises
//! them applies to the next fill without resizing a semaphore, and the
//! per-client count needs a map anyway. Admission never waits: a request
//! over a cap is answered at once (see `docs/caching.md`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::config::LimitsConfig;

/// The fill caps in force when a fill starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillCaps {
    /// Fills in flight at once over all clients (`max-fills`).
    pub total: u32,
    /// Fills in flight at once started by one client address
    /// (`max-fills-per-client`).
    pub per_client: u32,
}

impl FillCaps {
    /// The caps a configuration's `limit` block sets.
    pub fn from_config(limits: &LimitsConfig) -> FillCaps {
        FillCaps {
            total: limits.max_fills,
            per_client: limits.max_fills_per_client,
        }
    }
}

/// Why a fill was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FillRefused {
    /// Every fill the cap allows is under way.
    #[error("{limit} downloads are under way (max-fills)")]
    Total {
        /// The cap.
        limit: u32,
    },
    /// This client already started as many fills as one may.
    #[error("this client has {limit} downloads under way (max-fills-per-client)")]
    PerClient {
        /// The cap.
        limit: u32,
    },
}

/// What `/metrics` shows of the fill caps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillGateStats {
    /// Fills holding a permit now.
    pub in_flight: u64,
    /// Fills refused because `max-fills` was reached.
    pub refused_total: u64,
    /// Fills refused because their client was at `max-fills-per-client`.
    pub refused_per_client: u64,
}

/// Counts fills in flight against [`FillCaps`]; one per engine, so it
/// outlives reloads.
#[derive(Debug, Default)]
pub(super) struct FillGate {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    open: Mutex<Open>,
    refused_total: AtomicU64,
    refused_per_client: AtomicU64,
}

/// Both counts under one lock, held for a map update only.
#[derive(Debug, Default)]
struct Open {
    total: u32,
    /// Only clients with a fill in flight: an entry goes at zero.
    by_client: HashMap<IpAddr, u32>,
}

/// One fill's place under the caps; dropping it gives the place back.
#[derive(Debug)]
pub(super) struct FillPermit {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl FillGate {
    /// Admits a fill started by `client` if both caps allow it; a refusal
    /// is counted.
    pub(super) fn admit(&self, client: IpAddr, caps: FillCaps) -> Result<FillPermit, FillRefused> {
        let client = client.to_canonical();
        let mut open = self.shared.lock();
        if open.total >= caps.total {
            drop(open);
            self.shared.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(FillRefused::Total { limit: caps.total });
        }
        let mine = open.by_client.get(&client).copied().unwrap_or(0);
        if mine >= caps.per_client {
            drop(open);
            self.shared
                .refused_per_client
                .fetch_add(1, Ordering::Relaxed);
            return Err(FillRefused::PerClient {
                limit: caps.per_client,
            });
        }
        open.by_client.insert(client, mine + 1);
        open.total += 1;
        drop(open);
        Ok(FillPermit {
            shared: self.shared.clone(),
            client,
        })
    }

    /// The counters now.
    pub(super) fn stats(&self) -> FillGateStats {
        let in_flight = u64::from(self.shared.lock().total);
        FillGateStats {
            in_flight,
            refused_total: self.shared.refused_total.load(Ordering::Relaxed),
            refused_per_client: self.shared.refused_per_client.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        let mut open = self.shared.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_capped_over_all_and_per_client_and_given_back_on_drop() {
        let gate = FillGate::default();
        let caps = FillCaps {
            total: 3,
            per_client: 2,
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let a1 = gate.admit(a, caps).unwrap();
        let _a2 = gate.admit(a, caps).unwrap();
        assert_eq!(
            gate.admit(a, caps).unwrap_err(),
            FillRefused::PerClient { limit: 2 }
        );
        let _b1 = gate.admit(b, caps).unwrap();
        assert_eq!(
            gate.admit("10.0.0.2".parse().unwrap(), caps).unwrap_err(),
            FillRefused::Total { limit: 3 },
            "a mapped address is the same client, and the total is reached"
        );
        drop(a1);
        assert_eq!(gate.stats().in_flight, 2);
        let _a3 = gate.admit(a, caps).unwrap();
        let s = gate.stats();
        assert_eq!((s.refused_total, s.refused_per_client), (1, 1));
    }
}
