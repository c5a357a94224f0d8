//! The ledger conformance suite and every scenario file against Redis (needs
//! `TOLLGATE_TEST_REDIS`; skipped with a note without it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::Clock;
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

/// An engine over `ledger` (in memory when `None`) on a manual clock that starts at
/// 1,000,000 ms.
fn engine_on(
    ledger: Option<RedisLedger>,
    policy: &str,
) -> (tollgate::Engine, Arc<tollgate::ManualClock>) {
    let clock = Arc::new(tollgate::ManualClock::new(1_000_000));
    let mut builder = tollgate::Engine::builder().clock(clock.clone());
    if let Some(ledger) = ledger {
        builder = builder.ledger(Arc::new(ledger));
    }
    (builder.build_from_text(policy).unwrap(), clock)
}

/// The same, over Redis.
fn engine(ledger: RedisLedger, policy: &str) -> (tollgate::Engine, Arc<tollgate::ManualClock>) {
    engine_on(Some(ledger), policy)
}

/// A plain connection, to read and write keys as another version would.
fn connection(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
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
    let mut redis = connection(&url);
    let key = format!(r#"{prefix}:c:["p","rps","u1"]:b"#);
    let mut read = || -> (i64, i64) {
        // a 1 byte, then units, last take and deadline as little-endian doubles
        let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut redis).unwrap();
        assert_eq!((value.len(), value[0]), (25, 1), "{value:?}");
        let deadline = f64::from_le_bytes(value[17..25].try_into().unwrap()) as i64;
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

/// Rate counters that versions before 2026-12 wrote as text (`'<a> <b> <deadline>'`) are
/// read as they are: a bucket with one token left and a window with one request left each
/// admit exactly one more.
#[test]
fn rate_counters_written_as_text_are_read() {
    let Some(url) = url() else { return };
    let prefix = format!("{}:0", namespace("text-counters"));
    let (engine, _clock) = engine(
        RedisLedger::connect(&url, &prefix, 1).unwrap(),
        "policies: [{name: p, rules: [
           {id: rph, type: rate, limit: 3, per: 1h, by: [user]},
           {id: rpm, type: rate, algorithm: fixed_window, limit: 2, per: 1m, by: [team]}]}]",
    );
    let mut redis = connection(&url);
    let mut set = |key: String, value: String| {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query::<()>(&mut redis)
            .unwrap()
    };
    // 1,000,000 ms: the bucket (3 tokens of an hour each) has one hour's units left; the
    // window of that minute has counted one request of two.
    let now: i64 = 1_000_000;
    set(
        format!(r#"{prefix}:c:["p","rph","u1"]:b"#),
        format!("3600000 {now} {}", now + 10_000_000),
    );
    set(
        format!(r#"{prefix}:c:["p","rpm","t1"]:w"#),
        format!("{} 1 {}", now / 60_000, now + 60_000),
    );
    let mut user = tollgate::Request::default();
    user.subject.user = Some("u1".into());
    let mut team = tollgate::Request::default();
    team.subject.team = Some("t1".into());
    let answers = [
        engine.check(&user).allowed,
        engine.check(&user).allowed,
        engine.check(&team).allowed,
        engine.check(&team).allowed,
    ];
    cleanup(&url, "text-counters");
    assert_eq!(answers, [true, false, true, false]);
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

/// Redis and the in-memory ledger give the same decisions through day turns and a short
/// rolling window, with reservations live across the turns, recorded and lapsing: the
/// sum kept of reservations from before a turn follows every change.
#[test]
fn redis_agrees_with_memory_across_period_turns() {
    let Some(url) = url() else { return };
    let policy = "policies: [{name: p, rules: [
        {id: daily, type: budget, limit_usd: 0.00004, period: day},
        {id: burst, type: budget, limit_usd: 0.00003, period: 'rolling:5m'}]}]";
    let (on_redis, redis_clock) = engine(fresh(&url, "turns"), policy);
    let (on_memory, memory_clock) = engine_on(None, policy);
    // 20 minutes before a UTC midnight
    let start = 1_767_225_600_000 - 20 * 60_000;
    redis_clock.set(start);
    memory_clock.set(start);

    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // decisions to record, with their check time: recorded within 20 minutes (a Redis
    // key's lifetime runs on Redis's clock, not on the manual one)
    let mut allowed: Vec<(tollgate::DecisionId, tollgate::DecisionId, i64)> = Vec::new();
    for step in 0..600 {
        match next(6) {
            0 | 1 => {
                let mut request = tollgate::Request::default();
                request.estimate.cost_usd = Some(tollgate::Micros(1 + next(4) as i64));
                let (r, m) = (on_redis.check(&request), on_memory.check(&request));
                assert_eq!(
                    (r.allowed, r.code, &r.rule, &r.remaining, r.retry_after_ms),
                    (m.allowed, m.code, &m.rule, &m.remaining, m.retry_after_ms),
                    "step {step}"
                );
                if r.allowed {
                    allowed.push((r.decision_id, m.decision_id, memory_clock.now_ms()));
                }
            }
            2 if !allowed.is_empty() => {
                let (r, m, at) = allowed.swap_remove(next(allowed.len() as u64) as usize);
                if memory_clock.now_ms() - at > 20 * 60_000 {
                    continue;
                }
                let cost = tollgate::Micros(next(3) as i64);
                assert_eq!(
                    on_redis.record(&r, cost).unwrap(),
                    on_memory.record(&m, cost).unwrap(),
                    "step {step}"
                );
            }
            _ => {
                let ms = next(90_000) as i64;
                redis_clock.advance(ms);
                memory_clock.advance(ms);
            }
        }
    }
    let usage = |e: &tollgate::Engine| {
        e.usage(None)
            .unwrap()
            .into_iter()
            .map(|u| (u.rule, u.spent_usd, u.reserved_usd))
            .collect::<Vec<_>>()
    };
    assert_eq!(usage(&on_redis), usage(&on_memory));
    cleanup(&url, "turns");
}

/// A refusal on a busy trailing window says when to retry by walking the window from the
/// oldest spend, page by page in Redis: the same answer as the in-memory ledger's.
#[test]
fn retry_after_walks_a_long_window_as_memory_does() {
    let Some(url) = url() else { return };
    let policy = "policies: [{name: p, rules: [{id: cv, type: cost_velocity, limit_usd: 0.0003, window: 1h}]}]";
    let (on_redis, redis_clock) = engine(fresh(&url, "walk"), policy);
    let (on_memory, memory_clock) = engine_on(None, policy);
    let mut small = tollgate::Request::default();
    small.estimate.cost_usd = Some(tollgate::Micros(1));
    // 250 recorded micro-dollars one second apart, then 40 live reservations
    for i in 0..290 {
        for (engine, clock) in [(&on_redis, &redis_clock), (&on_memory, &memory_clock)] {
            let decision = engine.check(&small);
            assert!(decision.allowed, "{i}");
            if i < 250 {
                engine
                    .record(&decision.decision_id, tollgate::Micros(1))
                    .unwrap();
            }
            clock.advance(1_000);
        }
    }
    let mut large = tollgate::Request::default();
    large.estimate.cost_usd = Some(tollgate::Micros(150));
    let (r, m) = (on_redis.check(&large), on_memory.check(&large));
    assert!(!r.allowed);
    // 140 must leave the window: the 140th oldest was spent at 1,139,000
    assert_eq!(
        m.retry_after_ms,
        Some(1_139_000 + 3_600_000 + 1 - 1_290_000)
    );
    assert_eq!(r.retry_after_ms, m.retry_after_ms);
    cleanup(&url, "walk");
}

/// A calendar budget keeps one recorded event a day in Redis, however many calls it
/// records (before: one per call until the period turned), and reports the exact sum.
#[test]
fn calendar_spend_is_one_event_a_day() {
    let Some(url) = url() else { return };
    let (engine, clock) = engine(
        fresh(&url, "days"),
        "policies: [{name: p, rules: [{id: monthly, type: budget, limit_usd: 1000, period: month}]}]",
    );
    // 2026-03-02T20:00Z: 2,000 calls a minute apart (until 05:20 two days later) cross
    // two midnights.
    clock.set(1_772_481_600_000);
    let mut request = tollgate::Request::default();
    request.estimate.cost_usd = Some(tollgate::Micros(1));
    for i in 0..2_000 {
        clock.advance(60_000);
        let decision = engine.check(&request);
        assert!(decision.allowed);
        let cost = tollgate::Micros(1 + i % 7);
        engine.record(&decision.decision_id, cost).unwrap();
    }
    let spent: i64 = (0..2_000).map(|i| 1 + i % 7).sum();
    assert_eq!(
        engine.usage(None).unwrap()[0].spent_usd,
        tollgate::Micros(spent)
    );
    let mut c = connection(&url);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*:ev", namespace("days")))
        .query(&mut c)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let events: usize = redis::cmd("ZCARD").arg(&keys[0]).query(&mut c).unwrap();
    let all: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(&keys[0])
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        events,
        3,
        "one event for each of the three days: {:?}…",
        &all[..all.len().min(4)]
    );
    cleanup(&url, "days");
}

/// A 1-dollar month budget over a fresh Redis ledger (kept, to restore into it) on a
/// manual clock at 2026-03-02T20:00Z.
fn monthly_budget(
    url: &str,
    test: &str,
) -> (
    Arc<RedisLedger>,
    tollgate::Engine,
    Arc<tollgate::ManualClock>,
) {
    let ledger = Arc::new(fresh(url, test));
    let clock = Arc::new(tollgate::ManualClock::new(1_772_481_600_000));
    let engine = tollgate::Engine::builder()
        .clock(clock.clone())
        .ledger(ledger.clone())
        .build_from_text(
            "policies: [{name: p, rules: [{id: monthly, type: budget, limit_usd: 1, period: month}]}]",
        )
        .unwrap();
    (ledger, engine, clock)
}

/// The counter of that budget, as the store names it.
fn monthly_sink() -> tollgate::ledger::SpendSink {
    tollgate::ledger::SpendSink {
        policy: "p".into(),
        rule: "monthly".into(),
        by: Vec::new(),
        values: Vec::new(),
    }
}

/// After a loss, a decision recorded since (kept in its day's event) is not counted
/// again when the store replays it.
#[test]
fn a_decision_recorded_since_a_loss_is_not_restored_twice() {
    use tollgate::ledger::Restore;
    let Some(url) = url() else { return };
    let (ledger, engine, clock) = monthly_budget(&url, "replay");
    let decision = engine.check(&tollgate::Request::default());
    engine
        .record(&decision.decision_id, tollgate::Micros(5))
        .unwrap();
    let id = u128::from_str_radix(&decision.decision_id.replace('-', ""), 16).unwrap();
    let sink = monthly_sink();
    ledger
        .restore_spend(id, &[sink], clock.now_ms(), tollgate::Micros(5))
        .unwrap();
    assert_eq!(
        engine.usage(None).unwrap()[0].spent_usd,
        tollgate::Micros(5)
    );
    cleanup(&url, "replay");
}

/// A day of spend given back as one sum (the store's older days) counts once however
/// often it is replayed, and reads like the calls it sums for a calendar budget.
#[test]
fn a_day_sum_is_restored_once() {
    use tollgate::ledger::Restore;
    let Some(url) = url() else { return };
    let (ledger, engine, clock) = monthly_budget(&url, "day-sum");
    let sink = monthly_sink();
    let yesterday = clock.now_ms() - 86_400_000;
    for _ in 0..2 {
        ledger
            .restore_spend_day(&sink, yesterday, tollgate::Micros(400_000))
            .unwrap();
    }
    let decision = engine.check(&tollgate::Request::default());
    assert_eq!(
        decision.remaining.get("monthly"),
        Some(&tollgate::decision::Remaining::Usd(tollgate::Micros(
            600_000
        )))
    );
    cleanup(&url, "day-sum");
}
