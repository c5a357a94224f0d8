//! The cost of each rule type on its own: one-rule policies over 100,000 users.
//! `cargo run --release -p tollgate --example rule_costs` (set ONLY=<text> to pick rules,
//! ITER=<n> checks a policy, USERS=<n> to check that many users instead of 100,000,
//! TICK_MS=<ms> to move the clock before each check so that
//! reservations and decision records lapse as they would, PREAMBLE=<yaml> to prefix each
//! policy document, e.g. `reservation_ttl: 1s`, THRASH_KB=<kb> to write that much memory
//! before each timed check, as a server's sockets and HTTP code do between two checks, and
//! time the checks alone, on cold caches), RECORD=<micro-dollars> to record each decision
//! at that cost right after its check, as a two-phase client does (the time is then a
//! check's and its record's). Each line gives the time and allocations
//! per check and the heap the timed checks left allocated, per check (what the ledger
//! keeps: reservations and decision records until they lapse, with their queues' slack).

use std::alloc::{GlobalAlloc, Layout};

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tollgate_alloc::Mimalloc;

/// Counts allocations, to report allocations per decision next to the time; allocates
/// with mimalloc, as the server binary does.
struct Counting;
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { Mimalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { Mimalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { Mimalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tollgate::ledger::{Apply, CounterKey, LedgerError, OpResult, OpResults, Plan, SpendUsage};
use tollgate::{Engine, Ledger, ManualClock, Micros, RecordOutcome};

/// Grants every operation and keeps nothing: what a decision costs apart from its state.
struct NullLedger;

impl Ledger for NullLedger {
    fn apply(&self, plan: &Plan<'_>, _: Apply) -> Result<OpResults, LedgerError> {
        let granted = OpResult {
            granted: true,
            used: 0,
            remaining: 1,
            retry_after_ms: None,
        };
        Ok(std::iter::repeat_n(granted, plan.ops.len()).collect())
    }
    fn spend_used(&self, _: &CounterKey<'_>, _: i64, _: i64) -> Result<Micros, LedgerError> {
        Ok(Micros(0))
    }
    fn record(&self, _: u128, _: Micros, _: i64) -> Result<RecordOutcome, LedgerError> {
        Ok(RecordOutcome::Recorded)
    }
    fn release(&self, _: u128, _: i64) -> Result<bool, LedgerError> {
        Ok(false)
    }
    fn spend_usage(&self, _: Option<(&str, &str)>, _: i64, _: WindowOf) -> Usage {
        Ok(Vec::new())
    }
}

/// Writes one byte per cache line of `buf`: what a server's network stack and HTTP code
/// do to the caches between two checks.
fn evict(buf: &mut [u8]) {
    for i in (0..buf.len()).step_by(64) {
        buf[i] = buf[i].wrapping_add(1);
    }
    std::hint::black_box(&buf);
}

/// A number from the environment, or `default` when unset or not a number.
fn env_number<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type WindowOf<'a> = &'a dyn Fn(&str, &str) -> Option<i64>;
type Usage = Result<Vec<SpendUsage>, LedgerError>;

#[path = "../benches/common/mod.rs"]
mod common;
fn main() {
    let only = std::env::var("ONLY").ok();
    let rules = [
        "[]",
        "[{id: rpm, type: rate, limit: 1000000, per: 1m, by: [user]}]",
        "[{id: monthly, type: budget, limit_usd: 1000000, period: month, by: [user], alert_at: 0.9}]",
        "[{id: velocity, type: cost_velocity, limit_usd: 1000000, window: 1h, by: [team]}]",
        "[{id: forecast, type: forecast, monthly_budget_usd: 100000000, lookback: 7d}]",
        "[{id: engines, type: quota, resource: engines, max: 10, by: [user]}]",
        "[{id: access, type: access, label_keys: [input], clearances: {analyst: [public, internal]}}]",
        "[{id: no-gpt4, type: restrict_models, deny: [\"gpt-4\"]}]",
        "[{id: trial, type: downgrade, to: gpt-4o-mini, when: 'labels.plan == \"trial\"'}]",
        "[{id: cap, type: max_cost_per_request, limit_usd: 5}]",
        "[{id: huge, type: expression, deny_if: 'has(estimate.input_tokens) && estimate.input_tokens > 1000000'}]",
    ];
    let reqs = common::requests(env_number("USERS", 100_000));
    // Last, all ten together.
    let all = format!(
        "[{}]",
        rules[1..]
            .iter()
            .map(|r| r.trim_start_matches('[').trim_end_matches(']'))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut rules: Vec<&str> = rules.to_vec();
    rules.push(&all);
    let tick: i64 = env_number("TICK_MS", 0);
    let thrash_kb: usize = env_number("THRASH_KB", 0);
    let record: Option<i64> = std::env::var("RECORD").ok().and_then(|v| v.parse().ok());
    let mut thrash = vec![0u8; thrash_kb * 1024];
    for r in rules
        .iter()
        .filter(|r| only.as_deref().is_none_or(|o| r.contains(o)))
    {
        let clock = Arc::new(ManualClock::new(1_767_225_600_000));
        let mut builder = Engine::builder().clock(clock.clone());
        if std::env::var_os("NULL_LEDGER").is_some() {
            builder = builder.ledger(Arc::new(NullLedger));
        }
        let e = builder
            .build_from_text(&format!(
                "{}policies: [{{name: p, rules: {r}}}]",
                std::env::var("PREAMBLE").unwrap_or_default()
            ))
            .unwrap();
        let n: usize = env_number("ITER", 300_000);
        // Every user's counters exist before timing: the steady state, not creation.
        // A timed check on cold caches is timed alone, without the eviction before it.
        let mut cold_checks = Duration::ZERO;
        let mut check = |r, timed: bool| {
            if tick != 0 {
                clock.advance(tick);
            }
            if timed && thrash_kb != 0 {
                evict(&mut thrash);
                let t = Instant::now();
                std::hint::black_box(e.check(r));
                cold_checks += t.elapsed();
            } else {
                let d = e.check(r);
                if let Some(cost) = record {
                    let id = d.decision_id.to_string();
                    std::hint::black_box(e.record(&id, Micros(cost)).unwrap());
                }
                std::hint::black_box(d);
            }
        };
        for r in &reqs {
            check(r, false);
        }
        let allocations = ALLOCATIONS.load(Ordering::Relaxed);
        let live = LIVE_BYTES.load(Ordering::Relaxed);
        let t = Instant::now();
        for i in 0..n {
            check(&reqs[i % reqs.len()], true);
        }
        let elapsed = if thrash_kb == 0 {
            t.elapsed()
        } else {
            cold_checks
        };
        let per = (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / n.max(1) as f64;
        let grown = (LIVE_BYTES.load(Ordering::Relaxed) - live) as f64 / n.max(1) as f64;
        println!(
            "{:>8.0} ns {per:>6.1} allocs {grown:>6.0} B kept  {}",
            elapsed.as_nanos() as f64 / n.max(1) as f64,
            &r[..r.len().min(60)]
        );
    }
}
