//! Send-rate limits per channel (`channels.<kind>.rate`): a token bucket
//! read on the scheduler's clock, so that tests and `nudge simulate` drive
//! it in virtual time.
//!
//! A bucket holds as many tokens as the rate's count (`"200/s"`: 200 may go
//! at once) and refills one every `unit / count`. A step over the rate is
//! not dropped and not failed: it is given the next free slot and waits for
//! it in the store (a `deferred` record, its due time moved there), and its
//! slot is reserved, so that a backlog is spread evenly instead of coming
//! back all at once. The limit is per process: with several replicas, each
//! sends at most the rate.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A rate such as `200/s`, `30/m` or `1000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// Time between two tokens.
    fn interval(self) -> chrono::Duration {
        chrono::Duration::from_std(self.per / self.count).unwrap_or(chrono::Duration::MAX)
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a rate (e.g. \"200/s\", \"30/m\", \"1000/h\")");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("`{text}`: the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One channel's bucket, as a "theoretical arrival time" (GCRA): the
/// bucket is full when `tat <= now`; each send moves `tat` one interval on.
pub struct RateLimiter {
    rate: Rate,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    tat: Option<DateTime<Utc>>,
    /// Steps (by store row) given a later slot, paid for already: they go
    /// when they come back at it.
    reserved: HashMap<i64, DateTime<Utc>>,
}

/// Reservations older than this are forgotten (their step was settled
/// otherwise, say suppressed when it came back).
const FORGET_AFTER: chrono::Duration = chrono::Duration::hours(1);

impl RateLimiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            state: Mutex::default(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token for the step in store row `row` at `now`: `Ok` when it
    /// may go now, else the slot reserved for it (`Err(at)`).
    pub fn admit(&self, row: i64, now: DateTime<Utc>) -> Result<(), DateTime<Utc>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = state.reserved.remove(&row) {
            if slot <= now {
                return Ok(());
            }
            state.reserved.insert(row, slot);
            return Err(slot);
        }
        let interval = self.rate.interval();
        let burst = interval * (self.rate.count as i32 - 1);
        let tat = state.tat.unwrap_or(now).max(now);
        let slot = tat - burst;
        state.tat = Some(tat + interval);
        if slot <= now {
            return Ok(());
        }
        if state.reserved.len() >= 1024 {
            state.reserved.retain(|_, at| *at > now - FORGET_AFTER);
        }
        state.reserved.insert(row, slot);
        Err(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_their_unit_and_refuse_the_rest() {
        assert_eq!(
            "200/s".parse::<Rate>(),
            Ok(Rate {
                count: 200,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!("30/m".parse::<Rate>().unwrap().per, Duration::from_secs(60));
        assert_eq!(" 5 / h ".parse::<Rate>().unwrap().to_string(), "5/h");
        for bad in ["", "200", "0/s", "-1/s", "2/d", "x/s", "2/"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_burst_goes_then_each_step_gets_the_next_slot_once() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let ms = chrono::Duration::milliseconds;
        let bucket = RateLimiter::new("2/s".parse().unwrap());
        assert_eq!(bucket.admit(1, t0), Ok(()));
        assert_eq!(bucket.admit(2, t0), Ok(()));
        assert_eq!(bucket.admit(3, t0), Err(t0 + ms(500)));
        assert_eq!(bucket.admit(4, t0), Err(t0 + ms(1000)));
        // Early, it keeps its slot; at its slot it goes without a new token.
        assert_eq!(bucket.admit(3, t0 + ms(100)), Err(t0 + ms(500)));
        assert_eq!(bucket.admit(3, t0 + ms(500)), Ok(()));
        assert_eq!(bucket.admit(5, t0 + ms(500)), Err(t0 + ms(1500)));
        // Idle long enough, the bucket is full again.
        assert_eq!(bucket.admit(6, t0 + ms(10_000)), Ok(()));
        assert_eq!(bucket.admit(7, t0 + ms(10_000)), Ok(()));
        assert!(bucket.admit(8, t0 + ms(10_000)).is_err());
    }
}
