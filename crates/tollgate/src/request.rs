//! The question a caller asks: who wants to do what, with which model, at what estimated cost.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::money::Micros;

/// Who is asking. Every field is optional.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    /// The product (tenant) the call belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// The team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// The API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The end user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The run this call belongs to (see runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl Subject {
    /// The value of one subject dimension.
    pub fn get(&self, dim: SubjectDim) -> Option<&str> {
        match dim {
            SubjectDim::Product => self.product.as_deref(),
            SubjectDim::Team => self.team.as_deref(),
            SubjectDim::Key => self.key.as_deref(),
            SubjectDim::User => self.user.as_deref(),
            SubjectDim::Agent => self.agent.as_deref(),
            SubjectDim::Run => self.run.as_deref(),
        }
    }
}

/// A dimension of the subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectDim {
    /// `product`
    Product,
    /// `team`
    Team,
    /// `key`
    Key,
    /// `user`
    User,
    /// `agent`
    Agent,
    /// `run`
    Run,
}

impl SubjectDim {
    /// Every subject dimension.
    pub const ALL: [SubjectDim; 6] = [
        SubjectDim::Product,
        SubjectDim::Team,
        SubjectDim::Key,
        SubjectDim::User,
        SubjectDim::Agent,
        SubjectDim::Run,
    ];

    /// The dimension's name.
    pub fn name(self) -> &'static str {
        match self {
            SubjectDim::Product => "product",
            SubjectDim::Team => "team",
            SubjectDim::Key => "key",
            SubjectDim::User => "user",
            SubjectDim::Agent => "agent",
            SubjectDim::Run => "run",
        }
    }

    /// The dimension called `name`.
    pub fn from_name(name: &str) -> Option<SubjectDim> {
        SubjectDim::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// What a rule can key a counter by, or an access rule can constrain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// A subject field.
    Subject(SubjectDim),
    /// The (current) model.
    Model,
    /// The action.
    Action,
    /// The resource.
    Resource,
    /// `labels.<name>`.
    Label(String),
}

impl Dimension {
    /// Reads `product`, `model`, `labels.plan`, …
    pub fn parse(name: &str) -> Option<Dimension> {
        if let Some(d) = SubjectDim::from_name(name) {
            return Some(Dimension::Subject(d));
        }
        match name {
            "model" => Some(Dimension::Model),
            "action" => Some(Dimension::Action),
            "resource" => Some(Dimension::Resource),
            _ => name
                .strip_prefix("labels.")
                .filter(|l| !l.is_empty())
                .map(|l| Dimension::Label(l.to_string())),
        }
    }

    /// The dimension's value in a request, with `model` the current (possibly downgraded) one.
    pub fn value<'r>(&self, request: &'r Request, model: Option<&'r str>) -> Option<&'r str> {
        match self {
            Dimension::Subject(d) => request.subject.get(*d),
            Dimension::Model => model,
            Dimension::Action => request.action.as_deref(),
            Dimension::Resource => request.resource.as_deref(),
            Dimension::Label(l) => request.labels.get(l).map(String::as_str),
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dimension::Subject(d) => f.write_str(d.name()),
            Dimension::Model => f.write_str("model"),
            Dimension::Action => f.write_str("action"),
            Dimension::Resource => f.write_str("resource"),
            Dimension::Label(l) => write!(f, "labels.{l}"),
        }
    }
}

/// The caller's estimate of what the call will cost.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Estimate {
    /// The estimated cost; when absent it is priced from the tokens and `pricing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "0.0042"))]
    pub cost_usd: Option<Micros>,
    /// Estimated input (prompt) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// Estimated output (completion) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
}

/// A request for a decision. Every field is optional; unknown fields are refused
/// (a typo such as `subjcet` must not silently drop the subject and every limit with it).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// What is about to happen, e.g. `llm.call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Who asks.
    #[serde(default)]
    pub subject: Subject,
    /// The model requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Free-form labels (security labels, plan, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The estimated cost.
    #[serde(default)]
    pub estimate: Estimate,
    /// The resource a lease is asked for (`acquire`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// A request body that is not a valid [`Request`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// The offending field's path (`subject.usr`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Request {
    /// Parses a JSON request, naming the offending field on error.
    pub fn from_json(text: &str) -> Result<Request, RequestError> {
        serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            let field = unknown_field(&msg).map(str::to_string);
            RequestError {
                field,
                message: format!("invalid request: {msg}"),
            }
        })
    }
}

/// The field a serde error message names as unknown
/// (serde says "unknown field `x`, expected …").
pub fn unknown_field(message: &str) -> Option<&str> {
    message
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named() {
        let err = Request::from_json(r#"{"subjcet": {"user": "u1"}}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("subjcet"));
        let err = Request::from_json(r#"{"subject": {"usr": "u1"}}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("usr"));
        let err = Request::from_json(r#"{"estimate": {"cost_usd": "x"}}"#).unwrap_err();
        assert!(err.message.contains("decimal"), "{}", err.message);
    }

    #[test]
    fn full_request_parses() {
        let r = Request::from_json(
            r#"{"action":"llm.call","subject":{"product":"acme","team":"t","key":"k","user":"u","agent":"a","run":"r"},
                "model":"gpt-4o","labels":{"plan":"free"},"estimate":{"cost_usd":0.0042,"input_tokens":1200},"resource":"engines"}"#,
        )
        .unwrap();
        assert_eq!(r.estimate.cost_usd, Some(Micros(4200)));
        assert_eq!(r.subject.get(SubjectDim::Run), Some("r"));
        assert_eq!(
            Dimension::parse("labels.plan").unwrap().value(&r, None),
            Some("free")
        );
    }

    #[test]
    fn dimensions_parse() {
        assert_eq!(
            Dimension::parse("user"),
            Some(Dimension::Subject(SubjectDim::User))
        );
        assert_eq!(Dimension::parse("labels."), None);
        assert_eq!(Dimension::parse("nope"), None);
    }
}
