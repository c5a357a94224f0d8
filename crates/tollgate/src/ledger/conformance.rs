//! The ledger conformance suite: every backend must give these answers. A backend's
//! tests call [`run_all`] with a factory of fresh, empty ledgers.
#![allow(missing_docs)]

use crate::Micros;
use crate::ledger::{
    Algorithm, Apply, CounterKey, Ledger, NewLease, Op, OpKind, Plan, RecordOutcome,
};
use crate::request::{Dimension, Subject, SubjectDim};

pub const TTL: i64 = 60_000;
static BY_USER: [Dimension; 1] = [Dimension::Subject(SubjectDim::User)];

fn key<'a>(rule: &'static str) -> CounterKey<'a> {
    CounterKey::new("p", rule, &[], vec![])
}

/// (Of any lifetime: an operation's lifetime is its plan's own.)
fn rate<'a>(rule: &'static str, limit: u64) -> Op<'a> {
    Op {
        key: key(rule),
        kind: OpKind::Rate {
            algorithm: Algorithm::TokenBucket,
            limit,
            per_ms: 60_000,
            burst: limit,
        },
        enforcing: true,
    }
}

/// A quota of `max` leases on the resource `engines`, for every subject.
fn engines<'a>(max: u64) -> Op<'a> {
    Op {
        key: key("q"),
        kind: OpKind::Lease {
            resource: "engines".into(),
            max,
        },
        enforcing: true,
    }
}

fn spend(rule: &'static str, limit: i64, amount: i64, enforcing: bool) -> Op<'static> {
    Op {
        key: key(rule),
        kind: OpKind::Spend {
            window_start: i64::MIN,
            window_ms: None,
            limit: Micros(limit),
            amount: Micros(amount),
            span_ms: 86_400_000,
        },
        enforcing,
    }
}

fn plan(decision: u128, now: i64, ops: Vec<Op<'static>>) -> Plan<'static> {
    Plan {
        decision,
        now,
        reservation_ttl_ms: TTL,
        ops: ops.into(),
        lease: None,
    }
}

/// Conformance check `a_refused_enforcing_operation_commits_nothing`.
pub fn a_refused_enforcing_operation_commits_nothing(name: &str, l: &dyn Ledger) {
    let r = l
        .apply(
            &plan(1, 0, vec![rate("r", 5), spend("s", 100, 200, true)]),
            Apply::Commit,
        )
        .unwrap();
    assert!(r[0].granted && !r[1].granted, "{name}");
    let r = l
        .apply(&plan(2, 0, vec![rate("r", 5)]), Apply::Commit)
        .unwrap();
    assert_eq!(
        (r[0].used, r[0].remaining),
        (0, 4),
        "{name}: the refused plan took a token"
    );
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, 0).unwrap(),
        Micros(0),
        "{name}"
    );
}

/// Conformance check `a_dry_run_changes_nothing`.
pub fn a_dry_run_changes_nothing(name: &str, l: &dyn Ledger) {
    for _ in 0..3 {
        let r = l
            .apply(
                &plan(1, 0, vec![rate("r", 1), spend("s", 100, 60, true)]),
                Apply::DryRun,
            )
            .unwrap();
        assert!(r.iter().all(|r| r.granted), "{name}");
    }
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, 0).unwrap(),
        Micros(0),
        "{name}"
    );
}

/// Conformance check `non_enforcing_operations_reserve_but_never_go_into_debt`.
pub fn non_enforcing_operations_reserve_but_never_go_into_debt(name: &str, l: &dyn Ledger) {
    let soft = |d| {
        plan(
            d,
            0,
            vec![
                spend("s", 100, 80, false),
                Op {
                    enforcing: false,
                    ..rate("r", 1)
                },
            ],
        )
    };
    let r = l.apply(&soft(1), Apply::Commit).unwrap();
    assert!(r[0].granted && r[1].granted, "{name}");
    let r = l.apply(&soft(2), Apply::Commit).unwrap();
    assert!(!r[0].granted && !r[1].granted, "{name}");
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, 0).unwrap(),
        Micros(160),
        "{name}: reserved anyway"
    );
    // One minute later the bucket holds exactly one token again: it was never below zero.
    let r = l
        .apply(&plan(3, 60_000, vec![rate("r", 1)]), Apply::Commit)
        .unwrap();
    assert!(r[0].granted, "{name}");
    let r = l
        .apply(&plan(4, 60_000, vec![rate("r", 1)]), Apply::Commit)
        .unwrap();
    assert!(!r[0].granted, "{name}");
}

/// Conformance check `record_replaces_the_reservation_once`.
pub fn record_replaces_the_reservation_once(name: &str, l: &dyn Ledger) {
    l.apply(
        &plan(7, 1_000, vec![spend("s", 1_000, 300, true)]),
        Apply::Commit,
    )
    .unwrap();
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, 1_000).unwrap(),
        Micros(300),
        "{name}"
    );
    assert_eq!(
        l.record(7, Micros(120), 2_000).unwrap(),
        RecordOutcome::Recorded,
        "{name}"
    );
    assert_eq!(
        l.record(7, Micros(500), 2_000).unwrap(),
        RecordOutcome::Duplicate,
        "{name}"
    );
    assert_eq!(
        l.record(8, Micros(500), 2_000).unwrap(),
        RecordOutcome::UnknownDecision,
        "{name}"
    );
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, 2_000).unwrap(),
        Micros(120),
        "{name}"
    );
    // Spend is attributed to the check's time, not the record's.
    assert_eq!(
        l.spend_used(&key("s"), 1_000, 2_000).unwrap(),
        Micros(120),
        "{name}"
    );
    assert_eq!(
        l.spend_used(&key("s"), 1_001, 2_000).unwrap(),
        Micros(0),
        "{name}"
    );
}

/// Conformance check `reservations_expire_at_check_time_plus_ttl`.
pub fn reservations_expire_at_check_time_plus_ttl(name: &str, l: &dyn Ledger) {
    l.apply(
        &plan(1, 0, vec![spend("s", 1_000, 300, true)]),
        Apply::Commit,
    )
    .unwrap();
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, TTL - 1).unwrap(),
        Micros(300),
        "{name}"
    );
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, TTL).unwrap(),
        Micros(0),
        "{name}"
    );
}

/// Conformance check `leases_count_until_released_or_lapsed`.
pub fn leases_count_until_released_or_lapsed(name: &str, l: &dyn Ledger) {
    let subject = Subject {
        product: Some("acme".into()),
        ..Subject::default()
    };
    let acquire = |id: u128, now: i64, expires_at: Option<i64>| {
        let op = engines(2);
        let p = Plan {
            decision: id,
            now,
            reservation_ttl_ms: TTL,
            ops: smallvec::smallvec![op],
            lease: Some(NewLease {
                id,
                resource: "engines",
                subject: &subject,
                expires_at,
            }),
        };
        l.apply(&p, Apply::Commit).unwrap()[0].granted
    };
    assert!(acquire(1, 0, None), "{name}");
    assert!(acquire(2, 0, Some(1_000)), "{name}");
    assert!(!acquire(3, 999, None), "{name}");
    assert!(acquire(4, 1_000, None), "{name}: the TTL lease lapsed");
    assert!(!acquire(5, 1_000, None), "{name}");
    assert!(l.release(1, 1_000).unwrap(), "{name}");
    assert!(!l.release(1, 1_000).unwrap(), "{name}: released twice");
    assert!(acquire(6, 1_000, None), "{name}");
}

/// Conformance check `a_lease_beside_only_a_rate_operation_is_kept`: a lease taken by a
/// plan whose one operation is a rate limit (an `acquire` under a policy with no quota)
/// is kept like any other — released once, and counted by a quota added later.
pub fn a_lease_beside_only_a_rate_operation_is_kept(name: &str, l: &dyn Ledger) {
    fn with_lease<'a>(subject: &'a Subject, decision: u128, now: i64, op: Op<'a>) -> Plan<'a> {
        Plan {
            decision,
            now,
            reservation_ttl_ms: TTL,
            ops: smallvec::smallvec![op],
            lease: Some(NewLease {
                id: decision,
                resource: "engines",
                subject,
                expires_at: None,
            }),
        }
    }
    let subject = Subject::default();
    let p = with_lease(&subject, 1, 0, rate("r", 5));
    assert!(l.apply(&p, Apply::Commit).unwrap()[0].granted, "{name}");
    // A quota seen for the first time counts the live leases of its resource.
    let p = with_lease(&subject, 2, 1, engines(1));
    let r = l.apply(&p, Apply::Commit).unwrap();
    assert!(!r[0].granted, "{name}: the first lease was not kept");
    assert_eq!(r[0].used, 1, "{name}");
    assert!(l.release(1, 2).unwrap(), "{name}");
    assert!(!l.release(1, 2).unwrap(), "{name}: released twice");
}

/// Conformance check `forecast_projects_recorded_spend_only`.
pub fn forecast_projects_recorded_spend_only(name: &str, l: &dyn Ledger) {
    let day = 86_400_000;
    let forecast = |d, now| {
        let op = Op {
            key: key("f"),
            kind: OpKind::Forecast {
                lookback_ms: 2 * day,
                monthly_budget: Micros(30_000_000),
            },
            enforcing: true,
        };
        l.apply(&plan(d, now, vec![op]), Apply::Commit).unwrap()[0].clone()
    };
    assert!(forecast(1, 0).granted, "{name}");
    l.record(1, Micros(1_999_999), 0).unwrap();
    let r = forecast(2, 0);
    assert!(r.granted, "{name}: 1.999999 / 2 days × 30 < 30");
    assert_eq!(r.used, 29_999_985, "{name}");
    l.record(2, Micros(1), 0).unwrap();
    assert!(!forecast(3, 0).granted, "{name}: 2 / 2 × 30 = 30");
    assert!(
        !forecast(4, 2 * day).granted,
        "{name}: the lower edge is inside"
    );
    assert!(forecast(5, 2 * day + 1).granted, "{name}");
}

/// Conformance check `usage_lists_spend_counters_by_dimension`.
pub fn usage_lists_spend_counters_by_dimension(name: &str, l: &dyn Ledger) {
    for (d, user) in [(1u128, "u1"), (2, "u2")] {
        let op = Op {
            key: CounterKey::new("p", "b", &BY_USER, vec![user]),
            kind: OpKind::Spend {
                window_start: 0,
                window_ms: Some(86_400_000),
                limit: Micros(10),
                amount: Micros(3),
                span_ms: 86_400_000,
            },
            enforcing: true,
        };
        l.apply(&plan(d, 5, vec![op]), Apply::Commit).unwrap();
    }
    l.record(1, Micros(2), 6).unwrap();
    let rows = l
        .spend_usage(Some(("user", "u1")), 6, &|_, _| Some(0))
        .unwrap();
    assert_eq!(rows.len(), 1, "{name}");
    assert_eq!(
        (rows[0].key.as_str(), rows[0].spent, rows[0].reserved),
        ("user=u1", Micros(2), Micros(0)),
        "{name}"
    );
    assert_eq!(
        l.spend_usage(None, 6, &|_, _| Some(0)).unwrap().len(),
        2,
        "{name}"
    );
    assert!(
        l.spend_usage(None, 6, &|_, _| None).unwrap().is_empty(),
        "{name}"
    );
}

fn windowed(rule: &'static str, window_start: i64, limit: i64, amount: i64) -> Op<'static> {
    Op {
        key: key(rule),
        kind: OpKind::Spend {
            window_start,
            window_ms: Some(3_600_000),
            limit: Micros(limit),
            amount: Micros(amount),
            span_ms: 1,
        },
        enforcing: true,
    }
}

/// Conformance check `reservations_from_before_the_window_do_not_count`: a period that
/// turns while a reservation is live starts from zero.
pub fn reservations_from_before_the_window_do_not_count(name: &str, l: &dyn Ledger) {
    let turn = 10 * TTL;
    l.apply(
        &plan(1, turn - 10, vec![windowed("s", 0, 100, 60)]),
        Apply::Commit,
    )
    .unwrap();
    let r = l
        .apply(
            &plan(2, turn - 5, vec![windowed("s", 0, 100, 60)]),
            Apply::Commit,
        )
        .unwrap();
    assert!(!r[0].granted, "{name}: 60 + 60 > 100 in the same period");
    // The first reservation is still live (TTL), but from the previous period.
    let r = l
        .apply(
            &plan(3, turn, vec![windowed("s", turn, 100, 60)]),
            Apply::Commit,
        )
        .unwrap();
    assert!(
        r[0].granted,
        "{name}: a new period counts nothing from before it"
    );
    assert_eq!(r[0].used, 0, "{name}");
    let r = l
        .apply(
            &plan(4, turn + 1, vec![windowed("s", turn, 100, 60)]),
            Apply::Commit,
        )
        .unwrap();
    assert_eq!((r[0].granted, r[0].used), (false, 60), "{name}");
}

/// Conformance check `what_a_refused_plan_reads_stays_consistent`: spend that left its
/// window while a refused plan was answered is gone for the next one too.
pub fn what_a_refused_plan_reads_stays_consistent(name: &str, l: &dyn Ledger) {
    l.apply(&plan(1, 0, vec![windowed("s", 0, 100, 50)]), Apply::Commit)
        .unwrap();
    assert_eq!(l.record(1, Micros(50), 1).unwrap(), RecordOutcome::Recorded);
    // Later, the recorded 50 is outside the window; the rate limit refuses the plan.
    let later = 3 * TTL;
    l.apply(&plan(9, later, vec![rate("r", 1)]), Apply::Commit)
        .unwrap();
    let r = l
        .apply(
            &plan(
                2,
                later,
                vec![rate("r", 1), windowed("s", later - 10, 100, 80)],
            ),
            Apply::Commit,
        )
        .unwrap();
    assert!(!r[0].granted && r[1].granted, "{name}");
    assert_eq!(r[1].used, 0, "{name}");
    let r = l
        .apply(
            &plan(3, later + 1, vec![windowed("s", later - 9, 100, 80)]),
            Apply::Commit,
        )
        .unwrap();
    assert_eq!((r[0].granted, r[0].used), (true, 0), "{name}");
    assert_eq!(
        l.spend_used(&key("s"), i64::MIN, later + 1).unwrap(),
        Micros(130),
        "{name}: recorded 50 (all time) and the reservation of 80"
    );
}

/// Conformance check `costs_past_i64_never_reopen_a_counter`: two costs of 9·10^18
/// micro-dollars, whose sum is past `i64::MAX`. A backend counts the second or refuses it
/// with an error (Redis's integers are i64), but its sum never wraps round: the counter
/// stays spent.
pub fn costs_past_i64_never_reopen_a_counter(name: &str, l: &dyn Ledger) {
    const COST: i64 = 9_000_000_000_000_000_000;
    for decision in [31, 32] {
        let r = l
            .apply(
                &plan(decision, 1_000, vec![spend("s", 10, 0, true)]),
                Apply::Commit,
            )
            .unwrap();
        assert!(r[0].granted, "{name}");
    }
    assert_eq!(
        l.record(31, Micros(COST), 2_000).unwrap(),
        RecordOutcome::Recorded,
        "{name}"
    );
    let second = l.record(32, Micros(COST), 2_000);
    assert!(
        matches!(second, Ok(RecordOutcome::Recorded) | Err(_)),
        "{name}: {second:?}"
    );
    let r = l
        .apply(
            &plan(33, 3_000, vec![spend("s", 10, 1, true)]),
            Apply::Commit,
        )
        .unwrap();
    assert!(!r[0].granted, "{name}: {:?}", r[0]);
    assert_eq!(r[0].remaining, 0, "{name}");
    assert!(r[0].used >= COST, "{name}: {:?}", r[0]);
    let used = l.spend_used(&key("s"), i64::MIN, 3_000).unwrap();
    assert!(used >= Micros(COST), "{name}: {used:?}");
}

/// Runs every check, each on a fresh ledger from `make`.
pub fn run_all(name: &str, make: &dyn Fn() -> Box<dyn Ledger>) {
    a_refused_enforcing_operation_commits_nothing(name, &*make());
    a_dry_run_changes_nothing(name, &*make());
    non_enforcing_operations_reserve_but_never_go_into_debt(name, &*make());
    record_replaces_the_reservation_once(name, &*make());
    reservations_expire_at_check_time_plus_ttl(name, &*make());
    leases_count_until_released_or_lapsed(name, &*make());
    a_lease_beside_only_a_rate_operation_is_kept(name, &*make());
    forecast_projects_recorded_spend_only(name, &*make());
    usage_lists_spend_counters_by_dimension(name, &*make());
    reservations_from_before_the_window_do_not_count(name, &*make());
    what_a_refused_plan_reads_stays_consistent(name, &*make());
    costs_past_i64_never_reopen_a_counter(name, &*make());
}
