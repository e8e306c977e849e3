//! The policy ABI from the guest's side: an interpreter guest
//! (`guests/abi_interpreter.wat`) makes whatever host calls the input
//! spells, with any arguments, in both hooks. The host must answer every
//! call with a value or an error code, never panic, and leave a request, a
//! response and a direct answer that are valid HTTP.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cistern::config::{Isolation, OnError, PolicyDecl, PolicySource};
use cistern::policy::{
    LimitVerdict, PolicyChain, PolicyEngine, PolicyHost, ReplicaState, RequestOutcome,
    RequestView, ResponseView,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use libfuzzer_sys::fuzz_target;

/// Answers the engines' questions from fixed data, as the replica store
/// and limiters would.
struct FuzzHost {
    replicas: HashMap<String, ReplicaState>,
}

impl PolicyHost for FuzzHost {
    fn replica_state(&self, key: &str) -> ReplicaState {
        self.replicas.get(key).copied().unwrap_or(ReplicaState::Absent)
    }

    fn url_by_sha256(&self, digest: &[u8; 32]) -> Option<String> {
        (digest[0] == 0).then(|| "http://fuzz.test/by-digest".to_owned())
    }

    fn limiter_check(&self, limiter: &str, key: &str) -> Option<LimitVerdict> {
        (limiter == "limited").then(|| match key.len() % 2 {
            0 => LimitVerdict::Allow,
            _ => LimitVerdict::Deny {
                retry_after: Duration::from_millis(1500),
            },
        })
    }
}

struct Setup {
    chain: PolicyChain,
    host: Arc<dyn PolicyHost>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let wat = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guests/abi_interpreter.wat");
        let engine: &'static PolicyEngine =
            Box::leak(Box::new(PolicyEngine::new().expect("policy engine")));
        let decl = PolicyDecl {
            name: "abi".into(),
            source: PolicySource::File(wat),
            on_error: OnError::Pass,
            isolation: Isolation::Reuse,
            deadline: Duration::from_millis(200),
            memory_limit: 1 << 20,
            params: vec![("greeting".into(), "hello".into())],
            body: None,
        };
        let set = engine.load(&[decl]).expect("the interpreter guest loads");
        let chain = set.chain(&["abi".into()]).expect("chain");
        let mut replicas = HashMap::new();
        replicas.insert("http://fuzz.test/a".to_owned(), ReplicaState::Complete);
        Setup {
            chain,
            host: Arc::new(FuzzHost { replicas }),
        }
    })
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let program = &data[..data.len().min(0x3000)];
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-fuzz",
        HeaderValue::from_str(&hex(program)).expect("hex is a valid header value"),
    );
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let url = "http://fuzz.test/a?b=c".parse().unwrap();
    let mut req = RequestView::new(Method::GET, url, headers, client);
    match setup.chain.on_request(&setup.host, &mut req) {
        RequestOutcome::Respond(direct) => {
            assert!((200..=599).contains(&direct.status.as_u16()), "{}", direct.status);
            assert!(direct.body.len() <= 64 * 1024);
            return;
        }
        RequestOutcome::Continue => {}
    }
    // Whatever the policy did, the request is still one Cistern can send.
    assert!(matches!(req.url.scheme_str(), Some("http" | "https")), "{}", req.url);
    assert!(req.url.authority().is_some(), "{}", req.url);
    let mut resp = ResponseView {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
    };
    resp.headers
        .insert("content-type", HeaderValue::from_static("text/plain"));
    let _ = setup.chain.on_response(&setup.host, &mut req, &mut resp);
});
