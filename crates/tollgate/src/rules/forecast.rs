//! `forecast`: block when recorded spend in the lookback, projected to 30 days, reaches
//! the monthly budget. Reservations and the estimate do not count.

use crate::decision::Code;
use crate::duration::Millis;
use crate::eval::EvalCtx;
use crate::ledger::{Op, OpKind, OpResult, Ops};
use crate::money::Micros;
use crate::policy::reader;
use crate::request::Dimension;

use super::{RuleInput, Step, Verdict};

pub(crate) const FIELDS: &[&str] = &["monthly_budget_usd", "lookback", "by"];

pub(crate) struct Forecast {
    monthly_budget: Micros,
    lookback: Millis,
    by: Vec<Dimension>,
}

impl Forecast {
    pub(crate) fn lookback_ms(&self) -> i64 {
        self.lookback.0
    }

    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Forecast> {
        let monthly_budget = input
            .required("monthly_budget_usd")
            .and_then(|n| reader::money(n, &input.at("monthly_budget_usd"), input.d));
        let lookback = match input.optional("lookback") {
            None => Some(Millis(7 * Millis::DAY.0)),
            Some(n) => reader::duration(n, &input.at("lookback"), input.d),
        };
        let by = input.by();
        Some(Forecast {
            monthly_budget: monthly_budget?,
            lookback: lookback?,
            by: by?,
        })
    }

    pub(crate) fn plan<'r>(&'r self, ctx: &mut EvalCtx<'r>, ops: &mut Ops<'r>) -> Step<'r> {
        match ctx.key(&self.by) {
            Ok(key) => {
                ops.push(Op {
                    key,
                    kind: OpKind::Forecast {
                        lookback_ms: self.lookback.0,
                        monthly_budget: self.monthly_budget,
                    },
                    enforcing: true,
                });
                Step::Planned
            }
            Err(skip) => Step::Verdict(Verdict::Skip(skip.into())),
        }
    }

    pub(crate) fn judge(&self, op: &Op<'_>, result: &OpResult, explain: bool) -> Verdict<'static> {
        let projected = Micros(result.used);
        if result.granted {
            super::pass(explain, || format!("projected {projected} USD per 30 days"))
        } else {
            Verdict::Deny {
                code: Code::BudgetExceeded,
                reason: format!(
                    "forecast for {}: spend over the last {} projects to {} USD per 30 days, at or over the monthly budget of {} USD",
                    op.key.label(),
                    self.lookback,
                    projected,
                    self.monthly_budget
                ),
            }
        }
    }
}
