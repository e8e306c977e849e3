//! URL → cache key → replica path: whatever the text, a key is already
//! normal (parsing it again gives it back) and its replica path is
//! relative, made only of plain names (never empty, `.`, `..`, or holding
//! `/` or NUL), so no URL can reach outside the replica root.
#![no_main]

use std::path::Component;

use cistern::config::Layout;
use cistern::store::{CacheKey, ReplicaPath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Both ways a URL becomes a key: as text (a policy's store-id) and as
    // the request's parsed URI.
    let mut keys = Vec::new();
    if let Ok(key) = CacheKey::parse(text) {
        keys.push(key);
    }
    if let Ok(uri) = text.parse::<http::Uri>()
        && let Ok(key) = CacheKey::from_uri(&uri)
    {
        keys.push(key);
    }
    for key in keys {
        let again = CacheKey::parse(key.as_str())
            .unwrap_or_else(|e| panic!("key {key:?} does not parse as a key: {e}"));
        assert_eq!(again.as_str(), key.as_str(), "a key is not normal");
        for layout in [Layout::HostPort, Layout::Flat] {
            let Ok(path) = ReplicaPath::for_key(&key, layout) else {
                continue;
            };
            let p = path.as_path();
            assert!(p.is_relative(), "{key:?} → {p:?}");
            let mut parts = 0;
            for c in p.components() {
                let Component::Normal(name) = c else {
                    panic!("{key:?} → {p:?}: component {c:?}");
                };
                let bytes = name.as_encoded_bytes();
                assert!(!bytes.is_empty() && !bytes.contains(&0) && !bytes.contains(&b'/'));
                assert!(name != "." && name != "..", "{key:?} → {p:?}");
                parts += 1;
            }
            assert!(parts > 0, "{key:?} has an empty replica path");
            // The path reads back as the same relative replica path.
            let back = ReplicaPath::from_relative(p.to_path_buf())
                .unwrap_or_else(|e| panic!("{key:?} → {p:?} is refused as a replica path: {e}"));
            assert_eq!(back.as_path(), p);
        }
    }
});
