//! Names the commit a binary was built from (`nudge --version`, the
//! `nudge_build_info` metric), so ops can tell two builds of one version
//! apart. `NUDGE_COMMIT` in the build's environment names it where there
//! is no git checkout (an image build: `.git` is not in its context);
//! without either it says `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=NUDGE_COMMIT");
    let given = std::env::var("NUDGE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = match given.or_else(|| git(&["rev-parse", "--short=12", "HEAD"])) {
        Some(hash) if !hash.is_empty() => {
            // Tracked files changed since the commit: said, since the
            // binary is then not what the commit holds.
            let modified = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if modified {
                format!("{hash}-modified")
            } else {
                hash
            }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=NUDGE_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    // `--no-optional-locks` keeps `git status` from rewriting the index,
    // which would make every build run this again.
    for path in [
        ".git/HEAD",
        ".git/index",
        ".git/refs/heads",
        ".git/packed-refs",
        "src",
    ] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
