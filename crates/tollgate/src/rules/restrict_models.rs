//! `restrict_models`: deny models by glob, or allow only some.

use crate::decision::Code;
use crate::eval::EvalCtx;
use crate::matcher::Patterns;
use crate::policy::diag::Diags;
use crate::policy::reader::{self, At};
use crate::yaml::Node;

use super::{RuleInput, Verdict};

pub(crate) const FIELDS: &[&str] = &["deny", "allow"];

pub(crate) struct RestrictModels {
    deny: Option<Patterns>,
    allow: Option<Patterns>,
}

fn patterns(node: &Node, at: &At, d: &mut Diags) -> Option<Patterns> {
    let list = reader::string_list(node, at, d)?;
    let (names, positions): (Vec<String>, Vec<_>) = list.into_iter().unzip();
    match Patterns::new(names) {
        Ok(p) => Some(p),
        Err((i, e)) => {
            at.index(i).error(
                d,
                positions.get(i).copied().unwrap_or(node.pos),
                format!("bad glob: {e}"),
            );
            None
        }
    }
}

impl RestrictModels {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<RestrictModels> {
        let deny = input
            .optional("deny")
            .map(|n| patterns(n, &input.at("deny"), input.d));
        let allow = input
            .optional("allow")
            .map(|n| patterns(n, &input.at("allow"), input.d));
        if deny.is_none() && allow.is_none() {
            input.at("deny").error(
                input.d,
                input.fields.pos,
                "needs `deny` or `allow` (model globs)",
            );
            return None;
        }
        Some(RestrictModels {
            deny: deny.map_or(Some(None), |p| p.map(Some))?,
            allow: allow.map_or(Some(None), |p| p.map(Some))?,
        })
    }

    pub(crate) fn evaluate(&self, ctx: &mut EvalCtx<'_>) -> Verdict<'static> {
        let explain = ctx.explain;
        let Some(model) = ctx.model() else {
            return Verdict::Skip("the request names no model".into());
        };
        if let Some(deny) = &self.deny
            && deny.is_match(model)
        {
            return Verdict::Deny {
                code: Code::PolicyDenied,
                reason: format!(
                    "model `{model}` is not allowed (denied: {})",
                    deny.source.join(", ")
                ),
            };
        }
        if let Some(allow) = &self.allow
            && !allow.is_match(model)
        {
            return Verdict::Deny {
                code: Code::PolicyDenied,
                reason: format!(
                    "model `{model}` is not allowed (allowed: {})",
                    allow.source.join(", ")
                ),
            };
        }
        super::pass(explain, || format!("model `{model}` is allowed"))
    }
}
