//! CEL expressions (`when`, `deny_if`) over the request.
//!
//! Expressions compile once at load. The evaluation context is built at most once per
//! request, and only when a rule with an expression is reached: requests that need no
//! expression never pay for it. The standard library lives in one shared `Env` built
//! once per process (building it per call costs tens of microseconds).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::types::{CelDouble, CelInt, CelMap, CelMapKey, CelString};
use cel::common::value::Val;
use cel::{Context, Env, Program, Value};

use crate::request::Request;

mod direct;

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// The variables an expression may use.
pub(crate) const VARIABLES: [&str; 6] = [
    "action", "subject", "model", "labels", "estimate", "resource",
];

/// A compiled expression and its source text.
pub(crate) struct Expr {
    pub source: String,
    program: Program,
    /// The same expression compiled for direct evaluation, when its shape allows.
    direct: Option<direct::Direct>,
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
            direct: direct::Direct::compile(program.expression()),
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

    /// Evaluates directly over the request when the expression's shape allows and no
    /// error occurs; `None` means the interpreter must decide (see [`direct`]).
    pub(crate) fn eval_direct(&self, request: &Request, model: Option<&str>) -> Option<bool> {
        self.direct.as_ref()?.eval(request, model).ok()
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
pub(crate) fn empty_context<'r>() -> Context<'r, 'r> {
    Context::with_env(Arc::clone(&ENV))
}

/// Builds the evaluation context for one request, with every variable bound.
#[cfg(test)]
pub(crate) fn context<'r>(request: &'r Request, model: Option<&'r str>) -> Context<'r, 'r> {
    let mut ctx = empty_context();
    bind(&mut ctx, request, model, u8::MAX);
    ctx
}

fn string<'r>(s: &'r str) -> Box<dyn Val + 'r> {
    Box::new(CelString::from(s))
}

fn map<'r>(entries: impl Iterator<Item = (&'r str, Box<dyn Val + 'r>)>) -> Box<dyn Val + 'r> {
    let map: HashMap<CelMapKey<'r>, Box<dyn Val + 'r>> =
        entries.map(|(k, v)| (CelMapKey::from(k), v)).collect();
    Box::new(CelMap::from(map))
}

/// Binds the variables in `mask` (bits of [`VARIABLES`]), with `model` the current model.
/// Values borrow from the request: nothing is copied but the maps' own tables.
pub(crate) fn bind<'r>(
    ctx: &mut Context<'r, 'r>,
    request: &'r Request,
    model: Option<&'r str>,
    mask: u8,
) {
    for (i, name) in VARIABLES.iter().enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        let value = match *name {
            "action" => string(request.action.as_deref().unwrap_or_default()),
            "resource" => string(request.resource.as_deref().unwrap_or_default()),
            "model" => string(model.unwrap_or_default()),
            "subject" => map(crate::request::SubjectDim::ALL
                .iter()
                .filter_map(|d| request.subject.get(*d).map(|v| (d.name(), string(v))))),
            "labels" => map(request.labels.iter().map(|(k, v)| (k.as_str(), string(v)))),
            _ => {
                let e = &request.estimate;
                let int = |t: u64| -> Box<dyn Val + 'r> {
                    Box::new(CelInt::from(t.min(i64::MAX as u64) as i64))
                };
                map(e
                    .cost_usd
                    .map(|c| {
                        (
                            "cost_usd",
                            Box::new(CelDouble::from(c.as_f64())) as Box<dyn Val + 'r>,
                        )
                    })
                    .into_iter()
                    .chain(e.input_tokens.map(|t| ("input_tokens", int(t))))
                    .chain(e.output_tokens.map(|t| ("output_tokens", int(t)))))
            }
        };
        ctx.add_variable_as_val(*name, value);
    }
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
