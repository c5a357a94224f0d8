//! `downgrade`: swap the model (usually under a `when` condition).

use crate::eval::EvalCtx;
use crate::policy::reader;

use super::{RuleInput, Verdict};

pub(crate) const FIELDS: &[&str] = &["to"];

pub(crate) struct Downgrade {
    to: String,
}

impl Downgrade {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Downgrade> {
        let to = input
            .required("to")
            .and_then(|n| reader::nonempty_string(n, &input.at("to"), input.d));
        Some(Downgrade { to: to? })
    }

    pub(crate) fn evaluate<'r>(&'r self, ctx: &mut EvalCtx<'_>) -> Verdict<'r> {
        match ctx.model() {
            None => Verdict::Skip("the request names no model".into()),
            Some(m) if m == self.to => Verdict::Pass(String::new()),
            Some(m) => Verdict::Downgrade {
                to: &self.to,
                reason: format!("model `{m}` downgraded to `{}`", self.to),
            },
        }
    }
}
