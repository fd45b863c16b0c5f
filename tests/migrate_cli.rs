//! `nudge migrate --config FILE` as an operator runs it before a rollout.

use std::process::Command;

fn nudge(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run nudge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn migrate_creates_the_schema_then_finds_it_up_to_date_and_refuses_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nudge.db");
    let config = dir.path().join("nudge.toml");
    std::fs::write(
        &config,
        format!("[store]\npath = {:?}\n", db.to_str().unwrap()),
    )
    .unwrap();
    let args = ["migrate", "--config", config.to_str().unwrap()];

    let (code, out, err) = nudge(&args, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("nudge.db: schema version ") && out.contains("(was 0)"),
        "{out}"
    );
    let version: u32 = out
        .split("schema version ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("a version number");
    assert!(version >= 1);

    let (code, out, _) = nudge(&args, &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("schema version {version} (up to date)")),
        "{out}"
    );

    // A file written by a newer binary is refused, not touched.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", version + 1)
        .unwrap();
    drop(conn);
    let (code, out, err) = nudge(&args, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("newer than this binary") && err.contains("store.path"),
        "{err}"
    );

    // Refused while a daemon owns the file (its lock held, as `nudge run`
    // holds it), whatever name the file is given.
    let lock = std::fs::File::create(dir.path().join("nudge.db.lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(dir.path().join("nudge.db.lock"), "4242\n").unwrap();
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    let linked = dir.path().join("linked.toml");
    std::fs::write(
        &linked,
        format!("[store]\npath = {:?}\n", link.to_str().unwrap()),
    )
    .unwrap();
    for config in [&config, &linked] {
        let (code, out, err) = nudge(&["migrate", "--config", config.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("in use") && err.contains("4242"), "{err}");
    }
    drop(lock);

    // The environment names the store as it does for `nudge run`.
    let other = dir.path().join("other.db");
    let (code, out, err) = nudge(&args, &[("NUDGE_STORE__PATH", other.to_str().unwrap())]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("other.db") && other.exists(), "{out}");
}
