//! Public holidays by region (ISO 3166-2), read from `policy.holidays` or
//! the Australian calendar shipped in the binary (`holidays/au.toml`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use chrono::NaiveDate;

/// The calendar shipped with nudge: Australia, 2026 and 2027.
pub const SHIPPED: &str = include_str!("../../holidays/au.toml");

#[derive(Debug, Clone, Default)]
pub struct Holidays {
    /// Region (`AU`, `AU-VIC`) → date → name.
    by_region: HashMap<String, BTreeMap<NaiveDate, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HolidayError {
    #[error("policy.holidays: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy.holidays: {0}")]
    Invalid(String),
}

impl Holidays {
    pub fn shipped() -> Self {
        Self::parse(SHIPPED).expect("the shipped holiday calendar parses")
    }

    pub fn load(path: &Path) -> Result<Self, HolidayError> {
        let text = std::fs::read_to_string(path).map_err(|source| HolidayError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| HolidayError::Invalid(format!("{}: {e}", path.display())))
    }

    /// A table per region of "YYYY-MM-DD" = name; top-level strings
    /// (`source`) are documentation.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut by_region = HashMap::new();
        for (region, value) in doc {
            let table = match value {
                toml::Value::String(_) => continue,
                toml::Value::Table(t) => t,
                _ => return Err(format!("`{region}`: expected a table of date = name")),
            };
            if !crate::context::is_region(&region) {
                return Err(format!("`{region}`: not a region like AU or AU-VIC"));
            }
            let mut days = BTreeMap::new();
            for (date, name) in table {
                let day = NaiveDate::parse_from_str(&date, "%Y-%m-%d")
                    .map_err(|_| format!("{region}.{date}: not a date like 2026-11-03"))?;
                let name = name
                    .as_str()
                    .ok_or_else(|| format!("{region}.{date}: the holiday's name, as text"))?;
                days.insert(day, name.to_string());
            }
            by_region.insert(region.to_ascii_uppercase(), days);
        }
        Ok(Self { by_region })
    }

    /// The holiday on `date` for a customer in `region` (its country's
    /// holidays and its own), as (name, the region it belongs to).
    pub fn on<'a>(&'a self, region: &'a str, date: NaiveDate) -> Option<(&'a str, &'a str)> {
        let country = region.split_once('-').map_or(region, |(c, _)| c);
        [region, country]
            .into_iter()
            .filter_map(|r| self.by_region.get_key_value(r))
            .find_map(|(r, days)| days.get(&date).map(|n| (n.as_str(), r.as_str())))
    }

    /// What an operator must hear about a calendar that runs out within
    /// [`ENDING_WARNING`] of `today`: after its last date no day is a
    /// holiday, and call tasks would go on Christmas Day without a word.
    pub fn ending_note(&self, today: NaiveDate) -> Option<String> {
        let last = self
            .by_region
            .values()
            .filter_map(|d| d.keys().next_back())
            .max();
        match last {
            Some(last) if *last < today + ENDING_WARNING => Some(format!(
                "policy.holidays: the calendar's last holiday is {last}; after it no day is a public holiday (call tasks and marketing are not held): add the coming year's dates"
            )),
            None => Some("policy.holidays: the calendar has no holidays".into()),
            _ => None,
        }
    }
}

/// How long before a calendar's last date its end is reported.
pub const ENDING_WARNING: chrono::TimeDelta = chrono::TimeDelta::days(90);

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    /// The shipped calendar (to 2027) is reported from October 2027 on,
    /// not before; an empty one always.
    #[test]
    fn a_calendar_running_out_is_reported() {
        let h = Holidays::shipped();
        assert_eq!(h.ending_note(day("2026-12-06")), None);
        let note = h.ending_note(day("2027-10-15")).unwrap();
        assert!(note.contains("last holiday is 2027-12-2"), "{note}");
        assert!(Holidays::default().ending_note(day("2026-12-06")).is_some());
    }

    #[test]
    fn shipped_calendar_by_region() {
        let h = Holidays::shipped();
        let cup = day("2026-11-03");
        assert_eq!(h.on("AU-VIC", cup), Some(("Melbourne Cup", "AU-VIC")));
        assert_eq!(h.on("AU-NSW", cup), None);
        assert_eq!(h.on("AU", cup), None, "not national");
        assert_eq!(
            h.on("AU-WA", day("2026-04-03")),
            Some(("Good Friday", "AU"))
        );
        assert_eq!(h.on("AU", day("2027-03-29")).unwrap().0, "Easter Monday");
        // King's Birthday differs by state.
        assert!(h.on("AU-NSW", day("2026-06-08")).is_some());
        assert!(h.on("AU-WA", day("2026-06-08")).is_none());
        assert!(h.on("AU-WA", day("2026-09-28")).is_some());
        assert!(h.on("AU-QLD", day("2026-10-05")).is_some());
        // Anzac Day on a Sunday (2027): the Monday in QLD, NT, WA and the
        // ACT, not in NSW, VIC, SA or TAS.
        for region in ["AU-QLD", "AU-NT", "AU-WA", "AU-ACT"] {
            assert!(h.on(region, day("2027-04-26")).is_some(), "{region}");
        }
        for region in ["AU-NSW", "AU-VIC", "AU-SA", "AU-TAS"] {
            assert!(h.on(region, day("2027-04-26")).is_none(), "{region}");
        }
        assert_eq!(h.on("AU-NT", day("2026-04-05")).unwrap().0, "Easter Sunday");
        assert!(h.on("AU-TAS", day("2026-04-05")).is_none());
        assert!(Holidays::parse("[AU]\n\"2026-13-01\" = \"x\"\n")
            .unwrap_err()
            .contains("AU.2026-13-01"));
        // Regions as customers' `region` is read: any case, not a name.
        let lower = Holidays::parse("[au-vic]\n\"2026-11-03\" = \"Cup\"\n").unwrap();
        assert_eq!(lower.on("AU-VIC", cup), Some(("Cup", "AU-VIC")));
        assert!(Holidays::parse("[VICTORIA]\n\"2026-11-03\" = \"Cup\"\n")
            .unwrap_err()
            .contains("not a region like AU or AU-VIC"));
    }
}
