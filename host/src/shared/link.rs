//! The link to Redis: connecting and reconnecting (the `supervise` task)
//! and writing this node's digests into the fleet's index (the
//! `write_digests` task).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{
    CONNECT_TIMEOUT, Conn, DigestEvent, HeldAs, Inner, OP_TIMEOUT, Target, digest_key, node_key,
};
use crate::store::ReplicaStore;

/// How often a quiet connection is checked with `PING`.
const PING_EVERY: Duration = Duration::from_secs(1);
/// The first and the longest wait between connection attempts.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Digest changes sent in one pipeline.
const BATCH: usize = 512;

/// Keeps a connection to the configured Redis while there is one:
/// connects, pings it, and after a failure (its own or one another task
/// reported) reconnects with a growing wait.
pub(crate) async fn supervise(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut target_rx = inner.target.subscribe();
    let mut retry = RETRY_FIRST;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let target: Option<Target> = target_rx.borrow_and_update().clone();
        let Some(target) = target else {
            inner.disconnected();
            tokio::select! {
                _ = target_rx.changed() => continue,
                _ = shutdown.changed() => return,
            }
        };
        match connect(&target.url.0).await {
            Ok(conn) => {
                retry = RETRY_FIRST;
                let generation = inner.connected(conn, target.node.clone());
                // Healthy until a ping or another task's command fails, or
                // the config points elsewhere.
                let mut ping = tokio::time::interval(PING_EVERY);
                loop {
                    tokio::select! {
                        _ = ping.tick() => {
                            let Some(c) = inner.conn() else { break };
                            if c.generation != generation {
                                break;
                            }
                            if let Err(why) = ping_once(&c).await {
                                inner.failed(generation, &why);
                                break;
                            }
                        }
                        _ = inner.broken.notified() => {
                            if inner.conn().is_none_or(|c| c.generation != generation) {
                                break;
                            }
                        }
                        r = target_rx.changed() => {
                            if r.is_err() {
                                return;
                            }
                            inner.disconnected();
                            break;
                        }
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Err(why) => {
                inner.unreachable(&why);
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = target_rx.changed() => {}
                    _ = shutdown.changed() => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT));
    match tokio::time::timeout(
        CONNECT_TIMEOUT + OP_TIMEOUT,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
    }
}

/// Checks the connection and says this node is alive (see
/// [`super::alive_key`]).
async fn ping_once(c: &Conn) -> Result<(), String> {
    let mut conn = c.conn.clone();
    let alive = redis::cmd("SET")
        .arg(super::alive_key(&c.node))
        .arg(1)
        .arg("PX")
        .arg(super::ALIVE_FOR.as_millis() as u64)
        .to_owned();
    run(&mut conn, &alive).await.map(|_: String| ())
}

/// Runs one command within [`OP_TIMEOUT`].
pub(crate) async fn run<T: redis::FromRedisValue>(
    conn: &mut redis::aio::MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, cmd.query_async(conn)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Runs a pipeline within `limit`.
pub(crate) async fn run_pipe<T: redis::FromRedisValue>(
    conn: &mut redis::aio::MultiplexedConnection,
    pipe: &redis::Pipeline,
    limit: Duration,
) -> Result<T, String> {
    match tokio::time::timeout(limit, pipe.query_async(conn)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Writes this node's digest changes into the fleet's index as they come
/// and, after each (re)connection, the whole index again.
pub(crate) async fn write_digests(
    inner: Arc<Inner>,
    store: Arc<ReplicaStore>,
    mut rx: mpsc::Receiver<DigestEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if inner.resync.load(Ordering::Relaxed)
            && let Some(conn) = inner.conn()
        {
            inner.resync.store(false, Ordering::Relaxed);
            // The snapshot below covers everything queued so far.
            while rx.try_recv().is_ok() {}
            if let Err(why) = resync(&inner, &conn, &store).await {
                inner.resync.store(true, Ordering::Relaxed);
                inner.failed(conn.generation, &why);
            }
            continue;
        }
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
            }
            _ = inner.resync_wake.notified() => continue,
            _ = shutdown.changed() => return,
        }
        let Some(conn) = inner.conn() else {
            // Down: the next connection resyncs.
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for event in batch.drain(..) {
            match event {
                DigestEvent::Held { digest, key, size } => {
                    held(&mut pipe, &conn.node, &digest, key, size)
                }
                DigestEvent::Dropped(digest) => {
                    dropped(&mut pipe, &conn.node, &hex::encode(digest))
                }
            }
        }
        let mut c = conn.conn.clone();
        match run_pipe::<()>(&mut c, &pipe, OP_TIMEOUT).await {
            Ok(()) => {
                inner
                    .digests_written
                    .fetch_add(pipe.len() as u64 / 2, Ordering::Relaxed);
            }
            Err(why) => {
                inner.resync.store(true, Ordering::Relaxed);
                inner.failed(conn.generation, &why);
            }
        }
    }
}

fn held(pipe: &mut redis::Pipeline, node: &str, digest: &[u8; 32], key: String, size: u64) {
    let value = serde_json::to_string(&HeldAs { key, size }).unwrap_or_default();
    pipe.hset(digest_key(digest), node, value).ignore();
    pipe.sadd(node_key(node), hex::encode(digest)).ignore();
}

fn dropped(pipe: &mut redis::Pipeline, node: &str, hex_digest: &str) {
    pipe.hdel(format!("{}digest:{hex_digest}", super::PREFIX), node)
        .ignore();
    pipe.srem(node_key(node), hex_digest).ignore();
}

/// Makes the fleet's index say exactly what this node holds: takes back
/// the digests it no longer has (evicted while Redis was away) and writes
/// every one it has.
async fn resync(inner: &Inner, conn: &Conn, store: &ReplicaStore) -> Result<(), String> {
    let entries = store.entries();
    let mut have: Vec<([u8; 32], String, u64)> = entries
        .iter()
        .filter(|r| r.meta.in_tree())
        .filter_map(|r| {
            let mut d = [0u8; 32];
            hex::decode_to_slice(&r.meta.sha256, &mut d).ok()?;
            Some((d, r.meta.key.clone(), r.meta.length))
        })
        .collect();
    have.sort_by_key(|a| a.0);
    have.dedup_by(|a, b| a.0 == b.0);
    let mut c = conn.conn.clone();
    let listed: Vec<String> = run(&mut c, redis::cmd("SMEMBERS").arg(node_key(&conn.node))).await?;
    let keep: HashSet<String> = have.iter().map(|(d, _, _)| hex::encode(d)).collect();
    let mut written = 0u64;
    let mut pipe = redis::pipe();
    for gone in listed.iter().filter(|d| !keep.contains(*d)) {
        dropped(&mut pipe, &conn.node, gone);
        written += 1;
        if pipe.len() >= 2 * BATCH {
            run_pipe::<()>(&mut c, &pipe, OP_TIMEOUT).await?;
            pipe = redis::pipe();
        }
    }
    for (digest, key, size) in have {
        held(&mut pipe, &conn.node, &digest, key, size);
        written += 1;
        if pipe.len() >= 2 * BATCH {
            run_pipe::<()>(&mut c, &pipe, OP_TIMEOUT).await?;
            pipe = redis::pipe();
        }
    }
    if !pipe.is_empty() {
        run_pipe::<()>(&mut c, &pipe, OP_TIMEOUT).await?;
    }
    inner.digests_written.fetch_add(written, Ordering::Relaxed);
    tracing::debug!(target: "cistern::shared", written, "digest index written to Redis in full");
    Ok(())
}
