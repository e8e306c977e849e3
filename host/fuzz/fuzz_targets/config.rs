//! The config loader on any text: it returns a config or problems that
//! render, and never panics (a reload of a broken file must report it and
//! keep the old config serving).
#![no_main]

use std::path::Path;

use cistern::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/fuzz/config.kdl")) {
        Ok(config) => {
            // A config that parsed has what every start needs.
            assert!(!config.store.root.as_os_str().is_empty());
        }
        Err(problems) => {
            let shown = problems.to_string();
            assert!(!shown.is_empty());
        }
    }
});
