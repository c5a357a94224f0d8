//! CEL expressions (`when`, `deny_if`) over the request.
//!
//! Expressions compile once at load. The evaluation context is built at most once per
//! request, and only when a rule with an expression is reached: requests that need no
//! expression never pay for it. The standard library lives in one shared `Env` built
//! once per process (building it per call costs tens of microseconds).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::{Context, Env, Program, Value};

use crate::request::Request;

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// The variables an expression may use.
pub(crate) const VARIABLES: [&str; 6] = [
    "action", "subject", "model", "labels", "estimate", "resource",
];

/// A compiled expression and its source text.
pub(crate) struct Expr {
    pub source: String,
    program: Program,
    /// The request variables it uses (bit `i` = `VARIABLES[i]`): only those are bound.
    pub vars: u8,
}

/// The bit of `model` in [`Expr::vars`].
pub(crate) const MODEL: u8 = 1 << 2;

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl Expr {
    /// Compiles; on error returns the compiler's message.
    pub(crate) fn compile(source: &str) -> Result<Expr, String> {
        let program = ENV.compile(source).map_err(|e| {
            e.to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })?;
        let refs = program.references();
        let vars = VARIABLES
            .iter()
            .enumerate()
            .filter(|(_, v)| refs.has_variable(v))
            .fold(0u8, |acc, (i, _)| acc | (1 << i));
        Ok(Expr {
            source: source.to_string(),
            program,
            vars,
        })
    }

    /// Variables used that the request does not provide (probably typos).
    pub(crate) fn unknown_variables(&self) -> Vec<String> {
        let refs = self.program.references();
        let mut unknown: Vec<String> = refs
            .variables()
            .into_iter()
            .filter(|v| !VARIABLES.contains(v))
            .map(str::to_string)
            .collect();
        unknown.sort();
        unknown
    }

    /// Evaluates to a boolean; an evaluation error or a non-boolean result is an `Err`
    /// (the caller counts it as false and traces it).
    pub(crate) fn eval_bool(&self, scope: &Context<'_, '_>) -> Result<bool, String> {
        match self.program.execute(scope) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "`{}` gave {:?}, not a boolean",
                self.source,
                other.type_of()
            )),
            Err(e) => Err(format!("`{}`: {e}", self.source)),
        }
    }
}

/// An empty evaluation context (the standard library is shared, not rebuilt).
pub(crate) fn empty_context() -> Context<'static, 'static> {
    Context::with_env(Arc::clone(&ENV))
}

/// Builds the evaluation context for one request, with every variable bound.
#[cfg(test)]
pub(crate) fn context(request: &Request, model: Option<&str>) -> Context<'static, 'static> {
    let mut ctx = empty_context();
    bind(&mut ctx, request, model, u8::MAX);
    ctx
}

/// Binds the variables in `mask` (bits of [`VARIABLES`]), with `model` the current model.
pub(crate) fn bind(
    ctx: &mut Context<'static, 'static>,
    request: &Request,
    model: Option<&str>,
    mask: u8,
) {
    let s = |v: Option<&str>| Value::String(Arc::new(v.unwrap_or_default().to_string()));
    let has = |name: &str| {
        VARIABLES
            .iter()
            .position(|v| *v == name)
            .is_some_and(|i| mask & (1 << i) != 0)
    };
    if has("action") {
        ctx.add_variable_from_value("action", s(request.action.as_deref()));
    }
    if has("resource") {
        ctx.add_variable_from_value("resource", s(request.resource.as_deref()));
    }
    if has("model") {
        ctx.add_variable_from_value("model", s(model));
    }
    if has("subject") {
        bind_subject(ctx, request);
    }
    if has("labels") {
        let labels: HashMap<String, Value> = request
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), s(Some(v))))
            .collect();
        ctx.add_variable_from_value("labels", labels);
    }
    if has("estimate") {
        bind_estimate(ctx, request);
    }
}

fn bind_subject(ctx: &mut Context<'static, 'static>, request: &Request) {
    let s = |v: &str| Value::String(Arc::new(v.to_string()));
    let mut subject: HashMap<String, Value> = HashMap::new();
    for dim in crate::request::SubjectDim::ALL {
        if let Some(v) = request.subject.get(dim) {
            subject.insert(dim.name().to_string(), s(v));
        }
    }
    ctx.add_variable_from_value("subject", subject);
}

fn bind_estimate(ctx: &mut Context<'static, 'static>, request: &Request) {
    let mut estimate: HashMap<String, Value> = HashMap::new();
    if let Some(c) = request.estimate.cost_usd {
        estimate.insert("cost_usd".into(), Value::Float(c.as_f64()));
    }
    if let Some(t) = request.estimate.input_tokens {
        estimate.insert(
            "input_tokens".into(),
            Value::Int(t.min(i64::MAX as u64) as i64),
        );
    }
    if let Some(t) = request.estimate.output_tokens {
        estimate.insert(
            "output_tokens".into(),
            Value::Int(t.min(i64::MAX as u64) as i64),
        );
    }
    ctx.add_variable_from_value("estimate", estimate);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Request {
        Request::from_json(json).unwrap()
    }

    fn eval(src: &str, json: &str) -> Result<bool, String> {
        let r = req(json);
        Expr::compile(src)
            .unwrap()
            .eval_bool(&context(&r, r.model.as_deref()))
    }

    #[test]
    fn evaluates_over_the_request() {
        assert_eq!(
            eval(r#"labels.plan == "free""#, r#"{"labels":{"plan":"free"}}"#),
            Ok(true)
        );
        assert!(eval(r#"labels.plan == "free""#, r#"{}"#).is_err());
        assert_eq!(
            eval(
                r#"has(estimate.input_tokens) && estimate.input_tokens > 100000"#,
                r#"{"estimate":{"input_tokens":100001}}"#
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                r#"has(estimate.input_tokens) && estimate.input_tokens > 100000"#,
                r#"{}"#
            ),
            Ok(false)
        );
        assert_eq!(
            eval(r#"action == "" && model == "" && resource == """#, r#"{}"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"subject.user == "u1""#, r#"{"subject":{"user":"u1"}}"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"!has(subject.team)"#, r#"{"subject":{"user":"u1"}}"#),
            Ok(true)
        );
    }

    #[test]
    fn ints_and_doubles_compare_numerically() {
        assert_eq!(
            eval(
                "estimate.cost_usd > 1",
                r#"{"estimate":{"cost_usd":"1.5"}}"#
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "estimate.input_tokens < 2.5",
                r#"{"estimate":{"input_tokens":2}}"#
            ),
            Ok(true)
        );
        assert_eq!(
            eval("estimate.cost_usd == 2", r#"{"estimate":{"cost_usd":2}}"#),
            Ok(true)
        );
    }

    #[test]
    fn compile_errors_and_non_booleans() {
        assert!(Expr::compile("labels.plan == ").is_err());
        assert!(eval("1 + 1", "{}").unwrap_err().contains("not a boolean"));
        assert_eq!(
            Expr::compile("lables.x == 1 && model == ''")
                .unwrap()
                .unknown_variables(),
            vec!["lables"]
        );
    }

    #[test]
    fn only_referenced_variables_are_bound() {
        let e = Expr::compile("estimate.cost_usd > 1 && model == 'm'").unwrap();
        assert_eq!(e.vars, (1 << 4) | MODEL);
        let r = req(r#"{"model":"m","estimate":{"cost_usd":2},"labels":{"a":"b"}}"#);
        let mut ctx = empty_context();
        bind(&mut ctx, &r, r.model.as_deref(), e.vars);
        assert_eq!(e.eval_bool(&ctx), Ok(true));
        assert!(
            Expr::compile("labels.a == 'b'")
                .unwrap()
                .eval_bool(&ctx)
                .is_err()
        );
        bind(&mut ctx, &r, Some("other"), MODEL);
        assert_eq!(e.eval_bool(&ctx), Ok(false));
    }
}
