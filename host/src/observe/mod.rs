//! Observability vocabulary shared by the request path and the admin
//! listener: what the cache did ([`CacheOutcome`]), the counters
//! ([`Metrics`]) and the access log. A leaf: it depends on no engine, so
//! every engine can report into it.

pub mod accesslog;
pub mod metrics;
mod outcome;
pub mod redirects;

pub use metrics::{Metrics, MetricsSnapshot, OUTCOMES};
pub use outcome::{CacheOutcome, NoCacheReason};
