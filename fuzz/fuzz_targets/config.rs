//! The config loader on any file text: a `Config` or a `ConfigError`, never
//! a panic. The text goes through a file because the loader reads files
//! (`Config::load_with_env`), exactly as `nudge run --config` does.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nudge::config::Config;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("nudge-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|bytes: &[u8]| {
    std::fs::write(path(), bytes).expect("write the config under test");
    match Config::load_with_env(Some(path()), std::iter::empty()) {
        Ok(config) => {
            // A loaded config is validated: its invariants hold.
            assert!(config.scheduler.batch_size >= 1);
            assert!(config.scheduler.max_attempts >= 1);
            assert!(config.scheduler.retry_base <= config.scheduler.retry_max);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
