//! The CloudEvent decoder on a whole Kafka record, headers included (the
//! binary content mode and the choice of mode): never a panic, and the
//! cheap validation (`peek_record`) agrees with the full decode (`decode`).
//!
//! Input layout: a header count, then per header a name length, the name,
//! a value length (255: a null value) and the value; then 8 bytes of
//! default time (present when the first is odd); the rest is the value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nudge::event::{CeHeaders, Event, Record};

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Some(head)
}

fuzz_target!(|input: &[u8]| {
    let mut bytes = input;
    let Some(&[count]) = take(&mut bytes, 1) else { return };
    let mut headers = CeHeaders::default();
    for _ in 0..count % 16 {
        let Some(&[n]) = take(&mut bytes, 1) else { return };
        let Some(name) = take(&mut bytes, n as usize) else { return };
        let Some(&[m]) = take(&mut bytes, 1) else { return };
        let value = match m {
            255 => None,
            m => match take(&mut bytes, m as usize) {
                Some(v) => Some(v),
                None => return,
            },
        };
        headers.add(name, value);
    }
    let Some(time) = take(&mut bytes, 8) else { return };
    let default_time_ms = (time[0] % 2 == 1)
        .then(|| i64::from_le_bytes(time.try_into().unwrap()) % 10_000_000_000_000);
    let record = Record {
        value: bytes,
        headers,
        default_time_ms,
    };
    let head = Event::peek_record(&record);
    match Event::decode(&record) {
        Ok(event) => {
            let head = head.expect("peek_record refused an event that decode accepts");
            assert_eq!(head.event_type, event.event_type);
            assert_eq!(head.customer, event.customer);
        }
        Err(e) => {
            let reason = e.to_string();
            if head.is_some() {
                assert!(
                    reason.contains("number out of range"),
                    "peek_record passed a record that decode refuses: {reason}"
                );
            }
        }
    }
});
