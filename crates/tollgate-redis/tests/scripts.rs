//! Scripts are called by SHA and loaded again when Redis no longer has them (a restart,
//! a `SCRIPT FLUSH`), with the counters as they were (needs `TOLLGATE_TEST_REDIS`).

use std::sync::{Arc, Mutex};

use tollgate::{Engine, Ledger, ManualClock, Micros, Remaining, Request};
use tollgate_redis::RedisLedger;

/// The tests here run one at a time: one of them flushes every script Redis holds.
static SERIAL: Mutex<()> = Mutex::new(());

/// A Redis ledger of the test's own and an engine over it, on a manual clock, with the
/// Redis URL; `None` (with a note) when `TOLLGATE_TEST_REDIS` is not set.
fn over_redis(test: &str, policy: &str) -> Option<(Arc<RedisLedger>, Engine, String)> {
    let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS") else {
        eprintln!("note: TOLLGATE_TEST_REDIS is not set; skipping");
        return None;
    };
    let prefix = format!("tollgate-test:{test}:{}", std::process::id());
    let ledger = Arc::new(RedisLedger::connect(&url, &prefix, 1).unwrap());
    let engine = Engine::builder()
        .clock(Arc::new(ManualClock::new(1_767_225_600_000)))
        .ledger(ledger.clone())
        .build_from_text(policy)
        .unwrap();
    Some((ledger, engine, url))
}

/// A check by user `u` estimated at `cost`.
fn user_request(cost: Micros) -> Request {
    let mut request = Request::default();
    request.subject.user = Some("u".into());
    request.estimate.cost_usd = Some(cost);
    request
}

#[test]
fn a_flushed_script_is_loaded_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ledger, engine, url)) = over_redis(
        "scripts",
        "policies: [{name: p, rules: [
           {id: rpm, type: rate, limit: 2, per: 1h, by: [user]},
           {id: b, type: budget, limit_usd: 10, period: total, by: [user]}]}]",
    ) else {
        return;
    };
    let request = user_request(Micros(400_000));
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut allowed = Vec::new();
    for _ in 0..4 {
        // Before every check: Redis forgets every script.
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query::<()>(&mut redis)
            .unwrap();
        let decision = engine.check(&request);
        allowed.push((decision.allowed, decision.rule, decision.reason));
    }
    // Cleaned up before asserting, so that a failure leaves no keys behind.
    ledger.delete_all().unwrap();
    let backend_failures: Vec<_> = allowed
        .iter()
        .filter_map(|(_, _, reason)| reason.as_deref().filter(|r| r.contains("backend")))
        .collect();
    assert!(backend_failures.is_empty(), "{backend_failures:?}");
    let allowed: Vec<_> = allowed.into_iter().map(|(a, rule, _)| (a, rule)).collect();
    // The bucket kept its two requests of the hour through every flush.
    assert_eq!(
        allowed,
        [
            (true, None),
            (true, None),
            (false, Some("rpm".into())),
            (false, Some("rpm".into())),
        ]
    );
}

#[test]
fn large_amounts_come_back_from_the_script_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 5,000,000,000 USD is 5 × 10^15 micro-dollars: sixteen digits, more than Lua's own
    // number-to-text conversion keeps.
    let Some((ledger, engine, _)) = over_redis(
        "scripts-large",
        "policies: [{name: p, rules: [
           {id: b, type: budget, limit_usd: 5000000000, period: total, by: [user]}]}]",
    ) else {
        return;
    };
    let decision = engine.check(&user_request(Micros(1)));
    ledger.delete_all().unwrap();
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(
        decision.remaining.get("b"),
        Some(&Remaining::Usd(Micros(4_999_999_999_999_999)))
    );
}

/// An estimate of `i64::MAX` micro-dollars in an alert-mode budget reserves at most
/// `Micros::MAX_RECORDED`: Redis sums in doubles, and the whole estimate used to leave the
/// $10 budget reporting 8 trillion dollars left, with no alert, on the next check.
#[test]
fn a_huge_estimate_does_not_wrap_a_redis_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_ledger, engine, _url)) = over_redis(
        "huge",
        "policies: [{name: p, rules: [
           {id: b, type: budget, limit_usd: 10, period: month, by: [user], mode: alert}]}]",
    ) else {
        return;
    };
    for cost in [Micros(i64::MAX), Micros(1 << 60), Micros(5)] {
        let decision = engine.check(&user_request(cost));
        assert!(decision.allowed, "alert mode never refuses");
        assert_eq!(
            decision.remaining["b"],
            Remaining::Usd(Micros::ZERO),
            "{cost:?}"
        );
        assert_eq!(decision.alerts.len(), 1, "{cost:?}: {decision:?}");
    }
    let usage = engine.usage(None).unwrap();
    assert_eq!(usage[0].remaining_usd, Micros::ZERO);
    // Each of the two huge estimates reserved the most one call can record. The sum is past
    // 2^53, where Redis's doubles are no longer exact (it reads 2^54 + 4, not + 3), but it
    // has not wrapped round.
    let reserved = usage[0].reserved_usd.0;
    assert!(
        (2 * Micros::MAX_RECORDED.0..=2 * Micros::MAX_RECORDED.0 + 8).contains(&reserved),
        "{reserved}"
    );
}

/// A cost that would take a counter's recorded spend past what Redis holds is refused
/// before the script writes anything: the reservation stays, and the decision can still be
/// recorded (a script that failed halfway used to drop the reservation first).
#[test]
fn a_record_past_what_redis_holds_changes_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ledger, engine, _url)) = over_redis(
        "overflow",
        "policies: [{name: p, rules: [
           {id: b, type: budget, limit_usd: 10, period: total, by: [user]}]}]",
    ) else {
        return;
    };
    let decision = engine.check(&user_request(Micros(2_000_000)));
    let id = u128::from_str_radix(&decision.decision_id.replace('-', ""), 16).unwrap();
    let refused = ledger.record(id, Micros(i64::MAX), 0);
    let usage = engine.usage(None).unwrap();
    assert_eq!(
        (usage[0].spent_usd, usage[0].reserved_usd),
        (Micros::ZERO, Micros(2_000_000))
    );
    let err = refused.unwrap_err();
    assert!(err.0.contains("nothing was recorded"), "{err}");
    assert_eq!(
        ledger.record(id, Micros(1_000_000), 0).unwrap(),
        tollgate::RecordOutcome::Recorded
    );
    let usage = engine.usage(None).unwrap();
    assert_eq!(
        (usage[0].spent_usd, usage[0].reserved_usd),
        (Micros(1_000_000), Micros::ZERO)
    );
}
