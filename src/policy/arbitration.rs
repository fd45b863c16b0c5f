//! Arbitration: the "next best" of next-best-action. When one customer has
//! several steps due within `policy.arbitration.window` of each other and
//! the caps leave room for fewer than all of them, the highest score goes,
//! whatever was due or evaluated first; each loser is deferred until the
//! caps free (`on_lose = "defer"`, the default for `service`) or dropped
//! (`"drop"`, the default for `marketing`), with a reason naming the winner
//! and both scores. A deferral never passes the step's lateness bound: a
//! loser that could only go after it is dropped, saying so.
//!
//! The interface is narrow on purpose: candidates in, one [`Outcome`] per
//! candidate out; what the caps allow is asked through [`Room`], so the cap
//! rules (today `policy.max_per_customer` over `policy.cap_window`) can
//! change without touching the choice.

use chrono::{DateTime, Utc};

use crate::context::RecentSend;
use crate::model::{Category, ChannelKind};
use crate::policy::caps::caps_room;

pub use crate::model::OnLose;

/// One step that wants to reach the customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Names the step in reasons: `journey/step`.
    pub label: String,
    /// `rank(customer, vars)` or the journey's `priority`.
    pub score: f64,
    /// The journey has a `rank` that failed here: `score` is its priority,
    /// and reasons say so.
    pub rank_failed: bool,
    pub due: DateTime<Utc>,
    pub channel: ChannelKind,
    pub category: Category,
    pub on_lose: OnLose,
    /// The last moment the step may still go (planned time + lateness bound).
    pub latest: DateTime<Utc>,
}

/// What the caps allow, asked by [`decide`].
pub trait Room {
    /// Whether `next` may go when every one of `chosen` goes too.
    fn fits(&self, chosen: &[&Candidate], next: &Candidate) -> bool;
    /// When the caps have room for `loser` again once `chosen` went at
    /// their due times; `None` when they never will.
    fn frees_at(&self, chosen: &[&Candidate], loser: &Candidate) -> Option<DateTime<Utc>>;
}

/// What arbitration decided for one candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Win,
    Defer {
        until: DateTime<Utc>,
        reason: String,
    },
    Drop(String),
}

/// Decides every candidate: the highest scores take the room the caps
/// leave (ties: due first, then by label, so the result never depends on
/// the order given). Returns one outcome per candidate, in input order.
pub fn decide(candidates: &[Candidate], room: &dyn Room) -> Vec<Outcome> {
    decide_with_losses(candidates, room).0
}

/// [`decide`], and for each loser also why it lost (`arbitration: lost to
/// X (score 80 vs 50)`), so that a loser due later can be told the same
/// when it comes due ([`loser_outcome`]).
pub fn decide_with_losses(
    candidates: &[Candidate],
    room: &dyn Room,
) -> (Vec<Outcome>, Vec<Option<String>>) {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Service before marketing, whatever the scores: a service step is
    // never held by marketing sends, so a marketing step chosen ahead of
    // one would not take its room, only add a message past the cap.
    order.sort_by(|&a, &b| {
        let (a, b) = (&candidates[a], &candidates[b]);
        (a.category == Category::Marketing)
            .cmp(&(b.category == Category::Marketing))
            .then(b.score.total_cmp(&a.score))
            .then(a.due.cmp(&b.due))
            .then(a.label.cmp(&b.label))
    });
    let mut chosen: Vec<&Candidate> = Vec::new();
    let mut outcomes = vec![Outcome::Win; candidates.len()];
    let mut losses = vec![None; candidates.len()];
    let mut losers = Vec::new();
    for i in order {
        let c = &candidates[i];
        if room.fits(&chosen, c) {
            chosen.push(c);
        } else {
            losers.push(i);
        }
    }
    for i in losers {
        let loser = &candidates[i];
        // The winner it lost to: the lowest-scored one without which it
        // would fit (the one holding the room it wanted, not a winner due
        // another day); else the lowest-scored that took room ahead of it.
        let precedes = |w: &Candidate| {
            w.score >= loser.score
                || (w.category == Category::Service && loser.category == Category::Marketing)
        };
        let ahead = || chosen.iter().rev().filter(|w| precedes(w));
        let lost_to = ahead()
            .find(|w| {
                let others: Vec<&Candidate> = chosen
                    .iter()
                    .filter(|c| !std::ptr::eq(**c, **w))
                    .copied()
                    .collect();
                room.fits(&others, loser)
            })
            .or_else(|| ahead().next())
            .or(chosen.first());
        let lost = match lost_to {
            Some(w) => {
                let failed: Vec<&str> = [*w, loser]
                    .iter()
                    .filter(|c| c.rank_failed)
                    .map(|c| c.label.as_str())
                    .collect();
                let mut note = match failed.as_slice() {
                    [] => String::new(),
                    labels => format!(
                        "; the priority of {}: its rank failed",
                        labels.join(" and ")
                    ),
                };
                if w.score < loser.score {
                    note.push_str("; service goes before marketing");
                }
                format!(
                    "arbitration: lost to {} (score {} vs {}{note})",
                    w.label,
                    score_text(w.score),
                    score_text(loser.score)
                )
            }
            None => "arbitration: no room under the caps".to_string(),
        };
        let frees_at = match loser.on_lose {
            OnLose::Drop => None,
            OnLose::Defer => room.frees_at(&chosen, loser),
        };
        outcomes[i] = loser_outcome(&lost, loser.on_lose, frees_at, loser.latest);
        losses[i] = Some(lost);
    }
    (outcomes, losses)
}

/// What becomes of a loser that lost as `lost` says: dropped, or deferred
/// to `frees_at` (when the caps have room again) unless that is past
/// `latest`, its lateness bound.
pub fn loser_outcome(
    lost: &str,
    on_lose: OnLose,
    frees_at: Option<DateTime<Utc>>,
    latest: DateTime<Utc>,
) -> Outcome {
    match on_lose {
        OnLose::Drop => Outcome::Drop(format!("{lost}; on_lose = \"drop\"")),
        OnLose::Defer => match frees_at {
            Some(until) if until <= latest => Outcome::Defer {
                until,
                reason: format!("{lost}; deferred until the caps free"),
            },
            Some(until) => Outcome::Drop(format!(
                "{lost}; the caps free only at {}, past its lateness bound",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
            None => Outcome::Drop(format!("{lost}; the caps do not free")),
        },
    }
}

/// A score as people write it: `80`, `0.125`.
pub fn score_text(score: f64) -> String {
    if score.fract() == 0.0 && score.abs() < 1e15 {
        format!("{score:.0}")
    } else {
        let text = format!("{score:.4}");
        text.trim_end_matches('0').to_string()
    }
}

/// The caps (`policy.caps`, by calendar day in the customer's zone) over
/// the customer's recorded sends, with the chosen candidates counted as
/// sent at their due times.
pub struct CapsRoom {
    pub caps: Vec<crate::config::Cap>,
    pub sent: Vec<RecentSend>,
    pub tz: chrono_tz::Tz,
}

impl CapsRoom {
    /// With `next` going at `at` and each of `chosen` at its due time: the
    /// first of those sends, from `next` on in time order, that the caps
    /// would not allow, and when they would free for it. Each send is
    /// counted where it falls, so `next` neither counts against a chosen
    /// step due before it nor may take the room of one due after it (a
    /// loser deferred to tomorrow must not fill tomorrow's cap ahead of its
    /// winner's next step).
    fn conflict(
        &self,
        chosen: &[&Candidate],
        next: &Candidate,
        at: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        // Chosen steps due at the same moment as `next` go before it: they won.
        let mut order: Vec<(DateTime<Utc>, bool, ChannelKind, Category)> = chosen
            .iter()
            .map(|c| (c.due, false, c.channel, c.category))
            .chain(std::iter::once((at, true, next.channel, next.category)))
            .collect();
        order.sort_by_key(|&(due, is_next, ..)| (due, is_next));
        let mut sends = self.sent.clone();
        let mut next_placed = false;
        for (due, is_next, channel, category) in order {
            next_placed |= is_next;
            if next_placed {
                // A service step goes whatever marketing sent before it, so
                // a marketing step counts the chosen service steps due
                // after it too: it may not take room they will need.
                let mut counted = sends.clone();
                if category == Category::Marketing {
                    counted.extend(
                        chosen
                            .iter()
                            .filter(|c| c.category == Category::Service && c.due > due)
                            .map(|c| RecentSend {
                                at: c.due,
                                journey: String::new(),
                                channel: c.channel,
                                category: c.category,
                            }),
                    );
                }
                if let Err(hit) = caps_room(&self.caps, &counted, channel, category, self.tz, due) {
                    return Some(hit.frees_at);
                }
            }
            sends.push(RecentSend {
                at: due,
                journey: String::new(),
                channel,
                category,
            });
        }
        None
    }
}

/// How many times [`CapsRoom::frees_at`] moves a loser on before it gives
/// up (each move passes one cap period that a chosen step or a recorded
/// send fills).
const MOST_MOVES: usize = 32;

impl Room for CapsRoom {
    fn fits(&self, chosen: &[&Candidate], next: &Candidate) -> bool {
        self.conflict(chosen, next, next.due).is_none()
    }

    fn frees_at(&self, chosen: &[&Candidate], loser: &Candidate) -> Option<DateTime<Utc>> {
        let mut at = loser.due;
        for _ in 0..MOST_MOVES {
            match self.conflict(chosen, loser, at) {
                None => return Some(at),
                // A local midnight that does not exist is answered with the
                // instant asked about: move on by a minute, not forever.
                Some(free) => at = free.max(at + chrono::Duration::minutes(1)),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn candidate(label: &str, score: f64, due: &str, category: Category) -> Candidate {
        let due = at(due);
        Candidate {
            rank_failed: false,
            label: label.into(),
            score,
            due,
            channel: ChannelKind::Push,
            category,
            on_lose: OnLose::default_for(category),
            latest: due + Duration::days(2),
        }
    }

    /// `max` sends a calendar day (UTC), on everything; 0: no cap.
    fn cap(max: u32) -> CapsRoom {
        let caps = if max == 0 {
            vec![]
        } else {
            vec![crate::config::Cap {
                category: None,
                channel: None,
                max,
                per: 1,
            }]
        };
        CapsRoom {
            caps,
            sent: vec![],
            tz: chrono_tz::UTC,
        }
    }

    /// The scenario and its neighbours, one row each: who wins
    /// does not depend on who was due (or is listed) first.
    #[test]
    fn the_higher_score_goes_whatever_was_due_or_evaluated_first() {
        let fee = || {
            candidate(
                "fee_increase/alert",
                50.0,
                "2026-03-02T01:00:00Z",
                Category::Service,
            )
        };
        let loan = || {
            candidate(
                "unsigned_loan/push",
                80.0,
                "2026-03-02T01:05:00Z",
                Category::Service,
            )
        };
        let promo = || {
            candidate(
                "energy_rebate/invite",
                30.0,
                "2026-03-02T01:02:00Z",
                Category::Marketing,
            )
        };
        let deferred = |until: &str, reason: &str| Outcome::Defer {
            until: at(until),
            reason: reason.into(),
        };
        struct Row {
            name: &'static str,
            candidates: Vec<Candidate>,
            cap: CapsRoom,
            expect: Vec<Outcome>,
        }
        let rows = vec![
            Row {
                name: "fee due and listed first, loan later: the loan goes, the fee alert waits a day",
                candidates: vec![fee(), loan()],
                cap: cap(1),
                expect: vec![
                    deferred(
                        "2026-03-03T00:00:00Z",
                        "arbitration: lost to unsigned_loan/push (score 80 vs 50); deferred until the caps free",
                    ),
                    Outcome::Win,
                ],
            },
            Row {
                name: "listed the other way round: the same",
                candidates: vec![loan(), fee()],
                cap: cap(1),
                expect: vec![
                    Outcome::Win,
                    deferred(
                        "2026-03-03T00:00:00Z",
                        "arbitration: lost to unsigned_loan/push (score 80 vs 50); deferred until the caps free",
                    ),
                ],
            },
            Row {
                name: "room for all: everyone goes",
                candidates: vec![fee(), loan(), promo()],
                cap: cap(3),
                expect: vec![Outcome::Win, Outcome::Win, Outcome::Win],
            },
            Row {
                name: "no cap: everyone goes",
                candidates: vec![fee(), loan()],
                cap: cap(0),
                expect: vec![Outcome::Win, Outcome::Win],
            },
            Row {
                name: "room for two: marketing is dropped",
                candidates: vec![promo(), fee(), loan()],
                cap: cap(2),
                expect: vec![
                    Outcome::Drop(
                        "arbitration: lost to fee_increase/alert (score 50 vs 30); on_lose = \"drop\"".into(),
                    ),
                    Outcome::Win,
                    Outcome::Win,
                ],
            },
            Row {
                name: "marketing scored above service: service still goes first",
                candidates: vec![
                    Candidate {
                        score: 2000.0,
                        ..promo()
                    },
                    fee(),
                ],
                cap: cap(1),
                expect: vec![
                    Outcome::Drop(
                        "arbitration: lost to fee_increase/alert (score 50 vs 2000; service goes \
                         before marketing); on_lose = \"drop\""
                            .into(),
                    ),
                    Outcome::Win,
                ],
            },
        ];
        for row in rows {
            assert_eq!(
                decide(&row.candidates, &row.cap),
                row.expect,
                "{}",
                row.name
            );
        }
    }

    /// A loser whose wait would pass its lateness bound is dropped, saying
    /// when the caps free; an explicit `on_lose = "drop"` drops a service step.
    #[test]
    fn deferral_respects_the_lateness_bound_and_on_lose() {
        let loan = candidate(
            "unsigned_loan/push",
            80.0,
            "2026-03-02T01:05:00Z",
            Category::Service,
        );
        let mut fee = candidate(
            "fee_increase/alert",
            50.0,
            "2026-03-02T01:00:00Z",
            Category::Service,
        );
        fee.latest = fee.due + Duration::hours(1);
        let out = decide(&[fee.clone(), loan.clone()], &cap(1));
        assert_eq!(
            out[0],
            Outcome::Drop(
                "arbitration: lost to unsigned_loan/push (score 80 vs 50); the caps free only at 2026-03-03T00:00:00Z, past its lateness bound".into()
            )
        );
        fee.on_lose = OnLose::Drop;
        fee.latest = fee.due + Duration::days(2);
        assert!(
            matches!(&decide(&[fee, loan], &cap(1))[0], Outcome::Drop(r) if r.ends_with("on_lose = \"drop\""))
        );
    }

    /// Sends already in the window count: a cap of 2 a day with one send
    /// earlier that day frees for the loser at the next local midnight.
    #[test]
    fn earlier_sends_take_room_and_set_when_it_frees() {
        let loan = candidate(
            "unsigned_loan/push",
            80.0,
            "2026-03-02T01:05:00Z",
            Category::Service,
        );
        let fee = candidate(
            "fee_increase/alert",
            50.0,
            "2026-03-02T01:00:00Z",
            Category::Service,
        );
        let room = CapsRoom {
            sent: vec![RecentSend {
                at: at("2026-03-02T00:30:00Z"),
                journey: "energy_rebate".into(),
                channel: ChannelKind::Email,
                category: Category::Service,
            }],
            ..cap(2)
        };
        let out = decide(&[fee, loan], &room);
        assert_eq!(out[1], Outcome::Win);
        assert!(
            matches!(&out[0], Outcome::Defer { until, .. } if *until == at("2026-03-03T00:00:00Z")),
            "{out:?}"
        );
    }

    /// A loser deferred past its winner's day must not land on the day its
    /// winner's next step needs: with the window reaching that step, it
    /// waits for the first day neither holds, and names the winner that
    /// holds the room it wanted (the push today, not the email tomorrow).
    #[test]
    fn a_loser_is_deferred_past_the_days_its_winners_hold() {
        let fee = candidate(
            "fee_increase/alert",
            50.0,
            "2026-03-02T01:00:00Z",
            Category::Service,
        );
        let push = candidate(
            "unsigned_loan/push",
            80.0,
            "2026-03-02T01:00:00Z",
            Category::Service,
        );
        let email = candidate(
            "unsigned_loan/email",
            80.0,
            "2026-03-03T01:00:00Z",
            Category::Service,
        );
        let out = decide(&[fee.clone(), push.clone(), email.clone()], &cap(1));
        assert_eq!(&out[1..], &[Outcome::Win, Outcome::Win]);
        assert_eq!(
            out[0],
            Outcome::Defer {
                until: at("2026-03-04T00:00:00Z"),
                reason: "arbitration: lost to unsigned_loan/push (score 80 vs 50); \
                         deferred until the caps free"
                    .into()
            }
        );
        // Its lateness bound ends before the first free day: dropped.
        let hurried = Candidate {
            latest: at("2026-03-03T12:00:00Z"),
            ..fee.clone()
        };
        assert!(
            matches!(&decide(&[hurried, push.clone(), email.clone()], &cap(1))[0],
                Outcome::Drop(r) if r.contains("past its lateness bound")),
        );
        // A week's cap: the loser goes only once the email's week is over.
        let weekly = CapsRoom {
            caps: vec![crate::config::Cap {
                category: None,
                channel: None,
                max: 1,
                per: 7,
            }],
            ..cap(0)
        };
        let late = Candidate {
            latest: at("2026-03-20T00:00:00Z"),
            ..fee
        };
        let chosen = [&email];
        assert_eq!(
            weekly.frees_at(&chosen, &late),
            Some(at("2026-03-10T00:00:00Z"))
        );
        assert!(
            !weekly.fits(&chosen, &late),
            "it would take the email's week"
        );
        assert!(weekly.fits(&[], &late));
    }

    #[test]
    fn scores_read_as_written() {
        assert_eq!(score_text(80.0), "80");
        assert_eq!(score_text(0.125), "0.125");
        assert_eq!(score_text(-3.0), "-3");
    }
}
