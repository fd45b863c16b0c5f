//! The review page's HTML, written by hand: every text that comes from the
//! store, an event or a request goes through [`esc`] (element text and
//! quoted attribute values alike) or [`url`] (a link's path segment or
//! query value), so a customer id or journey name can never become markup.
//! Nothing inline: no `style=` and no `<script>`, the CSP forbids both.

use std::fmt::{self, Display, Write as _};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::model::{ChannelKind, LogRecord};
use crate::review::funnel::{Funnel, FunnelReport, Uplift};
use crate::review::log::LogPage;
use crate::review::percent;
use crate::review::record::DecisionRecord;

use super::LogQuery;

/// Text made safe for HTML element content and double- or single-quoted
/// attribute values.
pub struct Esc<'a>(pub &'a str);

pub fn esc(s: &str) -> Esc<'_> {
    Esc(s)
}

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Shown as the terminal tools show them: a reviewer sees what is
        // stored, not text reversed or hidden by a formatting character.
        // Line breaks and tabs stay: HTML shows them as space, and the
        // pretty-printed JSON blocks are laid out with them.
        let shown = crate::humanize::escaped_where(self.0, |c| {
            crate::humanize::hidden(c) && c != '\n' && c != '\t'
        });
        let mut rest = shown.as_ref();
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters: safe
/// as a path segment or a query value (and then in an attribute as is).
pub fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The link to a customer's page. A browser resolves an id of `.` or
/// `..` in a path (encoded or not) to another page, so those go by query.
pub fn customer_href(id: &str) -> String {
    match id {
        "." | ".." => format!("/customer?id={}", url(id)),
        _ => format!("/customers/{}", url(id)),
    }
}

/// How far back the log reaches, on every page (retention deletes older records).
pub struct Reach {
    pub oldest: Option<DateTime<Utc>>,
    pub retention: Duration,
}

impl Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.oldest {
            Some(t) => write!(f, "The log reaches back to <time>{}</time>", time(t))?,
            None => f.write_str("The log is empty")?,
        }
        if self.retention.is_zero() {
            f.write_str("; nothing is deleted (<code>store.retention</code> = 0).")
        } else {
            write!(
                f,
                "; records older than {} are deleted (<code>store.retention</code>).",
                esc(&crate::humanize::duration(self.retention))
            )
        }
    }
}

/// The frame of every page.
pub fn layout(title: &str, active: &str, reach: Option<&Reach>, body: &str) -> String {
    layout_titled(title, title, active, reach, body)
}

/// [`layout`] with a document title of its own (what a screen reader
/// announces and a tab shows: the view with its filter and count).
fn layout_titled(
    title: &str,
    heading: &str,
    active: &str,
    reach: Option<&Reach>,
    body: &str,
) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · nudge review</title><link rel=\"stylesheet\" href=\"/assets/app.css\"></head>\
         <body><a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header><nav aria-label=\"Main\"><span class=\"brand\">nudge review</span>",
        esc(title)
    );
    for (href, label) in [("/", "Dispatch log"), ("/funnel", "Funnels")] {
        let class = if label == active {
            " class=\"active\" aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(out, "<a href=\"{href}\"{class}>{label}</a>");
    }
    out.push_str("</nav>");
    if let Some(reach) = reach {
        let _ = write!(out, "<p class=\"reach\" id=\"reach\">{reach}</p>");
    }
    let _ = writeln!(
        out,
        "</header><main id=\"main\" tabindex=\"-1\"><h1>{}</h1>{body}</main></body></html>",
        esc(heading)
    );
    out
}

pub fn error_page(message: &str) -> String {
    layout(
        "Cannot show this",
        "",
        None,
        &format!("<p class=\"error\" id=\"error\">{}</p>", esc(message)),
    )
}

pub fn not_found_page(path: &str) -> String {
    layout(
        "Not found",
        "",
        None,
        &format!(
            "<p class=\"error\" id=\"error\">Nothing is at <code>{}</code>.</p>\
             <p><a href=\"/\">The dispatch log</a> · <a href=\"/funnel\">Funnels</a></p>",
            esc(path)
        ),
    )
}

/// The example stays visible under the field (a placeholder vanishes
/// once typed in, and reads as a value already set).
fn text_input(out: &mut String, name: &str, label: &str, value: Option<&str>, hint: &str) {
    suggesting_input(out, name, label, value, hint, &[]);
}

/// A text input that offers `suggestions` as the reviewer types (a
/// datalist): the journeys and steps of the rules in force, while a name
/// no longer in them (a retired journey still in the log) can be typed.
fn suggesting_input(
    out: &mut String,
    name: &str,
    label: &str,
    value: Option<&str>,
    hint: &str,
    suggestions: &[String],
) {
    let list = if suggestions.is_empty() {
        String::new()
    } else {
        format!(" list=\"{name}-suggestions\" autocomplete=\"off\"")
    };
    let _ = write!(
        out,
        "<label>{label}<input type=\"text\" name=\"{name}\" value=\"{}\"{list} aria-describedby=\"{name}-hint\">\
         <small class=\"hint\" id=\"{name}-hint\">e.g. {}</small></label>",
        esc(value.unwrap_or("")),
        esc(hint)
    );
    if !suggestions.is_empty() {
        let _ = write!(out, "<datalist id=\"{name}-suggestions\">");
        for s in suggestions {
            let _ = write!(out, "<option value=\"{}\">", esc(s));
        }
        out.push_str("</datalist>");
    }
}

/// What each outcome means, folded away under the table.
fn outcome_glossary(out: &mut String) {
    out.push_str(
        "<details id=\"outcomes\" class=\"glossary\"><summary>What each outcome means</summary><dl>",
    );
    for o in crate::model::Outcome::ALL {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", o.as_str(), esc(o.meaning()));
    }
    out.push_str("</dl></details>");
}

fn select(out: &mut String, name: &str, label: &str, value: Option<&str>, options: &[&str]) {
    let _ = write!(
        out,
        "<label>{label}<select name=\"{name}\"><option value=\"\">any</option>"
    );
    for o in options {
        let selected = if value == Some(*o) { " selected" } else { "" };
        let _ = write!(out, "<option{selected}>{}</option>", esc(o));
    }
    out.push_str("</select></label>");
}

/// The dispatch log page: the filter form, one page of records newest
/// first, and links to the next (older) page and to the CSV of the filter.
pub fn log_page(query: &LogQuery, page: &LogPage, reach: &Reach, known: &Known) -> String {
    let mut out = String::new();
    let paged = query.after.is_some() || page.next.is_some();
    // A keyboard user reaches the results past seven fields, and the
    // page links past a hundred rows, in one key press each.
    out.push_str("<nav class=\"skips\" aria-label=\"Skip\"><a class=\"skip\" href=\"#results\">Skip to the results</a>");
    if paged {
        out.push_str("<a class=\"skip\" href=\"#pages\">Skip to the page links</a>");
    }
    out.push_str("</nav>");
    log_form(&mut out, query, known);
    let filters = query.filters_query();
    let _ = write!(
        out,
        "<p class=\"actions\"><a id=\"csv\" href=\"/log.csv?{}bom=1\" download>Download CSV of this filter</a> \
         (every record it selects, not just this page; UTF-8 with a byte-order mark, which spreadsheets need)</p>",
        if filters.is_empty() { String::new() } else { format!("{}&amp;", filters.replace('&', "&amp;")) }
    );
    // The count is of this page: a total would cost a scan of every
    // matching record, so the words say when more are on other pages.
    let shown = match (
        page.records.len(),
        query.after.is_some(),
        page.next.is_some(),
    ) {
        (1, false, false) => "1 record".to_string(),
        (n, false, false) => format!("{n} records, newest first"),
        (n, false, true) => format!("the newest {n} records (older ones on the next pages)"),
        (1, true, false) => "1 older record, the oldest there is".to_string(),
        (n, true, false) => format!("{n} older records, the oldest there are"),
        (n, true, true) => format!("{n} older records (more on the next pages)"),
    };
    let filtered = filters_summary(query);
    out.push_str("<div id=\"results\" tabindex=\"-1\">");
    if page.records.is_empty() {
        let text = if filters.is_empty() && query.after.is_none() {
            "The dispatch log is empty: nothing has been decided yet (or retention removed it)."
                .to_string()
        } else {
            format!(
                "No record passes this filter.{}",
                unknown_names(query, known)
            )
        };
        let _ = write!(out, "<p id=\"empty\" role=\"status\">{}</p>", text);
    } else {
        let _ = write!(
            out,
            "<p id=\"shown\" role=\"status\">{}{}</p>",
            capitalised(&shown),
            if filtered.is_empty() {
                String::new()
            } else {
                format!(" where {}", esc(&filtered))
            }
        );
        log_table(&mut out, &page.records);
    }
    out.push_str("</div>");
    pager(&mut out, query, page, &filters);
    outcome_glossary(&mut out);
    let title = if filtered.is_empty() {
        format!("Dispatch log: {shown}")
    } else {
        format!("Dispatch log: {filtered}: {shown}")
    };
    layout_titled(&title, "Dispatch log", "Dispatch log", Some(reach), &out)
}

/// The log page for a filter that cannot be read: the form as it was sent,
/// and what is wrong with it.
pub fn log_refused(query: &LogQuery, message: &str, known: &Known) -> String {
    let mut out = String::new();
    log_form(&mut out, query, known);
    // The field the message names (`since: …`) is marked invalid and
    // pointed at the message, so a screen reader says both together.
    if let Some((field, _)) = message.split_once(':') {
        let control = format!("name=\"{field}\"");
        if field.chars().all(|c| c.is_ascii_lowercase()) && out.contains(&control) {
            out = out.replacen(
                &control,
                &format!("{control} aria-invalid=\"true\" aria-errormessage=\"error\""),
                1,
            );
        }
    }
    let _ = write!(
        out,
        "<p class=\"error\" id=\"error\" role=\"alert\">{}</p>",
        esc(message)
    );
    layout_titled(
        "Error: Dispatch log",
        "Dispatch log",
        "Dispatch log",
        None,
        &out,
    )
}

/// "Sentence case" for a status line built from a lower-case phrase.
fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Why a filter may have found nothing: a journey or step named in it
/// that the rules in force do not have (case and typos included), with
/// the names they do have. Empty when the names are known or no rules are.
fn unknown_names(query: &LogQuery, known: &Known) -> String {
    let mut out = String::new();
    for (field, value, names) in [
        ("journey", &query.journey, &known.journeys),
        ("step", &query.step, &known.steps),
    ] {
        let Some(value) = value.as_deref() else {
            continue;
        };
        if names.is_empty() || names.iter().any(|n| n == value) {
            continue;
        }
        let _ = write!(
            out,
            " The rules in force have no {field} named <code>{}</code> (they have {}); \
             a retired {field} keeps its records under its old name.",
            esc(value),
            names
                .iter()
                .map(|n| format!("<code>{}</code>", esc(n)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // A pasted id often brings a space with it. Not trimmed away: an
    // event may carry an id that has one, and its records stay reachable.
    if let Some(customer) = query
        .customer
        .as_deref()
        .filter(|c| c.trim() != *c && !c.trim().is_empty())
    {
        let mut trimmed = query.clone();
        trimmed.customer = Some(customer.trim().to_string());
        let _ = write!(
            out,
            " The customer id starts or ends with a space: \
             <a id=\"trimmed\" href=\"/?{}\">look for <code>{}</code></a>?",
            trimmed.filters_query().replace('&', "&amp;"),
            esc(customer.trim())
        );
    }
    out
}

/// The filters in force, as words (`journey unsigned_loan, outcome sent`).
fn filters_summary(query: &LogQuery) -> String {
    [
        ("journey", &query.journey),
        ("step", &query.step),
        ("channel", &query.channel),
        ("outcome", &query.outcome),
        ("since", &query.since),
        ("until", &query.until),
        ("customer", &query.customer),
    ]
    .iter()
    .filter_map(|(name, value)| {
        value
            .as_deref()
            .filter(|v| !v.is_empty())
            .map(|v| format!("{name} {v}"))
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// The journeys and steps of the rules in force, offered in the filters.
#[derive(Debug, Default, Clone)]
pub struct Known {
    pub journeys: Vec<String>,
    pub steps: Vec<String>,
}

fn log_form(out: &mut String, query: &LogQuery, known: &Known) {
    out.push_str("<form method=\"get\" action=\"/\" class=\"filters\" id=\"filters\">");
    suggesting_input(
        out,
        "journey",
        "Journey",
        query.journey.as_deref(),
        "unsigned_loan",
        &known.journeys,
    );
    suggesting_input(
        out,
        "step",
        "Step",
        query.step.as_deref(),
        "push",
        &known.steps,
    );
    let channels: Vec<&str> = ChannelKind::ALL.iter().map(|c| c.as_str()).collect();
    select(
        out,
        "channel",
        "Channel",
        query.channel.as_deref(),
        &channels,
    );
    let outcomes = crate::model::Outcome::ALL.map(crate::model::Outcome::as_str);
    select(
        out,
        "outcome",
        "Outcome",
        query.outcome.as_deref(),
        &outcomes,
    );
    text_input(
        out,
        "since",
        "Since",
        query.since.as_deref(),
        "7d, 2026-03-02 (midnight UTC) or 2026-03-02T00:00:00+11:00",
    );
    text_input(
        out,
        "until",
        "Until",
        query.until.as_deref(),
        "2026-03-09 (UTC) or 2026-03-09T00:00:00+11:00",
    );
    text_input(
        out,
        "customer",
        "Customer id",
        query.customer.as_deref(),
        "c-1001",
    );
    out.push_str(
        "<div class=\"buttons\"><button type=\"submit\" id=\"apply\">Filter</button>\
         <a href=\"/\">Clear</a></div></form>",
    );
}

/// Links to the newest page and the next older one; nothing when there is
/// only one page.
fn pager(out: &mut String, query: &LogQuery, page: &LogPage, filters: &str) {
    if query.after.is_none() && page.next.is_none() {
        return;
    }
    out.push_str("<nav class=\"pager\" id=\"pages\" tabindex=\"-1\" aria-label=\"Pages\">");
    let limit = query.limit.as_deref().map(|l| format!("limit={}", url(l)));
    if query.after.is_some() {
        let kept: Vec<String> = [
            Some(filters.replace('&', "&amp;")).filter(|f| !f.is_empty()),
            limit.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let _ = write!(
            out,
            "<a id=\"newest\" href=\"/{}\">Newest</a>",
            if kept.is_empty() {
                String::new()
            } else {
                format!("?{}", kept.join("&amp;"))
            }
        );
    }
    if let Some(next) = page.next {
        let sep = if filters.is_empty() { "" } else { "&amp;" };
        let limit = limit.map(|l| format!("&amp;{l}")).unwrap_or_default();
        let _ = write!(
            out,
            "<a id=\"older\" rel=\"next\" href=\"/?{}{sep}after={}{limit}\">Older</a>",
            filters.replace('&', "&amp;"),
            super::cursor_text(next)
        );
    }
    out.push_str("</nav>");
}

fn log_table(out: &mut String, records: &[LogRecord]) {
    out.push_str(
        "<table class=\"records\" id=\"log\"><thead><tr><th>Time (UTC)</th><th>Customer</th>\
         <th>Journey</th><th>Step</th><th>Channel</th><th>Outcome</th><th>Try</th>\
         <th>Late</th><th>Reason</th><th>Script</th></tr></thead><tbody>",
    );
    for r in records {
        let _ = write!(
            out,
            "<tr data-seq=\"{seq}\"><td data-label=\"Time (UTC)\"><time>{time}</time></td>\
             <td data-label=\"Customer\"><a class=\"customer\" href=\"{href}\"><bdi>{customer}</bdi></a></td>\
             <td data-label=\"Journey\" class=\"journey\">{journey}</td>\
             <td data-label=\"Step\">{step}</td><td data-label=\"Channel\">{channel}</td>\
             <td data-label=\"Outcome\"><span class=\"outcome {outcome}\">{outcome}</span></td>\
             <td data-label=\"Try\">{attempt}</td><td data-label=\"Late\">{late}</td>\
             <td data-label=\"Reason\" class=\"reason\">{reason}</td>\
             <td data-label=\"Script\"><code title=\"{hash}\">{short}</code></td></tr>",
            seq = r.seq,
            time = time(r.time),
            href = customer_href(&r.customer),
            customer = esc(&r.customer),
            journey = esc(&r.journey),
            step = esc(&r.step),
            channel = esc(&r.channel),
            outcome = r.outcome.as_str(),
            attempt = r.attempt,
            late = r
                .latency_ms
                .map(|l| crate::humanize::duration(std::time::Duration::from_millis(l)))
                .unwrap_or_default(),
            reason = esc(&r.reason),
            hash = esc(&r.rule_hash),
            short = esc(r.rule_hash.get(..8).unwrap_or(&r.rule_hash)),
        );
    }
    out.push_str("</tbody></table>");
}

fn ci(u: &Uplift) -> String {
    match (u.difference, u.ci95) {
        (Some(d), Some((lo, hi))) => format!(
            "{:+.1} points (95 % CI {:+.1} to {:+.1}){}",
            d * 100.0,
            lo * 100.0,
            hi * 100.0,
            if u.reliable {
                ""
            } else {
                "; too few conversions in an arm for the interval to be reliable"
            }
        ),
        _ => "no comparison: an arm has no customers".into(),
    }
}

/// Funnels and uplift per journey (all of them, or the one asked for).
pub fn funnel_page(
    report: &FunnelReport,
    journey: Option<&str>,
    reach: &Reach,
    known: &Known,
) -> String {
    let mut out = String::new();
    out.push_str("<form method=\"get\" action=\"/funnel\" class=\"filters\">");
    suggesting_input(
        &mut out,
        "journey",
        "Journey",
        journey,
        "unsigned_loan; empty for all",
        &known.journeys,
    );
    out.push_str(
        "<div class=\"buttons\"><button type=\"submit\">Show</button><a href=\"/funnel\">All</a></div></form>",
    );
    if report.journeys.is_empty() {
        match journey {
            None => out.push_str("<p id=\"empty\">No instance of any journey in the store.</p>"),
            Some(j) => {
                let asked = LogQuery {
                    journey: Some(j.to_string()),
                    ..LogQuery::default()
                };
                let _ = write!(
                    out,
                    "<p id=\"empty\">No instance of journey <code>{}</code> in the store.{}</p>",
                    esc(j),
                    unknown_names(&asked, known)
                );
            }
        }
    }
    for f in &report.journeys {
        funnel_section(&mut out, f);
    }
    out.push_str(
        "<p class=\"note\">The funnel counts live instances; the uplift counts customers \
         (treated: with a live instance, held out: in the control group), converted when an \
         instance of theirs converted. Open instances count as not converted in both arms.</p>",
    );
    layout("Funnels", "Funnels", Some(reach), &out)
}

fn funnel_section(out: &mut String, f: &Funnel) {
    let _ = write!(
        out,
        "<section class=\"funnel\" data-journey=\"{j}\"><h2>{j}</h2>\
         <p><a href=\"/?journey={ju}\">Its dispatch log</a></p>\
         <table class=\"records\"><thead><tr><th>Stage</th><th>Count</th><th>Of started</th>\
         <th>Of previous</th><th>Not sent, and why</th></tr></thead><tbody>\
         <tr class=\"started\"><td data-label=\"Stage\">started</td><td data-label=\"Count\">{started}</td>\
         <td data-label=\"Of started\"></td><td data-label=\"Of previous\"></td><td data-label=\"Not sent\"></td></tr>",
        j = esc(&f.journey),
        ju = url(&f.journey),
        started = f.started,
    );
    for s in &f.steps {
        let _ = write!(
            out,
            "<tr class=\"step\"><td data-label=\"Stage\">{} sent</td><td data-label=\"Count\">{}</td>\
             <td data-label=\"Of started\">{}</td><td data-label=\"Of previous\">{}</td><td data-label=\"Not sent\">",
            esc(&s.step),
            s.sent,
            percent(s.of_started),
            percent(s.of_previous)
        );
        if !s.not_sent.is_empty() {
            out.push_str("<ul class=\"reasons\">");
            for r in &s.not_sent {
                let _ = write!(
                    out,
                    "<li><span class=\"outcome {o}\">{o}</span> {} × {}</li>",
                    r.count,
                    esc(&r.reason),
                    o = r.outcome.as_str()
                );
            }
            out.push_str("</ul>");
        }
        out.push_str("</td></tr>");
    }
    let _ = write!(
        out,
        "<tr class=\"converted\"><td data-label=\"Stage\">converted</td><td data-label=\"Count\">{}</td>\
         <td data-label=\"Of started\">{}</td><td data-label=\"Of previous\"></td><td data-label=\"Not sent\"></td></tr>\
         </tbody></table>",
        f.converted,
        percent(f.conversion_rate)
    );
    let _ = write!(
        out,
        "<h3>Uplift against the control group</h3>\
         <table class=\"records uplift\"><thead><tr><th>Arm</th><th>Customers</th><th>Converted</th>\
         <th>Conversion</th></tr></thead><tbody>\
         <tr class=\"treated\"><td data-label=\"Arm\">treated</td><td data-label=\"Customers\">{}</td>\
         <td data-label=\"Converted\">{}</td><td data-label=\"Conversion\">{}</td></tr>\
         <tr class=\"held-out\"><td data-label=\"Arm\">held out</td><td data-label=\"Customers\">{}</td>\
         <td data-label=\"Converted\">{}</td><td data-label=\"Conversion\">{}</td></tr></tbody></table>\
         <p class=\"difference\">Difference: {}</p>",
        f.uplift.treated.customers,
        f.uplift.treated.converted,
        percent(f.uplift.treated.rate),
        f.uplift.held_out.customers,
        f.uplift.held_out.converted,
        percent(f.uplift.held_out.rate),
        esc(&ci(&f.uplift)),
    );
    if f.shadow_instances > 0 {
        let _ = write!(
            out,
            "<p>{} shadow instances (logged, never sent) are in neither arm.</p>",
            f.shadow_instances
        );
    }
    out.push_str(
        "<h3>Per rule version</h3><table class=\"records versions\"><thead><tr><th>Script hash</th>\
         <th>First – last start</th><th>Started</th><th>Converted</th><th>Treated</th><th>Held out</th>\
         <th>Difference</th></tr></thead><tbody>",
    );
    for v in &f.by_rule_version {
        let _ = write!(
            out,
            "<tr><td data-label=\"Script hash\"><code title=\"{hash}\">{short}</code></td>\
             <td data-label=\"First – last start\">{} – {}</td><td data-label=\"Started\">{}</td>\
             <td data-label=\"Converted\">{}</td>\
             <td data-label=\"Treated\">{} of {}</td><td data-label=\"Held out\">{} of {}</td>\
             <td data-label=\"Difference\">{}</td></tr>",
            time(v.first_started),
            time(v.last_started),
            v.started,
            v.converted,
            percent(v.uplift.treated.rate),
            v.uplift.treated.customers,
            percent(v.uplift.held_out.rate),
            v.uplift.held_out.customers,
            esc(&ci(&v.uplift)),
            hash = esc(&v.rule_hash),
            short = esc(v.rule_hash.get(..12).unwrap_or(&v.rule_hash)),
        );
    }
    out.push_str("</tbody></table></section>");
}

/// One customer's decision record (contact details masked).
pub fn customer_page(record: &DecisionRecord, retention: Duration) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<p><a id=\"customer-log\" href=\"/?customer={}\">This customer's dispatch log</a></p>",
        url(&record.customer)
    );
    out.push_str("<h2>Contact now</h2>");
    match &record.contact {
        Some(c) => {
            let _ = write!(
                out,
                "<dl class=\"contact\" id=\"contact\"><dt>Timezone</dt><dd>{}</dd><dt>App</dt><dd>{}</dd>\
                 <dt>Email</dt><dd>{}</dd><dt>Phone</dt><dd>{}</dd><dt>Consents</dt><dd><code>{}</code></dd></dl>",
                esc(c.timezone.as_deref().unwrap_or("-")),
                if c.app_installed { "installed" } else { "not installed" },
                esc(c.email.as_deref().unwrap_or("-")),
                esc(c.phone.as_deref().unwrap_or("-")),
                esc(&c.consents.to_string()),
            );
        }
        None => out.push_str("<p>No contact or consent event received.</p>"),
    }
    out.push_str("<h2>What happened, oldest first</h2>");
    if record.entries.is_empty() {
        out.push_str("<p id=\"empty\">Nothing recorded for this customer.</p>");
    } else {
        out.push_str(
            "<table class=\"records\" id=\"record\"><thead><tr><th>Time (UTC)</th><th>Kind</th>\
             <th>What</th></tr></thead><tbody>",
        );
        for e in &record.entries {
            let seq = e
                .seq
                .map(|s| format!(" data-seq=\"{s}\""))
                .unwrap_or_default();
            let kind = serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<tr class=\"{kind}\"{seq}><td data-label=\"Time (UTC)\"><time>{}</time></td>\
                 <td data-label=\"Kind\">{kind}</td><td data-label=\"What\">{}",
                e.time.to_rfc3339_opts(SecondsFormat::Millis, true),
                esc(&e.text),
            );
            if let Some(inputs) = &e.inputs {
                let _ = write!(
                    out,
                    "<details><summary>What the script saw</summary><pre>{}</pre></details>",
                    esc(&serde_json::to_string_pretty(inputs).unwrap_or_default())
                );
            }
            if let Some(vars) = e
                .variables
                .as_ref()
                .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
            {
                let _ = write!(
                    out,
                    "<details><summary>Template variables</summary><pre>{}</pre></details>",
                    esc(&serde_json::to_string_pretty(vars).unwrap_or_default())
                );
            }
            out.push_str("</td></tr>");
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("<h2>Not recorded, so not shown</h2><ul class=\"note\">");
    for n in &record.not_recorded {
        let _ = write!(out, "<li>{}</li>", esc(n));
    }
    out.push_str("</ul>");
    let reach = Reach {
        oldest: record.log_reaches_back_to,
        retention,
    };
    layout(
        &format!("Customer {}", record.customer),
        "",
        Some(&reach),
        &out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_encodes_urls() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(esc("plain text").to_string(), "plain text");
        assert_eq!(
            esc("Netflix\u{202e}gnp.exe\n<b>\u{1b}[2J\u{200b}").to_string(),
            "Netflix\\u{202e}gnp.exe\n&lt;b&gt;\\u{1b}[2J\\u{200b}"
        );
        assert_eq!(url("c-1/2 ?&\"<é"), "c-1%2F2%20%3F%26%22%3C%C3%A9");
    }
}
