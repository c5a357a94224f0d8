//! Custom rules written in Rust and registered on the engine builder.
//!
//! ```
//! use tollgate::{Code, CustomRule, CustomVerdict, Engine, Request};
//!
//! /// Refuses requests whose prompt is over `params.max_tokens` input tokens.
//! struct PromptSize;
//!
//! impl CustomRule for PromptSize {
//!     fn validate(&self, params: &serde_json::Value) -> Result<(), String> {
//!         params["max_tokens"].as_u64().map(|_| ()).ok_or("`params.max_tokens` must be a whole number".into())
//!     }
//!     fn check(&self, request: &Request, _model: Option<&str>, params: &serde_json::Value) -> CustomVerdict {
//!         let max = params["max_tokens"].as_u64().unwrap_or(u64::MAX);
//!         match request.estimate.input_tokens {
//!             Some(t) if t > max => CustomVerdict::Deny { code: Code::PolicyDenied, reason: format!("{t} input tokens > {max}") },
//!             _ => CustomVerdict::Allow,
//!         }
//!     }
//! }
//!
//! let policy = "policies:\n  - name: p\n    rules: [{id: size, type: prompt_size, params: {max_tokens: 10}}]\n";
//! let engine = Engine::builder().custom_rule("prompt_size", PromptSize).build_from_text(policy).unwrap();
//! let mut request = Request::default();
//! request.estimate.input_tokens = Some(11);
//! assert_eq!(engine.check(&request).rule.as_deref(), Some("size"));
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use crate::decision::Code;
use crate::eval::EvalCtx;
use crate::request::Request;

use super::{RuleInput, Verdict};

pub(crate) const FIELDS: &[&str] = &["params"];

/// What a custom rule says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomVerdict {
    /// No objection.
    Allow,
    /// Refuse with this code and reason.
    Deny {
        /// The code (`POLICY_DENIED` for most custom rules).
        code: Code,
        /// Why, for the caller.
        reason: String,
    },
}

/// A rule type implemented in Rust. Policies use it as `type: <name>` with an optional
/// free-form `params` mapping; `when` and `mode` work as for every rule.
pub trait CustomRule: Send + Sync {
    /// Checks `params` when a policy is loaded; an `Err` is a validation error.
    fn validate(&self, params: &serde_json::Value) -> Result<(), String> {
        let _ = params;
        Ok(())
    }

    /// Judges a request; `model` is the current model (after earlier downgrades).
    fn check(
        &self,
        request: &Request,
        model: Option<&str>,
        params: &serde_json::Value,
    ) -> CustomVerdict;
}

/// The custom rule types known to an engine.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    rules: HashMap<String, Arc<dyn CustomRule>>,
}

impl Registry {
    pub(crate) fn insert(&mut self, name: String, rule: Arc<dyn CustomRule>) {
        self.rules.insert(name, rule);
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.rules.contains_key(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn CustomRule>> {
        self.rules.get(name)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }
}

pub(crate) struct Custom {
    pub type_name: String,
    rule: Arc<dyn CustomRule>,
    params: serde_json::Value,
}

impl Custom {
    pub(crate) fn parse(
        type_name: &str,
        rule: Arc<dyn CustomRule>,
        input: &mut RuleInput<'_, '_>,
    ) -> Option<Custom> {
        let (params, pos) = match input.optional("params") {
            Some(n) => (n.to_json(), n.pos),
            None => (serde_json::Value::Null, input.fields.pos),
        };
        if let Err(e) = rule.validate(&params) {
            input.at("params").error(input.d, pos, e);
            return None;
        }
        Some(Custom {
            type_name: type_name.to_string(),
            rule,
            params,
        })
    }

    pub(crate) fn evaluate(&self, ctx: &mut EvalCtx<'_>) -> Verdict<'static> {
        match self.rule.check(ctx.request, ctx.model(), &self.params) {
            CustomVerdict::Allow => Verdict::Pass(String::new()),
            CustomVerdict::Deny { code, reason } if code != Code::Allowed => {
                Verdict::Deny { code, reason }
            }
            CustomVerdict::Deny { reason, .. } => Verdict::Deny {
                code: Code::PolicyDenied,
                reason,
            },
        }
    }
}
