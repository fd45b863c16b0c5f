use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::rules::{bucket, load_sources, Limits, RuleSet};

fn patch_err(body: &str) -> PatchError {
    journey_patch(body.as_bytes()).unwrap_err()
}

#[test]
fn a_change_names_what_is_wrong_with_it() {
    let ok = journey_patch(br#"{"shadow": true, "pilot_percent": 10, "enabled": null}"#).unwrap();
    assert_eq!(ok.0["shadow"], Some(json!(true)));
    assert_eq!(ok.0["pilot_percent"], Some(json!(10)));
    assert_eq!(ok.0["enabled"], None, "null clears the override");

    let e = patch_err(r#"{"shadow": true, "shaddow": false}"#);
    assert_eq!(
        e.to_string(),
        "unknown field `shaddow`: fields are enabled, shadow, pilot_percent, holdout_percent"
    );
    for bad in [
        r#"{"pilot_percent": 101}"#,
        r#"{"pilot_percent": -1}"#,
        r#"{"pilot_percent": 10.5}"#,
        r#"{"pilot_percent": "10"}"#,
    ] {
        assert_eq!(
            patch_err(bad).to_string(),
            "`pilot_percent` must be a whole percentage 0-100 (or null to clear the override)",
            "{bad}"
        );
    }
    assert!(
        matches!(patch_err(r#"{"holdout_percent": true}"#), PatchError::BadValue { field, .. } if field == "holdout_percent")
    );
    assert!(
        matches!(patch_err(r#"{"shadow": "yes"}"#), PatchError::BadValue { field, expected } if field == "shadow" && expected == "true or false")
    );
    assert!(matches!(patch_err("{}"), PatchError::Empty(_)));
    assert!(matches!(patch_err("[]"), PatchError::NotAnObject(_)));
    assert!(matches!(
        patch_err("shadow=true"),
        PatchError::NotAnObject(_)
    ));
    // A channel has one field.
    assert!(
        matches!(channel_patch(br#"{"shadow": true}"#), Err(PatchError::UnknownField { field, .. }) if field == "shadow")
    );
    assert_eq!(
        channel_patch(br#"{"enabled": false}"#).unwrap().0["enabled"],
        Some(json!(false))
    );
}

const JOURNEY_SCRIPT: &str = r#"fn journey() { #{ name: "j", category: "service", triggers: ["t"],
  steps: [#{ id: "push", channel: "push", template: "t1", delay: "0s" },
          #{ id: "email", channel: "email", template: "t2", delay: "1h" }] } }
fn decide(event, customer) { start() }
"#;

fn rules(extra_meta: &str) -> RuleSet {
    let script = JOURNEY_SCRIPT.replace(
        "triggers: [\"t\"],",
        &format!("triggers: [\"t\"],{extra_meta}"),
    );
    load_sources(vec![(PathBuf::from("j.rhai"), script)], &Limits::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn settings_come_from_the_override_then_config_then_script() {
    let set = rules(" shadow: true, pilot: 30,");
    let j = set.journey("j").unwrap();
    let policy = PolicyConfig::default();
    let s = JourneySettings::of(j, &policy, None);
    assert_eq!(
        (s.enabled, s.shadow, s.pilot_percent, s.holdout_percent),
        (
            Setting {
                value: true,
                source: Source::Default
            },
            Setting {
                value: true,
                source: Source::Script
            },
            Setting {
                value: 30,
                source: Source::Script
            },
            Setting {
                value: 0,
                source: Source::Default
            },
        )
    );
    let config = PolicyConfig {
        disabled_journeys: vec!["j".into()],
        ..PolicyConfig::default()
    };
    let s = JourneySettings::of(j, &config, None);
    assert_eq!(
        s.enabled,
        Setting {
            value: false,
            source: Source::Config
        }
    );
    // The override wins over both; clearing a field brings them back.
    let patch =
        journey_patch(br#"{"enabled": true, "shadow": false, "holdout_percent": 5}"#).unwrap();
    let edit = patch.journey_edit(j, &config, &Map::new());
    assert_eq!(
        edit.before,
        json!({"enabled": false, "shadow": true, "holdout_percent": 0})
    );
    assert_eq!(
        edit.after,
        json!({"enabled": true, "shadow": false, "holdout_percent": 5})
    );
    let o = JourneyOverride::from_settings(&edit.settings);
    let s = JourneySettings::of(j, &config, Some(&o));
    assert_eq!(
        s.enabled,
        Setting {
            value: true,
            source: Source::Override
        }
    );
    assert_eq!(
        s.shadow,
        Setting {
            value: false,
            source: Source::Override
        }
    );
    let clear = journey_patch(br#"{"shadow": null}"#).unwrap();
    let edit = clear.journey_edit(j, &config, &edit.settings);
    assert_eq!(edit.after, json!({"shadow": true}));
    assert_eq!(
        edit.settings,
        json!({"enabled": true, "holdout_percent": 5})
            .as_object()
            .unwrap()
            .clone()
    );
}

/// The customers `bucket` puts below `percent` for `salt` (pilot, holdout).
fn share(salt: &str, percent: u8, customers: u32) -> f64 {
    let inside = (0..customers)
        .filter(|i| bucket(&format!("c-{i}"), "unsigned_loan", salt) < percent)
        .count();
    100.0 * inside as f64 / customers as f64
}

#[test]
fn hash_groups_are_within_a_point_of_the_setting_on_100_000_customers() {
    for salt in ["pilot", "holdout"] {
        for percent in [1, 5, 10, 20, 50, 90] {
            let got = share(salt, percent, 100_000);
            assert!(
                (got - f64::from(percent)).abs() < 1.0,
                "{salt} {percent}%: {got:.2}% of 100,000 customers"
            );
        }
    }
}

#[test]
fn hash_groups_are_the_same_in_every_process_and_build() {
    // Fixed values: a change of hash (or of its input) would move
    // customers between groups across a restart or an upgrade.
    let got: Vec<u8> = ["c-1001", "c-1002", "c-1003", "c-42"]
        .iter()
        .flat_map(|c| {
            [
                bucket(c, "unsigned_loan", "pilot"),
                bucket(c, "unsigned_loan", "holdout"),
            ]
        })
        .collect();
    assert_eq!(got, GOLDEN.to_vec());
}

const GOLDEN: [u8; 8] = [13, 2, 23, 75, 92, 20, 5, 97];
