//! Time as a dependency: the daemon reads the wall clock, `simulate` and the
//! tests drive a virtual one so a three-day journey runs in milliseconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// A configured or scripted duration as an offset between instants. The
/// config bounds durations at load (at most 100 years) and scripts' delays
/// are parsed the same way, so saturating here is never reached in practice
/// and no caller needs a fallback of its own.
pub fn span(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

pub type SleepFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    /// Resolves once `now() >= deadline`.
    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        Box::pin(async move {
            let wait = (deadline - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
        })
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct VirtualClock {
    now: Arc<watch::Sender<DateTime<Utc>>>,
}

impl VirtualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(watch::Sender::new(start)),
        }
    }

    /// Moves time forward (never backward: replayed events may be out of order).
    pub fn advance_to(&self, t: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            if t > *now {
                *now = t;
                true
            } else {
                false
            }
        });
    }

    pub fn advance(&self, by: chrono::Duration) {
        let t = *self.now.borrow() + by;
        self.advance_to(t);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as self, so wait_for cannot fail here.
            let _ = rx.wait_for(|now| *now >= deadline).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Conformance: every clock is monotonic under sleep_until.
    async fn sleeps_until_deadline(clock: &dyn Clock, drive: impl FnOnce()) {
        let deadline = clock.now() + chrono::Duration::milliseconds(5);
        let sleeper = clock.sleep_until(deadline);
        drive();
        sleeper.await;
        assert!(clock.now() >= deadline);
    }

    #[tokio::test]
    async fn system_clock_conforms() {
        sleeps_until_deadline(&SystemClock, || {}).await;
    }

    #[tokio::test]
    async fn virtual_clock_conforms_and_never_goes_back() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let clock = VirtualClock::new(start);
        let driver = clock.clone();
        sleeps_until_deadline(&clock, move || driver.advance(chrono::Duration::seconds(1))).await;
        clock.advance_to(start);
        assert_eq!(clock.now(), start + chrono::Duration::seconds(1));
    }
}
