//! The journey-definition loader on any script text: a rule set or a list of
//! problems, never a panic, within the sandbox's operation limit.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use nudge::rules::{load_sources, Limits};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return; // `load_dir` reads files as UTF-8 and refuses anything else
    };
    let sources = vec![(PathBuf::from("fuzz/journey.rhai"), text.to_string())];
    match load_sources(sources, &Limits::default()) {
        Ok(rules) => assert!(!rules.version.is_empty()),
        Err(e) => {
            assert!(!e.problems.is_empty(), "a refusal names its problems");
            let _ = e.to_string();
        }
    }
});
