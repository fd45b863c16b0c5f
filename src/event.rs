//! CloudEvents 1.0 structured-mode JSON, decoded once at the edge.
//!
//! `data` stays a shared JSON object: scripts read it through a typed view
//! (see `rules::api`), so no per-event rhai map is built.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// A validated customer event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Dedup key: an id seen before changes nothing.
    pub id: String,
    pub event_type: String,
    pub source: String,
    /// CloudEvents `subject`: the customer id.
    pub customer: String,
    pub time: DateTime<Utc>,
    pub data: Arc<Map<String, Value>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not a CloudEvent: missing or empty `{0}`")]
    Missing(&'static str),
    #[error("not a CloudEvent: unsupported specversion `{0}` (expected 1.0)")]
    SpecVersion(String),
    #[error("not a CloudEvent: `time` is not RFC 3339: {0}")]
    Time(String),
    #[error("not a CloudEvent: `data` must be a JSON object")]
    DataNotObject,
}

#[derive(Deserialize)]
struct Wire {
    specversion: Option<String>,
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    source: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    data: Option<Value>,
}

/// What routing an event needs: its type and customer, borrowed from the
/// record. See [`Event::peek`].
#[derive(Debug, PartialEq)]
pub struct EventHead<'a> {
    pub event_type: Cow<'a, str>,
    pub customer: Cow<'a, str>,
}

/// `Wire` without allocations: strings borrowed, `data` only checked for its shape.
#[derive(Deserialize)]
struct WireRef<'a> {
    #[serde(borrow)]
    specversion: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    data: Option<DataShape>,
}

/// The shape of `data`, its contents skipped (still checked to be JSON).
enum DataShape {
    Object,
    Null,
    Other,
}

impl<'de> Deserialize<'de> for DataShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> Visitor<'de> for Shape {
            type Value = DataShape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DataShape, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(DataShape::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DataShape, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(DataShape::Other)
            }
            fn visit_unit<E>(self) -> Result<DataShape, E> {
                Ok(DataShape::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<DataShape, E> {
                Ok(DataShape::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<DataShape, E> {
                Ok(DataShape::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<DataShape, E> {
                Ok(DataShape::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<DataShape, E> {
                Ok(DataShape::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<DataShape, E> {
                Ok(DataShape::Other)
            }
        }
        d.deserialize_any(Shape)
    }
}

impl Event {
    /// Validates a structured-mode CloudEvent like [`parse`](Self::parse) but
    /// builds nothing: for records that no journey reads, so that the events
    /// nobody listens to cost a scan, not a decode. `None` here means
    /// `parse` fails too (call it for the reason). Not checked here: numbers
    /// inside `data` beyond f64 range, which only `parse` rejects.
    pub fn peek(bytes: &[u8]) -> Option<EventHead<'_>> {
        // One vectorised UTF-8 check of the whole record instead of one per string.
        let text = std::str::from_utf8(bytes).ok()?;
        let wire: WireRef<'_> = serde_json::from_str(text).ok()?;
        if wire.specversion.is_some_and(|v| v != "1.0") {
            return None;
        }
        let present = |v: &Option<Cow<'_, str>>| v.as_ref().is_some_and(|s| !s.is_empty());
        if !(present(&wire.id) && present(&wire.source)) {
            return None;
        }
        let (Some(event_type), Some(customer), Some(time)) =
            (wire.event_type, wire.subject, wire.time)
        else {
            return None;
        };
        if event_type.is_empty() || customer.is_empty() || time.is_empty() {
            return None;
        }
        DateTime::parse_from_rfc3339(&time).ok()?;
        if matches!(wire.data, Some(DataShape::Other)) {
            return None;
        }
        Some(EventHead {
            event_type,
            customer,
        })
    }

    /// Decodes and validates one structured-mode CloudEvent.
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        // JSON text is UTF-8 throughout: `from_slice` alone lets invalid
        // bytes through in attributes it skips (found by fuzzing), which
        // `peek` refuses.
        let text =
            std::str::from_utf8(bytes).map_err(|e| EventError::Json(format!("not UTF-8: {e}")))?;
        let wire: Wire = serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;
        if let Some(v) = wire.specversion {
            if v != "1.0" {
                return Err(EventError::SpecVersion(v));
            }
        }
        let id = required(wire.id, "id")?;
        let event_type = required(wire.event_type, "type")?;
        let source = required(wire.source, "source")?;
        let customer = required(wire.subject, "subject")?;
        let time_text = required(wire.time, "time")?;
        let time = DateTime::parse_from_rfc3339(&time_text)
            .map_err(|e| EventError::Time(format!("{time_text:?}: {e}")))?
            .with_timezone(&Utc);
        let data = match wire.data {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(EventError::DataNotObject),
        };
        Ok(Event {
            id,
            event_type,
            source,
            customer,
            time,
            data: Arc::new(data),
        })
    }

    /// A string field of `data`, or a number rendered as text (ids are often numeric).
    pub fn data_key(&self, field: &str) -> Option<String> {
        match self.data.get(field)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// Re-encodes the event as CloudEvents JSON (for producers and tests).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "type": self.event_type,
            "source": self.source,
            "subject": self.customer,
            "time": self.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": Value::Object((*self.data).clone()),
        })
    }
}

fn required(value: Option<String>, field: &'static str) -> Result<String, EventError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(EventError::Missing(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_in_a_skipped_attribute_is_refused_by_parse_and_peek() {
        let mut record = br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c1","time":"2026-01-01T10:00:00Z","extra":"A"}"#.to_vec();
        let at = record.iter().position(|b| *b == b'A').unwrap();
        record[at] = 0xff;
        assert!(Event::peek(&record).is_none());
        let err = Event::parse(&record).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn parses_a_structured_cloudevent() {
        let e = Event::parse(br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c1","time":"2026-01-01T10:00:00+10:00","data":{"a":1}}"#).unwrap();
        assert_eq!(e.customer, "c1");
        assert_eq!(e.time.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(e.data_key("a").as_deref(), Some("1"));
    }

    #[test]
    fn peek_accepts_and_refuses_what_parse_does() {
        let cases: &[&[u8]] = &[
            br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c1","time":"2026-01-01T10:00:00+10:00","data":{"a":[1,{"b":null}]}}"#,
            br#"{"id":"e1","type":"t\u00e9","source":"s","subject":"c\"1","time":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":null}"#,
            br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":[1]}"#,
            br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":"x"}"#,
            br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"yesterday"}"#,
            br#"{"id":"e1","type":"t","source":"s","time":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":"","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            br#"{"specversion":"0.3","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":{"a":}}"#,
            br#"{"id":"e1","id":"e2","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            br#"{"id":5,"type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            b"{nope",
            b"[]",
        ];
        for bytes in cases {
            let peeked = Event::peek(bytes);
            let parsed = Event::parse(bytes);
            assert_eq!(
                peeked.is_some(),
                parsed.is_ok(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
            if let (Some(h), Ok(e)) = (peeked, parsed) {
                assert_eq!(h.event_type, e.event_type);
                assert_eq!(h.customer, e.customer);
            }
        }
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(matches!(Event::parse(b"{nope"), Err(EventError::Json(_))));
        assert_eq!(
            Event::parse(br#"{"id":"e1","type":"t","source":"s","time":"2026-01-01T00:00:00Z"}"#)
                .unwrap_err(),
            EventError::Missing("subject")
        );
        assert!(matches!(
            Event::parse(
                br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"yesterday"}"#
            ),
            Err(EventError::Time(_))
        ));
        assert_eq!(
            Event::parse(br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":[1]}"#).unwrap_err(),
            EventError::DataNotObject
        );
    }
}
