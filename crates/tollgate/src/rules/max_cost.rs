//! `max_cost_per_request`: refuse a single call whose estimate is over the cap.

use crate::decision::Code;
use crate::eval::EvalCtx;
use crate::money::Micros;
use crate::policy::reader;

use super::{RuleInput, Verdict};

pub(crate) const FIELDS: &[&str] = &["limit_usd"];

pub(crate) struct MaxCost {
    limit: Micros,
}

impl MaxCost {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<MaxCost> {
        let limit = input
            .required("limit_usd")
            .and_then(|n| reader::money(n, &input.at("limit_usd"), input.d));
        Some(MaxCost { limit: limit? })
    }

    pub(crate) fn evaluate(&self, ctx: &mut EvalCtx<'_>) -> Verdict<'static> {
        let estimate = ctx.estimate();
        if estimate > self.limit {
            Verdict::Deny {
                code: Code::PolicyDenied,
                reason: format!(
                    "estimated cost {estimate} USD is over the per-request cap of {} USD",
                    self.limit
                ),
            }
        } else {
            super::pass(ctx.explain, || {
                format!("estimate {estimate} USD within {} USD", self.limit)
            })
        }
    }
}
