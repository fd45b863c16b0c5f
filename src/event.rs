//! CloudEvents 1.0 from Kafka records, decoded once at the edge, in both
//! content modes of the CloudEvents Kafka protocol binding:
//!
//! - structured: the whole event as JSON in the record value (`content-type:
//!   application/cloudevents+json`, or no `ce_` header at all);
//! - binary: the attributes in `ce_<attribute>` headers (UTF-8), the data
//!   as the record value, its media type in `content-type`.
//!
//! `data` stays a shared JSON object: scripts read it through a typed view
//! (see `rules::api`), so no per-event rhai map is built.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// A validated customer event.
#[derive(Debug, Clone)]
pub struct Event {
    /// With `source`, the dedup key ([`Event::dedup_key`]).
    pub id: String,
    pub event_type: String,
    pub source: String,
    /// CloudEvents `subject`: the customer id.
    pub customer: String,
    pub time: DateTime<Utc>,
    pub data: Arc<Map<String, Value>>,
}

/// Why a record is not an event nudge can read; the text is the dead
/// letter's `nudge.reason`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("not valid JSON: {0}")]
    Json(String),
    /// Valid JSON whose attributes have the wrong types (`"id": 12345`).
    #[error("not a CloudEvent: an attribute has the wrong type (at line {line}, column {column})")]
    AttributeType { line: usize, column: usize },
    /// Valid JSON that is not an object (a string, a number, an array).
    #[error("not a CloudEvent: the value is JSON but not an object")]
    NotAnObject,
    /// A record without a value: a tombstone (null) or empty bytes.
    #[error("the record has no value (a tombstone or empty record), not a CloudEvent")]
    Empty,
    /// A required attribute absent or empty (structured content mode).
    #[error("not a CloudEvent: missing `{0}`")]
    Missing(&'static str),
    /// A required attribute absent or empty (binary content mode).
    #[error("not a CloudEvent: missing `{0}` (binary content mode: no `ce_{0}` header, or an empty one)")]
    MissingHeader(&'static str),
    #[error("not a CloudEvent: header `ce_{0}` is not UTF-8")]
    HeaderNotUtf8(&'static str),
    /// An identifying attribute longer than [`MAX_ATTRIBUTE_BYTES`]: ids
    /// are stored, indexed and shown on every record of the customer.
    #[error("not a CloudEvent nudge accepts: `{field}` is {bytes} bytes, over the {MAX_ATTRIBUTE_BYTES} an id may have")]
    TooLong { field: &'static str, bytes: usize },
    #[error("not a CloudEvent: unsupported specversion {} (expected 1.0)", shown_version(.0))]
    SpecVersion(String),
    #[error("not a CloudEvent: `time` is not RFC 3339: {0}")]
    Time(String),
    #[error("not a CloudEvent: `data` must be a JSON object")]
    DataNotObject,
    #[error("not a CloudEvent: both `data` and `data_base64`")]
    DataTwice,
    #[error("not a CloudEvent: `data_base64` {0}")]
    DataBase64(String),
    #[error("binary content mode: the record value (the event's data) is not valid JSON: {0}")]
    ValueJson(String),
    #[error("binary content mode: the record value (the event's data) must be a JSON object")]
    ValueNotObject,
    #[error("binary content mode: content-type `{0}` is not JSON (nudge reads JSON objects)")]
    ContentType(String),
    #[error("structured content mode: event format `{0}` is not supported (only application/cloudevents+json)")]
    Format(String),
    #[error("batched CloudEvents (application/cloudevents-batch+json) are not supported: one event per record")]
    Batch,
}

/// The attributes nudge reads, in [`CeHeaders`] order.
/// A version number is shown; anything else (a producer's field mix-up can
/// put customer data there) only by its length, since reasons are logged.
fn shown_version(v: &str) -> String {
    if !v.is_empty() && v.len() <= 8 && v.chars().all(|c| c.is_ascii_digit() || c == '.') {
        format!("`{v}`")
    } else {
        format!(
            "(not a version number: {} characters, not shown)",
            v.chars().count()
        )
    }
}

/// The longest `id`, `type`, `source` or `subject` nudge takes. They are
/// keys (dedup, the customer's row, every dispatch-log record and the
/// review's indexes), so a producer's mistake such as a document in
/// `subject` must not become one; bank ids and URIs are far shorter.
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// `Err` for an attribute over [`MAX_ATTRIBUTE_BYTES`].
fn bounded<'s>(value: &'s str, field: &'static str) -> Result<&'s str, EventError> {
    match value.len() {
        bytes if bytes > MAX_ATTRIBUTE_BYTES => Err(EventError::TooLong { field, bytes }),
        _ => Ok(value),
    }
}

const ATTRIBUTES: [&str; 6] = ["specversion", "id", "type", "source", "subject", "time"];
const SPECVERSION: usize = 0;
const ID: usize = 1;
const TYPE: usize = 2;
const SOURCE: usize = 3;
const SUBJECT: usize = 4;
const TIME: usize = 5;

/// What a record's headers say about its CloudEvent, borrowed from the
/// record: the content type and the `ce_` attributes nudge reads. Header
/// names match without regard to ASCII case; of a repeated header the last
/// counts (as Kafka's `lastHeader`).
#[derive(Debug, Default, Clone, Copy)]
pub struct CeHeaders<'a> {
    content_type: Option<&'a [u8]>,
    attributes: [Option<&'a [u8]>; 6],
    /// Any `ce_` header, read or not (extensions such as `ce_traceparent`).
    any_ce: bool,
}

impl<'a> CeHeaders<'a> {
    /// Takes note of one header of the record (a null value is an absent one).
    pub fn add(&mut self, key: &[u8], value: Option<&'a [u8]>) {
        if key.len() >= 3 && key[..3].eq_ignore_ascii_case(b"ce_") {
            self.any_ce = true;
            let name = &key[3..];
            if let Some(i) = ATTRIBUTES
                .iter()
                .position(|a| name.eq_ignore_ascii_case(a.as_bytes()))
            {
                self.attributes[i] = value;
            }
        } else if key.eq_ignore_ascii_case(b"content-type") {
            self.content_type = value;
        }
    }

    /// Binary content mode, or structured; an error for a content type that
    /// names another event format or a batch.
    fn binary(&self) -> Result<bool, EventError> {
        if let Some(ct) = self.content_type {
            let media = media_type(ct);
            if starts_with_ignore_case(media, b"application/cloudevents-batch") {
                return Err(EventError::Batch);
            }
            if starts_with_ignore_case(media, b"application/cloudevents") {
                return match media.eq_ignore_ascii_case(b"application/cloudevents+json")
                    || media.eq_ignore_ascii_case(b"application/cloudevents")
                {
                    true => Ok(false),
                    false => Err(EventError::Format(
                        String::from_utf8_lossy(media).into_owned(),
                    )),
                };
            }
        }
        Ok(self.any_ce)
    }

    /// A `ce_` attribute as text; `None` when absent or empty.
    fn text(&self, i: usize) -> Result<Option<&'a str>, EventError> {
        match self.attributes[i] {
            None | Some(b"") => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .map(Some)
                .map_err(|_| EventError::HeaderNotUtf8(ATTRIBUTES[i])),
        }
    }

    fn required(&self, i: usize) -> Result<&'a str, EventError> {
        let value = self
            .text(i)?
            .ok_or(EventError::MissingHeader(ATTRIBUTES[i]))?;
        bounded(value, ATTRIBUTES[i])
    }
}

/// The media type of a content type: before any `;` parameter, trimmed.
fn media_type(content_type: &[u8]) -> &[u8] {
    let end = content_type
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(content_type.len());
    content_type[..end].trim_ascii()
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `application/json`, `text/json` or any `+json` type.
fn is_json(media: &[u8]) -> bool {
    media.eq_ignore_ascii_case(b"application/json")
        || media.eq_ignore_ascii_case(b"text/json")
        || (media.len() >= 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// One Kafka record as the CloudEvents Kafka binding reads it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub value: &'a [u8],
    pub headers: CeHeaders<'a>,
    /// The event's time when it has no `time` attribute (optional in
    /// CloudEvents): the record's Kafka timestamp, or when it was read, in
    /// ms since the epoch. `None` makes `time` required.
    pub default_time_ms: Option<i64>,
}

impl<'a> Record<'a> {
    /// A structured-mode event with its own `time`, outside Kafka (files, tests).
    pub fn structured(value: &'a [u8]) -> Self {
        Self {
            value,
            headers: CeHeaders::default(),
            default_time_ms: None,
        }
    }

    fn default_time(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(self.default_time_ms?)
    }

    /// `time` as given, else the record's default.
    fn time(&self, given: Option<&str>) -> Result<DateTime<Utc>, EventError> {
        match given {
            Some(t) => DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                // The value is not repeated: the reason reaches the log,
                // and the dead letter keeps the original.
                .map_err(|e| EventError::Time(format!("{e} (expected like 2026-03-02T09:00:00Z)"))),
            None => self.default_time().ok_or(EventError::Missing("time")),
        }
    }
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
    data_base64: Option<String>,
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
    #[serde(borrow)]
    data_base64: Option<Cow<'a, str>>,
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

/// RFC 4648 base64, padded or not (producers differ).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The JSON object `data_base64` holds.
fn decode_base64_object(text: &str) -> Result<Map<String, Value>, EventError> {
    let bytes = BASE64
        .decode(text)
        .map_err(|e| EventError::DataBase64(format!("is not base64: {e}")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(EventError::DataBase64(
            "holds JSON that is not an object (nudge reads JSON objects)".into(),
        )),
        Err(e) => Err(EventError::DataBase64(format!(
            "does not hold JSON (nudge reads JSON objects): {e}"
        ))),
    }
}

/// A binary-mode record's attributes, validated, borrowed from its headers.
struct BinaryAttributes<'a> {
    id: &'a str,
    event_type: &'a str,
    source: &'a str,
    customer: &'a str,
    time: DateTime<Utc>,
}

/// Everything [`Event::decode`] checks of a binary-mode record except its
/// data, shared with [`Event::peek_record`] so the two cannot disagree.
fn binary_attributes<'a>(r: &Record<'a>) -> Result<BinaryAttributes<'a>, EventError> {
    let h = &r.headers;
    let version = h.required(SPECVERSION)?;
    if version != "1.0" {
        return Err(EventError::SpecVersion(version.to_string()));
    }
    let attributes = BinaryAttributes {
        id: h.required(ID)?,
        event_type: h.required(TYPE)?,
        source: h.required(SOURCE)?,
        customer: h.required(SUBJECT)?,
        time: r.time(h.text(TIME)?)?,
    };
    if let Some(ct) = h.content_type {
        let media = media_type(ct);
        if !is_json(media) {
            return Err(EventError::ContentType(
                String::from_utf8_lossy(media).into_owned(),
            ));
        }
    }
    Ok(attributes)
}

impl Event {
    /// What identifies the event for dedup: CloudEvents makes `source` +
    /// `id` unique, so two producers may reuse each other's ids (a retry
    /// keeps both). Length-prefixed, so no source and id run together.
    pub fn dedup_key(&self) -> String {
        format!("{}:{}{}", self.source.len(), self.source, self.id)
    }

    /// [`peek_record`](Self::peek_record) of a structured-mode event with its own `time`.
    pub fn peek(bytes: &[u8]) -> Option<EventHead<'_>> {
        Self::peek_record(&Record::structured(bytes))
    }

    /// [`decode`](Self::decode) of a structured-mode event with its own `time`.
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        Self::decode(&Record::structured(bytes))
    }

    /// Validates a record like [`decode`](Self::decode) but builds nothing:
    /// for records that no journey reads, so that the events nobody listens
    /// to cost a scan, not a decode. `None` here means `decode` fails too
    /// (call it for the reason). Not checked here: numbers inside `data`
    /// beyond f64 range, which only `decode` rejects.
    pub fn peek_record<'a>(record: &Record<'a>) -> Option<EventHead<'a>> {
        match record.headers.binary().ok()? {
            false => peek_structured(record),
            true => {
                let a = binary_attributes(record).ok()?;
                if !record.value.is_empty() {
                    let text = std::str::from_utf8(record.value).ok()?;
                    let shape: DataShape = serde_json::from_str(text).ok()?;
                    if matches!(shape, DataShape::Other) {
                        return None;
                    }
                }
                Some(EventHead {
                    event_type: Cow::Borrowed(a.event_type),
                    customer: Cow::Borrowed(a.customer),
                })
            }
        }
    }

    /// Decodes and validates the CloudEvent a record carries, in either
    /// content mode.
    pub fn decode(record: &Record<'_>) -> Result<Event, EventError> {
        match record.headers.binary()? {
            false => decode_structured(record),
            true => {
                let a = binary_attributes(record)?;
                let data = match record.value {
                    b"" => Map::new(),
                    bytes => match serde_json::from_slice(bytes) {
                        Ok(Value::Object(map)) => map,
                        Ok(Value::Null) => Map::new(),
                        Ok(_) => return Err(EventError::ValueNotObject),
                        Err(e) => return Err(EventError::ValueJson(e.to_string())),
                    },
                };
                Ok(Event {
                    id: a.id.to_string(),
                    event_type: a.event_type.to_string(),
                    source: a.source.to_string(),
                    customer: a.customer.to_string(),
                    time: a.time,
                    data: Arc::new(data),
                })
            }
        }
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

fn peek_structured<'a>(record: &Record<'a>) -> Option<EventHead<'a>> {
    // One vectorised UTF-8 check of the whole record instead of one per string.
    let text = std::str::from_utf8(record.value).ok()?;
    let wire: WireRef<'a> = serde_json::from_str(text).ok()?;
    if wire.specversion.as_deref() != Some("1.0") {
        return None;
    }
    let fits = |s: &str| !s.is_empty() && s.len() <= MAX_ATTRIBUTE_BYTES;
    let present = |v: &Option<Cow<'_, str>>| v.as_deref().is_some_and(fits);
    if !(present(&wire.id) && present(&wire.source)) {
        return None;
    }
    let (Some(event_type), Some(customer)) = (wire.event_type, wire.subject) else {
        return None;
    };
    if !(fits(&event_type) && fits(&customer)) {
        return None;
    }
    record.time(wire.time.as_deref()).ok()?;
    match (wire.data, wire.data_base64) {
        (Some(DataShape::Other), _) => return None,
        (Some(DataShape::Object), Some(_)) => return None,
        // Rare: decoded here so that peek and decode agree.
        (_, Some(b64)) => {
            decode_base64_object(&b64).ok()?;
        }
        _ => {}
    }
    Some(EventHead {
        event_type,
        customer,
    })
}

fn decode_structured(record: &Record<'_>) -> Result<Event, EventError> {
    // JSON text is UTF-8 throughout: `from_slice` alone lets invalid bytes
    // through in attributes it skips (found by fuzzing), which `peek` refuses.
    let text = std::str::from_utf8(record.value)
        .map_err(|e| EventError::Json(format!("not UTF-8: {e}")))?;
    let start = text.trim_start();
    if start.is_empty() {
        return Err(EventError::Empty);
    }
    // Only an object is a structured event (serde would also take an array
    // of the attributes in order).
    if !start.starts_with('{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => EventError::NotAnObject,
            Err(e) => EventError::Json(e.to_string()),
        });
    }
    let wire: Wire = serde_json::from_str(text).map_err(|e| match e.classify() {
        // serde's text quotes the value (it may be contact data, and it
        // reaches the log): where it is says enough, with the record kept.
        serde_json::error::Category::Data => EventError::AttributeType {
            line: e.line(),
            column: e.column(),
        },
        _ => EventError::Json(e.to_string()),
    })?;
    match wire.specversion {
        Some(v) if v == "1.0" => {}
        None => return Err(EventError::Missing("specversion")),
        Some(v) if v.is_empty() => return Err(EventError::Missing("specversion")),
        Some(v) => return Err(EventError::SpecVersion(v)),
    }
    let id = required(wire.id, "id")?;
    let event_type = required(wire.event_type, "type")?;
    let source = required(wire.source, "source")?;
    let customer = required(wire.subject, "subject")?;
    let time = record.time(wire.time.as_deref())?;
    let data = match (wire.data, wire.data_base64) {
        (Some(Value::Object(_)), Some(_)) => return Err(EventError::DataTwice),
        (Some(Value::Object(map)), None) => map,
        (None | Some(Value::Null), None) => Map::new(),
        (None | Some(Value::Null), Some(b64)) => decode_base64_object(&b64)?,
        (Some(_), _) => return Err(EventError::DataNotObject),
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

fn required(value: Option<String>, field: &'static str) -> Result<String, EventError> {
    match value {
        Some(v) if !v.is_empty() => {
            bounded(&v, field)?;
            Ok(v)
        }
        _ => Err(EventError::Missing(field)),
    }
}

#[cfg(test)]
mod tests {
    /// A specversion that is not a version may be customer data put in the
    /// wrong field: the reason (which is logged) gives its length only.
    #[test]
    fn a_specversion_that_is_not_a_version_is_not_echoed() {
        let e = |v: &str| {
            Event::parse(
                format!(r#"{{"specversion":"{v}","id":"e","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":{{}}}}"#)
                    .as_bytes(),
            )
            .unwrap_err()
            .to_string()
        };
        let leaked = e("zoe.private@example.com");
        assert!(!leaked.contains("zoe"), "{leaked}");
        assert!(leaked.contains("23 characters"), "{leaked}");
        assert!(e("0.3").contains("`0.3`"));
    }

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

    /// `{"a": 1}` as `data_base64`.
    const A1_BASE64: &str = "eyJhIjogMX0=";

    fn structured_cases() -> Vec<Vec<u8>> {
        let mut cases: Vec<Vec<u8>> = [
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c1","time":"2026-01-01T10:00:00+10:00","data":{"a":[1,{"b":null}]}}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t\u00e9","source":"s","subject":"c\"1","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":null}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":[1]}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":"x"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"yesterday"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":""}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"1.0","id":"","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"0.3","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":{"a":}}"#,
            r#"{"specversion":"1.0","id":"e1","id":"e2","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"1.0","id":5,"type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data":{"a":1},"data_base64":"e30="}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data":null,"data_base64":"e30="}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data_base64":"eyJhIjogMX0"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data_base64":"WzFd"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data_base64":"aGk="}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data_base64":"%%%"}"#,
            r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data_base64":7}"#,
            "{nope",
            "[]",
        ]
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
        cases.push(
            format!(r#"{{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data_base64":"{A1_BASE64}"}}"#)
                .into_bytes(),
        );
        // Identifying attributes at the limit, and one byte over it.
        for field in ["id", "type", "source", "subject"] {
            for len in [MAX_ATTRIBUTE_BYTES, MAX_ATTRIBUTE_BYTES + 1] {
                let mut event = serde_json::json!({"specversion": "1.0", "id": "e1", "type": "t",
                    "source": "s", "subject": "c", "time": "2026-01-01T00:00:00Z"});
                event[field] = Value::String("é".repeat(len / 2) + "x".repeat(len % 2).as_str());
                cases.push(event.to_string().into_bytes());
            }
        }
        cases.push(b"{\"specversion\":\"1.0\",\"id\":\"e\xff\",\"type\":\"t\",\"source\":\"s\",\"subject\":\"c\"}".to_vec());
        cases
    }

    type Headers = Vec<(&'static str, Option<&'static [u8]>)>;

    static LONGEST: [u8; MAX_ATTRIBUTE_BYTES] = [b'x'; MAX_ATTRIBUTE_BYTES];
    static TOO_LONG: [u8; MAX_ATTRIBUTE_BYTES + 1] = [b'x'; MAX_ATTRIBUTE_BYTES + 1];

    /// Binary-mode records as (headers, value).
    fn binary_cases() -> Vec<(Headers, &'static [u8])> {
        let full = vec![
            ("ce_specversion", Some(&b"1.0"[..])),
            ("ce_id", Some(&b"e1"[..])),
            ("ce_type", Some(&b"t"[..])),
            ("ce_source", Some(&b"s"[..])),
            ("ce_subject", Some(&b"c1"[..])),
            ("ce_time", Some(&b"2026-01-01T00:00:00Z"[..])),
            (
                "content-type",
                Some(&b"application/json; charset=utf-8"[..]),
            ),
        ];
        let with = |name: &'static str, value: Option<&'static [u8]>| {
            let mut h: Vec<_> = full.iter().filter(|(k, _)| *k != name).cloned().collect();
            h.push((name, value));
            h
        };
        let without =
            |name: &str| -> Vec<_> { full.iter().filter(|(k, _)| *k != name).cloned().collect() };
        vec![
            (full.clone(), &br#"{"a":1}"#[..]),
            (full.clone(), b""),
            (full.clone(), b"null"),
            (full.clone(), b"[1]"),
            (full.clone(), b"{nope"),
            (full.clone(), b" "),
            (full.clone(), b"{\"a\":\"\xff\"}"),
            (without("ce_specversion"), br#"{"a":1}"#),
            (with("ce_specversion", Some(b"0.3")), br#"{"a":1}"#),
            (with("ce_specversion", None), br#"{"a":1}"#),
            (without("ce_id"), br#"{"a":1}"#),
            (with("ce_id", Some(b"")), br#"{"a":1}"#),
            (with("ce_id", Some(b"\xff")), br#"{"a":1}"#),
            (without("ce_subject"), br#"{"a":1}"#),
            (without("ce_time"), br#"{"a":1}"#),
            (with("ce_time", Some(b"yesterday")), br#"{"a":1}"#),
            (without("content-type"), br#"{"a":1}"#),
            (with("content-type", Some(b"text/plain")), br#"{"a":1}"#),
            (
                with("content-type", Some(b"application/vnd.x+json")),
                br#"{"a":1}"#,
            ),
            (
                with("content-type", Some(b"application/cloudevents+json")),
                br#"{"a":1}"#,
            ),
            (
                with("content-type", Some(b"application/cloudevents+avro")),
                br#"{"a":1}"#,
            ),
            (
                with("content-type", Some(b"application/cloudevents-batch+json")),
                br#"[]"#,
            ),
            (with("CE_Type", Some(b"upper")), br#"{"a":1}"#),
            (vec![("ce_traceparent", Some(&b"00-x"[..]))], br#"{"a":1}"#),
            (with("ce_subject", Some(&LONGEST)), br#"{"a":1}"#),
            (with("ce_subject", Some(&TOO_LONG)), br#"{"a":1}"#),
            (with("ce_id", Some(&TOO_LONG)), br#"{"a":1}"#),
        ]
    }

    fn record<'a>(
        headers: &[(&str, Option<&'a [u8]>)],
        value: &'a [u8],
        ts: Option<i64>,
    ) -> Record<'a> {
        let mut h = CeHeaders::default();
        for (k, v) in headers {
            h.add(k.as_bytes(), *v);
        }
        Record {
            value,
            headers: h,
            default_time_ms: ts,
        }
    }

    #[test]
    fn peek_accepts_and_refuses_what_decode_does() {
        let structured = structured_cases();
        let binary = binary_cases();
        let mut records: Vec<Record<'_>> = Vec::new();
        for bytes in &structured {
            records.push(Record::structured(bytes));
            records.push(Record {
                default_time_ms: Some(1_767_225_600_000),
                ..Record::structured(bytes)
            });
            records.push(record(
                &[("content-type", Some(b"application/cloudevents+json"))],
                bytes,
                Some(0),
            ));
        }
        for (headers, value) in &binary {
            records.push(record(headers, value, None));
            records.push(record(headers, value, Some(1_767_225_600_000)));
        }
        let (mut accepted, mut refused) = (0, 0);
        for r in &records {
            let peeked = Event::peek_record(r);
            let decoded = Event::decode(r);
            assert_eq!(
                peeked.is_some(),
                decoded.is_ok(),
                "{} {:?}: {decoded:?}",
                String::from_utf8_lossy(r.value),
                r.headers
            );
            match (peeked, decoded) {
                (Some(h), Ok(e)) => {
                    assert_eq!(h.event_type, e.event_type);
                    assert_eq!(h.customer, e.customer);
                    accepted += 1;
                }
                _ => refused += 1,
            }
        }
        assert!(accepted > 20 && refused > 40, "{accepted} {refused}");
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(matches!(Event::parse(b"{nope"), Err(EventError::Json(_))));
        // Valid JSON with a wrong-typed attribute is not "not valid JSON".
        let typed = Event::parse(
            br#"{"specversion":"1.0","id":12345,"type":"t","source":"s","subject":"c"}"#,
        )
        .unwrap_err();
        assert!(matches!(typed, EventError::AttributeType { .. }), "{typed}");
        assert!(typed.to_string().contains("column 31"), "{typed}");
        // Not an object: refused as such (an array of the attributes in
        // order would otherwise pass), and the value never quoted.
        for value in [
            &br#""jane.doe@example.com""#[..],
            br#"["1.0","e1","customer.contact_updated","s","c-1",null,{},null]"#,
            b"42",
        ] {
            let refused = Event::parse(value).unwrap_err();
            assert_eq!(refused, EventError::NotAnObject);
            assert!(Event::peek(value).is_none(), "peek agrees");
            assert!(!refused.to_string().contains("jane"), "{refused}");
        }
        assert_eq!(Event::parse(b"").unwrap_err(), EventError::Empty);
        // A document in `subject` is refused by its size, and not echoed.
        let document = format!(
            r#"{{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"{}","time":"2026-01-01T00:00:00Z"}}"#,
            "jane.doe@example.com ".repeat(15_000)
        );
        let long = Event::parse(document.as_bytes()).unwrap_err();
        assert_eq!(
            long.to_string(),
            "not a CloudEvent nudge accepts: `subject` is 315000 bytes, over the 1024 an id may have"
        );
        assert!(Event::peek(document.as_bytes()).is_none(), "peek agrees");
        assert_eq!(
            Event::parse(br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","time":"2026-01-01T00:00:00Z"}"#)
                .unwrap_err(),
            EventError::Missing("subject")
        );
        let no_version = Event::parse(
            br#"{"id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap_err();
        assert_eq!(no_version, EventError::Missing("specversion"));
        assert!(no_version.to_string().contains("missing `specversion`"));
        let time = Event::parse(
            br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"yesterday carol@example.com"}"#,
        )
        .unwrap_err();
        assert!(matches!(time, EventError::Time(_)), "{time}");
        // The value is not repeated (it reaches the log).
        assert!(!time.to_string().contains("carol"), "{time}");
        assert_eq!(
            Event::parse(br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data":[1]}"#).unwrap_err(),
            EventError::DataNotObject
        );
        assert_eq!(
            Event::parse(
                br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c"}"#
            )
            .unwrap_err(),
            EventError::Missing("time"),
            "outside Kafka an event brings its own time"
        );
        let b64 = |text: &str| {
            Event::parse(format!(r#"{{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","time":"2026-01-01T00:00:00Z","data_base64":"{text}"}}"#).as_bytes())
        };
        assert_eq!(b64(A1_BASE64).unwrap().data_key("a").as_deref(), Some("1"));
        for (text, says) in [
            ("aGk=", "`data_base64` does not hold JSON"),
            ("WzFd", "`data_base64` holds JSON that is not an object"),
            ("%%%", "`data_base64` is not base64"),
        ] {
            let e = b64(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn binary_mode_reads_the_attributes_from_headers_and_data_from_the_value() {
        let cases = binary_cases();
        let (headers, value) = &cases[0];
        let e = Event::decode(&record(headers, value, None)).unwrap();
        assert_eq!(
            (
                e.id.as_str(),
                e.event_type.as_str(),
                e.source.as_str(),
                e.customer.as_str()
            ),
            ("e1", "t", "s", "c1")
        );
        assert_eq!(e.time.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(e.data_key("a").as_deref(), Some("1"));

        let reason = |i: usize, ts: Option<i64>| {
            let (h, v) = &cases[i];
            Event::decode(&record(h, v, ts)).unwrap_err().to_string()
        };
        assert!(
            reason(7, None).contains("missing `specversion`"),
            "{}",
            reason(7, None)
        );
        assert!(reason(7, None).contains("ce_specversion"));
        assert!(reason(3, None).contains("must be a JSON object"));
        assert!(reason(4, None).contains("not valid JSON"));
        assert!(reason(12, None).contains("`ce_id` is not UTF-8"));
        assert!(reason(17, None).contains("content-type `text/plain` is not JSON"));
        assert!(reason(20, None).contains("application/cloudevents+avro"));
        assert!(reason(21, None).contains("batched CloudEvents"));
        // Structured content type wins over ce_ headers: the value is the event.
        assert!(reason(19, None).contains("missing `specversion`"));
        // An extension header alone still means binary mode.
        assert!(reason(23, None).contains("ce_specversion"));
        // Ids up to the limit pass; over it, refused naming the attribute.
        let (h, v) = &cases[24];
        assert_eq!(
            Event::decode(&record(h, v, None)).unwrap().customer.len(),
            1024
        );
        assert!(reason(25, None).contains("`subject` is 1025 bytes, over the 1024"));
        assert!(reason(26, None).contains("`id` is 1025 bytes"));

        // No `time`: the record's timestamp; without one, refused.
        let (h, v) = &cases[14];
        let e = Event::decode(&record(h, v, Some(1_767_225_600_123))).unwrap();
        assert_eq!(e.time.timestamp_millis(), 1_767_225_600_123);
        assert!(reason(14, None).contains("missing `time`"));
        // Empty value: no data.
        let (h, v) = &cases[1];
        assert!(Event::decode(&record(h, v, None)).unwrap().data.is_empty());
        // Header names are matched without regard to case.
        let (h, v) = &cases[22];
        assert_eq!(
            Event::decode(&record(h, v, None)).unwrap().event_type,
            "upper"
        );
    }
}
