//! The journey designer's toolkit: rule tests (`nudge test`) and replay with
//! diff (`nudge replay`). Both run journeys through `sim::Simulation`, the
//! same engine the daemon runs, on a virtual clock.

pub mod replay;
pub mod ruletest;

/// Renders an offset from a case's start compactly: `0s`, `12h`, `1d`, `3d 2h`.
pub fn offset_text(d: chrono::Duration) -> String {
    if d < chrono::Duration::zero() {
        return format!("-{}", offset_text(-d));
    }
    let std = d.to_std().unwrap_or_default();
    if std.as_secs() == 0 {
        return "0s".into();
    }
    let secs = std.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (hours, rest) = (rest / 3600, rest % 3600);
    let (mins, secs) = (rest / 60, rest % 60);
    let mut parts = Vec::new();
    for (n, unit) in [(days, "d"), (hours, "h"), (mins, "m"), (secs, "s")] {
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    parts.join(" ")
}
