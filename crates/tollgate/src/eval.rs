//! The decision procedure: match, resolve, walk the rules in order building a plan, let
//! the ledger apply the plan atomically, then read the verdicts in rule order.

use std::collections::BTreeMap;

use smallvec::SmallVec;

use crate::decision::{
    Alert, Code, Decision, DecisionId, Name, Names, Remaining, RemainingByRule, TraceEntry,
};
use crate::expr::{self, Expr};
use crate::ledger::{
    Apply, CounterKey, KeyValues, Ledger, LedgerError, NewLease, OpKind, OpResult, OpResults, Ops,
    Plan, ValuesHash,
};
use crate::money::Micros;
use crate::policy::PolicySet;
use crate::request::{Dimension, Request};
use crate::rules::{Mode, Rule, Step, Verdict};
use crate::settings::{EffectiveSetting, Overrides};

/// What a rule sees while it is evaluated.
pub(crate) struct EvalCtx<'r> {
    pub request: &'r Request,
    pub set: &'r PolicySet,
    pub now: i64,
    pub acquire: bool,
    pub explain: bool,
    ledger: &'r dyn Ledger,
    rule: Option<&'r Rule>,
    model: Option<&'r str>,
    cel: Option<cel::Context<'r, 'r>>,
    /// Variables already bound in `cel` (bits of `expr::VARIABLES`).
    cel_bound: u8,
    notes: Vec<String>,
    /// The dimensions of the last counter key and the hash of their values.
    last_values: Option<(&'r [Dimension], ValuesHash)>,
}

impl<'r> EvalCtx<'r> {
    /// The current model (after the downgrades so far).
    pub(crate) fn model(&self) -> Option<&'r str> {
        self.model
    }

    pub(crate) fn set_model(&mut self, model: &'r str) {
        self.model = Some(model);
        // Rebind `model` on the next expression that uses it.
        self.cel_bound &= !expr::MODEL;
    }

    /// The estimate: `cost_usd` when given, else tokens priced for the current model.
    pub(crate) fn estimate(&mut self) -> Micros {
        let e = &self.request.estimate;
        if let Some(c) = e.cost_usd {
            return c;
        }
        if e.input_tokens.is_none() && e.output_tokens.is_none() {
            return Micros::ZERO;
        }
        let model = self.model.unwrap_or_default();
        match self.set.pricing.get(model) {
            Some(price) => price.cost(e.input_tokens.unwrap_or(0), e.output_tokens.unwrap_or(0)),
            None => {
                self.notes.push(format!(
                    "model `{model}` has no pricing: the token-based estimate is 0"
                ));
                Micros::ZERO
            }
        }
    }

    /// The estimate a spend counter reserves: at most [`Micros::MAX_RECORDED`], the most
    /// one call can record, so that no backend sums amounts it cannot hold exactly (a
    /// Redis budget in alert mode that reserved `i64::MAX` went on to report 8 trillion
    /// dollars left; only a budget over that much could tell the difference), and nothing
    /// for a negative estimate (which the memory ledger never reserved, but counted as
    /// room: a budget near `i64::MAX` then reported less than nothing left over Redis).
    pub(crate) fn reserved_estimate(&mut self) -> Micros {
        self.estimate().clamp(Micros::ZERO, Micros::MAX_RECORDED)
    }

    /// The counter key of the current rule for these dimensions, or why the rule is skipped.
    pub(crate) fn key(&mut self, by: &'r [Dimension]) -> Result<CounterKey<'r>, String> {
        let rule = self.rule.expect("a rule is being evaluated");
        let mut values = KeyValues::new();
        for d in by {
            // A `model` dimension keys by the current (possibly downgraded) model.
            match d.value(self.request, self.model) {
                Some(v) => values.push(v),
                None => return Err(format!("the request has no `{d}`")),
            }
        }
        // Rules keyed by the same dimensions (a rate and a budget per user) hash the
        // request's values once. Not across a `model` dimension, whose value a downgrade
        // between the two rules can change.
        let hash = match self.last_values {
            Some((last, hash)) if last == by => hash,
            _ => {
                let hash = ValuesHash::of(&values);
                let reusable = !by.contains(&Dimension::Model);
                self.last_values = reusable.then_some((by, hash));
                hash
            }
        };
        Ok(CounterKey::with_hashes(
            &rule.key_prefix,
            hash,
            &rule.policy,
            &rule.id,
            by,
            values,
        ))
    }

    pub(crate) fn spend_used(
        &self,
        key: &CounterKey<'_>,
        window_start: i64,
    ) -> Result<Micros, LedgerError> {
        self.ledger.spend_used(key, window_start, self.now)
    }

    /// Evaluates an expression, binding on first use only the variables it reads.
    pub(crate) fn eval(&mut self, e: &Expr) -> Result<bool, String> {
        if let Some(b) = e.eval_direct(self.request, self.model) {
            return Ok(b);
        }
        let ctx = self.cel.get_or_insert_with(expr::empty_context);
        let missing = e.vars & !self.cel_bound;
        if missing != 0 {
            expr::bind(ctx, self.request, self.model, missing);
            self.cel_bound |= missing;
        }
        e.eval_bool(ctx)
    }
}

/// Options of one check.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CheckOptions {
    pub acquire: bool,
    pub explain: bool,
    pub lease_expires_at: Option<i64>,
}

struct Entry<'r> {
    rule: &'r Rule,
    verdict: Option<Verdict<'r>>,
    op: Option<usize>,
}

/// The source of a decision's `settings`.
pub(crate) enum DecisionSettings<'r> {
    /// A run's snapshot, frozen at its creation.
    Frozen(BTreeMap<String, EffectiveSetting>),
    /// Resolved now from the policies that apply and these overrides; only the values
    /// that do not come from the default layer are reported.
    Live(&'r Overrides),
}

/// Everything a decision needs besides the policy set.
pub(crate) struct Inputs<'r> {
    pub ledger: &'r dyn Ledger,
    pub now: i64,
    pub decision_id: u128,
    pub lease_id: u128,
    /// Budget rules of the request's run and its ancestors (after all policy rules).
    pub run_rules: Vec<&'r Rule>,
    /// Where the decision's `settings` come from.
    pub settings: DecisionSettings<'r>,
}

pub(crate) fn decide(
    set: &PolicySet,
    request: &Request,
    inputs: Inputs<'_>,
    options: CheckOptions,
) -> Decision {
    let explain = options.explain;
    let mut trace: Vec<TraceEntry> = Vec::new();
    // The detail is only formatted when the decision is explained.
    let mut note =
        |policy: Option<&str>, rule: Option<&str>, outcome: &str, detail: &dyn Fn() -> String| {
            if explain {
                trace.push(TraceEntry {
                    policy: policy.map(str::to_string),
                    rule: rule.map(str::to_string),
                    outcome: outcome.to_string(),
                    detail: detail(),
                });
            }
        };

    let matched = set.matcher.matched(request);
    if explain {
        for (i, p) in set.policies.iter().enumerate() {
            let hit = matched.contains(&(i as u32));
            note(
                Some(&p.name),
                None,
                if hit { "matched" } else { "not_matched" },
                &|| {
                    if hit {
                        "its match holds".into()
                    } else {
                        set.matcher.explain(i as u32, request)
                    }
                },
            );
        }
    }
    let order = set.evaluation_order(&matched);
    let settings = match inputs.settings {
        DecisionSettings::Frozen(frozen) => frozen,
        DecisionSettings::Live(overrides) => {
            let mut all = set.resolve_settings(&order, overrides, &request.subject);
            all.retain(|_, s| s.source != "default");
            all
        }
    };
    let guardrails = set.guardrail_names(&matched);

    let mut ctx = EvalCtx {
        request,
        set,
        now: inputs.now,
        acquire: options.acquire,
        explain,
        ledger: inputs.ledger,
        rule: None,
        model: request.model.as_deref(),
        cel: None,
        cel_bound: 0,
        notes: Vec::new(),
        last_values: None,
    };

    let mut rule_count = inputs.run_rules.len();
    for &p in &order {
        rule_count += set.policies[p as usize].rules.len();
    }
    // Made empty and grown in place: `with_capacity` moved its kilobyte of inline room
    // (a `memcpy` per decision).
    let mut entries: SmallVec<[Entry<'_>; 16]> = SmallVec::new();
    if rule_count > entries.inline_size() {
        entries.reserve_exact(rule_count);
    }
    // The plan is built where it stays (moving its operations cost two `memcpy`s of
    // 656 bytes). Up to four operations inline; a rule that may plan one does not always
    // (a quota plans only for `acquire`), so no room is reserved ahead.
    let mut plan = Plan {
        decision: inputs.decision_id,
        now: inputs.now,
        reservation_ttl_ms: set.reservation_ttl.0,
        ops: Ops::new(),
        lease: None,
    };
    let mut stateless_denial = false;
    let rules = order
        .iter()
        .flat_map(|&p| set.policies[p as usize].rules.iter())
        .chain(inputs.run_rules.iter().copied());
    for rule in rules {
        ctx.rule = Some(rule);
        if let Some(when) = &rule.when {
            match ctx.eval(when) {
                Ok(true) => {}
                // Skips and errors only ever add to the trace.
                Ok(false) => {
                    if explain {
                        let why = format!("`when` is false: {}", when.source);
                        entries.push(Entry {
                            rule,
                            verdict: Some(Verdict::Skip(why.into())),
                            op: None,
                        });
                    }
                    continue;
                }
                Err(e) => {
                    if explain {
                        let why = format!("`when` failed, counted as false: {e}");
                        entries.push(Entry {
                            rule,
                            verdict: Some(Verdict::Error(why)),
                            op: None,
                        });
                    }
                    continue;
                }
            }
        }
        let planned_before = plan.ops.len();
        match rule.step(&mut ctx, &mut plan.ops) {
            Step::Verdict(v) => {
                if let Verdict::Downgrade { to, .. } = &v
                    && rule.mode == Mode::Enforce
                {
                    ctx.set_model(to);
                }
                let denies = matches!(v, Verdict::Deny { .. }) && rule.mode == Mode::Enforce;
                // A pass, a skip or an error only adds to the trace: unexplained, the
                // entry would be built and dropped for nothing (most rules pass).
                if !explain && matches!(v, Verdict::Pass(_) | Verdict::Skip(_) | Verdict::Error(_))
                {
                    continue;
                }
                entries.push(Entry {
                    rule,
                    verdict: Some(v),
                    op: None,
                });
                if denies {
                    // Later rules cannot change the outcome: stop here.
                    stateless_denial = true;
                    break;
                }
            }
            Step::Planned => {
                debug_assert_eq!(plan.ops.len(), planned_before + 1, "one operation a rule");
                let index = planned_before;
                plan.ops[index].enforcing &= rule.mode == Mode::Enforce;
                entries.push(Entry {
                    rule,
                    verdict: None,
                    op: Some(index),
                });
            }
        }
    }
    let final_walk_model = ctx.model.map(Name::from);
    for n in ctx.notes.drain(..) {
        note(None, None, "note", &|| n.clone());
    }

    plan.lease = (options.acquire && !stateless_denial).then(|| NewLease {
        id: inputs.lease_id,
        resource: request.resource.as_deref().unwrap_or_default(),
        subject: &request.subject,
        expires_at: options.lease_expires_at,
    });
    let mode = if stateless_denial {
        Apply::DryRun
    } else {
        Apply::Commit
    };
    // A ledger that cannot be reached answers nothing: the operations are judged as
    // granted here, and `on_backend_error` of the policies that asked decides below.
    let mut backend_error: Option<LedgerError> = None;
    let results: OpResults = if plan.ops.is_empty() && plan.lease.is_none() {
        OpResults::new()
    } else {
        match inputs.ledger.apply(&plan, mode) {
            Ok(r) => r,
            Err(e) => {
                backend_error = Some(e);
                let unknown = OpResult {
                    granted: true,
                    used: 0,
                    remaining: 0,
                    retry_after_ms: None,
                };
                smallvec::smallvec![unknown; plan.ops.len()]
            }
        }
    };

    // A plan that was not committed took nothing: report what is left now, not what
    // would have been left.
    let mut results = results;
    let committed = mode == Apply::Commit
        && !plan
            .ops
            .iter()
            .zip(&results)
            .any(|(op, r)| op.enforcing && !r.granted);
    if !committed {
        for (op, r) in plan.ops.iter().zip(results.iter_mut()) {
            match op.kind {
                OpKind::Rate { .. } | OpKind::Lease { .. } if r.granted => r.remaining += 1,
                OpKind::Spend { limit, .. } => r.remaining = limit.0.saturating_sub(r.used).max(0),
                _ => {}
            }
        }
    }

    let mut decision = Decision {
        allowed: true,
        code: Code::Allowed,
        reason: None,
        policy: None,
        rule: None,
        policy_version: set.version,
        matched_policies: names(set, &matched),
        model: final_walk_model,
        guardrails,
        settings,
        alerts: Vec::new(),
        retry_after_ms: None,
        decision_id: DecisionId::from_u128(inputs.decision_id),
        remaining: RemainingByRule::default(),
        trace: Vec::new(),
        lease_id: None,
    };
    let last_walk_downgrade = entries.iter().rposition(|e| {
        matches!(e.verdict, Some(Verdict::Downgrade { .. })) && e.rule.mode == Mode::Enforce
    });
    for (i, entry) in entries.iter_mut().enumerate() {
        let rule = entry.rule;
        if let Some(oi) = entry.op {
            let (op, result) = (&plan.ops[oi], &results[oi]);
            entry.verdict = Some(rule.judge(op, result, explain));
            let remaining = match op.kind {
                OpKind::Rate { .. } | OpKind::Lease { .. } => {
                    Some(Remaining::Count(result.remaining))
                }
                OpKind::Spend { .. } => Some(Remaining::Usd(Micros(result.remaining))),
                OpKind::Forecast { .. } => None,
            };
            if let Some(r) = remaining {
                decision.remaining.insert_first(&rule.id, r);
            }
            if !result.granted && decision.allowed && op.enforcing {
                decision.retry_after_ms = result.retry_after_ms;
            }
        }
        let verdict = entry
            .verdict
            .as_ref()
            .expect("every entry has a verdict by now");
        let (policy, id) = (Some(rule.policy.as_str()), Some(&*rule.id));
        match (verdict, rule.mode) {
            (Verdict::Pass(detail), _) => note(policy, id, "pass", &|| {
                format!("{}: {detail}", rule.type_name())
            }),
            (Verdict::Skip(detail), _) => note(policy, id, "skip", &|| detail.to_string()),
            (Verdict::Error(detail), _) => note(policy, id, "error", &|| detail.clone()),
            (Verdict::Deny { code, reason }, Mode::Enforce) => {
                note(policy, id, "deny", &|| reason.clone());
                if decision.allowed {
                    decision.allowed = false;
                    decision.code = *code;
                    decision.reason = Some(reason.clone());
                    decision.policy = Some(rule.policy.clone());
                    decision.rule = Some(rule.id.clone());
                }
            }
            (Verdict::Deny { reason, .. } | Verdict::Alert { reason }, Mode::Alert) => {
                note(policy, id, "alert", &|| reason.clone());
                decision.alerts.push(alert(rule, reason));
            }
            (Verdict::Alert { reason }, Mode::Enforce) => {
                note(policy, id, "alert", &|| reason.clone());
                decision.alerts.push(alert(rule, reason));
            }
            (Verdict::Deny { reason, .. }, Mode::Shadow) => {
                note(policy, id, "shadow_deny", &|| reason.clone())
            }
            (Verdict::Alert { reason }, Mode::Shadow) => {
                note(policy, id, "shadow_alert", &|| reason.clone())
            }
            (Verdict::Downgrade { to, reason }, Mode::Enforce) => {
                note(policy, id, "downgrade", &|| reason.clone());
                if entry.op.is_some() {
                    // A budget's downgrade also reports the exceeded budget.
                    decision.alerts.push(alert(rule, reason));
                    if last_walk_downgrade.is_none_or(|last| i > last) {
                        decision.model = Some(Name::from(*to));
                    }
                }
            }
            (Verdict::Downgrade { reason, .. }, Mode::Alert) => {
                note(policy, id, "alert", &|| reason.clone());
                decision.alerts.push(alert(rule, reason));
            }
            (Verdict::Downgrade { reason, .. }, Mode::Shadow) => {
                note(policy, id, "shadow_downgrade", &|| reason.clone())
            }
        }
    }
    if let Some(e) = backend_error {
        decision.remaining.clear();
        decision.lease_id = None;
        if decision.allowed {
            backend_failed(set, &plan, &e, &mut decision);
        }
        if !decision.allowed {
            decision.retry_after_ms = None;
            decision.trace = trace;
            return decision;
        }
    }
    if !decision.allowed {
        decision.retry_after_ms = decision
            .retry_after_ms
            .filter(|_| matches!(decision.code, Code::RateLimited));
    } else {
        decision.retry_after_ms = None;
        if plan.lease.is_some() {
            decision.lease_id = Some(DecisionId::from_u128(inputs.lease_id).to_string());
        }
    }
    decision.trace = trace;
    decision
}

/// The ledger failed and no rule denied on its own: each policy whose rules needed the
/// ledger says, with `on_backend_error`, whether the call goes ahead (`allow`, reported
/// as an alert) or not (`deny`, the default; run budgets always deny).
fn backend_failed(set: &PolicySet, plan: &Plan<'_>, error: &LedgerError, decision: &mut Decision) {
    let mut seen: Vec<&str> = Vec::new();
    for op in &plan.ops {
        if seen.contains(&op.key.policy) {
            continue;
        }
        seen.push(op.key.policy);
        if set.allows_backend_error(op.key.policy) {
            decision.alerts.push(Alert {
                policy: op.key.policy.to_string(),
                rule: op.key.rule.to_string(),
                reason: format!("{error}: allowed without counting (on_backend_error: allow)"),
            });
        } else if decision.allowed {
            decision.allowed = false;
            decision.code = Code::PolicyDenied;
            decision.policy = Some(op.key.policy.into());
            decision.rule = Some(op.key.rule.into());
            decision.reason = Some(format!("{error}: denied (on_backend_error: deny)"));
        }
    }
}

fn alert(rule: &Rule, reason: &str) -> Alert {
    Alert {
        policy: rule.policy.to_string(),
        rule: rule.id.to_string(),
        reason: reason.to_string(),
    }
}

fn names(set: &PolicySet, matched: &[u32]) -> Names {
    matched
        .iter()
        .map(|&m| set.policies[m as usize].name.clone())
        .collect()
}
