//! Connection admission: what a listener lets in and for how long a
//! connection may say nothing.
//!
//! - [`ConnGate`] caps the connections open at once, over all and per
//!   client address (`limit { max-connections … }`). A connection over a
//!   cap is closed as soon as it is accepted, before a byte is read or
//!   written: under a flood, refusing must cost nothing, and a listener
//!   does not know yet whether the client speaks HTTP/1, HTTP/2 or TLS, so
//!   no error page could be written that every client understands.
//! - [`AcceptBackoff`] spaces out accept retries while the process is out
//!   of descriptors, instead of spinning or waiting a fixed time.
//! - [`raise_descriptor_limit`] lifts the soft `RLIMIT_NOFILE` to the hard
//!   limit at start, so the caps, not the default 1024, bound what is open.
//!
//! - [`SendDeadline`] closes a connection whose client takes no byte of
//!   what Cistern has for it for `timeouts { send }` (a slow reader), and
//!   [`StreamWatch`] one whose HTTP/2 client grants a response no
//!   flow-control window for as long while the socket itself drains.
//!
//! The deadline of a connection's first request (the idle timeout from
//! accept until a whole request head has arrived) is kept by the listeners
//! in [`crate::server`] and [`crate::admin`]; they count what it closes
//! here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::LimitsConfig;

mod send;
mod stream;
pub use send::SendDeadline;
pub use stream::{StreamWatch, WatchedBody};

/// The connection caps in force when a connection is accepted; read from
/// the snapshot serving then, so a reload applies to the next accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnCaps {
    /// Connections open at once over all the gate's listeners.
    pub total: u32,
    /// Connections open at once from one client address.
    pub per_client: u32,
}

impl ConnCaps {
    /// The caps a configuration's `limit` block sets.
    pub fn from_config(limits: &LimitsConfig) -> ConnCaps {
        ConnCaps {
            total: limits.max_connections,
            per_client: limits.max_connections_per_client,
        }
    }
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every connection the gate allows is taken.
    #[error("{limit} connections are open (max-connections)")]
    Total {
        /// The cap.
        limit: u32,
    },
    /// This client already has as many connections as one may.
    #[error("this client has {limit} connections open (max-connections-per-client)")]
    PerClient {
        /// The cap.
        limit: u32,
    },
}

/// Counts open connections against [`ConnCaps`], and what was refused or
/// closed for silence. One per kind of listener (proxy, admin); it
/// outlives reloads.
#[derive(Debug, Default)]
pub struct ConnGate {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    open: Mutex<Open>,
    refused_total: AtomicU64,
    refused_per_client: AtomicU64,
    silent: AtomicU64,
    idle_tunnels: AtomicU64,
    stalled: AtomicU64,
    stalled_streams: AtomicU64,
}

/// Both counts under one lock, so a connection is admitted against both
/// caps at once; the lock is held for a map update, never across I/O.
#[derive(Debug, Default)]
struct Open {
    total: u32,
    /// Only clients with a connection open: an entry goes when its count
    /// reaches zero, so the map is as big as the set of clients connected.
    by_client: HashMap<IpAddr, u32>,
}

/// One admitted connection; dropping it gives its place back. A CONNECT
/// tunnel takes a share of its connection's permit, so the tunnel counts
/// for as long as it is open.
#[derive(Debug)]
pub struct ConnPermit {
    shared: Arc<Shared>,
    client: IpAddr,
}

/// What `/metrics` shows of a gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Connections open now.
    pub open: u64,
    /// Connections closed at accept because `max-connections` was reached.
    pub refused_total: u64,
    /// Connections closed at accept because their client was at
    /// `max-connections-per-client`.
    pub refused_per_client: u64,
    /// Connections closed because no whole request arrived within the idle
    /// timeout of their accept.
    pub silent: u64,
    /// CONNECT tunnels closed after the idle timeout with no byte either way.
    pub idle_tunnels: u64,
    /// Connections closed because their client took no data for the send
    /// timeout.
    pub stalled: u64,
    /// HTTP/2 connections closed because a response waited for flow-control
    /// window from its client for the send timeout.
    pub stalled_streams: u64,
}

impl ConnGate {
    /// A gate with nothing open.
    pub fn new() -> ConnGate {
        ConnGate::default()
    }

    /// Admits a connection from `client` if both caps allow it; a refusal
    /// is counted.
    pub fn admit(&self, client: IpAddr, caps: ConnCaps) -> Result<ConnPermit, Refused> {
        // A v4 client on a dual-stack listener is the same client as on a
        // v4 one.
        let client = client.to_canonical();
        let mut open = self.shared.lock();
        if open.total >= caps.total {
            drop(open);
            self.shared.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Total { limit: caps.total });
        }
        // Looked up before inserting, so a refusal never leaves an entry.
        let mine = open.by_client.get(&client).copied().unwrap_or(0);
        if mine >= caps.per_client {
            drop(open);
            self.shared
                .refused_per_client
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refused::PerClient {
                limit: caps.per_client,
            });
        }
        open.by_client.insert(client, mine + 1);
        open.total += 1;
        drop(open);
        Ok(ConnPermit {
            shared: self.shared.clone(),
            client,
        })
    }

    /// Counts a connection closed because it sent no whole request in time.
    pub fn closed_silent(&self) {
        self.shared.silent.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn stats(&self) -> GateStats {
        let open = u64::from(self.shared.lock().total);
        let s = &self.shared;
        GateStats {
            open,
            refused_total: s.refused_total.load(Ordering::Relaxed),
            refused_per_client: s.refused_per_client.load(Ordering::Relaxed),
            silent: s.silent.load(Ordering::Relaxed),
            idle_tunnels: s.idle_tunnels.load(Ordering::Relaxed),
            stalled: s.stalled.load(Ordering::Relaxed),
            stalled_streams: s.stalled_streams.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn open_from(&self, client: IpAddr) -> u32 {
        let client = client.to_canonical();
        self.shared
            .lock()
            .by_client
            .get(&client)
            .copied()
            .unwrap_or(0)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ConnPermit {
    /// Counts a CONNECT tunnel on this connection closed for idleness.
    pub fn closed_idle_tunnel(&self) {
        self.shared.idle_tunnels.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts this connection closed because its client took no data for
    /// the send timeout.
    pub fn closed_stalled(&self) {
        self.shared.stalled.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts this HTTP/2 connection closed because one of its responses
    /// waited for flow-control window for the send timeout.
    pub fn closed_stalled_stream(&self) {
        self.shared.stalled_streams.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ConnPermit {
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

/// The wait before the next accept after a failed one: 10 ms, doubling up
/// to 1 s while accepts keep failing, back to 10 ms after one succeeds.
/// Running out of descriptors is the usual failure; retrying at once would
/// spin, and a fixed long wait would leave the listener deaf once
/// descriptors are free again.
#[derive(Debug, Clone)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_millis(10);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(1);

    /// A back-off at its first step.
    pub fn new() -> AcceptBackoff {
        AcceptBackoff { next: Self::FIRST }
    }

    /// An accept failed: how long to wait before the next one.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(Self::MAX);
        wait
    }

    /// An accept succeeded: the next failure waits the first step again.
    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff::new()
    }
}

/// The descriptor limit before and after [`raise_descriptor_limit`];
/// `None` stands for unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorLimit {
    /// The soft limit the process started with.
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
}

/// Why the descriptor limit could not be raised.
#[derive(Debug, thiserror::Error)]
#[error("raising the open-file limit from {before:?} to {wanted:?}: {source}")]
pub struct DescriptorLimitError {
    /// The soft limit, unchanged.
    pub before: Option<u64>,
    /// What was asked for.
    pub wanted: Option<u64>,
    /// What the OS said.
    pub source: std::io::Error,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Every connection
/// (and every tunnel's upstream, every replica file being read) takes a
/// descriptor; shells and service managers often start processes at 1024,
/// far below the hard limit and below the default `max-connections`.
pub fn raise_descriptor_limit() -> Result<DescriptorLimit, DescriptorLimitError> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    // An unlimited hard limit cannot be set as the soft one for open files
    // (Linux caps it at fs.nr_open, 1 Mi by default): ask for that.
    let wanted = Some(limit.maximum.unwrap_or(1 << 20));
    if before.is_none() || before >= wanted {
        return Ok(DescriptorLimit {
            before,
            now: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: wanted,
            maximum: limit.maximum,
        },
    )
    .map_err(|e| DescriptorLimitError {
        before,
        wanted,
        source: e.into(),
    })?;
    Ok(DescriptorLimit {
        before,
        now: getrlimit(Resource::Nofile).current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(total: u32, per_client: u32) -> ConnCaps {
        ConnCaps { total, per_client }
    }

    #[test]
    fn backoff_doubles_from_10ms_to_1s_and_resets_on_success() {
        let mut b = AcceptBackoff::new();
        let waits: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
        assert_eq!(b.failed(), Duration::from_millis(20));
    }

    #[test]
    fn per_client_cap_counts_each_address_and_forgets_it_at_zero() {
        let gate = ConnGate::new();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<ConnPermit> = (0..2)
            .map(|_| gate.admit(a, caps(10, 2)).unwrap())
            .collect();
        assert_eq!(
            gate.admit(a, caps(10, 2)).unwrap_err(),
            Refused::PerClient { limit: 2 }
        );
        let other = gate.admit(b, caps(10, 2)).unwrap();
        assert_eq!(gate.stats().open, 3);
        assert_eq!(gate.stats().refused_per_client, 1);
        drop(held);
        assert_eq!(gate.open_from(a), 0);
        assert_eq!(gate.shared.lock().by_client.len(), 1, "a's entry is gone");
        drop(other);
        assert!(gate.shared.lock().by_client.is_empty());
        assert_eq!(gate.stats().open, 0);
    }

    #[test]
    fn total_cap_refuses_any_client_once_reached() {
        let gate = ConnGate::new();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        let first = gate.admit(a, caps(2, 5)).unwrap();
        let _second = gate.admit(b, caps(2, 5)).unwrap();
        assert_eq!(
            gate.admit(b, caps(2, 5)).unwrap_err(),
            Refused::Total { limit: 2 }
        );
        // A refusal leaves no entry behind.
        assert_eq!(gate.shared.lock().by_client.len(), 2);
        assert_eq!(gate.open_from("127.0.0.2".parse().unwrap()), 1);
        drop(first);
        assert!(gate.admit(b, caps(2, 5)).is_ok());
        assert_eq!(gate.stats().refused_total, 1);
    }
}
