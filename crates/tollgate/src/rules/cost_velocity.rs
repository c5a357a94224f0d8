//! `cost_velocity`: a spend-rate circuit breaker — a budget over a trailing window,
//! denied as `RATE_LIMITED`.

use crate::decision::Code;
use crate::duration::Millis;
use crate::eval::EvalCtx;
use crate::ledger::{Op, OpKind, OpResult, Ops};
use crate::money::Micros;
use crate::policy::reader;
use crate::request::Dimension;

use super::{RuleInput, Step, Verdict};

pub(crate) const FIELDS: &[&str] = &["limit_usd", "window", "by"];

pub(crate) struct CostVelocity {
    limit: Micros,
    window: Millis,
    by: Vec<Dimension>,
}

impl CostVelocity {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<CostVelocity> {
        let limit = input
            .required("limit_usd")
            .and_then(|n| reader::money(n, &input.at("limit_usd"), input.d));
        let window = input
            .required("window")
            .and_then(|n| reader::duration(n, &input.at("window"), input.d));
        let by = input.by();
        Some(CostVelocity {
            limit: limit?,
            window: window?,
            by: by?,
        })
    }

    pub(crate) fn plan<'r>(&'r self, ctx: &mut EvalCtx<'r>, ops: &mut Ops<'r>) -> Step<'r> {
        let key = match ctx.key(&self.by) {
            Ok(k) => k,
            Err(skip) => return Step::Verdict(Verdict::Skip(skip.into())),
        };
        ops.push(Op {
            key,
            kind: OpKind::Spend {
                window_start: ctx.now - self.window.0,
                window_ms: Some(self.window.0),
                limit: self.limit,
                amount: ctx.reserved_estimate(),
                span_ms: 1,
            },
            enforcing: true,
        });
        Step::Planned
    }

    /// The window is the rule's own; spend is read through [`EvalCtx::window_start`].
    pub(crate) fn window_start(&self, now: i64) -> i64 {
        now - self.window.0
    }

    pub(crate) fn window_ms(&self) -> i64 {
        self.window.0
    }

    pub(crate) fn limit(&self) -> Micros {
        self.limit
    }

    pub(crate) fn judge(&self, op: &Op<'_>, result: &OpResult, explain: bool) -> Verdict<'static> {
        if result.granted {
            return super::pass(explain, || format!("{} USD left", Micros(result.remaining)));
        }
        let amount = match op.kind {
            OpKind::Spend { amount, .. } => amount,
            _ => Micros::ZERO,
        };
        Verdict::Deny {
            code: Code::RateLimited,
            reason: format!(
                "cost velocity {} USD per {} for {} exceeded: {} USD spent and reserved in the window, {} USD estimated",
                self.limit,
                self.window,
                op.key.label(),
                Micros(result.used),
                amount
            ),
        }
    }
}
