//! Rate limits, on governor: requests per client, the shared upstream
//! bandwidth cap, and the named limiters that policies consult. With
//! `cluster { redis }` the named limiters are fleet-wide (a window counted
//! in Redis, see [`crate::shared`]) and governor's are their fallback
//! while Redis is unreachable.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Config, RequestRate};

/// All the limiters of one configuration.
#[derive(Debug)]
pub struct Limits {
    per_client: Option<DefaultKeyedRateLimiter<IpAddr>>,
    download: Option<Bandwidth>,
    named: HashMap<String, Named>,
    /// Where the named limiters count fleet-wide, with `cluster { redis }`.
    fleet: Option<crate::shared::SharedState>,
}

/// A named limiter: its rate and this node's own limiter of it.
#[derive(Debug)]
struct Named {
    rate: RequestRate,
    local: DefaultKeyedRateLimiter<String>,
}

/// The upstream download cap, in bytes per second, shared by every fetch.
#[derive(Debug)]
pub struct Bandwidth {
    limiter: DefaultDirectRateLimiter,
    /// Largest grant governor can make at once (one second's worth).
    burst: u32,
}

/// A limiter said no: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for a `Retry-After` header, at least 1.
    pub fn header_secs(&self) -> u64 {
        let whole = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        whole.max(1)
    }
}

fn quota(rate: RequestRate) -> Quota {
    // Config validation guarantees non-zero count, period and burst.
    let count = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(count);
    let replenish = rate.period / count.get();
    Quota::with_period(replenish.max(Duration::from_nanos(1)))
        .expect("non-zero period")
        .allow_burst(burst)
}

impl Limits {
    /// Builds the limiters a configuration declares; the named ones count
    /// fleet-wide in `shared` when the config has `cluster { redis }`.
    pub fn with_shared(config: &Config, shared: &crate::shared::SharedState) -> Limits {
        let mut limits = Limits::new(config);
        if config.cluster.as_ref().is_some_and(|c| c.redis.is_some()) {
            limits.fleet = Some(shared.clone());
        }
        limits
    }

    /// Builds the limiters a configuration declares, all local.
    pub fn new(config: &Config) -> Limits {
        let per_client = config
            .limits
            .requests_per_client
            .map(|rate| RateLimiter::keyed(quota(rate)));
        let download = config.limits.download_bytes_per_sec.map(Bandwidth::new);
        let named = config
            .limiters
            .iter()
            .map(|l| {
                let local = RateLimiter::keyed(quota(l.rate));
                (
                    l.name.clone(),
                    Named {
                        rate: l.rate,
                        local,
                    },
                )
            })
            .collect();
        Limits {
            per_client,
            download,
            named,
            fleet: None,
        }
    }

    /// Counts one request from `client`; `Err` when it is over its rate.
    pub fn check_client(&self, client: IpAddr) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.per_client else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Asks the named limiter about `key`; `None` when no such limiter is
    /// declared. Fleet-wide while Redis is up (never waiting on it), this
    /// node's own limiter otherwise.
    pub fn check_named(&self, name: &str, key: &str) -> Option<Result<(), RetryAfter>> {
        let limiter = self.named.get(name)?;
        let fleet = self.fleet.as_ref().and_then(|shared| {
            shared.check_fleet(name, key, limiter.rate.count, limiter.rate.period)
        });
        if let Some(verdict) = fleet {
            return Some(verdict.map_err(RetryAfter));
        }
        Some(
            limiter
                .local
                .check_key(&key.to_owned())
                .map_err(|n| RetryAfter(n.wait_time_from(DefaultClock::default().now()))),
        )
    }

    /// The upstream bandwidth cap, if any.
    pub fn download(&self) -> Option<&Bandwidth> {
        self.download.as_ref()
    }

    /// Forgets clients not seen for a while so the keyed state stays small;
    /// called periodically.
    pub fn housekeeping(&self) {
        if let Some(l) = &self.per_client {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in self.named.values() {
            l.local.retain_recent();
            l.local.shrink_to_fit();
        }
    }
}

impl Bandwidth {
    /// A cap of `bytes_per_sec` (at least 1), with bursts of one second.
    pub fn new(bytes_per_sec: u64) -> Bandwidth {
        let burst = bytes_per_sec.clamp(1, u64::from(u32::MAX)) as u32;
        let rate = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Bandwidth {
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            burst,
        }
    }

    /// Waits until `bytes` more may be downloaded. Chunks larger than one
    /// second's worth are granted in pieces.
    pub async fn acquire(&self, bytes: usize) {
        let mut left = bytes as u64;
        while left > 0 {
            let piece = left.min(u64::from(self.burst)) as u32;
            let n = NonZeroU32::new(piece).unwrap_or(NonZeroU32::MIN);
            loop {
                match self.limiter.check_n(n) {
                    Ok(Ok(())) => break,
                    Ok(Err(not_until)) => {
                        let wait = not_until.wait_time_from(DefaultClock::default().now());
                        tokio::time::sleep(wait).await;
                    }
                    // Cannot happen: pieces never exceed the burst.
                    Err(_) => break,
                }
            }
            left -= u64::from(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(RetryAfter(Duration::from_millis(1)).header_secs(), 1);
        assert_eq!(RetryAfter(Duration::ZERO).header_secs(), 1);
        assert_eq!(RetryAfter(Duration::from_secs(2)).header_secs(), 2);
        assert_eq!(RetryAfter(Duration::from_millis(2100)).header_secs(), 3);
    }
}
