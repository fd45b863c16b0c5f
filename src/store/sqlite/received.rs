//! The received events of the decision record (`store::received`).

use rusqlite::{params, Connection};

use super::{from_ms, ms};
use crate::store::received::{
    decode_ended_nothing, decode_not_started, encode_ended_nothing, encode_not_started,
    ReceivedEvent,
};
use crate::store::StoreError;

pub(super) fn insert(conn: &Connection, e: &ReceivedEvent) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO received_events (customer, event_id, event_type, event_time, received_at, context_updated, not_started, refused, ended_nothing)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        e.customer,
        e.event_id,
        e.event_type,
        ms(e.event_time),
        ms(e.received_at),
        e.context_updated,
        encode_not_started(&e.not_started)?,
        e.refused,
        encode_ended_nothing(&e.ended_nothing)?,
    ])?;
    Ok(())
}

/// The customer's received events, oldest first.
pub(super) fn of_customer(
    conn: &Connection,
    customer: &str,
) -> Result<Vec<ReceivedEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, event_type, event_time, received_at, context_updated, not_started, refused, ended_nothing
         FROM received_events WHERE customer = ?1 ORDER BY received_at, id",
    )?;
    let mut rows = stmt.query([customer])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(ReceivedEvent {
            event_id: r.get(0)?,
            customer: customer.to_string(),
            event_type: r.get(1)?,
            event_time: from_ms(r.get(2)?),
            received_at: from_ms(r.get(3)?),
            context_updated: r.get(4)?,
            not_started: decode_not_started(&r.get::<_, String>(5)?)?,
            refused: r.get(6)?,
            ended_nothing: decode_ended_nothing(r.get::<_, Option<String>>(7)?.as_deref())?,
        });
    }
    Ok(out)
}
