//! Compiling a `rules/` directory: every file must compile and declare a
//! valid journey, or nothing is loaded. Problems carry file, line, column and
//! a hint, because the reader is a journey designer, not a Rust programmer.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rhai::{Dynamic, Engine, Scope};

use super::api::{build_engine, innermost, with_deadline, Limits};
use super::{Journey, RuleSet, StepPlan};
use crate::config::settings::Fatigue;
use crate::model::{content_hash, Category, ChannelKind, ExitOutcome};

/// Every key `fn journey()`'s map may have; any other is refused with its
/// file and line (a typo would otherwise be a silently ignored setting).
/// The one list: a new journey key is added here and read in `compile_one`.
pub const JOURNEY_FIELDS: &[&str] = &[
    "name",
    "description",
    "category",
    "priority",
    "triggers",
    "exits",
    "key",
    "steps",
    "cooldown",
    "holdout",
    "pilot",
    "shadow",
    "fatigue",
    "on_lose",
];

/// Every key a step's map may have (the same rule as [`JOURNEY_FIELDS`]).
pub const STEP_FIELDS: &[&str] = &["id", "channel", "template", "delay", "when", "fallback"];
use crate::model::OnLose;

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the problem is the file (or directory) as a whole.
        if self.line == 0 {
            write!(f, "{}: error: {}", self.file, self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file, self.line, self.column, self.message
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in a rule set; nothing was loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub struct LoadError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl LoadError {
    fn single(file: &str, message: String) -> Self {
        Self {
            problems: vec![Problem {
                file: file.into(),
                line: 0,
                column: 0,
                message,
                hint: None,
            }],
        }
    }
}

/// Reads and compiles every `*.rhai` file in `dir`.
pub fn load_dir(dir: &Path, limits: &Limits) -> Result<RuleSet, LoadError> {
    load_sources(dir_sources(dir)?, limits)
}

/// Every journey of several directories, compiled as one rule set (all of
/// them or none; a journey name may appear once across them).
pub fn load_dirs(dirs: &[PathBuf], limits: &Limits) -> Result<RuleSet, LoadError> {
    let mut sources = Vec::new();
    for dir in dirs {
        sources.extend(dir_sources(dir)?);
    }
    load_sources(sources, limits)
}

/// Subdirectories deeper than this are not read (a symlink loop ends here).
const MAX_DEPTH: usize = 8;

/// The files under `dir` whose name ends with `suffix`, in subdirectories
/// too (a team's folder each), in path order. Hidden names are skipped: an
/// editor's lock and backup files (`.#x.rhai`), and a Kubernetes
/// ConfigMap's `..data` copies of the files it also links at the top.
pub fn files_under(dir: &Path, suffix: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 0)];
    while let Some((at, depth)) = pending.pop() {
        for entry in std::fs::read_dir(&at)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                if depth < MAX_DEPTH {
                    pending.push((path, depth + 1));
                }
            } else if name.ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The `*.rhai` scripts under a directory in path order, with their text.
fn dir_sources(dir: &Path) -> Result<Vec<(PathBuf, String)>, LoadError> {
    let shown = dir.display().to_string();
    let paths = files_under(dir, ".rhai")
        .map_err(|e| LoadError::single(&shown, format!("cannot read rules directory: {e}")))?;
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            LoadError::single(&path.display().to_string(), format!("cannot read: {e}"))
        })?;
        sources.push((path, text));
    }
    if sources.is_empty() {
        return Err(LoadError::single(
            &shown,
            "no *.rhai journey scripts found".into(),
        ));
    }
    Ok(sources)
}

/// Compiles scripts given as (path, text): all of them or none.
pub fn load_sources(
    sources: Vec<(PathBuf, String)>,
    limits: &Limits,
) -> Result<RuleSet, LoadError> {
    let engine = build_engine(limits);
    let mut problems = Vec::new();
    let mut journeys: Vec<Journey> = Vec::new();
    let mut names = HashSet::new();
    for (path, text) in sources {
        match compile_one(&engine, limits, &path, &text) {
            Ok(journey) => {
                if !names.insert(journey.name.clone()) {
                    let (line, column) = find(&text, &format!("\"{}\"", journey.name));
                    let first = journeys
                        .iter()
                        .find(|j| j.name == journey.name)
                        .map_or_else(String::new, |j| j.file.display().to_string());
                    problems.push(Problem {
                        file: path.display().to_string(),
                        line,
                        column,
                        message: format!(
                            "journey name `{}` is already used by {first}",
                            journey.name
                        ),
                        hint: Some("every journey needs its own name".into()),
                    });
                } else {
                    journeys.push(journey);
                }
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(RuleSet::new(journeys, engine, limits.timeout))
    } else {
        Err(LoadError { problems })
    }
}

fn compile_one(
    engine: &Engine,
    limits: &Limits,
    path: &Path,
    text: &str,
) -> Result<Journey, Vec<Problem>> {
    let file = path.display().to_string();
    let problem = |line: usize, column: usize, message: String, hint: Option<&str>| Problem {
        file: file.clone(),
        line,
        column,
        message,
        hint: hint.map(str::to_string),
    };
    let ast = engine.compile(text).map_err(|e| {
        let hint = match &*e.0 {
            rhai::ParseErrorType::VariableUndefined(_) => Some(
                "declare it with `let`, or read event fields as event.data.<field> and context as customer.<property>",
            ),
            rhai::ParseErrorType::MissingToken(..) => Some("check for an unclosed bracket or a missing `,` or `;`"),
            _ => None,
        };
        let message = e.0.to_string();
        vec![problem(e.1.line().unwrap_or(0), e.1.position().unwrap_or(0), message, hint)]
    })?;

    let fn_line = |name: &str| find(text, &format!("fn {name}"));
    let has_fn = |name: &str, params: usize| {
        ast.iter_functions()
            .any(|f| f.name == name && f.params.len() == params)
    };
    // A function of the right name with other parameters is never called:
    // rhai tells functions apart by name and parameter count.
    let wrong_params = |name: &str, wanted: &str| {
        ast.iter_functions().find(|f| f.name == name).map(|f| {
            let (l, c) = fn_line(name);
            let takes = match f.params.len() {
                0 => "none".to_string(),
                _ => format!("({})", f.params.join(", ")),
            };
            problem(
                l,
                c,
                format!("`fn {name}` must take {wanted}; this one takes {takes}, so nudge would never call it"),
                None,
            )
        })
    };
    if !has_fn("journey", 0) {
        return Err(vec![wrong_params("journey", "no parameters").unwrap_or_else(|| {
            problem(1, 1, "missing `fn journey()` returning the journey's definition".into(),
                Some("see rules/README.md: fn journey() { #{ name: ..., triggers: [...], steps: [...] } }"))
        })]);
    }
    if !has_fn("decide", 2) {
        let hint = Some("decide returns start(vars) to start the journey, or skip(reason)");
        return Err(vec![match wrong_params("decide", "(event, customer)") {
            Some(mut p) => {
                p.hint = hint.map(str::to_string);
                p
            }
            None => problem(1, 1, "missing `fn decide(event, customer)`".into(), hint),
        }]);
    }

    let mut scope = Scope::new();
    let options = rhai::CallFnOptions::new().eval_ast(false);
    let meta: Dynamic = with_deadline(limits.timeout, || {
        engine.call_fn_with_options(options, &mut scope, &ast, "journey", ())
    })
    .map_err(|e| {
        let inner = innermost(&e);
        let (line, column) = match (inner.pos.line(), inner.pos.position()) {
            (Some(l), Some(c)) => (l, c),
            _ => fn_line("journey"),
        };
        vec![problem(
            line,
            column,
            format!("journey() failed: {}", inner.message),
            None,
        )]
    })?;
    let Some(meta) = meta.try_cast::<rhai::Map>() else {
        let (l, c) = fn_line("journey");
        return Err(vec![problem(
            l,
            c,
            "journey() must return a map #{ ... }".into(),
            None,
        )]);
    };

    let mut problems = Vec::new();
    // Where the step being checked begins in the text (0: the journey), so
    // that a step's problem is found in that step, not in the first one
    // that has the same key.
    let step_start = std::cell::Cell::new(0usize);
    let mut at = |needle: &str, message: String, hint: Option<&str>| {
        let (l, c) = if needle.is_empty() {
            fn_line("journey")
        } else {
            let base = step_start.get();
            let within = &text[base..];
            let found = if let Some((key, value)) =
                needle.strip_prefix('@').and_then(|n| n.split_once('='))
            {
                find_field(within, key, value)
            } else if let Some(key) = needle.strip_prefix('@').and_then(|n| n.strip_suffix(':')) {
                find_key(within, key)
            } else {
                within.find(needle)
            };
            // Not in this step as written (built by code, say): anywhere.
            match found {
                Some(offset) => position(text, base + offset),
                None => find(text, needle.trim_start_matches('@')),
            }
        };
        problems.push(problem(l, c, message, hint));
    };

    for k in meta.keys() {
        if !JOURNEY_FIELDS.contains(&k.as_str()) {
            at(
                &format!("@{k}:"),
                format!("unknown journey field `{k}`"),
                Some(&format!("fields are {}", JOURNEY_FIELDS.join(", "))),
            );
        }
    }

    for (key, problem) in wrong_types(&meta, JOURNEY_TEXT, JOURNEY_LISTS) {
        at(&format!("@{key}:"), problem, type_hint(&key));
    }

    let name = string_field(&meta, "name").unwrap_or_default();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        at(
            "name",
            format!("journey name `{name}` must be non-empty snake_case"),
            Some("e.g. name: \"unsigned_loan\""),
        );
    }
    let description = string_field(&meta, "description").unwrap_or_default();
    let category = match string_field(&meta, "category")
        .as_deref()
        .map(str::parse::<Category>)
    {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            at(
                "category",
                e,
                Some("category: \"service\" or \"marketing\""),
            );
            Category::Service
        }
        None => {
            at(
                "",
                "missing `category`".into(),
                Some("category: \"service\" or \"marketing\""),
            );
            Category::Service
        }
    };
    let priority = match meta.get("priority") {
        None => 0,
        Some(v) => v.as_int().unwrap_or_else(|_| {
            at(
                "priority",
                format!("priority must be a whole number, not {}", type_words(v)),
                Some("priority: 80 (higher goes first when caps leave room for fewer)"),
            );
            0
        }),
    };

    let triggers = string_list(&meta, "triggers");
    // (A `triggers` that is no list is reported as such above.)
    if triggers.as_ref().is_none_or(|t| t.is_empty()) && !wrong_list(&meta, "triggers") {
        at("", "journey has no triggers".into(), Some("triggers: [\"loan_application.completed\"] lists the event types that may start it"));
    }
    let mut exits = Vec::new();
    if let Some(v) = meta.get("exits") {
        match v.read_lock::<rhai::Map>() {
            Some(map) => {
                for (event_type, outcome) in map.iter() {
                    match outcome.clone().into_string().ok().as_deref() {
                        Some("converted") => {
                            exits.push((event_type.to_string(), ExitOutcome::Converted))
                        }
                        Some("cancelled") => {
                            exits.push((event_type.to_string(), ExitOutcome::Cancelled))
                        }
                        _ => at(
                            event_type.as_str(),
                            format!(
                                "exit `{event_type}` must map to \"converted\" or \"cancelled\""
                            ),
                            None,
                        ),
                    }
                }
            }
            None => at(
                "exits",
                "exits must be a map of event type to \"converted\" or \"cancelled\"".into(),
                None,
            ),
        }
    }
    for (event_type, _) in &exits {
        if event_type.trim().is_empty() {
            at(
                "@exits:",
                "an exit needs an event type: an empty one can never match".into(),
                Some("exits: #{ \"loan_application.signed\": \"converted\" }"),
            );
        } else if triggers.as_ref().is_some_and(|t| t.contains(event_type)) {
            at(
                &format!("@{event_type}:"),
                format!("`{event_type}` is both a trigger and an exit: each such event would end the journey, count as its outcome, and start it again"),
                Some("an exit is what the customer does in answer (signing, enrolling); a repeated trigger is kept apart by `key` and `cooldown`"),
            );
        }
    }
    let key_field = string_field(&meta, "key");

    let mut steps = Vec::new();
    let step_values = meta
        .get("steps")
        .and_then(|v| v.read_lock::<rhai::Array>().map(|a| a.clone()));
    match step_values {
        None => at(
            "",
            "journey has no steps".into(),
            Some("steps: [#{ id: \"push\", channel: \"push\", template: \"...\", delay: \"0s\" }]"),
        ),
        Some(values) if values.is_empty() => at("steps", "journey has no steps".into(), None),
        Some(values) => {
            let mut ids = HashSet::new();
            for v in values {
                let Some(step) = v.try_cast::<rhai::Map>() else {
                    at(
                        "steps",
                        "each step must be a map #{ id, channel, template, delay }".into(),
                        None,
                    );
                    continue;
                };
                // The step's map as written: the `#{` before its `id`.
                step_start.set(
                    string_field(&step, "id")
                        .and_then(|id| find_field(text, "id", &id))
                        .and_then(|id_at| text[..id_at].rfind("#{"))
                        .unwrap_or(0),
                );
                for k in step.keys() {
                    if !STEP_FIELDS.contains(&k.as_str()) {
                        at(
                            &format!("@{k}:"),
                            format!("unknown step field `{k}`"),
                            Some(&format!("step fields are {}", STEP_FIELDS.join(", "))),
                        );
                    }
                }
                let wrong = wrong_types(&step, STEP_TEXT, STEP_LISTS);
                let which =
                    string_field(&step, "id").map_or("step".into(), |id| format!("step `{id}`"));
                for (key, problem) in &wrong {
                    at(
                        &format!("@{key}:"),
                        format!("{which}: {problem}"),
                        type_hint(key),
                    );
                }
                if !wrong.is_empty() {
                    continue;
                }
                let id = string_field(&step, "id").unwrap_or_default();
                if id.is_empty() {
                    at("steps", "a step has no `id`".into(), None);
                } else if !ids.insert(id.clone()) {
                    at(
                        &format!("\"{id}\""),
                        format!("step id `{id}` is used twice"),
                        None,
                    );
                }
                let channel_text = string_field(&step, "channel").unwrap_or_default();
                let preferred = channel_text == "preferred";
                let channel = match channel_text.parse::<ChannelKind>() {
                    Ok(c) => c,
                    // Resolved per customer when planned and again when due; this is the default.
                    Err(_) if preferred => ChannelKind::Push,
                    Err(e) => {
                        at(
                            &format!("@channel={channel_text}"),
                            e,
                            Some("channels are push, email, call_task, or \"preferred\""),
                        );
                        ChannelKind::Push
                    }
                };
                let template = string_field(&step, "template").unwrap_or_default();
                if template.is_empty() {
                    at(
                        &format!("\"{id}\""),
                        format!("step `{id}` has no template"),
                        None,
                    );
                }
                let delay_text = string_field(&step, "delay").unwrap_or_else(|| "0s".into());
                let delay = match parse_delay(&delay_text) {
                    Ok(d) => d,
                    Err(e) => {
                        at(
                            &format!("@delay={delay_text}"),
                            format!("step `{id}`: {e}"),
                            Some("delays look like \"0s\", \"90m\", \"1d\", \"3d 12h\""),
                        );
                        Duration::ZERO
                    }
                };
                let condition = string_field(&step, "when");
                if let Some(f) = &condition {
                    if !has_fn(f, 2) {
                        at(&format!("@when={f}"), format!("step `{id}`: condition function `{f}(customer, vars)` is not defined"), Some("define fn NAME(customer, vars) returning true to send"));
                    }
                }
                let mut fallback = Vec::new();
                if let Some(v) = step.get("fallback") {
                    let names = v.read_lock::<rhai::Array>().map(|a| {
                        a.iter()
                            .map(|n| n.clone().into_string().ok())
                            .collect::<Option<Vec<String>>>()
                    });
                    match names {
                        Some(Some(names)) => {
                            for n in names {
                                match n.parse::<ChannelKind>() {
                                    Ok(c) if (preferred || c != channel) && !fallback.contains(&c) => {
                                        fallback.push(c)
                                    }
                                    Ok(_) => at(
                                        "@fallback:",
                                        format!("step `{id}`: fallback `{n}` repeats a channel of the step"),
                                        None,
                                    ),
                                    Err(e) => at(
                                        &format!("\"{n}\""),
                                        format!("step `{id}`: fallback: {e}"),
                                        Some("channels are push, email, call_task"),
                                    ),
                                }
                            }
                        }
                        _ => at(
                            "@fallback:",
                            format!("step `{id}`: fallback must be a list of channels"),
                            Some("e.g. fallback: [\"email\"]"),
                        ),
                    }
                }
                steps.push(StepPlan {
                    id,
                    template,
                    delay,
                    condition,
                    channel: match (preferred, fallback.first()) {
                        (true, Some(&first)) => first,
                        _ => channel,
                    },
                    fallback,
                    preferred,
                });
            }
            step_start.set(0);
        }
    }

    let cooldown = match string_field(&meta, "cooldown") {
        None => None,
        Some(t) => match parse_delay(&t) {
            Ok(d) => Some(d),
            Err(e) => {
                at(
                    &format!("\"{t}\""),
                    format!("cooldown: {e}"),
                    Some("e.g. cooldown: \"30d\""),
                );
                None
            }
        },
    };
    let mut percent = |key: &str, default: i64| -> u8 {
        match meta.get(key) {
            None => default as u8,
            Some(v) => match v.as_int() {
                Ok(p) if (0..=100).contains(&p) => p as u8,
                _ => {
                    at(
                        key,
                        format!(
                            "{key} must be a whole percentage 0..=100, not {}",
                            type_words(v)
                        ),
                        Some(match key {
                            "pilot" => "e.g. pilot: 10 starts the journey for 10 % of customers",
                            _ => "e.g. holdout: 10 keeps 10 % of customers out as a control group",
                        }),
                    );
                    default as u8
                }
            },
        }
    };
    let holdout_percent = percent("holdout", 0);
    let pilot_percent = percent("pilot", 100);
    let shadow = match meta.get("shadow").map(|v| v.as_bool()) {
        None => false,
        Some(Ok(b)) => b,
        Some(Err(_)) => {
            let value = type_words(&meta["shadow"]);
            at(
                "shadow",
                format!("shadow must be true or false, not {value}"),
                None,
            );
            false
        }
    };
    let fatigue = fatigue_field(&meta).unwrap_or_else(|e| {
        at(
            "fatigue",
            format!("fatigue: {e}"),
            Some("e.g. fatigue: #{ after: 3, pause: \"30d\" } (after: 0 turns it off)"),
        );
        None
    });

    let on_lose = match string_field(&meta, "on_lose").map(|t| t.parse::<OnLose>()) {
        None => OnLose::default_for(category),
        Some(Ok(o)) => o,
        Some(Err(e)) => {
            at("on_lose", e, Some("on_lose: \"defer\" or \"drop\""));
            OnLose::default_for(category)
        }
    };
    // `rank(customer, vars)` scores the journey's steps in arbitration.
    let rank = has_fn("rank", 2);
    if !rank && ast.iter_functions().any(|f| f.name == "rank") {
        at(
            "fn rank",
            "`fn rank` must take (customer, vars): as written it would never be called".into(),
            Some("fn rank(customer, vars) { customer.propensity(\"my_journey\", \"push\") * 100 }"),
        );
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Journey {
        on_lose,
        rank,
        name,
        description,
        category,
        priority,
        triggers: triggers.unwrap_or_default(),
        exits,
        key_field,
        steps,
        cooldown,
        holdout_percent,
        pilot_percent,
        shadow,
        fatigue,
        file: path.to_path_buf(),
        hash: content_hash(text.as_bytes()),
        ast,
    })
}

/// `fatigue: #{ after: 3, pause: "30d" }`; absent: the config's default.
fn fatigue_field(map: &rhai::Map) -> Result<Option<Fatigue>, String> {
    let Some(value) = map.get("fatigue") else {
        return Ok(None);
    };
    let table = value
        .read_lock::<rhai::Map>()
        .ok_or("must be a map like #{ after: 3, pause: \"30d\" }")?
        .clone();
    for k in table.keys() {
        if !["after", "pause"].contains(&k.as_str()) {
            return Err(format!("unknown field `{k}` (fields are after, pause)"));
        }
    }
    let after = match table.get("after").map(|v| v.as_int()) {
        Some(Ok(n)) if (0..=1000).contains(&n) => n as u32,
        _ => return Err("after must be a whole number of sends, 0..=1000".into()),
    };
    if let Some((_, problem)) = wrong_types(&table, &["pause"], &[]).into_iter().next() {
        return Err(problem);
    }
    let pause = match string_field(&table, "pause") {
        Some(t) => parse_delay(&t).map_err(|e| format!("pause: {e}"))?,
        None if after == 0 => Duration::ZERO,
        None => return Err("pause is required, e.g. \"30d\"".into()),
    };
    if after > 0 && pause.is_zero() {
        return Err("pause must be longer than 0s".into());
    }
    Ok(Some(Fatigue { after, pause }))
}

/// Journey keys whose value is text, and those that are lists of text.
const JOURNEY_TEXT: &[&str] = &[
    "name",
    "description",
    "category",
    "key",
    "cooldown",
    "on_lose",
];
const JOURNEY_LISTS: &[&str] = &["triggers"];
const STEP_TEXT: &[&str] = &["id", "channel", "template", "delay", "when"];
const STEP_LISTS: &[&str] = &["fallback"];

/// Each key of `text` or `lists` present in `map` with a value of another
/// type, and what is wrong with it: read as text, a number would be ignored
/// (a `delay: 2` would be no delay at all, a `key: 7` one instance per
/// customer), so it is refused instead.
fn wrong_types(map: &rhai::Map, text: &[&str], lists: &[&str]) -> Vec<(String, String)> {
    let mut wrong = Vec::new();
    for (key, value) in map.iter() {
        let key = key.as_str();
        if text.contains(&key) && !value.is_string() {
            wrong.push((
                key.to_string(),
                format!("`{key}` must be a string, not {}", type_words(value)),
            ));
        } else if lists.contains(&key) {
            let all_text = value
                .read_lock::<rhai::Array>()
                .map(|a| a.iter().all(rhai::Dynamic::is_string));
            match all_text {
                Some(true) => {}
                Some(false) => wrong.push((
                    key.to_string(),
                    format!("`{key}` must be a list of strings: it holds something else"),
                )),
                None => wrong.push((
                    key.to_string(),
                    format!(
                        "`{key}` must be a list of strings, not {}",
                        type_words(value)
                    ),
                )),
            }
        }
    }
    wrong.sort();
    wrong
}

/// Whether `key` is present but not a list.
fn wrong_list(map: &rhai::Map, key: &str) -> bool {
    map.get(key).is_some_and(|v| !v.is_array())
}

/// A value's type as a designer would say it.
fn type_words(value: &rhai::Dynamic) -> String {
    if value.is_int() || value.is_float() {
        format!("the number {value}")
    } else if value.is_bool() {
        format!("{value}")
    } else if value.is_string() {
        format!("the string \"{value}\"")
    } else if value.is_array() {
        "a list".into()
    } else if value.is_map() {
        "a map".into()
    } else if value.is_unit() {
        "() (nothing)".into()
    } else {
        format!("a {}", value.type_name())
    }
}

/// How to write a key whose value has the wrong type.
fn type_hint(key: &str) -> Option<&'static str> {
    Some(match key {
        "delay" => "delays are strings with a unit: \"0s\", \"90m\", \"1d\", \"3d 12h\"",
        "cooldown" => "e.g. cooldown: \"30d\"",
        "pause" => "e.g. pause: \"30d\"",
        "key" => "key names the event field that tells instances apart: key: \"application_id\"",
        "triggers" => {
            "triggers: [\"loan_application.completed\"] lists the event types that may start it"
        }
        "fallback" => "e.g. fallback: [\"email\"]",
        "on_lose" => "on_lose: \"defer\" or \"drop\"",
        "category" => "category: \"service\" or \"marketing\"",
        _ => return None,
    })
}

fn string_field(map: &rhai::Map, key: &str) -> Option<String> {
    map.get(key).and_then(|v| v.clone().into_string().ok())
}

fn string_list(map: &rhai::Map, key: &str) -> Option<Vec<String>> {
    let arr = map.get(key)?.read_lock::<rhai::Array>()?.clone();
    Some(
        arr.into_iter()
            .filter_map(|v| v.into_string().ok())
            .collect(),
    )
}

/// "0s", "90m", "1d", "3d 12h"; a bare number is refused (unit ambiguity).
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    crate::humanize::parse_span(text.trim()).map_err(|e| format!("`{text}` is not a delay: {e}"))
}

/// Position of `"value"` written as the value of `key` (`key: "value"` or
/// `"key": "value"`), so a bad channel is not reported where the same word
/// appears elsewhere (say, in the journey's name); else its first occurrence.
fn find_field(text: &str, key: &str, value: &str) -> Option<usize> {
    let quoted = format!("\"{value}\"");
    for (offset, _) in text.match_indices(&quoted) {
        let before = text[..offset].trim_end();
        if let Some(before_colon) = before.strip_suffix(':') {
            let name = before_colon.trim_end();
            if name.ends_with(key) || name.ends_with(&format!("\"{key}\"")) {
                return Some(offset);
            }
        }
    }
    text.find(&quoted)
}

/// Position of `key` written as a map key (`key:` or `"key":`, not part of
/// a longer word), so an unknown key is reported where it is set, not where
/// the same word first appears (say, in an event type); else its first
/// occurrence.
fn find_key(text: &str, key: &str) -> Option<usize> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for (offset, _) in text.match_indices(key) {
        let before = text[..offset].trim_end_matches('"');
        if before.chars().next_back().is_some_and(word) {
            continue;
        }
        let after = text[offset + key.len()..].trim_start_matches('"');
        if after.trim_start().starts_with(':') && !after.starts_with(|c: char| word(c)) {
            let start = if text[..offset].ends_with('"') {
                offset - 1
            } else {
                offset
            };
            return Some(start);
        }
    }
    text.find(key)
}

/// Steps (or their fallbacks) on channels the daemon has no endpoint for,
/// one problem per journey and channel, placed where the script names the
/// channel: the daemon refuses such rules at start and on reload alike.
pub fn unserved_channels(set: &RuleSet, served: &[ChannelKind]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for journey in set.journeys() {
        let mut missing: Vec<ChannelKind> = Vec::new();
        for step in &journey.steps {
            for channel in std::iter::once(step.channel).chain(step.fallback.iter().copied()) {
                if !served.contains(&channel) && !missing.contains(&channel) {
                    missing.push(channel);
                }
            }
        }
        let text = std::fs::read_to_string(&journey.file).unwrap_or_default();
        for channel in missing {
            let (line, column) = find(&text, &format!("\"{channel}\""));
            problems.push(Problem {
                file: journey.file.display().to_string(),
                line,
                column,
                message: format!(
                    "journey `{}` sends on {channel}, which has no endpoint in the daemon's config",
                    journey.name
                ),
                hint: Some(format!(
                    "set channels.{channel}.url in the config and restart, or send on a configured channel"
                )),
            });
        }
    }
    problems
}

/// 1-based line and column of the first occurrence of `needle` (1:1 if absent).
fn find(text: &str, needle: &str) -> (usize, usize) {
    match text.find(needle) {
        Some(offset) if !needle.is_empty() => position(text, offset),
        _ => (1, 1),
    }
}

/// 1-based line and column of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A problem with no place in a file (a missing directory) names the
    /// path alone, not a made-up `:0:0`.
    #[test]
    fn a_missing_rules_directory_is_named_without_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-rules");
        let err = load_dir(&missing, &Limits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: error: cannot read rules directory: No such file or directory (os error 2)",
                missing.display()
            )
        );
    }

    /// A team's folder is read like the top; hidden names are not: an
    /// editor's lock file (a dangling link), a hidden script, a ConfigMap's
    /// `..data` copies.
    #[test]
    fn journeys_in_subdirectories_load_and_hidden_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let journey = |name: &str| {
            format!("fn journey() {{\n    #{{ name: \"{name}\", category: \"service\", triggers: [\"x.y\"],\n       steps: [ #{{ id: \"a\", channel: \"push\", template: \"t\" }} ] }}\n}}\nfn decide(event, customer) {{ start() }}\n")
        };
        let root = dir.path();
        std::fs::create_dir_all(root.join("cards/deep")).unwrap();
        std::fs::create_dir_all(root.join("..data")).unwrap();
        std::fs::write(root.join("top.rhai"), journey("top")).unwrap();
        std::fs::write(root.join("cards/deep/card.rhai"), journey("card")).unwrap();
        std::fs::write(root.join("..data/top.rhai"), journey("top")).unwrap();
        std::fs::write(root.join(".hidden.rhai"), "not a script").unwrap();
        std::os::unix::fs::symlink("user@host.1234", root.join(".#top.rhai")).unwrap();
        std::fs::write(root.join("cards/notes.txt"), "not a script").unwrap();
        let files: Vec<String> = files_under(root, ".rhai")
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(files, ["cards/deep/card.rhai", "top.rhai"]);
        let rules = load_dir(root, &Limits::default()).unwrap();
        let mut names: Vec<&str> = rules.journeys().iter().map(|j| j.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["card", "top"]);
    }

    #[test]
    fn a_rank_with_other_parameters_is_refused() {
        let text = "fn journey() {\n    #{ name: \"r\", category: \"service\", triggers: [\"x.y\"],\n       steps: [ #{ id: \"a\", channel: \"push\", template: \"t\" } ] }\n}\nfn decide(event, customer) { start() }\nfn rank(customer) { 100 }\n";
        let err = load_sources(
            vec![(PathBuf::from("r.rhai"), text.into())],
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].line, 6, "{err}");
        assert!(
            err.problems[0]
                .message
                .contains("must take (customer, vars)"),
            "{err}"
        );
    }

    /// A `decide` or `journey` with other parameters is named as such at its
    /// line (it read "missing `fn decide`", though the designer wrote one).
    #[test]
    fn a_decide_or_journey_with_other_parameters_is_named_at_its_line() {
        let journey = "fn journey() {\n    #{ name: \"r\", category: \"service\", triggers: [\"x.y\"],\n       steps: [ #{ id: \"a\", channel: \"push\", template: \"t\" } ] }\n}\n";
        for (text, line, wanted) in [
            (
                format!("{journey}fn decide(event) {{ start() }}\n"),
                5,
                "`fn decide` must take (event, customer); this one takes (event), so nudge would never call it",
            ),
            (
                format!("{}fn decide(event, customer) {{ start() }}\n", journey.replace("fn journey()", "fn journey(x)")),
                1,
                "`fn journey` must take no parameters; this one takes (x), so nudge would never call it",
            ),
        ] {
            let err = load_sources(vec![(PathBuf::from("r.rhai"), text)], &Limits::default())
                .unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert_eq!(err.problems[0].line, line, "{err}");
            assert_eq!(err.problems[0].message, wanted, "{err}");
        }
    }

    /// A value a designer got wrong is echoed in the error, so the line can
    /// be found and the mistake seen at once.
    #[test]
    fn wrong_values_are_echoed() {
        for (field, wanted) in [
            ("priority: \"high\"", "priority must be a whole number, not the string \"high\""),
            ("holdout: \"10%\"", "holdout must be a whole percentage 0..=100, not the string \"10%\""),
            ("pilot: 150", "pilot must be a whole percentage 0..=100, not the number 150"),
            ("shadow: \"yes\"", "shadow must be true or false, not the string \"yes\""),
            ("cooldown: \"tomorrow\"", "cooldown: `tomorrow` is not a delay: write a number and a unit, like \"90m\", \"1d\" or \"3d 12h\""),
        ] {
            let text = format!("fn journey() {{\n    #{{ name: \"r\", category: \"service\", triggers: [\"x.y\"],\n       {field},\n       steps: [ #{{ id: \"a\", channel: \"push\", template: \"t\" }} ] }}\n}}\nfn decide(event, customer) {{ start() }}\n");
            let err = load_sources(vec![(PathBuf::from("r.rhai"), text)], &Limits::default())
                .unwrap_err();
            assert_eq!(err.problems.len(), 1, "{field}: {err}");
            assert_eq!(err.problems[0].message, wanted, "{err}");
            assert_eq!(err.problems[0].line, 3, "{field}: {err}");
            if let Some(key @ ("pilot" | "holdout")) = field.split(':').next() {
                let hint = err.problems[0].hint.as_deref().unwrap_or_default();
                assert!(hint.starts_with(&format!("e.g. {key}: 10")), "{hint}");
            }
        }
    }

    /// A value of the wrong type is refused at its line, not read as absent:
    /// `delay: 2` would have been no delay at all, `cooldown: 90` no
    /// cooldown, `key: 7` one instance per customer.
    #[test]
    fn values_of_the_wrong_type_are_refused_at_their_line() {
        let cases = [
            (
                "delay: 2",
                "step `a`: `delay` must be a string, not the number 2",
            ),
            (
                "delay: 2.5",
                "step `a`: `delay` must be a string, not the number 2.5",
            ),
            ("when: true", "step `a`: `when` must be a string, not true"),
            (
                "fallback: [1]",
                "step `a`: `fallback` must be a list of strings: it holds something else",
            ),
            (
                "cooldown: 90",
                "`cooldown` must be a string, not the number 90",
            ),
            ("key: 7", "`key` must be a string, not the number 7"),
            (
                "on_lose: ()",
                "`on_lose` must be a string, not () (nothing)",
            ),
            (
                "fatigue: #{ after: 3, pause: 30 }",
                "fatigue: `pause` must be a string, not the number 30",
            ),
        ];
        for (field, expected) in cases {
            let (journey_field, step_field) = match field.starts_with("delay")
                || field.starts_with("when")
                || field.starts_with("fallback")
            {
                true => (String::new(), format!(", {field}")),
                false => (format!(",\n       {field}"), String::new()),
            };
            let text = format!(
                "fn journey() {{\n    #{{ name: \"r\", category: \"service\", triggers: [\"x.y\"]{journey_field},\n       steps: [ #{{ id: \"a\", channel: \"push\", template: \"t\"{step_field} }} ] }}\n}}\nfn decide(event, customer) {{ start() }}\nfn c(customer, vars) {{ true }}\n"
            );
            let err = load_sources(vec![(PathBuf::from("r.rhai"), text)], &Limits::default())
                .unwrap_err();
            assert_eq!(err.problems.len(), 1, "{field}: {err}");
            let p = &err.problems[0];
            assert_eq!(p.message, expected, "{field}");
            assert_eq!(p.line, 3, "{field}: {err}");
        }
    }

    /// Each step's problem at that step's line, though an earlier step
    /// has the same key (and a channel named like the bad fallback).
    #[test]
    fn a_steps_problem_is_reported_in_that_step() {
        let text = "fn journey() {\n    #{\n        name: \"fb\", category: \"service\", triggers: [\"x.y\"],\n        steps: [\n            #{ id: \"a\", channel: \"push\", template: \"t\", fallback: [\"email\"] },\n            #{ id: \"b\", channel: \"push\", template: \"t\", delay: \"1d\", fallback: \"email\" },\n            #{ id: \"c\", channel: \"email\", template: \"t\", delay: \"2d\", fallback: [\"email\"] },\n            #{ id: \"d\", template: \"t\", channel: \"fax\", delay: \"soon\", colour: 1 },\n        ],\n    }\n}\nfn decide(event, customer) { start() }\n";
        let err = load_sources(
            vec![(PathBuf::from("fb.rhai"), text.into())],
            &Limits::default(),
        )
        .unwrap_err();
        let mut at: Vec<(usize, String)> = err
            .problems
            .iter()
            .map(|p| (p.line, p.message.split(':').next().unwrap().to_string()))
            .collect();
        at.sort();
        assert_eq!(
            at,
            vec![
                (6, "step `b`".to_string()),
                (7, "step `c`".to_string()),
                (8, "step `d`".to_string()),
                (
                    8,
                    "unknown channel `fax` (expected push, email or call_task)".to_string()
                ),
                (8, "unknown step field `colour`".to_string()),
            ],
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_is_reported_where_its_key_is_not_where_the_word_first_appears() {
        let text = "fn journey() {\n    #{\n        name: \"fax\",\n        category: \"service\",\n        triggers: [\"x.y\"],\n        steps: [ #{ id: \"a\", channel: \"fax\", template: \"t\", delay: \"soon\" } ],\n    }\n}\nfn decide(event, customer) { start() }\n";
        let err = load_sources(
            vec![(PathBuf::from("fax.rhai"), text.into())],
            &Limits::default(),
        )
        .unwrap_err();
        let at: Vec<(usize, usize)> = err.problems.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(at, vec![(6, 39), (6, 68)], "{err}");
    }

    #[test]
    fn fatigue_is_read_and_a_bad_one_is_refused_at_its_line() {
        let script = |fatigue: &str| {
            format!(
                "fn journey() {{\n    #{{\n        name: \"f\",\n        category: \"marketing\",\n        triggers: [\"x.y\"],\n        steps: [ #{{ id: \"a\", channel: \"push\", template: \"t\", delay: \"0s\" }} ],\n        {fatigue}\n    }}\n}}\nfn decide(event, customer) {{ start() }}\n"
            )
        };
        let load =
            |text: String| load_sources(vec![(PathBuf::from("f.rhai"), text)], &Limits::default());
        let rules = load(script("fatigue: #{ after: 3, pause: \"30d\" },")).unwrap();
        assert_eq!(
            rules.journey("f").unwrap().fatigue,
            Some(Fatigue {
                after: 3,
                pause: Duration::from_secs(30 * 86400)
            })
        );
        let rules = load(script("")).unwrap();
        assert_eq!(
            rules.journey("f").unwrap().fatigue,
            None,
            "the config's default"
        );
        for (bad, says) in [
            ("fatigue: #{ after: 3 },", "pause is required"),
            ("fatigue: #{ after: -1, pause: \"30d\" },", "after must be"),
            (
                "fatigue: #{ after: 3, pause: \"30d\", every: 1 },",
                "unknown field `every`",
            ),
            ("fatigue: 3,", "must be a map"),
        ] {
            let err = load(script(bad)).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{bad}: {err}");
            assert_eq!(err.problems[0].line, 7, "{bad}: {err}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }
}
