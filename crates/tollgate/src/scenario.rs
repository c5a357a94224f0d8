//! Policy tests: scenario files run on a manual clock (`tollgate test`).
//!
//! A file holds one scenario or several separated by `---`. Each names a policy (inline
//! or `policy_file`) and a list of steps — checks, leases, records, clock moves, runs,
//! policy replacements and settings — each with an optional partial expectation.
//! See DESIGN §7 for the format; `usage` and `remove_setting` steps are extensions.

use std::sync::Arc;

use serde_json::{Value as Json, json};

use crate::clock::ManualClock;
use crate::duration::Millis;
use crate::engine::{Engine, RunSpec};
use crate::ledger::{Ledger, MemoryLedger, RecordOutcome};
use crate::money::Micros;
use crate::policy::PolicySet;
use crate::request::{Request, Subject};
use crate::yaml::{self, Node, Value};

/// The result of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The scenario's name.
    pub name: String,
    /// One line per failing step, `step N (kind): expected …, got …` (empty: passed).
    pub failures: Vec<String>,
}

impl Outcome {
    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Reads the file a `policy_file:` names (relative to the scenario file).
pub type FileLoader<'a> = &'a dyn Fn(&str) -> Result<String, String>;

/// Makes the ledger a scenario runs on (a fresh one per scenario).
pub type LedgerFactory<'a> = &'a dyn Fn() -> Arc<dyn Ledger>;

const DEFAULT_START: &str = "2026-01-01T00:00:00Z";

/// Runs every scenario of a text on fresh in-memory ledgers.
pub fn run_text(text: &str, load_file: FileLoader<'_>) -> Vec<Outcome> {
    run_text_with(text, load_file, &|| Arc::new(MemoryLedger::new()))
}

/// Runs every scenario of a text, each on a fresh ledger from `ledger`.
pub fn run_text_with(
    text: &str,
    load_file: FileLoader<'_>,
    ledger: LedgerFactory<'_>,
) -> Vec<Outcome> {
    match yaml::load_all(text) {
        Ok(docs) => docs
            .iter()
            .enumerate()
            .map(|(i, doc)| run_scenario(doc, i, load_file, ledger))
            .collect(),
        Err(e) => vec![Outcome {
            name: "(file)".into(),
            failures: vec![format!("syntax error at {}: {}", e.pos, e.message)],
        }],
    }
}

/// Each error as `LINE:COL: PATH: message`.
fn errors_text(e: &crate::policy::diag::PolicyErrors) -> Vec<String> {
    e.errors()
        .map(|d| format!("{}:{}: {d}", d.line, d.column))
        .collect()
}

fn parse_time(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("bad time `{text}`: {e} (write RFC 3339, e.g. 2026-01-01T00:00:00Z)"))
}

fn run_scenario(
    doc: &Node,
    index: usize,
    load_file: FileLoader<'_>,
    ledger: LedgerFactory<'_>,
) -> Outcome {
    let name = doc
        .get("name")
        .and_then(Node::as_str)
        .map_or_else(|| format!("scenario #{}", index + 1), str::to_string);
    let fail = |msg: String| Outcome {
        name: name.clone(),
        failures: vec![msg],
    };
    const KEYS: &[&str] = &[
        "name",
        "start",
        "policy",
        "policy_file",
        "steps",
        "expect_policy_error",
    ];
    if let Value::Map(entries) = &doc.value {
        if let Some((k, _)) = entries
            .iter()
            .find(|(k, _)| !KEYS.contains(&k.name.as_str()))
        {
            return fail(format!(
                "line {}: unknown scenario field `{}` (expected one of: {})",
                k.pos.line,
                k.name,
                KEYS.join(", ")
            ));
        }
    } else {
        return fail(format!("line {}: a scenario is a mapping", doc.pos.line));
    }

    let start = match doc.get("start").map(|n| {
        n.as_str()
            .ok_or("`start` is an RFC 3339 string".to_string())
            .and_then(parse_time)
    }) {
        None => parse_time(DEFAULT_START).expect("valid default"),
        Some(Ok(t)) => t,
        Some(Err(e)) => return fail(e),
    };
    let clock = Arc::new(ManualClock::new(start));
    let builder = Engine::builder().clock(clock.clone()).ledger(ledger());

    // A policy that cannot be read at all is a failure; one that is read but refused
    // (syntax or validation) is what `expect_policy_error` looks at.
    let compiled: Result<PolicySet, Vec<String>> = match (doc.get("policy"), doc.get("policy_file"))
    {
        (Some(p), None) => {
            PolicySet::compile_tree(p, &Default::default()).map_err(|e| errors_text(&e))
        }
        (None, Some(f)) => {
            let Some(path) = f.as_str() else {
                return fail("`policy_file` is a path".into());
            };
            match load_file(path) {
                Ok(text) => PolicySet::compile(&text).map_err(|e| errors_text(&e)),
                Err(e) => return fail(e),
            }
        }
        (None, None) => return fail("a scenario needs `policy` or `policy_file`".into()),
        (Some(_), Some(_)) => return fail("give `policy` or `policy_file`, not both".into()),
    };

    if let Some(expect) = doc.get("expect_policy_error") {
        let contains = expect
            .get("contains")
            .and_then(Node::as_str)
            .unwrap_or_default();
        return match compiled {
            Ok(_) => fail(format!(
                "expected the policy to be refused with an error containing {contains:?}, but it loaded"
            )),
            Err(errors) if errors.iter().any(|e| e.contains(contains)) => Outcome {
                name,
                failures: vec![],
            },
            Err(errors) => fail(format!(
                "expected a policy error containing {contains:?}, got: {}",
                errors.join(" | ")
            )),
        };
    }
    let set = match compiled {
        Ok(s) => s,
        Err(e) => return fail(format!("the policy was refused: {}", e.join(" | "))),
    };
    let engine = builder.build(set);
    let Some(Value::Seq(steps)) = doc.get("steps").map(|n| &n.value) else {
        return fail("a scenario needs `steps` (a list) or `expect_policy_error`".into());
    };
    let mut runner = Runner {
        engine,
        clock,
        last_allowed: None,
        leases: Vec::new(),
        failures: Vec::new(),
    };
    for (i, step) in steps.iter().enumerate() {
        runner.step(i + 1, step);
    }
    Outcome {
        name,
        failures: runner.failures,
    }
}

struct Runner {
    engine: Engine,
    clock: Arc<ManualClock>,
    last_allowed: Option<String>,
    leases: Vec<String>,
    failures: Vec<String>,
}

/// The most times one step may repeat: a million checks take a second or two; a
/// `repeat` of 2^63 would never end (found by `tests/no_panic.rs`, which ran one for
/// 20 minutes).
const MAX_REPEAT: i64 = 1_000_000;

const STEP_KINDS: &[&str] = &[
    "check",
    "acquire",
    "release",
    "record",
    "advance",
    "at",
    "create_run",
    "replace_policy",
    "set_setting",
    "remove_setting",
    "settings",
    "usage",
];

impl Runner {
    fn failed(&mut self, n: usize, kind: &str, msg: String) {
        self.failures.push(format!("step {n} ({kind}): {msg}"));
    }

    fn step(&mut self, n: usize, step: &Node) {
        let Value::Map(entries) = &step.value else {
            return self.failed(
                n,
                "?",
                format!("line {}: a step is a mapping", step.pos.line),
            );
        };
        let kinds: Vec<&str> = entries
            .iter()
            .map(|(k, _)| k.name.as_str())
            .filter(|k| STEP_KINDS.contains(k))
            .collect();
        let extra: Vec<&str> = entries
            .iter()
            .map(|(k, _)| k.name.as_str())
            .filter(|k| {
                !STEP_KINDS.contains(k) && !["expect", "repeat", "explain", "ttl"].contains(k)
            })
            .collect();
        if kinds.len() != 1 || !extra.is_empty() {
            return self.failed(
                n,
                "?",
                format!(
                    "line {}: a step has exactly one of {} (plus expect, repeat, ttl, explain); found {:?}",
                    step.pos.line,
                    STEP_KINDS.join(", "),
                    entries.iter().map(|(k, _)| k.name.as_str()).collect::<Vec<_>>()
                ),
            );
        }
        let kind = kinds[0];
        let body = step.get(kind).expect("present");
        let expect = step.get("expect").map(Node::to_json);
        let repeat = match step.get("repeat").map(|r| &r.value) {
            None => 1,
            Some(Value::Int(r)) if (1..=MAX_REPEAT).contains(r) => *r as usize,
            Some(_) => {
                let msg = format!("`repeat` is a whole number from 1 to {MAX_REPEAT}");
                return self.failed(n, kind, msg);
            }
        };
        for rep in 0..repeat {
            let label = if repeat > 1 {
                format!("{kind}, repetition {}", rep + 1)
            } else {
                kind.to_string()
            };
            let result = self.run_kind(kind, body, step);
            if let Err(msg) = check_expectation(result, expect.as_ref()) {
                self.failed(n, &label, msg);
                if repeat > 1 {
                    break;
                }
            }
        }
    }

    /// Runs one step: `Ok(actual JSON)` or `Err(refusal text)`.
    fn run_kind(&mut self, kind: &str, body: &Node, step: &Node) -> Result<Json, String> {
        match kind {
            "check" | "acquire" => {
                let request: Request = serde_json::from_value(body.to_json())
                    .map_err(|e| format!("bad request: {e}"))?;
                let explain = matches!(
                    step.get("explain").map(|n| &n.value),
                    Some(Value::Bool(true))
                );
                let decision = if kind == "acquire" {
                    let ttl = match step.get("ttl") {
                        Some(t) => Some(
                            t.as_str()
                                .and_then(Millis::parse)
                                .ok_or("`ttl` is a duration such as 30s")?,
                        ),
                        None => None,
                    };
                    self.engine.acquire(&request, ttl, explain)
                } else if explain {
                    self.engine.check_explained(&request)
                } else {
                    self.engine.check(&request)
                };
                if decision.allowed {
                    self.last_allowed = Some(decision.decision_id.to_string());
                    if let Some(l) = &decision.lease_id {
                        self.leases.push(l.clone());
                    }
                }
                serde_json::to_value(&decision).map_err(|e| e.to_string())
            }
            "release" => {
                let which = body
                    .as_str()
                    .ok_or("`release` is `last`, `all` or a lease id")?;
                let ids: Vec<String> = match which {
                    "last" => vec![self.leases.pop().ok_or("no lease to release")?],
                    "all" => std::mem::take(&mut self.leases),
                    id => {
                        self.leases.retain(|l| l != id);
                        vec![id.to_string()]
                    }
                };
                let mut released = 0;
                for id in ids {
                    if self.engine.release(&id).map_err(|e| e.to_string())? {
                        released += 1;
                    }
                }
                Ok(json!({"released": released}))
            }
            "record" => {
                let cost = body.get("cost_usd").ok_or("`record` needs `cost_usd`")?;
                let cost: Micros = serde_json::from_value(cost.to_json())
                    .map_err(|e| format!("bad cost_usd: {e}"))?;
                let decision = match body.get("decision_id").and_then(Node::as_str) {
                    Some(id) => id.to_string(),
                    None => self
                        .last_allowed
                        .clone()
                        .ok_or("no allowed decision to record against")?,
                };
                match self
                    .engine
                    .record(&decision, cost)
                    .map_err(|e| e.to_string())?
                {
                    RecordOutcome::Recorded => Ok(json!({"recorded": true, "duplicate": false})),
                    RecordOutcome::Duplicate => Ok(json!({"recorded": true, "duplicate": true})),
                    RecordOutcome::UnknownDecision => Err(format!("unknown decision `{decision}`")),
                }
            }
            "advance" => {
                let text = match &body.value {
                    Value::Str(s) => s.clone(),
                    _ => return Err("`advance` is a duration such as 10s".into()),
                };
                let ms = Millis::parse(&text).ok_or(format!("bad duration `{text}`"))?;
                self.clock.advance(ms.0);
                Ok(json!({}))
            }
            "at" => {
                let t = parse_time(body.as_str().ok_or("`at` is an RFC 3339 time")?)?;
                let now = self.engine.now_ms();
                if t < now {
                    return Err(format!(
                        "`at` moves the clock backwards (from {})",
                        crate::engine::rfc3339(now)
                    ));
                }
                self.clock.set(t);
                Ok(json!({}))
            }
            "create_run" => {
                let spec: RunSpec =
                    serde_json::from_value(body.to_json()).map_err(|e| format!("bad run: {e}"))?;
                let info = self.engine.create_run(spec).map_err(|e| e.to_string())?;
                serde_json::to_value(info).map_err(|e| e.to_string())
            }
            "replace_policy" => {
                let set = self
                    .engine
                    .compile_tree(body)
                    .map_err(|e| errors_text(&e).join("; "))?;
                Ok(json!({"version": self.engine.install(set)}))
            }
            "set_setting" | "remove_setting" => {
                let key = body
                    .get("key")
                    .and_then(Node::as_str)
                    .ok_or("needs `key`")?;
                let scope = body.get("scope").and_then(Node::as_str).unwrap_or("global");
                let old = if kind == "set_setting" {
                    let value = body.get("value").ok_or("needs `value`")?.to_json();
                    self.engine.set_setting(scope, key, value)
                } else {
                    self.engine.remove_setting(scope, key)
                }
                .map_err(|e| e.to_string())?;
                Ok(json!({"previous": old}))
            }
            "settings" => {
                let subject: Subject = match body.get("subject") {
                    Some(s) => serde_json::from_value(s.to_json())
                        .map_err(|e| format!("bad subject: {e}"))?,
                    None => Subject::default(),
                };
                let settings = self.engine.settings(&subject).map_err(|e| e.to_string())?;
                serde_json::to_value(settings).map_err(|e| e.to_string())
            }
            "usage" => {
                let dim = body.get("dimension").and_then(Node::as_str);
                let id = body.get("id").and_then(Node::as_str);
                let filter = dim.zip(id);
                let items = self.engine.usage(filter).map_err(|e| e.to_string())?;
                Ok(json!({"items": items}))
            }
            _ => Err(format!("unknown step `{kind}`")),
        }
    }
}

/// Compares a step's result with its expectation.
fn check_expectation(result: Result<Json, String>, expect: Option<&Json>) -> Result<(), String> {
    let wants_error = expect.and_then(|e| e.get("error")).and_then(Json::as_str);
    match (result, wants_error) {
        (Err(e), Some(text)) if e.contains(text) => Ok(()),
        (Err(e), Some(text)) => Err(format!(
            "expected an error containing {text:?}, got error: {e}"
        )),
        (Err(e), None) => Err(format!("error: {e}")),
        (Ok(actual), Some(text)) => Err(format!(
            "expected an error containing {text:?}, but it succeeded: {actual}"
        )),
        (Ok(_), None) if expect.is_none() => Ok(()),
        (Ok(actual), None) => {
            let expect = expect.expect("checked");
            if matches(expect, &actual) {
                Ok(())
            } else {
                Err(format!(
                    "expected {expect}, got {}",
                    project(expect, &actual)
                ))
            }
        }
    }
}

/// Partial comparison: objects on the keys the expectation names, lists by length and
/// element, money and numbers by value.
pub(crate) fn matches(expected: &Json, actual: &Json) -> bool {
    match (expected, actual) {
        (Json::Object(e), Json::Object(a)) => e
            .iter()
            .all(|(k, v)| matches(v, a.get(k).unwrap_or(&Json::Null))),
        (Json::Array(e), Json::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(x, y)| matches(x, y))
        }
        (Json::Null, Json::Null) => true,
        (e, a) if e == a => true,
        (e @ (Json::Number(_) | Json::String(_)), a @ (Json::Number(_) | Json::String(_))) => {
            match (decimal(e), decimal(a)) {
                (Some(x), Some(y)) => x == y,
                _ => false,
            }
        }
        _ => false,
    }
}

fn decimal(v: &Json) -> Option<i128> {
    // Compare with 12 decimal places: money has 6, settings numbers rarely more.
    let text = match v {
        Json::Number(n) => n.to_string(),
        Json::String(s) => s.clone(),
        _ => return None,
    };
    let (neg, digits) = text
        .strip_prefix('-')
        .map_or((false, text.as_str()), |r| (true, r));
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 12 || int.len() > 20 {
        return None;
    }
    let scaled: i128 = format!("{}{:0<12}", if int.is_empty() { "0" } else { int }, frac)
        .parse()
        .ok()?;
    Some(if neg { -scaled } else { scaled })
}

/// The part of `actual` the expectation talks about, for failure messages.
fn project(expected: &Json, actual: &Json) -> Json {
    match (expected, actual) {
        (Json::Object(e), Json::Object(a)) => Json::Object(
            e.iter()
                .map(|(k, v)| (k.clone(), a.get(k).map_or(Json::Null, |av| project(v, av))))
                .collect(),
        ),
        _ => actual.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_matching() {
        assert!(matches(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!matches(&json!({"a": 1}), &json!({"a": 2})));
        assert!(matches(&json!({"m": "0.5"}), &json!({"m": "0.500000"})));
        assert!(matches(&json!({"m": 0.2}), &json!({"m": 0.2})));
        assert!(matches(&json!({"n": 25}), &json!({"n": 25.0})));
        assert!(!matches(
            &json!({"s": "gpt-4o"}),
            &json!({"s": "gpt-4o-mini"})
        ));
        assert!(matches(
            &json!([{"rule": "x"}]),
            &json!([{"rule": "x", "policy": "p"}])
        ));
        assert!(!matches(
            &json!([{"rule": "x"}]),
            &json!([{"rule": "x"}, {"rule": "y"}])
        ));
        assert!(matches(&json!({"alerts": []}), &json!({"alerts": []})));
        assert!(matches(&json!({"x": null}), &json!({})));
        assert!(!matches(&json!({"x": true}), &json!({})));
    }

    #[test]
    fn a_failing_step_is_reported_and_never_passes() {
        let text = "name: t\npolicy: {policies: [{name: p, rules: [{id: r, type: rate, limit: 1, per: 1m}]}]}\nsteps:\n  - check: {}\n    repeat: 2\n    expect: {allowed: true}\n";
        let out = run_text(text, &|_| Err("no files".into()));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].failures.len(), 1, "{:?}", out[0].failures);
        assert!(
            out[0].failures[0].contains("step 1 (check, repetition 2)"),
            "{:?}",
            out[0].failures
        );
    }

    #[test]
    fn a_repeat_past_a_million_is_refused_before_running() {
        for repeat in ["1000001", "9223372036854775807", "0", "-1", "2.5"] {
            let text =
                format!("name: t\npolicy: {{}}\nsteps:\n  - check: {{}}\n    repeat: {repeat}\n");
            let out = run_text(&text, &|_| Err("no files".into()));
            assert!(
                out[0].failures[0].contains("`repeat` is a whole number from 1 to 1000000"),
                "{repeat}: {:?}",
                out[0].failures
            );
        }
    }

    #[test]
    fn unknown_steps_and_fields_fail() {
        let out = run_text("name: t\npolicy: {}\nsteps:\n  - chekc: {}\n", &|_| {
            Err("x".into())
        });
        assert!(!out[0].passed());
        let out = run_text("name: t\npolicy: {}\nstepz: []\n", &|_| Err("x".into()));
        assert!(!out[0].passed());
        let out = run_text(
            "name: t\npolicy: {}\nexpect_policy_error: {contains: x}\n",
            &|_| Err("x".into()),
        );
        assert!(
            !out[0].passed(),
            "a valid policy does not pass expect_policy_error"
        );
    }
}
