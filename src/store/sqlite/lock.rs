//! One daemon per SQLite file. SQLite's own locking keeps the file
//! consistent under several processes, but the daemon's guarantees do not
//! survive two owners: each would release the other's claims at start and
//! send the same step twice. The owner holds an OS lock on `<file>.lock`
//! (released by the kernel when the process dies, so a SIGKILL leaves
//! nothing to clean up) with its pid written inside for the error message.
//! A file reached through a second name that resolving cannot see (a hard
//! link) would take a lock file of its own, so the owner also holds a
//! `flock` on the database file itself: one per inode, whatever its name.
//! It does not meet SQLite's own locks, which are `fcntl` byte ranges, on a
//! local file system (on NFS, where SQLite's locking is unreliable anyway,
//! Linux turns `flock` into `fcntl` and the two would meet).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::store::StoreError;

pub(super) struct OwnerLock {
    _file: File,
    /// The `flock` on the database file, once it exists. Kept open until the
    /// store is dropped: closing any descriptor of the file drops every
    /// `fcntl` lock the process holds on it, SQLite's among them, so the
    /// store drops this after its connections.
    _store_file: Option<File>,
    /// The database file as opened: its path and (device, inode), so that
    /// a file removed or replaced under the running daemon is noticed.
    store: Option<(PathBuf, (u64, u64))>,
}

fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl OwnerLock {
    pub(super) fn acquire(store: &Path) -> Result<Self, StoreError> {
        let path = lock_path(store);
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StoreError::Locked {
                    path: store.display().to_string(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        let mut owner = Self {
            _file: file,
            _store_file: None,
            store: None,
        };
        // Before SQLite opens it: a second owner must not even migrate it.
        if store.exists() {
            owner.lock_store_file(store)?;
        }
        Ok(owner)
    }

    /// Takes the `flock` on the database file itself (see the module's doc).
    fn lock_store_file(&mut self, store: &Path) -> Result<(), StoreError> {
        if self._store_file.is_some() {
            return Ok(());
        }
        let io = |source| StoreError::Io {
            path: store.display().to_string(),
            source,
        };
        let file = File::open(store).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: store.display().to_string(),
                    holder: identity(store).ok().and_then(flock_holder),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        self._store_file = Some(file);
        Ok(())
    }

    /// Remembers which file the store opened at `path`, and locks it if
    /// the store created it.
    pub(super) fn watch(&mut self, path: &Path) -> Result<(), StoreError> {
        self.lock_store_file(path)?;
        let id = identity(path).map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.store = Some((path.to_path_buf(), id));
        Ok(())
    }

    /// Fails while the file at the store's path is not the one opened (it
    /// was deleted or replaced): writes would go to a file nothing will
    /// read again, so the daemon must stop consuming and say why. Transient
    /// (an I/O error): it holds until ops restore the file or restart.
    pub(super) fn file_in_place(&self) -> Result<(), StoreError> {
        let Some((path, opened)) = &self.store else {
            return Ok(());
        };
        let gone = |why: &str| {
            StoreError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the database file was {why} while the daemon had it open: restore it, or restart the daemon"),
            ),
        }
        };
        match identity(path) {
            Ok(now) if now == *opened => Ok(()),
            Ok(_) => Err(gone("replaced")),
            Err(_) => Err(gone("removed")),
        }
    }
}

/// The pid holding a `flock` on the file `(device, inode)`, from
/// `/proc/locks` (Linux), for the error message; `None` where it cannot tell.
fn flock_holder((dev, ino): (u64, u64)) -> Option<u32> {
    // The kernel prints the device as `major:minor` in hex (glibc's split).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let wanted = format!("{major:02x}:{minor:02x}:{ino}");
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, file, ..] if *file == wanted => pid.parse().ok(),
            _ => None,
        }
    })
}

/// `<file>.lock` beside the file itself: the path resolved (symbolic links,
/// `..`), so that two names of one file take one lock.
fn lock_path(store: &Path) -> PathBuf {
    let mut name = resolved(store).into_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// The file's real path; for a file not created yet, its directory's real
/// path and its name; as given when neither resolves (the open then fails
/// with its own error).
fn resolved(store: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(store) {
        return real;
    }
    let dir = match store.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), store.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => store.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second owner through a symbolic link, or a path with `..`, to the
    /// same file is refused like one through the same path.
    #[test]
    fn one_file_one_owner_whatever_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nudge.db");
        std::fs::write(&db, b"").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let dotted = dir.path().join("sub").join("..").join("nudge.db");
        let _owner = OwnerLock::acquire(&db).unwrap();
        for other in [&db, &link, &dotted] {
            match OwnerLock::acquire(other) {
                Err(StoreError::Locked { holder, .. }) => {
                    assert_eq!(holder, Some(std::process::id()), "{}", other.display())
                }
                Err(e) => panic!("{}: {e}", other.display()),
                Ok(_) => panic!("{}: a second owner", other.display()),
            }
        }
        // A file not created yet, named through its directory's link.
        let dir_link = dir.path().join("dirlink");
        std::os::unix::fs::symlink(dir.path(), &dir_link).unwrap();
        let _new = OwnerLock::acquire(&dir.path().join("new.db")).unwrap();
        assert!(OwnerLock::acquire(&dir_link.join("new.db")).is_err());
    }

    /// A hard link is a second name that no resolving reveals: the lock on
    /// the file itself refuses it, naming the holder, before SQLite opens it.
    #[test]
    fn a_hard_link_to_an_owned_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nudge.db");
        let (owner, _) = crate::store::sqlite::SqliteStore::open_exclusive(&db, 2).unwrap();
        let hard = dir.path().join("hard.db");
        std::fs::hard_link(&db, &hard).unwrap();
        match crate::store::sqlite::SqliteStore::open_exclusive(&hard, 2) {
            Err(e @ StoreError::Locked { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("hard.db")
                        && text.contains(&format!("pid {}", std::process::id())),
                    "{text}"
                );
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a second owner through a hard link"),
        }
        // Once the owner has gone, the file opens through either name.
        drop(owner);
        crate::store::sqlite::SqliteStore::open_exclusive(&hard, 2).unwrap();
    }
}
