//! Measures hook cost per isolation mode; prints figures, asserts nothing
//! about time. Ignored by default (it is a measurement, not a test):
//!   cargo test -p cistern --test policy_cost -- --ignored --nocapture
//! docs/policies.md records the figures and how they were taken.

mod policy_common;

use std::time::Instant;

use cistern::config::{Isolation, PolicySource};
use cistern::policy::ResponseView;
use policy_common::{TestHost, decl, engine, guest, request};

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn hook_cost() {
    let mut fresh = decl("healthy-fresh", guest("healthy.wat"));
    fresh.isolation = Isolation::Fresh;
    let mut store_id = decl("store-id", PolicySource::Builtin("store-id".into()));
    store_id.params = vec![(
        "rule".into(),
        "http://*/debian/pool/* http://debian.cistern/pool/$2".into(),
    )];
    let mut store_id_fresh = store_id.clone();
    store_id_fresh.name = "store-id-fresh".into();
    store_id_fresh.isolation = Isolation::Fresh;
    let set = engine()
        .load(&[
            decl("healthy", guest("healthy.wat")),
            fresh,
            store_id,
            store_id_fresh,
            decl("distro", PolicySource::Builtin("distro".into())),
        ])
        .unwrap();
    let host = TestHost::default().shared();
    const N: u32 = 20_000;
    for name in ["healthy", "healthy-fresh", "store-id", "store-id-fresh"] {
        let chain = set.chain(&[name.into()]).unwrap();
        let mut req = request("http://deb.debian.org/debian/pool/main/h/hello.deb", &[]);
        for _ in 0..1000 {
            chain.on_request(&host, &mut req);
        }
        let start = Instant::now();
        for _ in 0..N {
            chain.on_request(&host, &mut req);
        }
        println!(
            "on_request {name:>16}: {:>8.2} µs/call",
            start.elapsed().as_secs_f64() * 1e6 / f64::from(N)
        );
    }
    let chain = set.chain(&["distro".into()]).unwrap();
    let mut req = request("http://deb.debian.org/debian/pool/main/h/hello.deb", &[]);
    let mut resp = ResponseView::default();
    let start = Instant::now();
    for _ in 0..N {
        chain.on_response(&host, &mut req, &mut resp);
    }
    println!(
        "on_response {:>15}: {:>8.2} µs/call",
        "distro",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(N)
    );
}
