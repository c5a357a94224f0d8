//! `budget`: spend per calendar period (UTC), trailing window, or in total; per-value
//! overrides; reject, alert or downgrade when exceeded; an early alert at a fraction.

use std::collections::HashMap;

use crate::decision::Code;
use crate::duration::Millis;
use crate::eval::EvalCtx;
use crate::ledger::{Op, OpKind, OpResult, Ops};
use crate::money::Micros;
use crate::policy::reader;
use crate::request::Dimension;

use super::{RuleInput, Step, Verdict};

pub(crate) const FIELDS: &[&str] = &[
    "limit_usd",
    "period",
    "by",
    "overrides",
    "on_exceeded",
    "downgrade_to",
    "alert_at",
];

/// The day of the month (1–31, proleptic Gregorian, UTC) of a day counted from
/// 1970-01-01: H. Hinnant's `civil_from_days`, the day only.
fn day_of_month(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    day_of_year - (153 * month_from_march + 2) / 5 + 1
}

/// Which spend a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Period {
    Day,
    Week,
    Month,
    Rolling(Millis),
    Total,
}

impl Period {
    pub(crate) fn parse(text: &str) -> Option<Period> {
        Some(match text {
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            "total" => Period::Total,
            other => Period::Rolling(Millis::parse(other.strip_prefix("rolling:")?)?),
        })
    }

    /// The first millisecond that counts at `now` (inclusive).
    pub(crate) fn window_start(self, now: i64) -> i64 {
        // Calendar arithmetic on days since the epoch (every check of a period budget
        // asks): a few integer operations instead of a date library's conversions.
        const DAY_MS: i64 = Millis::DAY.0;
        let days = now.div_euclid(DAY_MS);
        match self {
            Period::Total => i64::MIN,
            Period::Rolling(w) => now.saturating_sub(w.0),
            Period::Day => days * DAY_MS,
            // 1970-01-01 was a Thursday: Monday is 3 days before.
            Period::Week => (days - (days + 3).rem_euclid(7)) * DAY_MS,
            Period::Month => (days - (day_of_month(days) - 1)) * DAY_MS,
        }
    }

    /// The span within which spend is the same to this period (see `OpKind::Spend`):
    /// calendar periods and `total` start at midnight UTC, so a day; a trailing window
    /// can start at any millisecond.
    pub(crate) fn span_ms(self) -> i64 {
        match self {
            Period::Rolling(_) => 1,
            Period::Day | Period::Week | Period::Month | Period::Total => Millis::DAY.0,
        }
    }

    /// The longest time an amount can count for (`None`: forever).
    pub(crate) fn longest_ms(self) -> Option<i64> {
        match self {
            Period::Day => Some(Millis::DAY.0),
            Period::Week => Some(7 * Millis::DAY.0),
            Period::Month => Some(31 * Millis::DAY.0),
            Period::Rolling(w) => Some(w.0),
            Period::Total => None,
        }
    }

    fn describe(self) -> String {
        match self {
            Period::Day => "per day".into(),
            Period::Week => "per week".into(),
            Period::Month => "per month".into(),
            Period::Rolling(w) => format!("per trailing {w}"),
            Period::Total => "in total".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnExceeded {
    Reject,
    Alert,
    Downgrade,
}

pub(crate) struct Budget {
    limit: Micros,
    period: Period,
    by: Vec<Dimension>,
    overrides: HashMap<String, Micros>,
    on_exceeded: OnExceeded,
    downgrade_to: Option<String>,
    alert_at: Option<f64>,
}

impl Budget {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Budget> {
        let limit = input
            .required("limit_usd")
            .and_then(|n| reader::money(n, &input.at("limit_usd"), input.d));
        let period = input.required("period").and_then(|n| {
            let at = input.at("period");
            let text = reader::string(n, &at, input.d)?;
            let p = Period::parse(&text);
            if p.is_none() {
                at.error(
                    input.d,
                    n.pos,
                    format!("bad period `{text}` (expected day, week, month, total or rolling:<duration> such as rolling:30d)"),
                );
            }
            p
        });
        let by = input.by();
        let overrides = match input.optional("overrides") {
            None => Some(HashMap::new()),
            Some(n) => {
                let at = input.at("overrides");
                if by.as_ref().is_some_and(Vec::is_empty) {
                    at.error(input.d, n.pos, "`overrides` give limits per value of the first `by` dimension, but the rule has no `by`");
                }
                reader::entries(n, &at, input.d).and_then(|entries| {
                    let mut map = HashMap::new();
                    let mut ok = true;
                    for (k, v) in entries {
                        match reader::money(v, &at.field(&k.name), input.d) {
                            Some(m) => {
                                map.insert(k.name.clone(), m);
                            }
                            None => ok = false,
                        }
                    }
                    ok.then_some(map)
                })
            }
        };
        let on_exceeded = match input.optional("on_exceeded") {
            None => Some(OnExceeded::Reject),
            Some(n) => reader::one_of(
                n,
                &input.at("on_exceeded"),
                input.d,
                &["reject", "alert", "downgrade"],
            )
            .map(|s| match s.as_str() {
                "alert" => OnExceeded::Alert,
                "downgrade" => OnExceeded::Downgrade,
                _ => OnExceeded::Reject,
            }),
        };
        let downgrade_to = input
            .optional("downgrade_to")
            .and_then(|n| reader::nonempty_string(n, &input.at("downgrade_to"), input.d));
        match (on_exceeded, &downgrade_to) {
            (Some(OnExceeded::Downgrade), None) => input.at("downgrade_to").error(
                input.d,
                input.fields.pos,
                "`on_exceeded: downgrade` needs `downgrade_to` (the model to use instead)",
            ),
            (Some(OnExceeded::Reject | OnExceeded::Alert), Some(_)) => {
                let pos = input
                    .optional("downgrade_to")
                    .map_or(input.fields.pos, |n| n.pos);
                input.at("downgrade_to").error(
                    input.d,
                    pos,
                    "`downgrade_to` only applies with `on_exceeded: downgrade`",
                )
            }
            _ => {}
        }
        let alert_at = alert_at(input)?;
        Some(Budget {
            limit: limit?,
            period: period?,
            by: by?,
            overrides: overrides?,
            on_exceeded: on_exceeded?,
            downgrade_to,
            alert_at,
        })
    }

    /// A run's budget: `total`, over all the run's calls.
    pub(crate) fn for_run(
        limit: Micros,
        on_exceeded: OnExceeded,
        downgrade_to: Option<String>,
        alert_at: Option<f64>,
    ) -> Budget {
        Budget {
            limit,
            period: Period::Total,
            by: Vec::new(),
            overrides: HashMap::new(),
            on_exceeded,
            downgrade_to,
            alert_at,
        }
    }

    /// The limit for this request: an override for the first `by` value, else `limit_usd`.
    fn limit_for(&self, key_values: &[&str]) -> Micros {
        self.limit_for_value(key_values.first().copied())
    }

    pub(crate) fn limit_for_value(&self, first: Option<&str>) -> Micros {
        first
            .and_then(|v| self.overrides.get(v))
            .copied()
            .unwrap_or(self.limit)
    }

    pub(crate) fn window_start(&self, now: i64) -> i64 {
        self.period.window_start(now)
    }

    /// The trailing window, for `rolling:<dur>` (calendar periods and `total` have none).
    pub(crate) fn trailing_window_ms(&self) -> Option<i64> {
        match self.period {
            Period::Rolling(w) => Some(w.0),
            _ => None,
        }
    }

    /// Whether this rule's downgrade takes effect in rule order (so later rules see the
    /// new model). The budget is read first; the reservation is made in the atomic apply.
    pub(crate) fn plan<'r>(
        &'r self,
        enforce: bool,
        ctx: &mut EvalCtx<'r>,
        ops: &mut Ops<'r>,
    ) -> Step<'r> {
        let key = match ctx.key(&self.by) {
            Ok(k) => k,
            Err(skip) => return Step::Verdict(Verdict::Skip(skip.into())),
        };
        let limit = self.limit_for(&key.values);
        let amount = ctx.reserved_estimate();
        let window_start = self.period.window_start(ctx.now);
        if enforce
            && self.on_exceeded == OnExceeded::Downgrade
            && let Some(to) = &self.downgrade_to
            && let Ok(used) = ctx.spend_used(&key, window_start)
            && exceeds(used, amount, limit)
        {
            ctx.set_model(to);
        }
        ops.push(Op {
            key,
            kind: OpKind::Spend {
                window_start,
                window_ms: self.period.longest_ms(),
                limit,
                amount,
                span_ms: self.period.span_ms(),
            },
            enforcing: self.on_exceeded == OnExceeded::Reject,
        });
        Step::Planned
    }

    pub(crate) fn judge(&self, op: &Op<'_>, result: &OpResult, explain: bool) -> Verdict<'_> {
        let OpKind::Spend { limit, amount, .. } = op.kind else {
            return Verdict::Pass(String::new());
        };
        if !result.granted {
            let reason = format!(
                "budget {} USD {} for {} exceeded: {} USD spent and reserved, {} USD estimated",
                limit,
                self.period.describe(),
                op.key.label(),
                Micros(result.used),
                amount
            );
            return match (self.on_exceeded, &self.downgrade_to) {
                (OnExceeded::Downgrade, Some(to)) => Verdict::Downgrade { to, reason },
                (OnExceeded::Alert, _) => Verdict::Alert { reason },
                _ => Verdict::Deny {
                    code: Code::BudgetExceeded,
                    reason,
                },
            };
        }
        let after = result.used.saturating_add(amount.0);
        if let Some(fraction) = self.alert_at
            && after as f64 >= fraction * limit.0 as f64
        {
            return Verdict::Alert {
                reason: format!(
                    "budget {:.0}% used ({} of {} USD {} for {})",
                    (after as f64 / limit.0.max(1) as f64) * 100.0,
                    Micros(after),
                    limit,
                    self.period.describe(),
                    op.key.label()
                ),
            };
        }
        super::pass(explain, || format!("{} USD left", Micros(result.remaining)))
    }
}

/// `alert_at`, a fraction in (0, 1].
pub(crate) fn alert_at(input: &mut RuleInput<'_, '_>) -> Option<Option<f64>> {
    match input.optional("alert_at") {
        None => Some(None),
        Some(n) => {
            let at = input.at("alert_at");
            let f = reader::number(n, &at, input.d)?;
            if f > 0.0 && f <= 1.0 {
                Some(Some(f))
            } else {
                at.error(
                    input.d,
                    n.pos,
                    format!("`alert_at` is a fraction of the limit in (0, 1], found {f}"),
                );
                None
            }
        }
    }
}

/// The budget test: a reached cap blocks even a zero estimate.
pub(crate) fn exceeds(used: Micros, amount: Micros, limit: Micros) -> bool {
    used >= limit || used.0.saturating_add(amount.0) > limit.0
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::{DateTime, Datelike, NaiveDate, Utc};
    use proptest::prelude::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    /// The calendar periods by a date library, the reference.
    fn reference(period: Period, now: i64) -> i64 {
        let day = |d: NaiveDate| d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_millis();
        let date = DateTime::<Utc>::from_timestamp_millis(now)
            .unwrap()
            .date_naive();
        match period {
            Period::Day => day(date),
            Period::Week => {
                day(date - chrono::Days::new(u64::from(date.weekday().num_days_from_monday())))
            }
            Period::Month => day(date.with_day(1).unwrap()),
            _ => unreachable!(),
        }
    }

    proptest! {
        /// From 1600 to 2400 (leap centuries both ways, the epoch, negative times).
        #[test]
        fn calendar_periods_agree_with_a_date_library(now in -11_676_096_000_000i64..13_569_465_600_000) {
            for period in [Period::Day, Period::Week, Period::Month] {
                prop_assert_eq!(period.window_start(now), reference(period, now), "{:?} at {}", period, now);
            }
        }
    }

    #[test]
    fn months_turn_at_every_first_across_four_centuries() {
        // Every day from 1900-01-01 to 2300-12-31, against the reference.
        let start = at("1900-01-01T00:00:00Z");
        let end = at("2301-01-01T00:00:00Z");
        let mut now = start;
        while now < end {
            for t in [now, now + 86_399_999] {
                assert_eq!(
                    Period::Month.window_start(t),
                    reference(Period::Month, t),
                    "{t}"
                );
                assert_eq!(
                    Period::Week.window_start(t),
                    reference(Period::Week, t),
                    "{t}"
                );
            }
            now += 86_400_000;
        }
    }

    #[test]
    fn calendar_periods_are_utc() {
        let now = at("2024-02-29T13:00:00Z"); // a Thursday, leap day
        assert_eq!(Period::Day.window_start(now), at("2024-02-29T00:00:00Z"));
        assert_eq!(Period::Week.window_start(now), at("2024-02-26T00:00:00Z"));
        assert_eq!(Period::Month.window_start(now), at("2024-02-01T00:00:00Z"));
        let monday = at("2026-03-02T00:00:00Z");
        assert_eq!(Period::Week.window_start(monday), monday);
        assert_eq!(
            Period::Week.window_start(monday - 1),
            at("2026-02-23T00:00:00Z")
        );
        assert_eq!(
            Period::Month.window_start(at("2026-01-01T00:00:00Z") - 1),
            at("2025-12-01T00:00:00Z")
        );
        assert_eq!(Period::Total.window_start(now), i64::MIN);
        assert_eq!(
            Period::parse("rolling:30d").unwrap().window_start(now),
            now - 30 * 86_400_000
        );
        assert_eq!(Period::parse("rolling:"), None);
        assert_eq!(Period::parse("year"), None);
    }

    #[test]
    fn exceeding_allows_spending_exactly_to_the_limit() {
        assert!(!exceeds(Micros(5), Micros(5), Micros(10)));
        assert!(exceeds(Micros(5), Micros(6), Micros(10)));
        assert!(exceeds(Micros(10), Micros(0), Micros(10)));
    }
}
