//! # tollgate
//!
//! A policy engine for LLM and AI-agent traffic. Before a model call, an agent task or
//! an engine provision, ask *may this happen, under which limits, with which model and
//! which guardrails?*
//!
//! The crate is split the way the decision flows:
//!
//! * [`policy`] reads a YAML/JSON document, validates it (every error at once, with
//!   line and column) and compiles it into an immutable [`PolicySet`];
//! * the evaluator matches scopes, resolves inheritance, guardrails and settings, runs
//!   the stateless rules and builds a [`ledger::Plan`] for the stateful ones — pure, no
//!   I/O, time from a [`Clock`];
//! * a [`Ledger`] applies the plan atomically (all or nothing); [`MemoryLedger`] is the
//!   in-process one;
//! * [`Engine`] ties them together: `check`, `acquire`/`release`, `record`, runs,
//!   settings overrides and the usage summary.
//!
//! ```
//! use std::sync::Arc;
//! use tollgate::{Engine, ManualClock, Request};
//!
//! let clock = Arc::new(ManualClock::new(0));
//! let engine = Engine::builder()
//!     .clock(clock.clone())
//!     .build_from_text(r#"
//! policies:
//!   - name: free
//!     match: {team: ["free-*"]}
//!     rules:
//!       - {id: rpm, type: rate, limit: 1, per: 1m, by: [user]}
//! "#)
//!     .unwrap();
//! let request: Request = serde_json::from_str(r#"{"subject": {"team": "free-eu", "user": "u1"}}"#).unwrap();
//! assert!(engine.check(&request).allowed);
//! let second = engine.check(&request);
//! assert_eq!(second.code.as_str(), "RATE_LIMITED");
//! assert_eq!(second.retry_after_ms, Some(60_000));
//! clock.advance(60_000);
//! assert!(engine.check(&request).allowed);
//! ```
#![warn(missing_docs)]

pub mod clock;
pub mod decision;
mod decision_json;
pub mod duration;
mod engine;
mod eval;
mod expr;
pub mod ledger;
mod matcher;
pub mod money;
pub mod policy;
pub mod request;
mod rules;
pub mod scenario;
pub mod settings;
pub mod yaml;

pub use clock::{Clock, ManualClock, SystemClock};
pub use decision::{
    Alert, Code, Decision, DecisionId, Name, Names, Remaining, RemainingByRule, TraceEntry,
};
pub use engine::{Engine, EngineBuilder, EngineError, RunInfo, RunSpec, UsageItem, rfc3339};
pub use ledger::{Ledger, MemoryLedger, RecordOutcome};
pub use money::Micros;
pub use policy::diag::{Diagnostic, PolicyErrors, Severity};
pub use policy::{PolicySet, Resolution};
pub use request::{Estimate, Request, Subject};
pub use rules::{CustomRule, CustomVerdict};
