//! `expression`: a custom deny rule in CEL, with its own code and message.

use crate::decision::Code;
use crate::eval::EvalCtx;
use crate::expr::Expr;
use crate::policy::reader;

use super::{RuleInput, Verdict, compile_expr};

pub(crate) const FIELDS: &[&str] = &["deny_if", "code", "message"];

pub(crate) struct Expression {
    deny_if: Expr,
    code: Code,
    message: Option<String>,
}

impl Expression {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Expression> {
        let deny_if = input.required("deny_if").and_then(|n| {
            let at = input.at("deny_if");
            let src = reader::string(n, &at, input.d)?;
            compile_expr(&src, n, &at, input.d)
        });
        let code = match input.optional("code") {
            None => Some(Code::PolicyDenied),
            Some(n) => reader::one_of(
                n,
                &input.at("code"),
                input.d,
                &[
                    "POLICY_DENIED",
                    "RATE_LIMITED",
                    "QUOTA_EXCEEDED",
                    "BUDGET_EXCEEDED",
                ],
            )
            .and_then(|c| Code::from_name(&c)),
        };
        let message = input
            .optional("message")
            .and_then(|n| reader::string(n, &input.at("message"), input.d));
        Some(Expression {
            deny_if: deny_if?,
            code: code?,
            message,
        })
    }

    pub(crate) fn evaluate(&self, ctx: &mut EvalCtx<'_>) -> Verdict<'static> {
        match ctx.eval(&self.deny_if) {
            Ok(true) => Verdict::Deny {
                code: self.code,
                reason: self
                    .message
                    .clone()
                    .unwrap_or_else(|| self.deny_if.source.clone()),
            },
            Ok(false) => super::pass(ctx.explain, || {
                format!("`{}` is false", self.deny_if.source)
            }),
            Err(e) => Verdict::Error(format!("{e} (counted as false)")),
        }
    }
}
