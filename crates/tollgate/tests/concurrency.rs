//! Many threads against one limit: the limit holds exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use tollgate::{Engine, ManualClock, MemoryLedger, Micros, Request};

const THREADS: usize = 8;

fn engine(policy: &str) -> Arc<Engine> {
    engine_on(policy, MemoryLedger::new())
}

fn engine_on(policy: &str, ledger: MemoryLedger) -> Arc<Engine> {
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    Arc::new(
        Engine::builder()
            .clock(clock)
            .ledger(Arc::new(ledger))
            .build_from_text(policy)
            .unwrap(),
    )
}

/// Runs `per_thread` calls of `f` on each of THREADS threads; returns how many were allowed.
fn hammer(engine: &Arc<Engine>, per_thread: usize, f: fn(&Engine, usize) -> bool) -> usize {
    let allowed = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (engine, allowed) = (Arc::clone(engine), Arc::clone(&allowed));
            thread::spawn(move || {
                for i in 0..per_thread {
                    if f(&engine, t * per_thread + i) {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    allowed.load(Ordering::Relaxed)
}

#[test]
fn concurrent_estimates_never_reserve_more_than_the_budget() {
    let e = engine(
        "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 5, period: month}]}]",
    );
    let allowed = hammer(&e, 1000, |e, _| {
        let mut r = Request::default();
        r.estimate.cost_usd = Some(Micros(7_000)); // 0.007: 714 fit in 5 USD
        e.check(&r).allowed
    });
    assert_eq!(allowed, 714);
    let usage = e.usage(None).unwrap();
    assert_eq!(usage[0].reserved_usd, Micros(714 * 7_000));
    assert!(usage[0].reserved_usd <= usage[0].limit_usd);
}

#[test]
fn concurrent_checks_never_pass_a_rate_limit() {
    for algorithm in ["token_bucket", "fixed_window", "sliding_window"] {
        let e = engine(&format!(
            "policies: [{{name: p, rules: [{{id: r, type: rate, limit: 100, per: 1h, algorithm: {algorithm}}}]}}]"
        ));
        let allowed = hammer(&e, 500, |e, _| e.check(&Request::default()).allowed);
        assert_eq!(allowed, 100, "{algorithm}");
    }
}

#[test]
fn concurrent_acquires_never_pass_a_quota() {
    let e =
        engine("policies: [{name: p, rules: [{id: q, type: quota, resource: engines, max: 10}]}]");
    let allowed = hammer(&e, 200, |e, _| {
        let r = Request {
            resource: Some("engines".into()),
            ..Request::default()
        };
        e.acquire(&r, None, false).allowed
    });
    assert_eq!(allowed, 10);
}

#[test]
fn all_or_nothing_under_contention() {
    // Two limits in one plan: a request refused by the second takes nothing from the first.
    let e = engine(
        "policies: [{name: p, rules: [{id: wide, type: rate, limit: 1000, per: 1h}, {id: narrow, type: rate, limit: 50, per: 1h, by: [user]}]}]",
    );
    let allowed = hammer(&e, 100, |e, i| {
        let mut r = Request::default();
        r.subject.user = Some(format!("u{}", i % 4));
        e.check(&r).allowed
    });
    assert_eq!(allowed, 200); // 4 users × 50
    let d = e.check(&Request::default());
    assert_eq!(
        d.remaining.get("wide"),
        Some(&tollgate::Remaining::Count(799))
    );
}

#[test]
fn budgets_hold_while_records_race_with_checks() {
    let e = engine(
        "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 1, period: total}]}]",
    );
    let allowed = hammer(&e, 300, |e, _| {
        let mut r = Request::default();
        r.estimate.cost_usd = Some(Micros(10_000));
        let d = e.check(&r);
        if d.allowed {
            // The call cost half its estimate: the rest is given back.
            e.record(&d.decision_id, Micros(5_000)).unwrap();
        }
        d.allowed
    });
    let usage = e.usage(None).unwrap();
    assert_eq!(usage[0].reserved_usd, Micros(0));
    assert_eq!(usage[0].spent_usd, Micros(allowed as i64 * 5_000));
    assert!(usage[0].spent_usd <= Micros(1_000_000));
    // Spend can end at most one estimate below the limit.
    assert!(usage[0].spent_usd.0 > 1_000_000 - 10_000, "{:?}", usage[0]);
}

#[test]
fn limits_hold_while_shards_sweep_after_every_plan() {
    // Per-user limits on a ledger that sweeps each shard after every plan: sweeps fall
    // between other threads' plans all the time, and take nothing a limit needs.
    let e = engine_on(
        "policies: [{name: p, rules: [\
         {id: r, type: rate, limit: 150, per: 1h, by: [user]},\
         {id: b, type: budget, limit_usd: 1, period: month, by: [user]}]}]",
        MemoryLedger::sweeping_every(0),
    );
    let allowed = hammer(&e, 400, |e, i| {
        let mut r = Request::default();
        r.subject.user = Some(format!("u{}", i % 16));
        r.estimate.cost_usd = Some(Micros(10_000)); // 100 fit in 1 USD
        e.check(&r).allowed
    });
    assert_eq!(allowed, 16 * 100);
    for u in e.usage(None).unwrap() {
        assert_eq!(u.reserved_usd, Micros(1_000_000), "{u:?}");
    }
}
