//! The dead-letter outbox's rows, and how a record's headers are stored
//! with them (one JSON column, the same in both backends).

use base64::Engine as _;
use serde_json::{json, Value};

use super::StoreError;

/// A record that could not be processed, kept in the store's outbox (in the
/// same transaction as its offset) until it is published to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: String,
    pub journey: Option<String>,
    pub event_id: Option<String>,
    /// The original record's headers, in order, except `nudge.*` ones (the
    /// publisher writes its own): binary-mode CloudEvents keep their
    /// attributes there, so without them the event could not be rebuilt.
    pub headers: Vec<RecordHeader>,
}

/// One Kafka record header. A name that was not UTF-8 is kept with its
/// invalid bytes replaced (U+FFFD); values are kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// A dead letter handed to a publisher by [`Store::claim_dead_letters`](super::Store::claim_dead_letters).
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedDeadLetter {
    pub id: i64,
    /// Its payload is at most the first `max_payload` bytes of the original.
    pub letter: DeadLetter,
    /// The original payload's size in bytes.
    pub payload_size: usize,
    /// Publish attempts that failed so far.
    pub attempts: u32,
}

/// Dead letters not published, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadLetterBacklog {
    /// To be published: not tried yet, or to be tried again.
    pub waiting: u64,
    /// Given up after their attempts; kept in the store.
    pub failed: u64,
}

/// The `headers` column: `NULL` for none (most records), else a JSON array
/// of `[name, value]` pairs, the value a string when it is UTF-8 without
/// NUL (which PostgreSQL's `jsonb` cannot hold), `{"base64": …}` otherwise,
/// `null` for a null value.
pub(super) fn encode_headers(headers: &[RecordHeader]) -> Option<String> {
    if headers.is_empty() {
        return None;
    }
    let pairs: Vec<Value> = headers
        .iter()
        .map(|h| {
            let value = match &h.value {
                None => Value::Null,
                Some(v) => match std::str::from_utf8(v) {
                    Ok(text) if !text.contains('\0') => Value::String(text.to_string()),
                    _ => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(v) }),
                },
            };
            json!([h.key.replace('\0', "\u{fffd}"), value])
        })
        .collect();
    Some(Value::Array(pairs).to_string())
}

/// The inverse of [`encode_headers`].
pub(super) fn decode_headers(column: Option<&str>) -> Result<Vec<RecordHeader>, StoreError> {
    let Some(text) = column else {
        return Ok(Vec::new());
    };
    let corrupt = |why: &str| StoreError::Corrupt(format!("dead letter headers: {why}"));
    let pairs: Vec<(String, Value)> =
        serde_json::from_str(text).map_err(|e| corrupt(&e.to_string()))?;
    pairs
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Null => None,
                Value::String(s) => Some(s.into_bytes()),
                Value::Object(o) => match o.get("base64").and_then(Value::as_str) {
                    Some(b) => Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| corrupt(&e.to_string()))?,
                    ),
                    None => return Err(corrupt("a value object without `base64`")),
                },
                _ => return Err(corrupt("a value that is not a string, object or null")),
            };
            Ok(RecordHeader { key, value })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_whatever_their_bytes() {
        let headers = vec![
            RecordHeader {
                key: "ce_id".into(),
                value: Some(b"e-1".to_vec()),
            },
            RecordHeader {
                key: "empty".into(),
                value: Some(Vec::new()),
            },
            RecordHeader {
                key: "null".into(),
                value: None,
            },
            RecordHeader {
                key: "binary".into(),
                value: Some(vec![0xff, 0, 1]),
            },
            RecordHeader {
                key: "nul".into(),
                value: Some(b"a\0b".to_vec()),
            },
            RecordHeader {
                key: "ce_id".into(),
                value: Some("é \"quoted\"".as_bytes().to_vec()),
            },
        ];
        let column = encode_headers(&headers).unwrap();
        assert!(!column.contains("\\u0000"), "{column}");
        assert_eq!(decode_headers(Some(&column)).unwrap(), headers);
        assert_eq!(encode_headers(&[]), None);
        assert!(decode_headers(None).unwrap().is_empty());
        assert!(decode_headers(Some("[1]")).is_err());
    }
}
