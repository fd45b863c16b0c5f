//! Replicas tell each other when they hand claimed steps back unsent (a
//! replica draining on SIGTERM, or a channel stopped at run time), so that
//! another takes them at once instead of at its next idle look (up to 30 s).
//!
//! PostgreSQL's `NOTIFY` carries it: the release and its notification
//! commit together, and a listener connection per replica wakes that
//! channel's loop. The payload names the schema, since notifications are
//! per database and two deployments may share one. A notification missed
//! while the listener reconnects costs only the wait it was meant to save:
//! on every (re)connection every channel is woken once.

use std::sync::Weak;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use super::conn::Manager;
use crate::model::ChannelKind;
use crate::store::StoreError;

/// The `LISTEN` channel; payload `<schema>:<channel kind>`.
pub(super) const RELEASED: &str = "nudge_steps_released";

/// Notifies the schema's listeners that steps of `channel` were released
/// (run inside the releasing transaction).
pub(super) const NOTIFY_RELEASED: &str =
    "SELECT pg_notify('nudge_steps_released', current_schema() || ':' || $1)";

/// How long the listener waits for a notification before it checks that
/// its store is still open.
const TICK: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Hears each channel whose steps were handed back, and each failure of
/// the listening connection (it reconnects with backoff meanwhile).
pub(super) type Heard = Box<dyn Fn(Result<ChannelKind, StoreError>) + Send + Sync>;

/// Listens on a connection of its own, on a thread of its own (the
/// synchronous client must not run on an async worker), until `alive` has
/// no strong reference left (the store was dropped).
pub(super) fn spawn(manager: Manager, alive: Weak<()>, heard: Heard) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("nudge-pg-listen".into())
        .spawn(move || {
            let mut backoff = Duration::from_secs(1);
            while alive.strong_count() > 0 {
                if let Err(e) = listen(&manager, &alive, &heard, &mut backoff) {
                    heard(Err(e.into()));
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        })
        .map(|_| ())
}

/// One connection's life: returns `Ok` once the store is dropped, the
/// client's error when the connection fails.
fn listen(
    manager: &Manager,
    alive: &Weak<()>,
    heard: &Heard,
    backoff: &mut Duration,
) -> Result<(), postgres::Error> {
    let mut client = manager.connect_plain()?;
    let schema: String = client.query_one("SELECT current_schema()", &[])?.get(0);
    client.batch_execute(&format!("LISTEN {RELEASED}"))?;
    *backoff = Duration::from_secs(1);
    // Releases made while nobody listened are found by looking once.
    for channel in ChannelKind::ALL {
        heard(Ok(channel));
    }
    let prefix = format!("{schema}:");
    while alive.strong_count() > 0 {
        {
            let mut notifications = client.notifications();
            let mut pending = notifications.timeout_iter(TICK);
            while let Some(n) = pending.next()? {
                let channel = n
                    .payload()
                    .strip_prefix(&prefix)
                    .and_then(|c| c.parse::<ChannelKind>().ok());
                if let Some(channel) = channel {
                    heard(Ok(channel));
                }
            }
        }
        if client.is_closed() {
            // The iterator ends quietly on a closed connection: ask for the error.
            client.simple_query("")?;
        }
    }
    Ok(())
}
