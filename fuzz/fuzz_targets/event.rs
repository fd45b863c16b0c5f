//! The structured-mode CloudEvent decoder on any bytes a Kafka record may
//! hold: never a panic, and the cheap validation (`peek`) agrees with the
//! full decode (`parse`) on what it lets through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nudge::event::Event;

fuzz_target!(|bytes: &[u8]| {
    let head = Event::peek(bytes);
    match Event::parse(bytes) {
        Ok(event) => {
            // `peek` is the filter for records no journey reads: an event that
            // decodes must pass it, with the same routing fields.
            let head = head.expect("peek refused an event that parse accepts");
            assert_eq!(head.event_type, event.event_type);
            assert_eq!(head.customer, event.customer);
            // What the decoder accepts, re-encoded, decodes to the same event.
            // A number of more digits than an f64 holds may come back one
            // unit in the last place off (serde_json's fast float parsing is
            // not correctly rounded there), so `data` is compared from the
            // first re-encoding on: from then on it is stable.
            let again = Event::parse(event.to_json().to_string().as_bytes())
                .expect("a re-encoded event parses");
            assert_eq!(again.id, event.id);
            assert_eq!(again.customer, event.customer);
            let third = Event::parse(again.to_json().to_string().as_bytes())
                .expect("a re-encoded event parses");
            assert_eq!(third.data, again.data);
        }
        Err(e) => {
            // `peek` lets through only what decodes: a record it passes is
            // never parsed when no journey reads its type, so a bad one it
            // passed would be skipped instead of dead-lettered. The one
            // documented exception: a number in `data` beyond f64 range.
            let reason = e.to_string();
            if head.is_some() {
                assert!(
                    reason.contains("number out of range"),
                    "peek passed a record that parse refuses: {reason}"
                );
            }
        }
    }
});
