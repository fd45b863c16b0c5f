//! The one way async code reaches the store.
//!
//! Every [`Store`] blocks: SQLite on its file and its write lock, a database
//! server on the network. Called on a tokio worker, a slow call would stall
//! whatever else that worker runs (readiness answers, sends, the Kafka loop),
//! and a synchronous database client refuses to run inside a runtime at all.
//! So async code holds an [`AsyncStore`] and each call runs on the blocking
//! pool; synchronous code (the decide stage, which already runs there; the
//! CLI; tests) uses the [`Store`] it wraps directly.

use std::sync::Arc;

use super::{Store, StoreError};

#[derive(Clone)]
pub struct AsyncStore(Arc<dyn Store>);

impl AsyncStore {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self(store)
    }

    /// Runs `work` against the store on the blocking pool.
    pub async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || work(store.as_ref()))
            .await
            .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
    }

    /// The store itself, for code that is already off the async workers.
    pub fn blocking(&self) -> &Arc<dyn Store> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[tokio::test(flavor = "current_thread")]
    async fn calls_run_off_the_async_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = AsyncStore::new(Arc::new(
            SqliteStore::open(&dir.path().join("s.db")).unwrap(),
        ));
        let caller = std::thread::current().id();
        let ran_on = store
            .call(|s| {
                s.next_due(None)?;
                Ok(std::thread::current().id())
            })
            .await
            .unwrap();
        assert_ne!(ran_on, caller);
    }
}
