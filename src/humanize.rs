//! Durations written for people, in log reasons and messages: `90d`, `1d 2h`,
//! `12h 30s`, `30m`, `1.5s`, `250ms`. Days are the largest unit: humantime's
//! month is 30.44 days and its year 365.25, so it prints a 90-day cooldown as
//! "2months 29days 2h 52m 48s". Also text from events shown to people
//! ([`printable`]).

use std::time::Duration;

/// `d` in days, hours, minutes and seconds, leaving out the zero ones (`1d 2h`,
/// `12h 30s`); under a minute, seconds to a tenth (`1.5s`); under a second,
/// milliseconds (`250ms`). Parts smaller than shown are dropped, never rounded
/// up, so a duration never reads longer than it is.
pub fn duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_millis(1) {
        return "<1ms".into();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    if d < Duration::from_secs(60) {
        let tenths = d.subsec_millis() / 100;
        return if tenths == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}.{tenths}s", d.as_secs())
        };
    }
    let secs = d.as_secs();
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let mut out = String::new();
    for (n, unit) in parts.into_iter().filter(|(n, _)| *n > 0) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("{n}{unit}"));
    }
    out
}

/// Characters a reader would not see as written: controls, zero-width and
/// bidirectional formatting characters, the soft hyphen and the BOM.
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{00AD}' | '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// `text` for a terminal: control characters (an escape sequence or a line
/// break an event put in a customer id) shown escaped, never acted on; so
/// are invisible and direction-changing characters (`c-1001\u{200b}` is not
/// `c-1001`, and U+202E would show an id reversed).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    escaped_where(text, hidden)
}

/// `text` with each character `escape` picks written as its Rust escape.
pub fn escaped_where(text: &str, escape: impl Fn(char) -> bool) -> std::borrow::Cow<'_, str> {
    if text.chars().any(&escape) {
        text.chars()
            .map(|c| match escape(c) {
                true => c.escape_default().to_string(),
                false => c.to_string(),
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// `n` and its noun, singular for one: "1 journey", "3 journeys".
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    match n.into() {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    }
}

/// A span (`90m`, `3d 12h`) as humantime reads it, less the units whose
/// length varies or whose letter is a trap: to humantime `1M` is a month
/// (30.44 days) and `1m` a minute, and a year is 365.25 days. The reason,
/// if refused, in a designer's words.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let units = text
        .split(|c: char| !c.is_alphabetic())
        .filter(|u| !u.is_empty());
    for unit in units {
        if matches!(unit, "M" | "month" | "months" | "y" | "year" | "years") {
            return Err(format!(
                "`{unit}` is not a unit nudge takes (months and years vary in length): write days or weeks, like \"30d\" or \"52w\" (\"m\" is minutes)"
            ));
        }
    }
    humantime::parse_duration(text).map_err(|e| span_error(&e))
}

/// Why a duration (`90m`, `3d 12h`) did not parse, in a designer's words:
/// humantime says "expected number at 0" for `tomorrow`.
pub fn span_error(e: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    let like = "write a number and a unit, like \"90m\", \"1d\" or \"3d 12h\"";
    match e {
        E::Empty => format!("it is empty: {like} (\"0s\" for at once)"),
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("{value} has no unit: write \"{value}m\", \"{value}h\" or \"{value}d\"")
        }
        E::UnknownUnit { unit, .. } => {
            format!(
                "`{unit}` is not a unit: use s, m, h, d or w (or their names: minutes, days, ...)"
            )
        }
        E::NumberOverflow => "it is too long".into(),
        E::InvalidCharacter(_) | E::NumberExpected(_) => like.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Duration {
        humantime::parse_duration(text).unwrap()
    }

    #[test]
    fn months_and_years_are_refused_and_minutes_kept() {
        assert_eq!(parse_span("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_span("3d 12h"), Ok(d("84h")));
        for text in ["1M", "1 month", "2months", "1y", "1 year", "1d 1M"] {
            let why = parse_span(text).unwrap_err();
            assert!(why.contains("is not a unit nudge takes"), "{text}: {why}");
            assert!(why.contains("\"m\" is minutes"), "{text}: {why}");
        }
    }

    #[test]
    fn one_is_singular() {
        assert_eq!(count(1u64, "journey", "journeys"), "1 journey");
        assert_eq!(count(0u64, "journey", "journeys"), "0 journeys");
        assert_eq!(
            count(2u32, "rule failure", "rule failures"),
            "2 rule failures"
        );
    }

    #[test]
    fn a_bad_span_is_explained_in_words() {
        let why = |t: &str| span_error(&humantime::parse_duration(t).unwrap_err());
        assert_eq!(
            why("tomorrow"),
            "write a number and a unit, like \"90m\", \"1d\" or \"3d 12h\""
        );
        assert_eq!(why("5"), "5 has no unit: write \"5m\", \"5h\" or \"5d\"");
        assert!(why("2 fortnights").starts_with("`fortnights` is not a unit"));
        assert!(why("").starts_with("it is empty"));
    }

    #[test]
    fn the_largest_unit_is_the_day() {
        assert_eq!(duration(d("90d")), "90d");
        assert_eq!(duration(d("400d")), "400d");
        assert_eq!(duration(d("1d 2h")), "1d 2h");
        assert_eq!(duration(d("36h")), "1d 12h");
        assert_eq!(duration(d("12h")), "12h");
        assert_eq!(duration(d("90m")), "1h 30m");
        assert_eq!(duration(d("30m")), "30m");
        assert_eq!(duration(d("2d 3h 4m 5s")), "2d 3h 4m 5s");
    }

    #[test]
    fn zero_parts_are_left_out_and_small_parts_are_not_rounded_up() {
        assert_eq!(duration(d("12h 30s")), "12h 30s");
        assert_eq!(duration(d("1d 5m")), "1d 5m");
        assert_eq!(duration(d("12h 999ms")), "12h");
        assert_eq!(duration(d("1m 30s 999ms")), "1m 30s");
        assert_eq!(duration(d("59s 999ms")), "59.9s");
    }

    #[test]
    fn under_a_minute_seconds_to_a_tenth_and_under_a_second_milliseconds() {
        assert_eq!(duration(Duration::ZERO), "0s");
        assert_eq!(duration(d("1s")), "1s");
        assert_eq!(duration(d("1s 500ms")), "1.5s");
        assert_eq!(duration(d("2s 40ms")), "2s");
        assert_eq!(duration(d("45s")), "45s");
        assert_eq!(duration(d("250ms")), "250ms");
        assert_eq!(duration(d("999ms")), "999ms");
        assert_eq!(duration(d("1ms")), "1ms");
        assert_eq!(duration(Duration::from_micros(300)), "<1ms");
    }

    #[test]
    fn whole_seconds_read_back_as_the_same_duration() {
        // What the config and the journey scripts accept, so a reason can be
        // pasted back into either.
        for secs in [1, 59, 60, 61, 3599, 3600, 86_399, 86_400, 90 * 86_400 + 7] {
            let t = duration(Duration::from_secs(secs));
            assert_eq!(
                humantime::parse_duration(&t).unwrap().as_secs(),
                secs,
                "{t}"
            );
        }
    }
}
