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
        Ok(Self { _file: file })
    }
}

fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}
