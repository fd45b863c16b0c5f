//! The received events of the decision record (`store::received`).

use chrono::{DateTime, Utc};

use super::conn::PgConn;
use crate::store::received::{
    decode_ended_nothing, decode_not_started, encode_ended_nothing, encode_not_started,
    ReceivedEvent,
};
use crate::store::StoreError;

/// Writes a batch's received events in one statement.
pub(super) fn insert(c: &mut PgConn, events: &[ReceivedEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&ReceivedEvent) -> &str| -> Vec<&str> { events.iter().map(f).collect() };
    let event_times: Vec<DateTime<Utc>> = events.iter().map(|e| e.event_time).collect();
    let received: Vec<DateTime<Utc>> = events.iter().map(|e| e.received_at).collect();
    let updated: Vec<bool> = events.iter().map(|e| e.context_updated).collect();
    let refused: Vec<Option<&str>> = events.iter().map(|e| e.refused.as_deref()).collect();
    let ended_nothing = events
        .iter()
        .map(|e| encode_ended_nothing(&e.ended_nothing))
        .collect::<Result<Vec<Option<String>>, _>>()?;
    let not_started = events
        .iter()
        .map(|e| encode_not_started(&e.not_started))
        .collect::<Result<Vec<String>, _>>()?;
    c.execute(
        "/* plan: generic */ INSERT INTO received_events (customer, event_id, event_type, event_time, received_at, context_updated, not_started, refused, ended_nothing)
         SELECT u.customer, u.event_id, u.event_type, u.event_time, u.received_at, u.updated, u.not_started::jsonb, u.refused, u.ended_nothing::jsonb
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bool[], $7::text[], $8::text[], $9::text[])
             AS u(customer, event_id, event_type, event_time, received_at, updated, not_started, refused, ended_nothing)",
        &[
            &col(|e| &e.customer),
            &col(|e| &e.event_id),
            &col(|e| &e.event_type),
            &event_times,
            &received,
            &updated,
            &not_started,
            &refused,
            &ended_nothing,
        ],
    )?;
    Ok(())
}

/// The customer's received events, oldest first.
pub(super) fn of_customer(
    c: &mut PgConn,
    customer: &str,
) -> Result<Vec<ReceivedEvent>, StoreError> {
    c.query(
        "SELECT event_id, event_type, event_time, received_at, context_updated, not_started::text, refused, ended_nothing::text
         FROM received_events WHERE customer = $1 ORDER BY received_at, id",
        &[&customer],
    )?
    .iter()
    .map(|r| {
        Ok(ReceivedEvent {
            event_id: r.try_get(0)?,
            customer: customer.to_string(),
            event_type: r.try_get(1)?,
            event_time: r.try_get(2)?,
            received_at: r.try_get(3)?,
            context_updated: r.try_get(4)?,
            not_started: decode_not_started(r.try_get::<_, &str>(5)?)?,
            refused: r.try_get(6)?,
            ended_nothing: decode_ended_nothing(r.try_get::<_, Option<&str>>(7)?)?,
        })
    })
    .collect()
}
