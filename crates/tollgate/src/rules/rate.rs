//! `rate`: requests per period — token bucket (default), fixed window, exact sliding window.

use crate::decision::Code;
use crate::duration::Millis;
use crate::eval::EvalCtx;
use crate::ledger::{Algorithm, Op, OpKind, OpResult, Ops};
use crate::policy::reader;
use crate::request::Dimension;

use super::{RuleInput, Step, Verdict};

pub(crate) const FIELDS: &[&str] = &["limit", "per", "burst", "by", "algorithm"];

pub(crate) struct Rate {
    limit: u64,
    per: Millis,
    burst: u64,
    by: Vec<Dimension>,
    algorithm: Algorithm,
}

impl Rate {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Rate> {
        let limit = input
            .required("limit")
            .and_then(|n| reader::integer(n, &input.at("limit"), input.d, 1));
        let per = input
            .required("per")
            .and_then(|n| reader::duration(n, &input.at("per"), input.d));
        let algorithm = match input.optional("algorithm") {
            None => Some(Algorithm::TokenBucket),
            Some(n) => reader::one_of(
                n,
                &input.at("algorithm"),
                input.d,
                &["token_bucket", "fixed_window", "sliding_window"],
            )
            .map(|a| match a.as_str() {
                "fixed_window" => Algorithm::FixedWindow,
                "sliding_window" => Algorithm::SlidingWindow,
                _ => Algorithm::TokenBucket,
            }),
        };
        let burst = match input.optional("burst") {
            None => limit,
            Some(n) => {
                if algorithm.is_some_and(|a| a != Algorithm::TokenBucket) {
                    input.at("burst").error(
                        input.d,
                        n.pos,
                        "`burst` only applies to the token_bucket algorithm",
                    );
                }
                reader::integer(n, &input.at("burst"), input.d, 1)
            }
        };
        let by = input.by();
        Some(Rate {
            limit: limit? as u64,
            per: per?,
            burst: burst? as u64,
            by: by?,
            algorithm: algorithm?,
        })
    }

    pub(crate) fn plan<'r>(&'r self, ctx: &mut EvalCtx<'r>, ops: &mut Ops<'r>) -> Step<'r> {
        match ctx.key(&self.by) {
            Ok(key) => {
                ops.push(Op {
                    key,
                    kind: OpKind::Rate {
                        algorithm: self.algorithm,
                        limit: self.limit,
                        per_ms: self.per.0,
                        burst: self.burst,
                    },
                    enforcing: true,
                });
                Step::Planned
            }
            Err(skip) => Step::Verdict(Verdict::Skip(skip.into())),
        }
    }

    pub(crate) fn judge(&self, op: &Op<'_>, result: &OpResult, explain: bool) -> Verdict<'static> {
        if result.granted {
            super::pass(explain, || format!("{} left", result.remaining))
        } else {
            Verdict::Deny {
                code: Code::RateLimited,
                reason: format!(
                    "rate limit {}/{} for {} exceeded",
                    self.limit,
                    self.per,
                    op.key.label()
                ),
            }
        }
    }
}
