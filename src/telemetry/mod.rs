//! What nudge tells its operators: the metric catalog (names, types, labels,
//! help; README's table is generated from it) and the events that write
//! them. Elsewhere, code emits an event instead of calling `tracing::warn!`,
//! `tracing::error!` or a `metrics` macro, so each failure is logged and
//! counted in one place (a test below holds every module to it).

pub mod catalog;
pub mod events;

pub use catalog::{reference as metrics_reference, Kind, Metric};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// The Prometheus exporter set up for the catalog: every histogram with
/// [`catalog::BUCKETS`].
pub fn prometheus() -> Result<PrometheusBuilder, BuildError> {
    let mut builder = PrometheusBuilder::new();
    for m in catalog::ALL.iter().filter(|m| m.kind == Kind::Histogram) {
        builder = builder.set_buckets_for_metric(Matcher::Full(m.name.into()), catalog::BUCKETS)?;
    }
    Ok(builder)
}

/// Writes at zero every series whose labels are known at start (the
/// channels served, the journeys loaded): a counter that first appears at
/// its first increment makes `increase()` and `rate()` miss that increment,
/// and an alert on it cannot tell "none yet" from "not exported". Call it
/// before anything sets a gauge (runtime control's `nudge_channel_stopped`).
pub fn export_known_series(channels: &[&str], journeys: &[&str]) {
    use catalog::{ALL, CHANNEL_STOPPED, DEAD_LETTERS, STEPS};
    events::BuildInfo.emit();
    metrics::gauge!(catalog::RULES_REFUSED.name).set(0.0);
    let counters = |labels: &[&str]| {
        ALL.iter()
            .filter(move |m| m.kind == Kind::Counter && m.labels == labels)
            .map(|m| m.name)
            .collect::<Vec<_>>()
    };
    for name in counters(&[]) {
        metrics::counter!(name).increment(0);
    }
    for kind in ["invalid", "rule", "context"] {
        metrics::counter!(DEAD_LETTERS.name, "kind" => kind).increment(0);
    }
    for (metric, label, values) in FIXED_LABELS {
        for &value in *values {
            metrics::counter!(metric.name, *label => value).increment(0);
        }
    }
    for &channel in channels {
        let channel = channel.to_string();
        for name in counters(&["channel"]) {
            metrics::counter!(name, "channel" => channel.clone()).increment(0);
        }
        for outcome in STEP_OUTCOMES_EXPORTED {
            metrics::counter!(STEPS.name, "channel" => channel.clone(), "outcome" => *outcome)
                .increment(0);
        }
        metrics::gauge!(CHANNEL_STOPPED.name, "channel" => channel).set(0.0);
    }
    for &journey in journeys {
        for name in counters(&["journey"]) {
            metrics::counter!(name, "journey" => journey.to_string()).increment(0);
        }
    }
}

/// Counters of failures whose one label takes a few fixed values, exported
/// at zero so that an alert on them sees the series before the first.
const FIXED_LABELS: &[(&catalog::Metric, &str, &[&str])] = &[
    (
        &catalog::OFFSET_COMMIT_ERRORS,
        "commit",
        &["batch", "final"],
    ),
    (
        &catalog::RULE_RELOADS,
        "result",
        &["ok", "refused", "failed"],
    ),
    (
        &catalog::DEAD_LETTER_PUBLISH_ERRORS,
        "stage",
        &["read", "publish", "mark"],
    ),
    (
        &catalog::AUDIT_PUBLISH_ERRORS,
        "stage",
        &["read", "produce"],
    ),
    (
        &catalog::ADMIN_AUTH_REFUSED,
        "reason",
        &[
            "missing token",
            "wrong token",
            "reviewer token on an admin endpoint",
        ],
    ),
    (&catalog::CONTROL_CHANGES, "kind", &["journey", "channel"]),
];

/// The step outcomes alerts are written on, exported at zero per channel.
const STEP_OUTCOMES_EXPORTED: &[&str] = &["sent", "failed", "expired", "suppressed"];

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::time::Duration;

    use super::catalog::{self, Kind};
    use super::events::*;

    /// Emits every event that writes a metric, with sample values.
    fn emit_all() {
        let error: &dyn std::fmt::Display = &"boom";
        let d = Duration::from_millis(3);
        EventsConsumed {
            topic: "t",
            partition: 0,
            count: 2,
        }
        .emit();
        ConsumerLag {
            topic: "t",
            partition: 0,
            lag: 5,
        }
        .emit();
        KeyMismatches { count: 1 }.emit();
        StoreOffsetMoved {
            topic: "t",
            partition: 0,
            expected: 9,
            found: Some(4),
        }
        .emit();
        RecordAge {
            youngest: chrono::Duration::milliseconds(40),
        }
        .emit();
        RecordDeadLettered {
            topic: "t",
            partition: 0,
            offset: 7,
            reason: error,
        }
        .emit();
        EventDeadLettered {
            event_id: "e1",
            journey: Some("j"),
            reason: "r",
        }
        .emit();
        EventDeadLettered {
            event_id: "e2",
            journey: None,
            reason: "r",
        }
        .emit();
        KafkaReceiveFailed { error }.emit();
        RebalanceFailed { error }.emit();
        StoredOffsetsUnreadable { topic: "t", error }.emit();
        InvalidOffset {
            topic: "t",
            partition: 0,
            offset: -9,
            error,
        }
        .emit();
        OffsetCommitDeferred { error }.emit();
        FinalOffsetCommitFailed { error }.emit();
        BatchStored { elapsed: d }.emit();
        BatchStoreFailed { error }.emit();
        BatchPanicked { error }.emit();
        EventsIgnored { count: 1 }.emit();
        DuplicateEvents { count: 1 }.emit();
        RuleEvaluated {
            journey: "j",
            ok: false,
        }
        .emit();
        RuleTimedOut {
            journey: "j",
            function: "decide",
        }
        .emit();
        JourneyStarted { journey: "j" }.emit();
        JourneyEnded {
            journey: "j",
            outcome: "converted",
        }
        .emit();
        RulesReloaded {
            trigger: "SIGHUP",
            old: "a",
            new: "b",
            added: "x",
            removed: "",
            changed: "y",
        }
        .emit();
        RulesReloadRefused {
            trigger: "SIGHUP",
            problems: &[],
        }
        .emit();
        RulesVersionNotRecorded { error }.emit();
        StepDecided {
            channel: "push",
            outcome: "sent",
        }
        .emit();
        StepDispatched {
            channel: "push",
            elapsed: d,
        }
        .emit();
        StepConditionFailed {
            journey: "j",
            instance: "i",
            error,
        }
        .emit();
        SchedulerRoundFailed {
            channel: "push",
            error,
        }
        .emit();
        StoreRefusedRecord {
            event_id: "e1",
            reason: "refused",
        }
        .emit();
        StepResultsUnstored {
            channel: "push",
            error,
        }
        .emit();
        StepResultRefused {
            channel: "push",
            instance: "i1",
            step: "s1",
            error,
        }
        .emit();
        StepClaimLost {
            channel: "push",
            instance: "i1",
            step: "s1",
            outcome: "sent",
        }
        .emit();
        AdminAuthRefused {
            path: "/",
            reason: "wrong token",
            client: None,
        }
        .emit();
        AuditRecordsPublished { count: 1 }.emit();
        AuditOutboxUnreadable { error }.emit();
        AuditPublishFailed {
            topic: "audit",
            count: 1,
            error,
        }
        .emit();
        AuditBacklogMeasured { waiting: 1 }.emit();
        AuditRecordsLost { count: 1 }.emit();
        LeaseRenewalFailed {
            channel: "push",
            error,
        }
        .emit();
        NextDueUnreadable {
            channel: "push",
            error,
        }
        .emit();
        DeadLettersPublished { count: 1 }.emit();
        DeadLetterOutboxUnreadable { error }.emit();
        DeadLetterPublishFailed {
            topic: "dlq",
            id: 1,
            attempt: 1,
            error,
        }
        .emit();
        DeadLetterGivenUp {
            id: 1,
            topic: "t",
            partition: 0,
            offset: 7,
            attempts: 5,
            error,
        }
        .emit();
        DeadLetterFailureNotRecorded { id: 1, error }.emit();
        DeadLetterBacklogMeasured {
            waiting: 2,
            failed: 1,
        }
        .emit();
        DeadLettersNotMarked { count: 1, error }.emit();
        StepRateLimited {
            channel: "push",
            wait: d,
        }
        .emit();
        RetentionPurgeFailed { error }.emit();
        ReviewFoldFailed { error }.emit();
        RetentionPurgePanicked { error }.emit();
        AdminServerFailed { error }.emit();
        DrainDeadlinePassed { deadline: d }.emit();
        AdminAuthRefused {
            path: "/admin/journeys/j",
            reason: "wrong token",
            client: None,
        }
        .emit();
        let entry = crate::store::control::ControlEntry {
            seq: 1,
            time: chrono::DateTime::default(),
            who: "admin".into(),
            kind: "journey".into(),
            target: "j".into(),
            before: serde_json::json!({"shadow": false}),
            after: serde_json::json!({"shadow": true}),
        };
        ControlChanged { entry: &entry }.emit();
        ControlRefreshFailed { error }.emit();
        PropensityRefreshFailed { error }.emit();
        ChannelStopped {
            channel: "push",
            stopped: true,
        }
        .emit();
        BuildInfo.emit();
    }

    /// Metric name → the label names of each of its series, read back from
    /// the exporter's text.
    fn exported() -> BTreeMap<String, Vec<BTreeSet<String>>> {
        let recorder = super::prometheus().unwrap().build_recorder();
        metrics::with_local_recorder(&recorder, emit_all);
        let mut found = BTreeMap::new();
        for line in recorder.handle().render().lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let series = line.split_once(' ').unwrap().0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let labels: BTreeSet<String> = labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
                .filter(|k| k != "le")
                .collect();
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| catalog::find(base).is_some_and(|m| m.kind == Kind::Histogram))
                .unwrap_or(name);
            found
                .entry(name.to_string())
                .or_insert_with(Vec::new)
                .push(labels);
        }
        found
    }

    #[test]
    fn events_write_exactly_the_catalog_with_its_labels() {
        let exported = exported();
        for (name, series) in &exported {
            let metric = catalog::find(name)
                .unwrap_or_else(|| panic!("{name} is written but not in the catalog"));
            let declared: BTreeSet<String> = metric.labels.iter().map(|l| l.to_string()).collect();
            for labels in series {
                assert_eq!(labels, &declared, "labels of {name}");
            }
        }
        for m in catalog::ALL {
            assert!(exported.contains_key(m.name), "no event writes {}", m.name);
        }
    }

    /// Before anything happens, the counters alerts are written on are
    /// exported at 0 for the channels and journeys known at start, and no
    /// channel shows as stopped.
    #[test]
    fn known_series_are_exported_at_zero_before_anything_happens() {
        let recorder = super::prometheus().unwrap().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            super::export_known_series(&["push", "email"], &["unsigned_loan"])
        });
        let text = recorder.handle().render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} is not exported:\n{text}"))
                .to_string()
        };
        for series in [
            r#"nudge_steps_total{channel="push",outcome="failed"}"#,
            r#"nudge_steps_total{channel="email",outcome="sent"}"#,
            r#"nudge_step_claims_lost_total{channel="email"}"#,
            r#"nudge_rule_errors_total{journey="unsigned_loan"}"#,
            r#"nudge_dead_letters_total{kind="invalid"}"#,
            "nudge_store_errors_total",
            "nudge_kafka_errors_total",
            r#"nudge_channel_stopped{channel="push"}"#,
            r#"nudge_offset_commit_errors_total{commit="final"}"#,
            r#"nudge_rule_reloads_total{result="refused"}"#,
            r#"nudge_dead_letter_publish_errors_total{stage="publish"}"#,
            r#"nudge_audit_publish_errors_total{stage="produce"}"#,
            r#"nudge_admin_auth_refused_total{reason="wrong token"}"#,
            r#"nudge_control_changes_total{kind="channel"}"#,
        ] {
            assert_eq!(value(series), "0", "{series}");
        }
        assert!(!text.contains(r#"channel="call_task""#), "{text}");
    }

    /// The fixed label values are the catalog's label and what the events write.
    #[test]
    fn fixed_label_values_name_the_catalogs_label() {
        let mut code = String::new();
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("telemetry/mod.rs")
                {
                    code.push_str(&std::fs::read_to_string(path).unwrap());
                }
            }
        }
        for (metric, label, values) in super::FIXED_LABELS {
            assert_eq!(metric.labels, [*label], "{}", metric.name);
            for value in *values {
                assert!(
                    code.contains(&format!("\"{value}\"")),
                    "{} {label}={value} is written nowhere",
                    metric.name
                );
            }
        }
    }

    #[test]
    fn catalog_entries_are_unique_and_fit_a_table_row() {
        let mut names = BTreeSet::new();
        for m in catalog::ALL {
            assert!(names.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("nudge_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            assert!(
                !m.help.contains(['|', '\n']),
                "{}: help must fit a table cell",
                m.name
            );
        }
    }

    /// Outside this module nothing writes a metric or a warning or error
    /// line: such a line would be a failure without its counter.
    #[test]
    fn only_telemetry_writes_metrics_and_warnings() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        visit(&src, &mut |path, text| {
            if path.starts_with(src.join("telemetry")) {
                return;
            }
            for (n, line) in text.lines().enumerate() {
                let forbidden = ["counter!(", "gauge!(", "histogram!(", "warn!(", "error!("];
                if forbidden.iter().any(|f| line.contains(f)) {
                    offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        });
        assert!(
            offenders.is_empty(),
            "emit an event from crate::telemetry::events instead:\n{}",
            offenders.join("\n")
        );
    }

    /// A JSON log line carries the event's `target` (its module), so a
    /// field of that name would repeat the key, and log shippers keep one.
    #[test]
    fn no_event_has_a_field_named_target() {
        let events = include_str!("events.rs");
        let offenders: Vec<&str> = events
            .lines()
            .filter(|l| l.contains("!(target:") && l.contains(", target ="))
            .collect();
        assert!(offenders.is_empty(), "{offenders:#?}");
    }

    fn visit(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, f);
            } else if path.extension().is_some_and(|x| x == "rs") {
                f(&path, &std::fs::read_to_string(&path).unwrap());
            }
        }
    }
}

/// The text log's field formatter. Ids, types and header values come from
/// producers: written as they are, a newline in an event id would forge a
/// log line of its own and an escape sequence would recolour or clear the
/// reader's terminal. Control and bidirectional-override characters are
/// written escaped, as the JSON format already does.
pub fn text_log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    use std::fmt::Write as _;
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let mut out = Escaped(w);
        if field.name() == "message" {
            write!(out, "{value:?}")
        } else {
            write!(out, "{field}={value:?}")
        }
    })
    .delimited(" ")
}

/// Writes through to `W`, escaping what could forge or hide log text.
pub struct Escaped<W>(pub W);

impl<W: std::fmt::Write> std::fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(crate::humanize::hidden) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(self.0, "{}", c.escape_default())?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod text_log_tests {
    use std::fmt::Write as _;

    use super::Escaped;

    /// A log destination the test reads back.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `emit` logs, in the daemon's text format.
    fn text_log_of(emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(super::text_log_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The text log as the daemon writes it: an event id carrying a newline
    /// and an escape sequence stays on its event's line.
    #[test]
    fn a_forged_line_in_a_field_stays_on_its_events_line() {
        let id = "t-nl\n2026-12-06T00:00:00Z ERROR nudge::admin: FORGED\u{1b}[2J";
        let text = text_log_of(|| {
            tracing::warn!(event_id = %id, kind = ?"rule", "event {id} refused");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.contains(r"event t-nl\n2026-12-06T00:00:00Z ERROR nudge::admin: FORGED\u{1b}[2J refused event_id=t-nl\n2026"),
            "{text}"
        );
    }

    /// A client hammering the admin port with refused requests and long
    /// paths writes a line now and then, not one each.
    #[test]
    fn refused_admin_requests_are_logged_a_line_a_while_their_paths_cut_short() {
        let long = format!("/admin/journeys/{}", "A".repeat(60_000));
        let text = text_log_of(|| {
            for _ in 0..1_000 {
                super::events::AdminAuthRefused {
                    path: &long,
                    reason: "missing token",
                    client: None,
                }
                .emit();
            }
        });
        // Another test of this process may have logged the reason within
        // the quiet period: then none here.
        assert!(text.lines().count() <= 1, "{} lines", text.lines().count());
        assert!(text.len() < 400, "{text}");
        assert_eq!(
            super::events::shown_path(&long),
            format!("/admin/journeys/{}… (60016 bytes)", "A".repeat(104))
        );
        assert_eq!(super::events::shown_path("/admin/x"), "/admin/x");
    }

    #[test]
    fn control_and_bidi_characters_are_escaped_and_the_rest_kept() {
        let mut out = String::new();
        write!(
            Escaped(&mut out),
            "t-nl\n2026 ERROR forged \u{1b}[2J tab\there \u{202e}gnp.exe — ünïcode"
        )
        .unwrap();
        assert_eq!(
            out,
            "t-nl\\n2026 ERROR forged \\u{1b}[2J tab\\there \\u{202e}gnp.exe — ünïcode"
        );
    }
}
