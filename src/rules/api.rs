//! What scripts see: the sandboxed engine, the `event` and `customer` views,
//! and the host functions. Events reach rhai as typed views over the decoded
//! JSON; only a JSON object a script asks for (`event.data`,
//! `customer.profile`) becomes a rhai map, because property access on a map
//! is a lookup while on a custom type it goes through a failed getter
//! resolution (which formats an error message) before the indexer.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, ImmutableString, Position, Scope};
use serde_json::{Map, Value};

use super::{Journey, RuleError};
use crate::context::CustomerContext;
use crate::event::Event;
use crate::model::{ChannelKind, Decision, InstanceStatus};
use crate::propensity::Table;

/// Sandbox limits for every script evaluation.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_operations: u64,
    /// Wall clock per evaluation: operations differ in cost (one `index_of`
    /// over 10,000 items is one operation), so the count alone does not
    /// bound the time a batch, and the store's writer, waits.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: crate::config::DEFAULT_MAX_OPERATIONS,
            timeout: crate::config::DEFAULT_RULES_TIMEOUT,
        }
    }
}

impl Limits {
    pub fn from_config(rules: &crate::config::RulesConfig) -> Self {
        Self {
            max_operations: rules.max_operations,
            timeout: rules.timeout,
        }
    }
}

thread_local! {
    /// When the evaluation running on this thread must stop, and its
    /// timeout. An evaluation runs start to end on one thread, while the
    /// engine is shared by all.
    static DEADLINE: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

/// The token of rhai's `ErrorTerminated` when the deadline stopped a script.
#[derive(Debug, Clone, Copy)]
struct TimedOut(Duration);

/// The clock is read every this many operations: cheap next to the
/// operations between, and a deadline is overrun by at most that many
/// operations, each bounded by the size limits.
const CLOCK_EVERY: u64 = 8;

/// Runs `f` (one evaluation) with the deadline `timeout` from now.
pub(super) fn with_deadline<T>(timeout: Duration, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<(Instant, Duration)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let previous = DEADLINE.with(|d| d.replace(Some((Instant::now() + timeout, timeout))));
    let _restore = Restore(previous);
    f()
}

#[derive(Clone)]
pub struct EventView(pub Arc<Event>);

/// The customer, and the propensity table their evaluation reads
/// (`customer.propensity(...)`).
#[derive(Clone)]
pub struct CustomerView(pub Arc<CustomerContext>, pub Arc<Table>);

/// Builds the one engine every rule set uses: strict variables, bounded
/// operations, call depth, expression depth and data sizes.
pub fn build_engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_strict_variables(true)
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(32)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(64 * 1024)
        .set_max_array_size(10_000)
        .set_max_map_size(10_000)
        .disable_symbol("eval")
        // A module from outside the rules directory would change what a
        // journey does without changing its recorded version, and escape
        // `rules.watch` and `nudge check`: one file is one journey.
        .disable_symbol("import")
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    // The wall-clock limit (see `with_deadline`); also stops a runaway
    // `journey()` at load time.
    engine.on_progress(|operations| {
        if operations % CLOCK_EVERY != 0 {
            return None;
        }
        let (deadline, timeout) = DEADLINE.with(Cell::get)?;
        (Instant::now() >= deadline).then(|| Dynamic::from(TimedOut(timeout)))
    });
    engine.on_print(|text| tracing::debug!(target: "nudge::script", "{text}"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(target: "nudge::script", source = source.unwrap_or(""), line = pos.line().unwrap_or(0), "{text}")
    });

    engine
        .register_type_with_name::<EventView>("Event")
        .register_get("id", |e: &mut EventView| e.0.id.clone())
        .register_get("type", |e: &mut EventView| e.0.event_type.clone())
        .register_get("source", |e: &mut EventView| e.0.source.clone())
        .register_get("customer", |e: &mut EventView| e.0.customer.clone())
        .register_get("time", |e: &mut EventView| e.0.time.to_rfc3339())
        .register_get("data", |e: &mut EventView| object_to_dynamic(&e.0.data));

    // JSON objects reach scripts as maps: `x.field`, `x["field"]` (`()` when
    // absent or null), `x.has("field")`, `x.keys()`.
    engine.register_fn("has", |m: &mut rhai::Map, key: &str| {
        m.get(key).is_some_and(|v| !v.is_unit())
    });

    engine
        .register_type_with_name::<CustomerView>("Customer")
        .register_get("id", |c: &mut CustomerView| c.0.id.clone())
        .register_get("timezone", |c: &mut CustomerView| {
            c.0.timezone
                .clone()
                .map(Dynamic::from)
                .unwrap_or(Dynamic::UNIT)
        })
        .register_get("has_app", |c: &mut CustomerView| c.0.app_installed)
        .register_get("has_email", |c: &mut CustomerView| {
            c.0.reachable(ChannelKind::Email)
        })
        .register_get("has_phone", |c: &mut CustomerView| {
            c.0.reachable(ChannelKind::CallTask)
        })
        .register_get("preferred_channel", |c: &mut CustomerView| {
            c.0.preferred_channel
                .map(|ch| Dynamic::from(ch.to_string()))
                .unwrap_or(Dynamic::UNIT)
        })
        .register_get("profile", |c: &mut CustomerView| {
            object_to_dynamic(&c.0.profile)
        })
        .register_get("recent_contacts", |c: &mut CustomerView| {
            c.0.recent_sends.len() as i64
        })
        .register_get("journeys", |c: &mut CustomerView| {
            c.0.journeys
                .iter()
                .map(|j| {
                    let mut m = rhai::Map::new();
                    m.insert("journey".into(), j.journey.clone().into());
                    m.insert("key".into(), j.key.clone().into());
                    m.insert("status".into(), j.status.as_str().into());
                    m.insert("mode".into(), j.mode.as_str().into());
                    m.insert("started_at".into(), j.started_at.to_rfc3339().into());
                    Dynamic::from_map(m)
                })
                .collect::<rhai::Array>()
        })
        .register_fn("in_journey", |c: &mut CustomerView, name: &str| {
            c.0.in_journey(name)
        })
        .register_fn("converted", |c: &mut CustomerView, name: &str| {
            c.0.has_status(name, InstanceStatus::Converted)
        })
        .register_fn(
            "propensity",
            |c: &mut CustomerView,
             journey: &str,
             channel: &str|
             -> Result<f64, Box<EvalAltResult>> {
                let channel: ChannelKind = channel.parse().map_err(|e: String| e)?;
                Ok(c.1.rate(journey, None, channel))
            },
        )
        .register_fn(
            "propensity",
            |c: &mut CustomerView,
             journey: &str,
             step: &str,
             channel: &str|
             -> Result<f64, Box<EvalAltResult>> {
                let channel: ChannelKind = channel.parse().map_err(|e: String| e)?;
                Ok(c.1.rate(journey, Some(step), channel))
            },
        )
        .register_fn(
            "consented",
            |c: &mut CustomerView,
             channel: &str,
             category: &str|
             -> Result<bool, Box<EvalAltResult>> {
                let channel = channel.parse().map_err(|e: String| e)?;
                let category = category.parse().map_err(|e: String| e)?;
                Ok(c.0.consented(channel, category))
            },
        );

    engine
        .register_type_with_name::<Decision>("Decision")
        .register_fn("start", || Decision::Start {
            key: None,
            vars: Map::new(),
        })
        .register_fn(
            "start",
            |vars: rhai::Map| -> Result<Decision, Box<EvalAltResult>> {
                Ok(Decision::Start {
                    key: None,
                    vars: map_to_json(&vars)?,
                })
            },
        )
        .register_fn(
            "start",
            |key: &str, vars: rhai::Map| -> Result<Decision, Box<EvalAltResult>> {
                Ok(Decision::Start {
                    key: Some(key.to_string()),
                    vars: map_to_json(&vars)?,
                })
            },
        )
        // A reason may be built from the event (`"for " + event.data.email`)
        // and is shown wherever decisions are: logs, the review page.
        .register_fn("skip", |reason: &str| {
            Decision::Skip(crate::mask::mask_contacts(reason))
        });

    engine
        .register_fn("money", |x: f64| format!("{x:.2}"))
        .register_fn("money", |x: i64| format!("{x}.00"));
    engine
}

pub(super) fn decide(
    engine: &Engine,
    timeout: Duration,
    journey: &Journey,
    event: &Arc<Event>,
    customer: &Arc<CustomerContext>,
    propensity: Arc<Table>,
) -> Result<Decision, RuleError> {
    let result = call(
        engine,
        timeout,
        journey,
        "decide",
        (
            EventView(event.clone()),
            CustomerView(customer.clone(), propensity),
        ),
    )?;
    if result.is_unit() {
        return Ok(Decision::Skip("decide returned ()".into()));
    }
    // Checked by type first: `try_cast` consumes, so trying on clones would
    // deep-copy the decision's variables once per attempt.
    if let Ok(b) = result.as_bool() {
        return Ok(if b {
            Decision::Start {
                key: None,
                vars: Map::new(),
            }
        } else {
            Decision::Skip("decide returned false".into())
        });
    }
    if result.is::<Decision>() {
        return Ok(result.cast::<Decision>());
    }
    if result.is_map() {
        let map = result.cast::<rhai::Map>();
        let vars = map_to_json(&map).map_err(|e| runtime_error(journey, "decide", &e))?;
        return Ok(Decision::Start { key: None, vars });
    }
    Err(at_function(
        journey,
        "decide",
        format!(
            "decide returned a {}; return start(vars), skip(reason) or ()",
            result.type_name()
        ),
    ))
}

/// Runs `function(customer, vars)` of the journey's script: the shape of
/// step conditions and `rank`.
fn call_on_customer(
    engine: &Engine,
    timeout: Duration,
    journey: &Journey,
    function: &str,
    customer: &Arc<CustomerContext>,
    propensity: Arc<Table>,
    vars: &Map<String, Value>,
) -> Result<Dynamic, RuleError> {
    let vars: rhai::Map = vars
        .iter()
        .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
        .collect();
    call(
        engine,
        timeout,
        journey,
        function,
        (CustomerView(customer.clone(), propensity), vars),
    )
}

pub(super) fn condition(
    engine: &Engine,
    timeout: Duration,
    journey: &Journey,
    function: &str,
    customer: &Arc<CustomerContext>,
    propensity: Arc<Table>,
    vars: &Map<String, Value>,
) -> Result<bool, RuleError> {
    let result = call_on_customer(
        engine, timeout, journey, function, customer, propensity, vars,
    )?;
    result.as_bool().map_err(|t| {
        at_function(
            journey,
            function,
            format!("condition `{function}` returned a {t}, not a bool"),
        )
    })
}

pub(super) fn rank(
    engine: &Engine,
    timeout: Duration,
    journey: &Journey,
    customer: &Arc<CustomerContext>,
    propensity: Arc<Table>,
    vars: &Map<String, Value>,
) -> Result<f64, RuleError> {
    let result = call_on_customer(engine, timeout, journey, "rank", customer, propensity, vars)?;
    let score = match (result.as_float(), result.as_int()) {
        (Ok(f), _) => f,
        (_, Ok(i)) => i as f64,
        _ => {
            return Err(at_function(
                journey,
                "rank",
                format!("rank returned a {}, not a number", result.type_name()),
            ))
        }
    };
    if !score.is_finite() {
        return Err(at_function(
            journey,
            "rank",
            format!("rank returned {score}"),
        ));
    }
    Ok(score)
}

/// Every evaluation of a journey's script goes through here: the one place
/// that bounds it in time (the operation and size limits are the engine's).
fn call(
    engine: &Engine,
    timeout: Duration,
    journey: &Journey,
    function: &str,
    args: impl rhai::FuncArgs,
) -> Result<Dynamic, RuleError> {
    let mut scope = Scope::new();
    let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
    with_deadline(timeout, || {
        engine.call_fn_with_options::<Dynamic>(options, &mut scope, &journey.ast, function, args)
    })
    .map_err(|e| runtime_error(journey, function, &e))
}

/// A failure of `function` as a whole (say, what it returned): reported at
/// the function's definition.
fn at_function(journey: &Journey, function: &str, message: String) -> RuleError {
    let pos = function_position(&journey.ast, function);
    RuleError {
        journey: journey.name.clone(),
        file: journey.file.display().to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
        timed_out: false,
    }
}

/// Where the script defines `function` (its body's opening brace).
fn function_position(ast: &rhai::AST, function: &str) -> Position {
    ast.iter_fn_def()
        .find(|f| f.name == function)
        .map_or(Position::NONE, |f| f.body.start_position())
}

/// Points at the innermost position: the line inside the script function
/// that failed, not the call site. Where rhai gives no position at all (a
/// limit hit between statements), the function that was called.
pub(super) fn runtime_error(journey: &Journey, function: &str, err: &EvalAltResult) -> RuleError {
    let inner = innermost(err);
    let pos = if inner.pos.is_none() {
        function_position(&journey.ast, function)
    } else {
        inner.pos
    };
    RuleError {
        journey: journey.name.clone(),
        file: journey.file.display().to_string(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        // rhai quotes values it failed on (`parse_int("carol@…")`, a
        // `throw` of event data); the message reaches logs, dead letters
        // and the review page, which keep contact details masked.
        message: crate::mask::mask_contacts(&inner.message),
        timed_out: inner.timed_out,
    }
}

/// What failed, where, and whether the deadline stopped it.
pub(super) struct Inner {
    pub message: String,
    pub pos: Position,
    pub timed_out: bool,
}

pub(super) fn innermost(err: &EvalAltResult) -> Inner {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, pos) => {
            let mut found = innermost(inner);
            if found.pos.is_none() {
                found.pos = *pos;
            }
            found
        }
        EvalAltResult::ErrorTooManyOperations(pos) => Inner {
            message: "stopped: the script ran too many operations (endless loop?)".into(),
            pos: *pos,
            timed_out: false,
        },
        EvalAltResult::ErrorTerminated(token, pos) if token.is::<TimedOut>() => Inner {
            message: format!(
                "stopped: the evaluation ran longer than rules.timeout ({})",
                crate::humanize::duration(token.clone_cast::<TimedOut>().0)
            ),
            pos: *pos,
            timed_out: true,
        },
        // rhai's "Length of string too large" names neither the limit nor
        // where such a value can come from: `event.data` is handed over
        // whole, so one field over the limit fails a script that never
        // reads it.
        EvalAltResult::ErrorDataTooLarge(what, pos) => Inner {
            message: format!(
                "{what} over the scripts' limits (strings 64 KiB, arrays and maps 10,000 items), \
                 in a value the script built or in the event's data, which the script is given \
                 whole even where it reads one field: producers send a reference (a URL, an id) \
                 rather than a document"
            ),
            pos: *pos,
            timed_out: false,
        },
        EvalAltResult::ErrorFunctionNotFound(signature, pos) => Inner {
            message: function_not_found(signature),
            pos: *pos,
            timed_out: false,
        },
        other => {
            // Display includes " (line x, position y)"; the position is reported separately.
            let text = other.to_string();
            let text = match text.rfind(" (line ") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            Inner {
                message: text,
                pos: other.position(),
                timed_out: false,
            }
        }
    }
}

/// rhai's "Function not found: mask (&str | ImmutableString | String)" in
/// a designer's words: the name, the kinds of value it was given, and
/// where to look.
fn function_not_found(signature: &str) -> String {
    let (name, given) = match signature.split_once(" (") {
        // One closing bracket: the last kind may be `()` (a missing field).
        Some((name, rest)) => (name, rest.strip_suffix(')').unwrap_or(rest)),
        None => (signature, ""),
    };
    let kind = |alternatives: &str| -> String {
        let t = alternatives.trim();
        if t.contains("String") || t.contains("&str") {
            "string".into()
        } else if t == "i64" || t == "i32" {
            "integer".into()
        } else if t == "f64" || t == "f32" {
            "number".into()
        } else if t == "()" {
            "() (nothing: a missing field?)".into()
        } else if t.ends_with("Map") {
            "map".into()
        } else if t.ends_with("Array") || t.starts_with("Vec<") {
            "array".into()
        } else {
            t.rsplit("::").next().unwrap_or(t).to_string()
        }
    };
    let given: Vec<String> = if given.is_empty() {
        Vec::new()
    } else {
        given.split(", ").map(kind).collect()
    };
    let given = given.join(", ");
    if !name.starts_with(|c: char| c.is_alphabetic() || c == '_') {
        return format!("no operator `{name}` for ({given}): convert one side first (e.g. `to_string`, `parse_int`, `parse_float`)");
    }
    format!(
        "no function `{name}` taking ({given}): neither this script nor nudge defines one \
         (a misspelt name or another number of arguments gives this too; \
         rules/README.md lists what scripts can call)"
    )
}

pub fn json_to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        Value::Array(items) => Dynamic::from_array(items.iter().map(json_to_dynamic).collect()),
        Value::Object(map) => object_to_dynamic(map),
    }
}

/// A JSON object as a rhai map (a copy: changing it changes nothing outside).
pub fn object_to_dynamic(map: &Map<String, Value>) -> Dynamic {
    Dynamic::from_map(
        map.iter()
            .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
            .collect(),
    )
}

fn map_to_json(map: &rhai::Map) -> Result<Map<String, Value>, Box<EvalAltResult>> {
    map.iter()
        .map(|(k, v)| Ok((k.to_string(), dynamic_to_json(v)?)))
        .collect()
}

pub(super) fn dynamic_to_json(v: &Dynamic) -> Result<Value, Box<EvalAltResult>> {
    if v.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = v.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = v.as_float() {
        return Ok(serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null));
    }
    if v.is_string() {
        return Ok(Value::String(v.clone().into_string().unwrap_or_default()));
    }
    if v.is_array() {
        let arr = v.read_lock::<rhai::Array>().expect("checked is_array");
        return arr
            .iter()
            .map(dynamic_to_json)
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if v.is_map() {
        let map = v.read_lock::<rhai::Map>().expect("checked is_map");
        return map_to_json(&map).map(Value::Object);
    }
    Err(format!("a {} cannot be a template variable", v.type_name()).into())
}

/// Reference of what scripts can use: `nudge rules-doc` prints it and
/// `rules/README.md` carries a copy. It is written by hand, next to the
/// registrations in [`build_engine`] it describes; `tests/docs.rs` fails when
/// the README's copy differs from it, when a property registered there is not
/// listed here or one listed here cannot be read, and when the instance
/// statuses and modes listed are not the ones scripts see.
pub fn host_api_reference() -> &'static str {
    r#"### `event` (type `Event`)
| property | type | meaning |
| --- | --- | --- |
| `event.id` | string | CloudEvents id (dedup key) |
| `event.type` | string | e.g. `loan_application.completed` |
| `event.source` | string | producing system |
| `event.customer` | string | CloudEvents `subject`: the customer id |
| `event.time` | string | RFC 3339 |
| `event.data` | JSON map | the event's `data` object |

### JSON maps (`event.data`, `customer.profile`, nested objects)
| use | result |
| --- | --- |
| `x.field`, `x["field"]` | the field: string, int, float, bool, array, map for objects, `()` when absent or null |
| `x.has("field")` | true when present and not null |
| `x.keys()` | array of field names |
| `x.field = v` | changes the script's own copy only |

### `customer` (type `Customer`)
| property or method | type | meaning |
| --- | --- | --- |
| `customer.id` | string | customer id |
| `customer.timezone` | string or `()` | IANA zone from `customer.contact_updated` |
| `customer.has_app` / `has_email` / `has_phone` | bool | reachable by push / email / call task |
| `customer.preferred_channel` | string or `()` | `push`, `email` or `call_task` |
| `customer.profile` | JSON map | merged `data.profile` of `customer.profile_updated` events |
| `customer.recent_contacts` | int | messages sent to the customer within the policy's cap window |
| `customer.journeys` | array of maps | newest first, at most 100: `journey`, `key`, `status` (`open`, `converted`, `cancelled`, `completed`), `mode` (`live`, `held_out`, `shadow`), `started_at` |
| `customer.in_journey(name)` | bool | an instance of `name` is open |
| `customer.converted(name)` | bool | an instance of `name` ended `converted` |
| `customer.consented(channel, category)` | bool | consent (service defaults to yes, marketing to no) |
| `customer.propensity(journey, channel)` | float | learned conversion rate of `journey`'s sends on `channel` (all its steps), Beta-smoothed: `(conversions + a) / (sends + a + b)`, `policy.propensity.prior` (default a = 1, b = 19: 0.05 before any send) |
| `customer.propensity(journey, step, channel)` | float | the same for one step |

An instance is `open` until an exit event ends it (`converted` or `cancelled`) or
every step has been dealt with, sent or not (`completed`); an exit event within
`policy.attribution_window` after that (by the event's own `time`, however late
nudge reads it) still turns a `completed` instance `converted` or `cancelled`. The mode never changes the status: held-out (control group) and
shadow instances end like live ones, only their steps are logged `held_out` or
`shadow` instead of being sent. `in_journey` and `converted` count every mode.

### Host functions
| function | returns | meaning |
| --- | --- | --- |
| `start()` / `start(vars)` | Decision | start the journey; `vars` (a map) are the template variables of every step |
| `start(key, vars)` | Decision | start with an explicit instance key |
| `skip(reason)` | Decision | do nothing, saying why (for readers of the script and for rule tests) |
| `money(x)` | string | `x` with two decimals: `money(18.5)` is `"18.50"` |
| `print(x)`, `debug(x)` | | log at debug level (target `nudge::script`) |

`decide` may also return `()` or `false` (skip), `true` (start without variables) or a map (start with it as variables).

### Sandbox
Strict variables (an undeclared name is a load error; a call of a function
that neither the script nor nudge defines is found only when the line runs,
so let `nudge test` or `nudge simulate` run every branch before it goes
live), at most `rules.max_operations`
operations per evaluation (default 100,000: an endless loop is stopped and only that
journey's evaluation fails) and at most `rules.timeout` of wall-clock time (default
100ms: an operation such as `index_of` on a long array can take long), call depth 32,
expression depth 64, strings 64 KiB, arrays and maps 10,000 items, no `eval` and
no `import` (a journey is its one file: what it runs is what its version records).
"#
}
