//! The daemon's long-running tasks, watched together. A task that ends or
//! panics before the daemon was asked to stop leaves it half alive (consuming
//! but never sending, or the reverse), so the whole process stops: readiness
//! goes false at once, the other tasks drain within the deadline, and the
//! daemon exits non-zero so that its supervisor (systemd, Kubernetes)
//! restarts it. Nothing is lost: offsets and claims are in the store.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{Id, JoinSet};

/// Why the daemon stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {task} task {cause}; the daemon stops so that its supervisor restarts it")]
pub struct TaskFailure {
    pub task: &'static str,
    /// `ended` or `panicked: …`.
    pub cause: String,
}

/// Named tasks that must all run until the stop signal.
#[derive(Default)]
pub struct Tasks {
    /// A task's own error, as text, when it returns one.
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_fallible(name, async move {
            task.await;
            Ok::<(), String>(())
        });
    }

    /// A task that may end with an error; the error is the failure's cause.
    pub fn spawn_fallible<E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let handle = self
            .set
            .spawn(async move { task.await.map_err(|e| format!("{e:#}")) });
        self.names.insert(handle.id(), name);
    }

    /// Runs until `stop_requested` resolves (a signal) or a task ends first.
    /// Either way every task is told to stop through `stop` and given up to
    /// `drain` to finish; `on_failure` runs before the drain, so readiness
    /// can say why while the process is still up.
    pub async fn supervise(
        mut self,
        stop_requested: impl Future<Output = ()>,
        stop: &watch::Sender<bool>,
        drain: Duration,
        on_failure: impl FnOnce(&TaskFailure),
    ) -> Result<DrainOutcome, TaskFailure> {
        let failure = tokio::select! {
            _ = stop_requested => None,
            Some(ended) = self.set.join_next_with_id() => Some(self.failure(ended)),
        };
        if let Some(f) = &failure {
            on_failure(f);
        }
        let _ = stop.send(true);
        let drained = tokio::time::timeout(drain, async {
            while self.set.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        self.set.abort_all();
        match failure {
            Some(f) => Err(f),
            None if drained => Ok(DrainOutcome::Drained),
            None => Ok(DrainOutcome::DeadlinePassed),
        }
    }

    fn failure(
        &self,
        ended: Result<(Id, Result<(), String>), tokio::task::JoinError>,
    ) -> TaskFailure {
        match ended {
            Ok((id, result)) => TaskFailure {
                task: self.names.get(&id).copied().unwrap_or("unnamed"),
                cause: match result {
                    Ok(()) => "ended".into(),
                    Err(e) => format!("failed: {e}"),
                },
            },
            Err(e) => {
                let task = self.names.get(&e.id()).copied().unwrap_or("unnamed");
                let cause = match e.try_into_panic() {
                    Ok(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
                    Err(e) => format!("was cancelled: {e}"),
                };
                TaskFailure { task, cause }
            }
        }
    }
}

/// How a requested stop went.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    Drained,
    /// Tasks still running at the deadline were abandoned.
    DeadlinePassed,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A task that runs until told to stop, like the daemon's loops.
    async fn until_stopped(mut stop: watch::Receiver<bool>) {
        let _ = stop.wait_for(|s| *s).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_stops_the_rest_and_names_itself() {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.spawn("ingest", until_stopped(rx.clone()));
        tasks.spawn("scheduler", async { panic!("boom at step 3") });
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        let result = tasks
            .supervise(
                std::future::pending(),
                &stop,
                Duration::from_secs(10),
                |f| {
                    *s.lock().unwrap() = Some(f.clone());
                },
            )
            .await;
        let failure = result.unwrap_err();
        assert_eq!(failure.task, "scheduler");
        assert_eq!(failure.cause, "panicked: boom at step 3");
        assert_eq!(seen.lock().unwrap().as_ref(), Some(&failure));
        assert!(*rx.borrow(), "the other tasks were told to stop");
        assert!(failure.to_string().contains("supervisor restarts it"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_early_is_a_failure_too() {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.spawn("ingest", until_stopped(rx.clone()));
        tasks.spawn("dead-letter publisher", async {});
        let failure = tasks
            .supervise(
                std::future::pending(),
                &stop,
                Duration::from_secs(10),
                |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(
            (failure.task, failure.cause.as_str()),
            ("dead-letter publisher", "ended")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_fails_names_its_error() {
        let (stop, _rx) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.spawn_fallible("ingest", async {
            Err::<(), _>(anyhow::anyhow!("consumer closed"))
        });
        let failure = tasks
            .supervise(
                std::future::pending(),
                &stop,
                Duration::from_secs(10),
                |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(failure.cause, "failed: consumer closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_stop_drains_and_a_stuck_task_is_abandoned_at_the_deadline() {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.spawn("ingest", until_stopped(rx.clone()));
        let outcome = tasks
            .supervise(async {}, &stop, Duration::from_secs(10), |_| {
                panic!("no failure")
            })
            .await;
        assert_eq!(outcome, Ok(DrainOutcome::Drained));

        let (stop, rx) = watch::channel(false);
        let mut tasks = Tasks::default();
        tasks.spawn("ingest", until_stopped(rx));
        tasks.spawn("stuck send", std::future::pending());
        let started = tokio::time::Instant::now();
        let outcome = tasks
            .supervise(async {}, &stop, Duration::from_secs(10), |_| {})
            .await;
        assert_eq!(outcome, Ok(DrainOutcome::DeadlinePassed));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
