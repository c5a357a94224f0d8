//! The answer: allowed or not, why, and under which model, guardrails and settings.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::money::Micros;
use crate::settings::EffectiveSetting;

/// The outcome code (and, through [`Code::http_status`], the HTTP status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// Every enforcing rule passed.
    Allowed,
    /// Access, model restriction, expression rules, max cost per request, unknown run.
    PolicyDenied,
    /// Request-rate and cost-velocity rules.
    RateLimited,
    /// Concurrency / count quotas (leases).
    QuotaExceeded,
    /// Period, per-subject, forecast and run budgets.
    BudgetExceeded,
}

impl Code {
    /// The HTTP status of the product-admission convention.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Allowed => 200,
            Code::PolicyDenied => 403,
            Code::RateLimited | Code::QuotaExceeded | Code::BudgetExceeded => 429,
        }
    }

    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Allowed => "ALLOWED",
            Code::PolicyDenied => "POLICY_DENIED",
            Code::RateLimited => "RATE_LIMITED",
            Code::QuotaExceeded => "QUOTA_EXCEEDED",
            Code::BudgetExceeded => "BUDGET_EXCEEDED",
        }
    }

    /// The code called `name`.
    pub fn from_name(name: &str) -> Option<Code> {
        [
            Code::Allowed,
            Code::PolicyDenied,
            Code::RateLimited,
            Code::QuotaExceeded,
            Code::BudgetExceeded,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A would-be denial reported without blocking (alert mode, `alert_at`, `on_exceeded: alert`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// The policy that defines the rule.
    pub policy: String,
    /// The rule id.
    pub rule: String,
    /// What happened.
    pub reason: String,
}

/// What is left on a stateful rule after this decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Remaining {
    /// Requests (rate rules) or slots (quotas).
    Count(i64),
    /// Money (budgets, cost velocity); a decimal string in JSON.
    Usd(Micros),
}

/// One step of an explained decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// The policy concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The rule concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `matched`, `not_matched`, `pass`, `deny`, `skip`, `alert`, `shadow_deny`, `downgrade`, `error`, …
    pub outcome: String,
    /// Why.
    pub detail: String,
}

/// The answer to a [`Request`](crate::Request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the call may go ahead.
    pub allowed: bool,
    /// The outcome code.
    pub code: Code,
    /// Why it was refused (or null).
    pub reason: Option<String>,
    /// The policy defining the deciding rule.
    pub policy: Option<String>,
    /// The deciding rule.
    pub rule: Option<String>,
    /// The policy version the decision was made on.
    pub policy_version: u64,
    /// Policies whose own `match` held, in document order.
    pub matched_policies: Vec<String>,
    /// The model to use (after downgrades); null when the request named none.
    pub model: Option<String>,
    /// Guardrails to apply, sorted.
    pub guardrails: Vec<String>,
    /// Settings that differ from their defaults for this subject (every setting, in a run).
    pub settings: BTreeMap<String, EffectiveSetting>,
    /// Would-be denials reported without blocking.
    pub alerts: Vec<Alert>,
    /// When to retry (rate limits).
    pub retry_after_ms: Option<u64>,
    /// The id to `record` actual usage against.
    pub decision_id: String,
    /// What is left on each stateful rule that applied, by rule id.
    pub remaining: BTreeMap<std::sync::Arc<str>, Remaining>,
    /// The explanation (empty unless asked for).
    pub trace: Vec<TraceEntry>,
    /// The lease granted by an `acquire`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
}
