//! `quota`: a cap on live leases of a resource (max engines per product, shared capacity).
//! Applies only to `acquire` requests for the rule's own resource.

use crate::decision::Code;
use crate::eval::EvalCtx;
use crate::ledger::{Op, OpKind, OpResult, Ops};
use crate::policy::reader;
use crate::request::Dimension;

use super::{RuleInput, Step, Verdict};

pub(crate) const FIELDS: &[&str] = &["resource", "max", "by"];

pub(crate) struct Quota {
    resource: String,
    max: u64,
    by: Vec<Dimension>,
}

impl Quota {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Quota> {
        let resource = input
            .required("resource")
            .and_then(|n| reader::nonempty_string(n, &input.at("resource"), input.d));
        let max = input
            .required("max")
            .and_then(|n| reader::integer(n, &input.at("max"), input.d, 0));
        let by = input.by();
        Some(Quota {
            resource: resource?,
            max: max? as u64,
            by: by?,
        })
    }

    pub(crate) fn plan<'r>(&'r self, ctx: &mut EvalCtx<'r>, ops: &mut Ops<'r>) -> Step<'r> {
        if !ctx.acquire {
            return Step::Verdict(Verdict::Skip("not an acquire".into()));
        }
        if ctx.request.resource.as_deref() != Some(self.resource.as_str()) {
            return Step::Verdict(Verdict::Skip(
                format!("the request is not for resource `{}`", self.resource).into(),
            ));
        }
        match ctx.key(&self.by) {
            Ok(key) => {
                ops.push(Op {
                    key,
                    kind: OpKind::Lease {
                        resource: self.resource.clone(),
                        max: self.max,
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
            super::pass(explain, || {
                format!(
                    "{} of {} {} in use",
                    result.used + 1,
                    self.max,
                    self.resource
                )
            })
        } else {
            Verdict::Deny {
                code: Code::QuotaExceeded,
                reason: format!(
                    "quota of {} `{}` for {} reached ({} live)",
                    self.max,
                    self.resource,
                    op.key.label(),
                    result.used
                ),
            }
        }
    }
}
