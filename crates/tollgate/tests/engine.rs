//! The library API: custom rules, settings, policy replacement, runs, explain.

use std::sync::Arc;

use serde_json::json;
use tollgate::decision::Remaining;
use tollgate::{
    Code, CustomRule, CustomVerdict, Engine, EngineError, Ledger, ManualClock, MemoryLedger,
    Micros, RecordOutcome, Request, RunSpec, Subject,
};

fn request(json: serde_json::Value) -> Request {
    serde_json::from_value(json).unwrap()
}

struct DenyUser;

impl CustomRule for DenyUser {
    fn validate(&self, params: &serde_json::Value) -> Result<(), String> {
        params["user"]
            .as_str()
            .map(|_| ())
            .ok_or_else(|| "`params.user` must be a string".to_string())
    }
    fn check(
        &self,
        request: &Request,
        _: Option<&str>,
        params: &serde_json::Value,
    ) -> CustomVerdict {
        if request.subject.user.as_deref() == params["user"].as_str() {
            CustomVerdict::Deny {
                code: Code::QuotaExceeded,
                reason: "blocked user".into(),
            }
        } else {
            CustomVerdict::Allow
        }
    }
}

#[test]
fn custom_rules_are_validated_and_obey_when_and_modes() {
    let builder = || Engine::builder().custom_rule("deny_user", DenyUser);
    let err = builder()
        .build_from_text(
            "policies: [{name: p, rules: [{id: c, type: deny_user, params: {user: 3}}]}]",
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("`params.user` must be a string"),
        "{err}"
    );
    let err = Engine::builder()
        .build_from_text("policies: [{name: p, rules: [{id: c, type: deny_user}]}]")
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown rule type `deny_user`"),
        "{err}"
    );

    let engine = builder()
        .build_from_text(
            "policies: [{name: p, rules: [
               {id: c, type: deny_user, params: {user: bad}, when: 'action == \"call\"'},
               {id: soft, type: deny_user, params: {user: meh}, mode: alert}]}]",
        )
        .unwrap();
    let d = engine.check(&request(
        json!({"action": "call", "subject": {"user": "bad"}}),
    ));
    assert_eq!(
        (d.allowed, d.code, d.rule.as_deref()),
        (false, Code::QuotaExceeded, Some("c"))
    );
    assert!(
        engine
            .check(&request(
                json!({"action": "other", "subject": {"user": "bad"}})
            ))
            .allowed
    );
    let d = engine.check(&request(json!({"subject": {"user": "meh"}})));
    assert!(d.allowed);
    assert_eq!(d.alerts[0].reason, "blocked user");
}

#[test]
fn settings_overrides_are_checked_and_a_refusal_changes_nothing() {
    let engine = Engine::builder()
        .build_from_text("settings: {size: {type: integer, default: 8, min: 1, max: 64}}")
        .unwrap();
    let subject = Subject {
        team: Some("t".into()),
        ..Subject::default()
    };
    assert!(engine.set_setting("team:t", "size", json!(65)).is_err());
    assert!(
        engine
            .set_setting("tema:t", "size", json!(6))
            .unwrap_err()
            .to_string()
            .contains("bad scope")
    );
    assert!(
        engine
            .set_setting("global", "nope", json!(6))
            .unwrap_err()
            .to_string()
            .contains("unknown setting `nope`")
    );
    assert!(engine.overrides().is_empty());
    assert_eq!(
        engine.set_setting("team:t", "size", json!(6)).unwrap(),
        None
    );
    assert_eq!(
        engine.set_setting("team:t", "size", json!(7)).unwrap(),
        Some(json!(6))
    );
    let s = engine.settings(&subject).unwrap();
    assert_eq!(
        (s["size"].value.clone(), s["size"].source.as_str()),
        (json!(7), "override:team:t")
    );
    // An override that a new policy version no longer admits stops applying.
    engine
        .replace_policy("settings: {size: {type: integer, default: 3, min: 1, max: 4}}")
        .unwrap();
    assert_eq!(engine.settings(&subject).unwrap()["size"].source, "default");
}

#[test]
fn an_invalid_replacement_keeps_the_current_version() {
    let engine = Engine::builder().build_from_text("policies: []").unwrap();
    assert_eq!(engine.policy().version(), 1);
    let err = engine
        .replace_policy("policies: [{name: a}, {name: a}]")
        .unwrap_err();
    assert_eq!(err.errors().count(), 1);
    assert_eq!(engine.policy().version(), 1);
    assert_eq!(engine.replace_policy("policies: [{name: a}]").unwrap(), 2);
    assert_eq!(engine.check(&Request::default()).policy_version, 2);
}

#[test]
fn runs_freeze_the_policy_version() {
    let clock = Arc::new(ManualClock::new(0));
    let engine = Engine::builder()
        .clock(clock)
        .build_from_text(
            "policies: [{name: p, rules: [{id: d, type: restrict_models, deny: [x]}]}]",
        )
        .unwrap();
    let run = engine
        .create_run(RunSpec {
            id: Some("r".into()),
            ..RunSpec::default()
        })
        .unwrap();
    assert_eq!(run.policy_version, 1);
    engine.replace_policy("policies: []").unwrap();
    let in_run = request(json!({"model": "x", "subject": {"run": "r"}}));
    assert_eq!(engine.check(&in_run).policy_version, 1);
    assert!(!engine.check(&in_run).allowed);
    assert!(engine.check(&request(json!({"model": "x"}))).allowed);
    assert_eq!(engine.run("r").unwrap().id, "r");
    let generated = engine.create_run(RunSpec::default()).unwrap();
    assert_eq!(generated.policy_version, 2);
    assert_ne!(generated.id, "r");
}

#[test]
fn decision_ids_are_unique_and_record_refuses_garbage() {
    let engine = Engine::builder().build_from_text("policies: []").unwrap();
    let mut ids: Vec<String> = (0..1000)
        .map(|_| engine.check(&Request::default()).decision_id.to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000);
    assert!(engine.record("nope", tollgate::Micros(1)).is_err());
}

#[test]
fn explain_traces_matching_rules_and_errors() {
    let engine = Engine::builder()
        .build_from_text(
            "policies:\n  - {name: a, match: {team: [x]}}\n  - name: b\n    rules:\n      - {id: e, type: expression, deny_if: 'labels.nope == \"1\"'}\n      - {id: r, type: rate, limit: 1, per: 1m, by: [user]}\n",
        )
        .unwrap();
    let d = engine.check_explained(&Request::default());
    let outcomes: Vec<(Option<&str>, &str)> = d
        .trace
        .iter()
        .map(|t| (t.rule.as_deref(), t.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (None, "not_matched"),
            (None, "matched"),
            (Some("e"), "error"),
            (Some("r"), "skip")
        ]
    );
    assert!(
        d.trace[0].detail.contains("the request has no team"),
        "{:?}",
        d.trace[0]
    );
    assert!(d.trace[3].detail.contains("no `user`"), "{:?}", d.trace[3]);
    assert!(engine.check(&Request::default()).trace.is_empty());
}

/// A ledger that cannot be reached.
struct Down;

impl tollgate::Ledger for Down {
    fn apply(
        &self,
        _: &tollgate::ledger::Plan<'_>,
        _: tollgate::ledger::Apply,
    ) -> Result<tollgate::ledger::OpResults, tollgate::ledger::LedgerError> {
        Err(tollgate::ledger::LedgerError("connection refused".into()))
    }
    fn spend_used(
        &self,
        _: &tollgate::ledger::CounterKey<'_>,
        _: i64,
        _: i64,
    ) -> Result<tollgate::Micros, tollgate::ledger::LedgerError> {
        Err(tollgate::ledger::LedgerError("connection refused".into()))
    }
    fn record(
        &self,
        _: u128,
        _: tollgate::Micros,
        _: i64,
    ) -> Result<tollgate::RecordOutcome, tollgate::ledger::LedgerError> {
        Err(tollgate::ledger::LedgerError("connection refused".into()))
    }
    fn release(&self, _: u128, _: i64) -> Result<bool, tollgate::ledger::LedgerError> {
        Err(tollgate::ledger::LedgerError("connection refused".into()))
    }
    fn spend_usage(
        &self,
        _: Option<(&str, &str)>,
        _: i64,
        _: &dyn Fn(&str, &str) -> Option<i64>,
    ) -> Result<Vec<tollgate::ledger::SpendUsage>, tollgate::ledger::LedgerError> {
        Err(tollgate::ledger::LedgerError("connection refused".into()))
    }
}

#[test]
fn on_backend_error_decides_when_the_ledger_is_down() {
    let engine = Engine::builder()
        .ledger(Arc::new(Down))
        .build_from_text(
            "policies:
  - {name: lenient, on_backend_error: allow, rules: [{id: rpm, type: rate, limit: 10, per: 1m}]}
  - {name: strict, match: {team: [strict]}, rules: [{id: spend, type: budget, limit_usd: 1, period: day}]}
  - {name: models, rules: [{id: no-x, type: restrict_models, deny: [x]}]}",
        )
        .unwrap();
    let d = engine.check(&request(json!({"model": "y"})));
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.alerts.len(), 1);
    assert_eq!(
        (d.alerts[0].policy.as_str(), d.alerts[0].rule.as_str()),
        ("lenient", "rpm")
    );
    assert!(
        d.alerts[0].reason.contains("on_backend_error: allow"),
        "{}",
        d.alerts[0].reason
    );

    let d = engine.check(&request(
        json!({"model": "y", "subject": {"team": "strict"}}),
    ));
    assert_eq!(
        (d.allowed, d.code, d.policy.as_deref()),
        (false, Code::PolicyDenied, Some("strict"))
    );
    assert!(
        d.reason.as_deref().unwrap().contains("connection refused"),
        "{d:?}"
    );
    assert!(d.remaining.is_empty());

    // A rule that denies on its own still decides, whatever the ledger.
    let d = engine.check(&request(
        json!({"model": "x", "subject": {"team": "strict"}}),
    ));
    assert_eq!(d.rule.as_deref(), Some("no-x"));

    let err = Engine::builder()
        .build_from_text("policies: [{name: p, on_backend_error: maybe}]")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("`maybe` is not one of: deny, allow"),
        "{err}"
    );
}

#[test]
fn a_rate_rule_that_becomes_a_budget_under_its_id_counts_recorded_spend() {
    let engine = Engine::builder()
        .clock(Arc::new(ManualClock::new(1_767_225_600_000)))
        .build_from_text(
            "policies: [{name: p, rules: [{id: x, type: rate, limit: 5, per: 1m, by: [user]}]}]",
        )
        .unwrap();
    let ask = request(json!({"subject": {"user": "u1"}, "estimate": {"cost_usd": "0.5"}}));
    assert!(engine.check(&ask).allowed);
    // The same counter id now holds spend: it must be named for the usage and the record.
    engine
        .replace_policy(
            "policies: [{name: p, rules: [{id: x, type: budget, limit_usd: 1, period: total, by: [user]}]}]",
        )
        .unwrap();
    let decision = engine.check(&ask);
    assert!(decision.allowed, "{decision:?}");
    assert_eq!(
        engine
            .record(&decision.decision_id, "0.4".parse().unwrap())
            .unwrap(),
        tollgate::RecordOutcome::Recorded
    );
    let usage = engine.usage(None).unwrap();
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!(
        (
            usage[0].key.as_str(),
            usage[0].spent_usd.to_string().as_str()
        ),
        ("user=u1", "0.400000")
    );
}

#[test]
fn a_counter_keyed_by_model_follows_a_downgrade_between_rules() {
    // `before` and `after` are keyed by the model; the downgrade between them changes it,
    // so `after` counts the model the call will use.
    let engine = Engine::builder()
        .clock(Arc::new(ManualClock::new(1_767_225_600_000)))
        .build_from_text(
            r#"policies: [{name: p, rules: [
                {id: before, type: rate, limit: 100, per: 1m, by: [model]},
                {id: trial, type: downgrade, to: small, when: 'labels.plan == "trial"'},
                {id: after, type: rate, limit: 1, per: 1m, by: [model]}]}]"#,
        )
        .unwrap();
    let downgraded = request(json!({"model": "large", "labels": {"plan": "trial"}}));
    let first = engine.check(&downgraded);
    assert!(first.allowed, "{first:?}");
    assert_eq!(first.model.as_deref(), Some("small"));
    let direct = engine.check(&request(json!({"model": "small"})));
    assert_eq!(
        (direct.allowed, direct.rule.as_deref()),
        (false, Some("after")),
        "{direct:?}"
    );
    assert!(engine.check(&request(json!({"model": "large"}))).allowed);
}

/// Recorded costs near `i64::MAX` micro-dollars (more than `Engine::record` takes, but the
/// ledger is a public trait): their sum does not wrap round to a small or negative one
/// (which would reopen a spent budget), and what is left is reported as 0.
#[test]
fn spend_past_i64_does_not_wrap_round() {
    for period in ["total", "month", "rolling:1h"] {
        let ledger = Arc::new(MemoryLedger::new());
        let engine = Engine::builder()
            .ledger(ledger.clone())
            .clock(Arc::new(ManualClock::new(1_767_225_600_000)))
            .build_from_text(&format!(
                "policies: [{{name: p, rules: [{{id: b, type: budget, limit_usd: 10, period: '{period}'}}]}}]"
            ))
            .unwrap();
        let first = engine.check(&Request::default());
        let second = engine.check(&Request::default());
        assert!(first.allowed && second.allowed, "{period}");
        for d in [&first, &second] {
            let id = uuid::Uuid::parse_str(&d.decision_id).unwrap().as_u128();
            let outcome = ledger.record(id, Micros(i64::MAX), engine.now_ms());
            assert_eq!(outcome.unwrap(), RecordOutcome::Recorded, "{period}");
        }
        let after = engine.check(&Request::default());
        assert_eq!(after.code, Code::BudgetExceeded, "{period}: {after:?}");
        assert_eq!(
            after.remaining["b"],
            Remaining::Usd(Micros::ZERO),
            "{period}"
        );
        let usage = engine.usage(None).unwrap();
        assert_eq!(usage[0].spent_usd, Micros(i64::MAX), "{period}");
    }
}

#[test]
fn record_refuses_a_cost_out_of_range_and_changes_nothing() {
    let engine = Engine::builder()
        .build_from_text(
            "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 10, period: total}]}]",
        )
        .unwrap();
    let d = engine.check(&Request::default());
    let err = engine
        .record(&d.decision_id, Micros(-1_500_000))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "`cost_usd` must be between 0 and 9007199254.740991 (got -1.500000)"
    );
    let too_large = Micros(Micros::MAX_RECORDED.0 + 1);
    assert!(matches!(
        engine.record(&d.decision_id, too_large),
        Err(EngineError::CostOutOfRange(c)) if c == too_large
    ));
    assert_eq!(engine.usage(None).unwrap()[0].spent_usd, Micros::ZERO);
    // The decision can still be recorded.
    assert_eq!(
        engine.record(&d.decision_id, Micros(2_000_000)).unwrap(),
        RecordOutcome::Recorded
    );
    assert_eq!(engine.usage(None).unwrap()[0].spent_usd, Micros(2_000_000));
}

/// A spend counter reserves at most what one call can record: an alert-mode budget takes
/// an estimate of `i64::MAX` micro-dollars as `Micros::MAX_RECORDED`.
#[test]
fn an_estimate_reserves_at_most_the_largest_recordable_cost() {
    let engine = Engine::builder()
        .build_from_text(
            "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 10, period: total, mode: alert}]}]",
        )
        .unwrap();
    let mut request = Request::default();
    request.estimate.cost_usd = Some(Micros(i64::MAX));
    let decision = engine.check(&request);
    assert!(decision.allowed);
    assert_eq!(decision.alerts.len(), 1, "{decision:?}");
    assert_eq!(
        engine.usage(None).unwrap()[0].reserved_usd,
        Micros::MAX_RECORDED
    );
}

/// The line before which a store may give spend back by the day lies before every
/// trailing window that can still read it: the policy's, a run's snapshot's after the
/// policy changed, and twice the reservation TTL (a late record), with a day to spare.
#[test]
fn exact_spend_since_covers_the_policy_the_runs_and_late_records() {
    const DAY: i64 = 86_400_000;
    // 2026-03-02T13:00Z
    let now = 1_772_456_400_000;
    let midnight = |t: i64| t.div_euclid(DAY) * DAY;
    let engine = Engine::builder()
        .clock(Arc::new(ManualClock::new(now)))
        .build_from_text(
            "reservation_ttl: 1h\npolicies: [{name: p, rules: [\
             {id: v, type: cost_velocity, limit_usd: 1, window: 10d}]}]",
        )
        .unwrap();
    assert_eq!(engine.exact_spend_since(now), midnight(now - 11 * DAY));
    engine
        .create_run(RunSpec {
            id: Some("r".into()),
            ..RunSpec::default()
        })
        .unwrap();
    // The run keeps its 10-day window after the policy drops it.
    engine
        .replace_policy("reservation_ttl: 1h\npolicies: [{name: p, rules: [{id: m, type: budget, limit_usd: 1, period: month}]}]")
        .unwrap();
    assert_eq!(engine.exact_spend_since(now), midnight(now - 11 * DAY));
    // Without trailing windows: late records (2 × TTL) and a day.
    let calendar = Engine::builder()
        .clock(Arc::new(ManualClock::new(now)))
        .build_from_text(
            "reservation_ttl: 20h\npolicies: [{name: p, rules: [{id: m, type: budget, limit_usd: 1, period: month}]}]",
        )
        .unwrap();
    assert_eq!(
        calendar.exact_spend_since(now),
        midnight(now - 40 * 3_600_000 - DAY)
    );
}

/// An explained decision is the plain one with a trace: the walk keeps what it needs to
/// explain only when asked (passes, skips and expression errors add nothing else), so
/// the two must agree on everything else, request after request, over every kind of
/// verdict and mode.
#[test]
fn an_explained_decision_is_the_plain_one_with_a_trace() {
    const POLICY: &str = r#"
settings: {size: {type: integer, default: 8, min: 1, max: 64}}
pricing: {big: {input: 10, output: 10}, small: {input: 1, output: 1}}
policies:
  - name: p
    guardrails: [g]
    rules:
      - {id: skipped, type: rate, limit: 1, per: 1m, by: [key]}
      - {id: off, type: max_cost_per_request, limit_usd: 0.000001, when: 'labels.plan == "never"'}
      - {id: broken, type: max_cost_per_request, limit_usd: 0.000001, when: 'labels.nope == "1"'}
      - {id: failing, type: expression, deny_if: 'labels.missing == "x"'}
      - {id: to-small, type: downgrade, to: small, when: 'labels.plan == "trial"'}
      - {id: rpm, type: rate, limit: 3, per: 1m, by: [user]}
      - {id: soft, type: rate, limit: 1, per: 1m, by: [user], mode: alert}
      - {id: quiet, type: rate, limit: 1, per: 1m, by: [user], mode: shadow}
      - {id: monthly, type: budget, limit_usd: 0.05, period: month, by: [user], alert_at: 0.5, on_exceeded: downgrade, downgrade_to: small}
      - {id: team, type: budget, limit_usd: 0.04, period: day, by: [team]}
      - {id: velocity, type: cost_velocity, limit_usd: 1, window: 1h, by: [team]}
      - {id: no-big, type: restrict_models, deny: [huge]}
      - {id: cap, type: max_cost_per_request, limit_usd: 0.03}
      - {id: soft-cap, type: max_cost_per_request, limit_usd: 0.015, mode: alert}
      - {id: quiet-cap, type: max_cost_per_request, limit_usd: 0.015, mode: shadow}
"#;
    let engine = |clock: Arc<ManualClock>| {
        Engine::builder()
            .clock(clock)
            .build_from_text(POLICY)
            .unwrap()
    };
    let (plain_clock, explained_clock) = (
        Arc::new(ManualClock::new(1_767_225_600_000)),
        Arc::new(ManualClock::new(1_767_225_600_000)),
    );
    let (plain, explained) = (engine(plain_clock.clone()), engine(explained_clock.clone()));
    for e in [&plain, &explained] {
        e.set_setting("team:t1", "size", json!(16)).unwrap();
    }
    let comparable = |d: &tollgate::Decision| {
        let mut v = serde_json::to_value(d).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("decision_id");
        o.remove("trace");
        v
    };
    let mut outcomes = std::collections::BTreeSet::new();
    for i in 0..40 {
        let r = request(json!({
            "subject": {"user": format!("u{}", i % 3), "team": format!("t{}", i % 2)},
            "model": if i % 7 == 0 { "huge" } else { "big" },
            "labels": {"plan": if i % 4 == 0 { "trial" } else { "pro" }},
            "estimate": {"input_tokens": 1000 + 500 * (i % 3), "output_tokens": 200},
        }));
        let (a, b) = (plain.check(&r), explained.check_explained(&r));
        assert_eq!(comparable(&a), comparable(&b), "request {i}: {r:?}");
        assert!(a.trace.is_empty() && !b.trace.is_empty());
        outcomes.extend(b.trace.iter().map(|t| t.outcome.clone()));
        outcomes.insert(format!("{:?}", a.code));
        for c in [&plain_clock, &explained_clock] {
            c.advance(2_000);
        }
    }
    // The sequence went through every kind of verdict it is meant to compare.
    for expected in [
        "pass",
        "skip",
        "error",
        "deny",
        "alert",
        "shadow_deny",
        "downgrade",
        "Allowed",
        "RateLimited",
        "BudgetExceeded",
        "PolicyDenied",
    ] {
        assert!(
            outcomes.contains(expected),
            "no `{expected}` in {outcomes:?}"
        );
    }
}
