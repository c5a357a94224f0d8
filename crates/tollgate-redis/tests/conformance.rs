//! The ledger conformance suite and every scenario file against Redis (needs
//! `TOLLGATE_TEST_REDIS`; skipped with a note without it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::ledger::{Ledger, conformance};
use tollgate_redis::RedisLedger;

fn url() -> Option<String> {
    let url = std::env::var("TOLLGATE_TEST_REDIS").ok();
    if url.is_none() {
        eprintln!("note: TOLLGATE_TEST_REDIS is not set; skipping the Redis ledger tests");
    }
    url
}

/// The keys of one test of this process.
fn namespace(test: &str) -> String {
    format!("tollgate-test:{}:{test}", std::process::id())
}

/// A ledger in a namespace of its own, so no two ledgers see each other's keys.
fn fresh(url: &str, test: &str) -> RedisLedger {
    static N: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("{}:{}", namespace(test), N.fetch_add(1, Ordering::Relaxed));
    RedisLedger::connect(url, &prefix, 2).expect("TOLLGATE_TEST_REDIS must be reachable")
}

/// Removes every key one test wrote.
fn cleanup(url: &str, test: &str) {
    RedisLedger::connect(url, &namespace(test), 1)
        .unwrap()
        .delete_all()
        .unwrap();
}

/// An engine over `ledger` on a manual clock that starts at 1,000,000 ms.
fn engine(ledger: RedisLedger, policy: &str) -> (tollgate::Engine, Arc<tollgate::ManualClock>) {
    let clock = Arc::new(tollgate::ManualClock::new(1_000_000));
    let engine = tollgate::Engine::builder()
        .clock(clock.clone())
        .ledger(Arc::new(ledger))
        .build_from_text(policy)
        .unwrap();
    (engine, clock)
}

#[test]
fn redis_ledger_conforms() {
    let Some(url) = url() else { return };
    conformance::run_all("redis", &|| Box::new(fresh(&url, "conformance")));
    cleanup(&url, "conformance");
}

#[test]
fn scenario_files_pass_on_redis() {
    let Some(url) = url() else { return };
    let dirs = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/scenarios"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/conformance"),
    ];
    let mut failures = Vec::new();
    let mut count = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let base = file.parent().unwrap().to_path_buf();
            let load =
                move |rel: &str| std::fs::read_to_string(base.join(rel)).map_err(|e| e.to_string());
            let make = || -> Arc<dyn Ledger> { Arc::new(fresh(&url, "scenarios")) };
            for o in tollgate::scenario::run_text_with(&text, &load, &make) {
                count += 1;
                for f in o.failures {
                    failures.push(format!("{}: {}: {f}", file.display(), o.name));
                }
            }
        }
    }
    cleanup(&url, "scenarios");
    assert!(count > 50, "only {count} scenarios found");
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A token bucket's key lives until its bucket is full again, and its lifetime is set
/// only when it must grow (`KEEPTTL` otherwise): the deadline kept in the value is the
/// key's, and a take that the deadline covers leaves the lifetime as it was.
#[test]
fn rate_keys_lapse_when_full_and_keep_lifetimes_that_cover_them() {
    let Some(url) = url() else { return };
    let prefix = format!("{}:0", namespace("lifetimes"));
    let (engine, clock) = engine(
        RedisLedger::connect(&url, &prefix, 1).unwrap(),
        "policies: [{name: p, rules: [{id: rps, type: rate, limit: 1000, per: 1s, by: [user]}]}]",
    );
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let key = format!(r#"{prefix}:c:["p","rps","u1"]:b"#);
    let mut read = || -> (i64, i64) {
        let value: String = redis::cmd("GET").arg(&key).query(&mut redis).unwrap();
        let deadline = value.rsplit(' ').next().unwrap().parse().unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut redis).unwrap();
        (deadline, ttl)
    };
    let mut request = tollgate::Request::default();
    request.subject.user = Some("u1".into());

    // one token of 1000 refills in 1 ms: full again 1 ms after the take, plus a second
    // of grace and a second of room
    assert!(engine.check(&request).allowed);
    let (deadline, ttl) = read();
    assert_eq!(deadline, 1_000_000 + 1 + 1000 + 1000);
    assert!(ttl > 1500 && ttl <= 2001, "{ttl}");

    // a take 5 ms later needs the key until 1_000_006 + 1000: covered, so kept
    clock.advance(5);
    assert!(engine.check(&request).allowed);
    let (kept, ttl_after) = read();
    assert_eq!(kept, deadline);
    assert!(ttl_after <= ttl, "lifetime set again: {ttl} → {ttl_after}");

    // 1.5 s later the deadline no longer covers the key: a new lifetime
    clock.advance(1500);
    assert!(engine.check(&request).allowed);
    let (moved, ttl) = read();
    assert_eq!(moved, 1_001_505 + 1 + 1000 + 1000);
    assert!(ttl > 1500 && ttl <= 2001, "{ttl}");
    cleanup(&url, "lifetimes");
}

/// Thousands of reservations lapsing together (a burst of checks never recorded) are
/// dropped in one check, however many: more than a Lua `unpack` takes at once.
#[test]
fn a_burst_of_lapsed_reservations_is_dropped_at_once() {
    let Some(url) = url() else { return };
    let (engine, clock) = engine(
        fresh(&url, "burst"),
        "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 1000, period: total}]}]",
    );
    let mut request = tollgate::Request::default();
    request.estimate.cost_usd = Some(tollgate::Micros(1));
    const BURST: usize = 9_000;
    for _ in 0..BURST {
        assert!(engine.check(&request).allowed);
    }
    let reserved = |engine: &tollgate::Engine| engine.usage(None).unwrap()[0].reserved_usd;
    assert_eq!(reserved(&engine), tollgate::Micros(BURST as i64));
    // past the 15-minute reservation TTL every one of them lapses
    clock.advance(15 * 60_000 + 1);
    let decision = engine.check(&request);
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(reserved(&engine), tollgate::Micros(1));
    cleanup(&url, "burst");
}

/// Thousands of recorded costs leaving a rolling window together are folded in one check.
#[test]
fn a_burst_of_spend_leaving_its_window_is_folded_at_once() {
    let Some(url) = url() else { return };
    let (engine, clock) = engine(
        fresh(&url, "fold"),
        "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 1000, period: 'rolling:1h'}]}]",
    );
    let request = tollgate::Request::default();
    const BURST: i64 = 9_000;
    for _ in 0..BURST {
        let decision = engine.check(&request);
        assert!(decision.allowed);
        engine
            .record(&decision.decision_id, tollgate::Micros(1))
            .unwrap();
    }
    let spent = |engine: &tollgate::Engine| engine.usage(None).unwrap()[0].spent_usd;
    assert_eq!(spent(&engine), tollgate::Micros(BURST));
    clock.advance(3_600_000 + 1);
    let decision = engine.check(&request);
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(spent(&engine), tollgate::Micros(0));
    cleanup(&url, "fold");
}
