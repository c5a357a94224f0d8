//! Random sequences of engine calls — checks, acquires, records, releases, runs, and a
//! clock moved both ways, with extreme amounts and token counts — against a policy with
//! every rule type. Shared by the property tests of every ledger backend (the memory
//! ledger's in `no_panic.rs`, Redis's in `tollgate-redis/tests/random_calls.rs`): no call
//! panics, and what a decision reports left is never negative.

use std::sync::Arc;

use proptest::prelude::*;
use tollgate::decision::Remaining;
use tollgate::duration::Millis;
use tollgate::{Engine, Ledger, ManualClock, Micros, Request, RunSpec};

/// Every rule type, algorithm and period, with modes and budget outcomes mixed.
pub const EVERY_RULE: &str = r#"
reservation_ttl: 1m
pricing:
  gpt-4o: {input: 2.50, output: 10.00}
  gpt-4o-mini: {input: 0.15, output: 0.60}
policies:
  - name: base
    guardrails: [pii-mask]
    rules:
      - {id: bucket, type: rate, limit: 5, per: 1s, burst: 8, by: [user]}
      - {id: fixed, type: rate, limit: 20, per: 1m, algorithm: fixed_window, by: [team]}
      - {id: sliding, type: rate, limit: 50, per: 1h, algorithm: sliding_window, mode: alert}
      - {id: daily, type: budget, limit_usd: 1, period: day, by: [user], overrides: {vip: 1000000}, alert_at: 0.5}
      - {id: weekly, type: budget, limit_usd: 100, period: week, by: [team], on_exceeded: downgrade, downgrade_to: gpt-4o-mini}
      - {id: monthly, type: budget, limit_usd: 1000, period: month, on_exceeded: alert}
      - {id: rolling, type: budget, limit_usd: 10, period: "rolling:36500d", by: [model]}
      - {id: forever, type: budget, limit_usd: 9223372036854, period: total, mode: shadow}
      - {id: velocity, type: cost_velocity, limit_usd: 5, window: 1h, by: [user]}
      - {id: forecast, type: forecast, monthly_budget_usd: 100, lookback: 7d}
      - {id: engines, type: quota, resource: engines, max: 2, by: [user]}
      - {id: access, type: access, label_keys: [input], clearances: {analyst: [public, internal]}}
      - {id: no-gpt4, type: restrict_models, deny: ["gpt-4"]}
      - {id: trial, type: downgrade, to: gpt-4o-mini, when: 'labels.plan == "trial"'}
      - {id: cap, type: max_cost_per_request, limit_usd: 50}
      - {id: huge, type: expression, deny_if: 'has(estimate.input_tokens) && estimate.input_tokens > 1000000'}
"#;

#[derive(Clone, Debug)]
pub enum Call {
    Check(Request),
    Acquire(Request, Option<i64>),
    /// Records the `n`th decision so far (or an unknown id) at this cost.
    Record(prop::sample::Index, i64),
    /// Releases the `n`th lease so far.
    Release(prop::sample::Index),
    /// Creates a run (the next checks may name it).
    Run(Option<i64>, bool),
    /// Moves the clock (backwards too).
    Advance(i64),
}

fn name() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        prop::sample::select(vec!["u1", "u2", "vip", "t1", "r0", "🙂"])
            .prop_map(|s| Some(s.to_string())),
        "\\PC{0,12}".prop_map(Some),
    ]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..2_000_000,
        1 => Just(i64::MAX),
        1 => Just(i64::MAX / 2),
        1 => 0i64..i64::MAX,
        1 => i64::MIN..0,
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let tokens = prop_oneof![
        Just(None),
        (0u64..5_000_000).prop_map(Some),
        Just(Some(u64::MAX))
    ];
    (
        (name(), name(), name(), name()),
        prop::option::of(prop::sample::select(vec![
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4",
            "unpriced",
        ])),
        prop::option::of(prop::sample::select(vec!["public", "internal", "secret"])),
        prop::option::of(prop::sample::select(vec!["trial", "pro"])),
        (prop::option::of(amount()), tokens.clone(), tokens),
        prop::option::of(prop::sample::select(vec!["engines", "other"])),
    )
        .prop_map(
            |((user, team, agent, run), model, input, plan, estimate, resource)| {
                let mut r = Request::default();
                r.subject.user = user;
                r.subject.team = team;
                r.subject.agent = agent;
                r.subject.run = run;
                r.model = model.map(str::to_string);
                if let Some(i) = input {
                    r.labels.insert("input".into(), i.into());
                }
                if let Some(p) = plan {
                    r.labels.insert("plan".into(), p.into());
                }
                r.estimate.cost_usd = estimate.0.map(Micros);
                r.estimate.input_tokens = estimate.1;
                r.estimate.output_tokens = estimate.2;
                r.resource = resource.map(str::to_string);
                r
            },
        )
}

pub fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        6 => request().prop_map(Call::Check),
        2 => (request(), prop::option::of(prop_oneof![1i64..=Millis::MAX.0, Just(i64::MAX)])).prop_map(|(r, t)| Call::Acquire(r, t)),
        3 => (any::<prop::sample::Index>(), amount()).prop_map(|(i, c)| Call::Record(i, c)),
        1 => any::<prop::sample::Index>().prop_map(Call::Release),
        1 => (prop::option::of(amount()), any::<bool>()).prop_map(|(b, p)| Call::Run(b, p)),
        3 => prop_oneof![-100_000_000_000i64..100_000_000_000, 0i64..10_000].prop_map(Call::Advance),
    ]
}

/// `default` cases, or `PROPTEST_CASES` when set.
pub fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok());
    ProptestConfig::with_cases(cases.unwrap_or(default))
}

/// An engine over `ledger` on a manual clock at 2026-02-28 (the leap day and a month turn
/// are a day away), with [`EVERY_RULE`].
pub fn engine(ledger: Arc<dyn Ledger>) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_772_236_800_000));
    let engine = Engine::builder()
        .clock(clock.clone())
        .ledger(ledger)
        .build_from_text(EVERY_RULE)
        .unwrap();
    (engine, clock)
}

/// Makes the calls; fails (or panics) as the property says.
pub fn run(engine: &Engine, clock: &ManualClock, calls: Vec<Call>) -> Result<(), TestCaseError> {
    let (mut decisions, mut leases, mut runs): (Vec<String>, Vec<String>, Vec<String>) =
        (Vec::new(), Vec::new(), Vec::new());
    for call in calls {
        let decision = match call {
            Call::Check(mut r) => {
                if r.subject.run.as_deref() == Some("r0") && !runs.is_empty() {
                    r.subject.run = runs.last().cloned();
                }
                Some(engine.check(&r))
            }
            Call::Acquire(r, ttl) => Some(engine.acquire(&r, ttl.map(Millis), false)),
            Call::Record(i, cost) => {
                let id = if decisions.is_empty() {
                    "00000000-0000-7000-8000-000000000000".to_string()
                } else {
                    decisions[i.index(decisions.len())].clone()
                };
                let _ = engine.record(&id, Micros(cost));
                None
            }
            Call::Release(i) => {
                if !leases.is_empty() {
                    let _ = engine.release(&leases[i.index(leases.len())]);
                }
                None
            }
            Call::Run(budget, child) => {
                let spec = RunSpec {
                    budget_usd: budget.map(Micros),
                    parent: if child { runs.last().cloned() } else { None },
                    ..RunSpec::default()
                };
                if let Ok(info) = engine.create_run(spec) {
                    runs.push(info.id);
                }
                None
            }
            Call::Advance(ms) => {
                clock.advance(ms);
                None
            }
        };
        if let Some(d) = decision {
            for (rule, left) in &d.remaining {
                let negative = match left {
                    Remaining::Count(n) => *n < 0,
                    Remaining::Usd(m) => m.0 < 0,
                };
                prop_assert!(!negative, "{rule}: {left:?} left");
            }
            if let Some(lease) = d.lease_id.clone() {
                leases.push(lease);
            }
            decisions.push(d.decision_id.to_string());
        }
    }
    let _ = engine.usage(None);
    Ok(())
}
