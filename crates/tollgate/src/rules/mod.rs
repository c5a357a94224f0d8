//! Rule types: one file each. A rule is either stateless (a verdict from the request
//! alone) or stateful (it adds one operation to the plan the ledger applies atomically,
//! then judges the ledger's answer).

use std::sync::Arc;

use crate::decision::Code;
use crate::expr::Expr;
use crate::ledger::{Op, OpResult, Ops};
use crate::policy::diag::Diags;
use crate::policy::reader::{self, At, Fields};
use crate::request::Dimension;
use crate::yaml::Node;

pub(crate) mod access;
pub(crate) mod budget;
pub(crate) mod cost_velocity;
pub(crate) mod custom;
pub(crate) mod downgrade;
pub(crate) mod expression;
pub(crate) mod forecast;
pub(crate) mod max_cost;
pub(crate) mod quota;
pub(crate) mod rate;
pub(crate) mod restrict_models;

pub use custom::{CustomRule, CustomVerdict};

use crate::eval::EvalCtx;

/// How a rule's would-be denial is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Deny.
    Enforce,
    /// Allow and report in `alerts`.
    Alert,
    /// Evaluate in full, never change the decision; trace and metric only.
    Shadow,
}

/// A compiled rule.
pub(crate) struct Rule {
    pub id: crate::decision::Name,
    /// The policy that defines it.
    pub policy: crate::decision::Name,
    pub when: Option<Expr>,
    pub mode: Mode,
    pub kind: RuleKind,
    /// Its counters' id prefix (policy and id hashed once).
    pub key_prefix: crate::ledger::KeyPrefix,
}

impl Rule {
    pub(crate) fn new(
        id: String,
        policy: String,
        when: Option<Expr>,
        mode: Mode,
        kind: RuleKind,
    ) -> Rule {
        Rule {
            key_prefix: crate::ledger::KeyPrefix::new(&policy, &id),
            id: id.into(),
            policy: policy.into(),
            when,
            mode,
            kind,
        }
    }
}

pub(crate) enum RuleKind {
    Rate(rate::Rate),
    CostVelocity(cost_velocity::CostVelocity),
    Budget(budget::Budget),
    Forecast(forecast::Forecast),
    MaxCost(max_cost::MaxCost),
    Quota(quota::Quota),
    Access(access::Access),
    RestrictModels(restrict_models::RestrictModels),
    Downgrade(downgrade::Downgrade),
    Expression(expression::Expression),
    Custom(custom::Custom),
}

/// What a rule says about a request.
#[derive(Debug)]
pub(crate) enum Verdict<'r> {
    /// Nothing to object to.
    Pass(String),
    /// The rule does not apply (missing dimension, wrong resource, …).
    Skip(std::borrow::Cow<'static, str>),
    /// Would deny.
    Deny { code: Code, reason: String },
    /// Swap the model.
    Downgrade { to: &'r str, reason: String },
    /// Allow, but report (budget `on_exceeded: alert`, `alert_at`).
    Alert { reason: String },
    /// The rule's expression failed to evaluate: counted as not denying, traced.
    Error(String),
}

/// What a rule contributes: its verdict when it needs no state, or an operation it has
/// pushed onto the plan. An `Op` is 176 bytes: built where it stays, it is not moved
/// through two `memcpy` calls on its way there.
pub(crate) enum Step<'r> {
    Verdict(Verdict<'r>),
    /// The rule pushed exactly one operation onto the plan.
    Planned,
}

impl Rule {
    /// The trailing window over which this rule reads recorded spend, if it has one
    /// (calendar periods and `total` read whole UTC days).
    pub(crate) fn trailing_spend_window_ms(&self) -> Option<i64> {
        match &self.kind {
            RuleKind::Budget(b) => b.trailing_window_ms(),
            RuleKind::CostVelocity(v) => Some(v.window_ms()),
            RuleKind::Forecast(f) => Some(f.lookback_ms()),
            _ => None,
        }
    }

    /// The rule's own step: a verdict, or an operation for the ledger.
    pub(crate) fn step<'r>(&'r self, ctx: &mut EvalCtx<'r>, ops: &mut Ops<'r>) -> Step<'r> {
        match &self.kind {
            RuleKind::Rate(r) => r.plan(ctx, ops),
            RuleKind::CostVelocity(r) => r.plan(ctx, ops),
            RuleKind::Budget(r) => r.plan(self.mode == Mode::Enforce, ctx, ops),
            RuleKind::Forecast(r) => r.plan(ctx, ops),
            RuleKind::Quota(r) => r.plan(ctx, ops),
            RuleKind::MaxCost(r) => Step::Verdict(r.evaluate(ctx)),
            RuleKind::Access(r) => Step::Verdict(r.evaluate(ctx)),
            RuleKind::RestrictModels(r) => Step::Verdict(r.evaluate(ctx)),
            RuleKind::Downgrade(r) => Step::Verdict(r.evaluate(ctx)),
            RuleKind::Expression(r) => Step::Verdict(r.evaluate(ctx)),
            RuleKind::Custom(r) => Step::Verdict(r.evaluate(ctx)),
        }
    }

    /// Judges the ledger's answer to this rule's operation.
    pub(crate) fn judge<'r>(
        &'r self,
        op: &Op<'_>,
        result: &OpResult,
        explain: bool,
    ) -> Verdict<'r> {
        match &self.kind {
            RuleKind::Rate(r) => r.judge(op, result, explain),
            RuleKind::CostVelocity(r) => r.judge(op, result, explain),
            RuleKind::Budget(r) => r.judge(op, result, explain),
            RuleKind::Forecast(r) => r.judge(op, result, explain),
            RuleKind::Quota(r) => r.judge(op, result, explain),
            _ => Verdict::Pass(String::new()),
        }
    }

    /// The rule's type name.
    pub(crate) fn type_name(&self) -> &str {
        match &self.kind {
            RuleKind::Rate(_) => "rate",
            RuleKind::CostVelocity(_) => "cost_velocity",
            RuleKind::Budget(_) => "budget",
            RuleKind::Forecast(_) => "forecast",
            RuleKind::MaxCost(_) => "max_cost_per_request",
            RuleKind::Quota(_) => "quota",
            RuleKind::Access(_) => "access",
            RuleKind::RestrictModels(_) => "restrict_models",
            RuleKind::Downgrade(_) => "downgrade",
            RuleKind::Expression(_) => "expression",
            RuleKind::Custom(c) => &c.type_name,
        }
    }
}

/// A passing verdict whose detail is only formatted when the decision is explained.
pub(crate) fn pass(explain: bool, detail: impl FnOnce() -> String) -> Verdict<'static> {
    Verdict::Pass(if explain { detail() } else { String::new() })
}

const COMMON: &[&str] = &["id", "type", "when", "mode"];

/// The built-in types and the fields each accepts beyond the common ones.
const TYPES: &[(&str, &[&str])] = &[
    ("rate", rate::FIELDS),
    ("cost_velocity", cost_velocity::FIELDS),
    ("budget", budget::FIELDS),
    ("forecast", forecast::FIELDS),
    ("max_cost_per_request", max_cost::FIELDS),
    ("quota", quota::FIELDS),
    ("access", access::FIELDS),
    ("restrict_models", restrict_models::FIELDS),
    ("downgrade", downgrade::FIELDS),
    ("expression", expression::FIELDS),
];

/// The fields of one rule, with the place to report errors.
pub(crate) struct RuleInput<'n, 'd> {
    pub fields: Fields<'n>,
    pub at: At,
    pub d: &'d mut Diags,
}

impl<'n> RuleInput<'n, '_> {
    /// A field that must be there.
    pub(crate) fn required(&mut self, name: &str) -> Option<&'n Node> {
        let v = self.fields.get(name);
        if v.is_none() {
            self.at.field(name).error(
                self.d,
                self.fields.pos,
                format!("missing required field `{name}`"),
            );
        }
        v
    }

    pub(crate) fn optional(&self, name: &str) -> Option<&'n Node> {
        self.fields.get(name)
    }

    pub(crate) fn at(&self, name: &str) -> At {
        self.at.field(name)
    }

    /// `by: [user, team]`.
    pub(crate) fn by(&mut self) -> Option<Vec<Dimension>> {
        let Some(node) = self.optional("by") else {
            return Some(Vec::new());
        };
        dimensions(node, &self.at("by"), self.d)
    }
}

/// A list of dimension names.
pub(crate) fn dimensions(node: &Node, at: &At, d: &mut Diags) -> Option<Vec<Dimension>> {
    let names = reader::string_list(node, at, d)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, (name, pos)) in names.iter().enumerate() {
        match Dimension::parse(name) {
            Some(dim) if !out.contains(&dim) => out.push(dim),
            Some(_) => {
                at.index(i)
                    .error(d, *pos, format!("dimension `{name}` is listed twice"));
                ok = false;
            }
            None => {
                at.index(i).error(
                    d,
                    *pos,
                    format!(
                        "unknown dimension `{name}` (expected product, team, key, user, agent, run, model, action, resource or labels.<name>)"
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// Reads one rule. `custom` are the rule types registered on the engine builder.
pub(crate) fn parse_rule(
    node: &Node,
    at: &At,
    policy: &str,
    custom: &custom::Registry,
    d: &mut Diags,
) -> Option<Rule> {
    let entries = reader::entries(node, at, d)?;
    let id = node
        .get("id")
        .and_then(|n| reader::nonempty_string(n, &at.field("id"), d));
    let at = at.with_context(match &id {
        Some(id) => format!("rule `{id}` of policy `{policy}`: "),
        None => format!("a rule of policy `{policy}`: "),
    });
    if id.is_none() && node.get("id").is_none() {
        at.field("id")
            .error(d, node.pos, "missing required field `id`");
    }
    let type_name = match node.get("type") {
        Some(t) => reader::string(t, &at.field("type"), d)?,
        None => {
            at.field("type")
                .error(d, node.pos, "missing required field `type`");
            return None;
        }
    };
    let own_fields: Vec<&str> = match TYPES.iter().find(|(t, _)| *t == type_name) {
        Some((_, f)) => f.to_vec(),
        None if custom.contains(&type_name) => custom::FIELDS.to_vec(),
        None => {
            let mut all: Vec<&str> = TYPES.iter().map(|(t, _)| *t).collect();
            all.extend(custom.names());
            at.field("type").error(
                d,
                node.get("type").map_or(node.pos, |n| n.pos),
                format!(
                    "unknown rule type `{type_name}` (expected one of: {})",
                    all.join(", ")
                ),
            );
            return None;
        }
    };
    // Every field must belong to this type; name the type it does belong to when there is one.
    let mut fields_ok = true;
    for (key, _) in entries {
        let name = key.name.as_str();
        if COMMON.contains(&name) || own_fields.contains(&name) {
            continue;
        }
        fields_ok = false;
        let owners: Vec<&str> = TYPES
            .iter()
            .filter(|(_, f)| f.contains(&name))
            .map(|(t, _)| *t)
            .collect();
        let msg = if owners.is_empty() {
            format!(
                "unknown field `{name}` (a `{type_name}` rule takes: {})",
                COMMON
                    .iter()
                    .chain(own_fields.iter())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "field `{name}` does not belong to rule type `{type_name}` (it is a field of {})",
                owners.join(", ")
            )
        };
        at.field(name).error(d, key.pos, msg);
    }
    let when = node.get("when").and_then(|n| {
        let at = at.field("when");
        let src = reader::string(n, &at, d)?;
        compile_expr(&src, n, &at, d)
    });
    let mode = match node.get("mode") {
        None => Some(Mode::Enforce),
        Some(n) => reader::one_of(n, &at.field("mode"), d, &["enforce", "alert", "shadow"]).map(
            |m| match m.as_str() {
                "alert" => Mode::Alert,
                "shadow" => Mode::Shadow,
                _ => Mode::Enforce,
            },
        ),
    };
    let mut input = RuleInput {
        fields: Fields {
            entries,
            pos: node.pos,
        },
        at: at.clone(),
        d,
    };
    let kind = match type_name.as_str() {
        "rate" => rate::Rate::parse(&mut input).map(RuleKind::Rate),
        "cost_velocity" => {
            cost_velocity::CostVelocity::parse(&mut input).map(RuleKind::CostVelocity)
        }
        "budget" => budget::Budget::parse(&mut input).map(RuleKind::Budget),
        "forecast" => forecast::Forecast::parse(&mut input).map(RuleKind::Forecast),
        "max_cost_per_request" => max_cost::MaxCost::parse(&mut input).map(RuleKind::MaxCost),
        "quota" => quota::Quota::parse(&mut input).map(RuleKind::Quota),
        "access" => access::Access::parse(&mut input).map(RuleKind::Access),
        "restrict_models" => {
            restrict_models::RestrictModels::parse(&mut input).map(RuleKind::RestrictModels)
        }
        "downgrade" => downgrade::Downgrade::parse(&mut input).map(RuleKind::Downgrade),
        "expression" => expression::Expression::parse(&mut input).map(RuleKind::Expression),
        other => custom
            .get(other)
            .and_then(|rule| custom::Custom::parse(other, Arc::clone(rule), &mut input))
            .map(RuleKind::Custom),
    };
    if !fields_ok {
        return None;
    }
    Some(Rule::new(id?, policy.to_string(), when, mode?, kind?))
}

/// Compiles a CEL expression, reporting compile errors and unknown variables at `at`.
pub(crate) fn compile_expr(src: &str, node: &Node, at: &At, d: &mut Diags) -> Option<Expr> {
    match Expr::compile(src) {
        Ok(e) => {
            let unknown = e.unknown_variables();
            if !unknown.is_empty() {
                at.warning(
                    d,
                    node.pos,
                    format!(
                        "expression `{src}` uses {} that requests do not have (they have: {}); it will evaluate to an error, counted as false",
                        unknown.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", "),
                        crate::expr::VARIABLES.join(", ")
                    ),
                );
            }
            Some(e)
        }
        Err(msg) => {
            at.error(
                d,
                node.pos,
                format!("expression `{src}` does not compile: {msg}"),
            );
            None
        }
    }
}
