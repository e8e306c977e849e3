//! Active health probes of a mirror set: a `HEAD` of the configured path
//! on each upstream, on the engine's clock (see [`super::mirror`] for what
//! the results do); and the background `HEAD` of a redirected file on the
//! mirror a client was sent to, whose 404 the set remembers.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};

use super::failover::{build_request, empty_body};
use super::mirror::{FileKey, MirrorSet};
use super::{FetchEngine, Inner, error_chain};

impl FetchEngine {
    /// Starts probing `set`'s upstreams if its `health` names a probe path.
    /// The task holds the set weakly and ends once a reload has dropped it.
    /// Outside a tokio runtime (unit tests building routers) nothing runs.
    pub fn watch_health(&self, set: &Arc<MirrorSet>) {
        if set.health.probe.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        let set = Arc::downgrade(set);
        runtime.spawn(probe_loop(inner, set));
    }
}

impl FetchEngine {
    /// After a client was redirected to upstream `index` of `set` for
    /// `rest` (the path below the prefix; `file` is its key in the set's
    /// 404 memory), checks the file there in the background when the set
    /// claims a check ([`MirrorSet::claim_check_of`]): a `HEAD` of
    /// `target` (`rest` with the query the redirect kept) within the
    /// probe timeout. A 404 or 410 is remembered as that mirror's 404, so
    /// the next client goes to another; anything else changes nothing
    /// (health is the probes' and the proxied requests'). The client's
    /// answer never waits for it.
    pub fn check_redirected(
        &self,
        set: &Arc<MirrorSet>,
        index: usize,
        file: FileKey,
        rest: &str,
        target: &str,
    ) {
        // Claimed first: a file checked already costs two map lookups, no
        // URL and no task.
        if !set.claim_check_of(index, file) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(url) = set.url(index, target) else {
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        let set = Arc::downgrade(set);
        let rest = rest.to_owned();
        runtime.spawn(async move {
            let (Some(inner), Some(set)) = (inner.upgrade(), set.upgrade()) else {
                return;
            };
            let req = build_request(Method::HEAD, &url, &HeaderMap::new(), empty_body());
            let timeout = set.health.timeout;
            match tokio::time::timeout(timeout, inner.client.send(req)).await {
                Ok(Ok(resp))
                    if matches!(
                        resp.status(),
                        http::StatusCode::NOT_FOUND | http::StatusCode::GONE
                    ) =>
                {
                    tracing::info!(target: "cistern::fetch", mirror = %set.name, %url,
                        status = resp.status().as_u16(),
                        "a redirected file is not on its mirror; later clients go to another");
                    set.remember_missing(index, &rest);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(target: "cistern::fetch", mirror = %set.name, %url,
                        "check of a redirected file failed: {}", error_chain(&e));
                }
                Err(_) => {
                    tracing::debug!(target: "cistern::fetch", mirror = %set.name, %url,
                        "check of a redirected file: no answer within {timeout:?}");
                }
            }
        });
    }
}

/// Probes what is due, then sleeps on the set's clock until the next one.
async fn probe_loop(inner: Weak<Inner>, set: Weak<MirrorSet>) {
    loop {
        let (Some(inner), Some(set)) = (inner.upgrade(), set.upgrade()) else {
            return;
        };
        let now = set.now_ms();
        let due = set.due_probes(now);
        let probes = due.iter().map(|&i| probe(&inner, &set, i));
        futures_util::future::join_all(probes).await;
        let wait = set.next_probe_in(set.now_ms());
        let clock = set.clock().clone();
        // Hold neither while asleep: a reload must be able to drop the set.
        drop((inner, set));
        // A probe whose answer took a while may leave nothing due yet;
        // waiting at least a moment keeps a broken schedule from spinning.
        clock.sleep(wait.max(Duration::from_millis(1))).await;
    }
}

/// Sends one probe to upstream `index` and records its result.
async fn probe(inner: &Inner, set: &MirrorSet, index: usize) {
    let Some(path) = set.health.probe.as_deref() else {
        return;
    };
    let at = set.clock().now();
    let started = Instant::now();
    let result = match set.url(index, path) {
        Err(e) => Err(format!("no probe URL: {e}")),
        Ok(url) => {
            let req = build_request(Method::HEAD, &url, &HeaderMap::new(), empty_body());
            match tokio::time::timeout(set.health.timeout, inner.client.send(req)).await {
                Err(_) => Err(format!("no answer within {:?}", set.health.timeout)),
                Ok(Err(e)) => Err(error_chain(&e)),
                Ok(Ok(resp)) if resp.status().is_success() => Ok(resp.status().as_u16()),
                Ok(Ok(resp)) => Err(format!("status {}", resp.status())),
            }
        }
    };
    if let Err(why) = &result {
        tracing::debug!(target: "cistern::fetch", mirror = %set.name, index, "probe failed: {why}");
    }
    set.probed(index, at, started.elapsed(), result);
}
