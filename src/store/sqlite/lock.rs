//! One daemon per SQLite file. SQLite's own locking keeps the file
//! consistent under several processes, but the daemon's guarantees do not
//! survive two owners: each would release the other's claims at start and
//! send the same step twice. The owner holds an OS lock on `<file>.lock`
//! (released by the kernel when the process dies, so a SIGKILL leaves
//! nothing to clean up) with its pid written inside for the error message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::store::StoreError;

pub(super) struct OwnerLock {
    _file: File,
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
        Ok(Self {
            _file: file,
            store: None,
        })
    }

    /// Remembers which file the store opened at `path`.
    pub(super) fn watch(&mut self, path: &Path) -> Result<(), StoreError> {
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
}
