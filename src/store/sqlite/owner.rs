//! One parley per database file: the store holds an exclusive lock on `<path>.lock` for its life,
//! so a second parley on the same file is refused at start-up with a message naming the file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::{StoreError, StoreResult};

/// Takes the exclusive lock on `<path>.lock`, trying for a second: a parley that is stopping (or
/// a child process between its fork and its exec, which holds a copy of the lock for that
/// moment) lets go of it soon.
pub(super) async fn take_ownership(path: &Path) -> StoreResult<File> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Some(file) = try_ownership(path, attempt >= 20)? {
            return Ok(file);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One attempt of [`take_ownership`]: `None` if the lock is held, unless this is the `last`
/// attempt, which says which file another parley holds.
fn try_ownership(path: &Path, last: bool) -> StoreResult<Option<File>> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) if !last => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "the SQLite database {} is in use by another parley (it holds {}); stop it, or set \
             PARLEY_SQLITE_PATH to another file (several replicas need PARLEY_STORE=postgres or redis)",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}
