//! Shared fixtures for the policy tests: one engine per test binary, a
//! declaration builder, an in-memory `PolicyHost`, and request views.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cistern::config::{Isolation, OnError, PolicyDecl, PolicySource};
use cistern::policy::{LimitVerdict, PolicyEngine, PolicyHost, ReplicaState, RequestView};
use http::{HeaderMap, Method};

/// One engine per test binary: the pooling allocator reserves address space
/// per engine, and a real process has exactly one.
pub fn engine() -> &'static PolicyEngine {
    static ENGINE: OnceLock<PolicyEngine> = OnceLock::new();
    ENGINE.get_or_init(|| PolicyEngine::new().expect("engine"))
}

/// A test guest in `tests/guests/`.
pub fn guest(file: &str) -> PolicySource {
    PolicySource::File(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/guests")
            .join(file),
    )
}

/// A Rust test guest built by host/build.rs from `policies/testing/`.
pub fn built_guest(artifact: &str) -> PolicySource {
    PolicySource::File(
        PathBuf::from(env!("CISTERN_GUEST_WASM_DIR")).join(format!("{artifact}.wasm")),
    )
}

/// A declaration with the defaults `config.kdl` gives.
pub fn decl(name: &str, source: PolicySource) -> PolicyDecl {
    PolicyDecl {
        name: name.to_owned(),
        source,
        on_error: OnError::Pass,
        isolation: Isolation::Reuse,
        deadline: Duration::from_millis(50),
        memory_limit: 16 * 1024 * 1024,
        params: Vec::new(),
        body: None,
    }
}

/// An in-memory replica index and limiter.
#[derive(Default)]
pub struct TestHost {
    /// key or URL → state
    pub replicas: HashMap<String, ReplicaState>,
    /// sha256 → URL
    pub digests: HashMap<[u8; 32], String>,
    /// limiter name → allowed requests per key
    pub limiters: HashMap<String, u32>,
    counts: Mutex<HashMap<(String, String), u32>>,
}

impl TestHost {
    /// Wraps it as the proxy would pass it.
    pub fn shared(self) -> Arc<dyn PolicyHost> {
        Arc::new(self)
    }
}

impl PolicyHost for TestHost {
    fn replica_state(&self, key: &str) -> ReplicaState {
        self.replicas
            .get(key)
            .copied()
            .unwrap_or(ReplicaState::Absent)
    }

    fn url_by_sha256(&self, digest: &[u8; 32]) -> Option<String> {
        self.digests.get(digest).cloned()
    }

    fn limiter_check(&self, limiter: &str, key: &str) -> Option<LimitVerdict> {
        let allowed = *self.limiters.get(limiter)?;
        let mut counts = self.counts.lock().unwrap();
        let count = counts
            .entry((limiter.to_owned(), key.to_owned()))
            .or_default();
        *count += 1;
        Some(if *count <= allowed {
            LimitVerdict::Allow
        } else {
            LimitVerdict::Deny {
                retry_after: Duration::from_millis(1500),
            }
        })
    }
}

/// A GET of `url` from 192.0.2.7:40000 with the given headers.
pub fn request(url: &str, headers: &[(&str, &str)]) -> RequestView {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    RequestView::new(Method::GET, url.parse().unwrap(), map, client)
}

/// A header's value as a string, or "".
pub fn header(map: &HeaderMap, name: &str) -> String {
    map.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}
