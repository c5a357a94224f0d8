//! Direct evaluation of the common expression shapes, without the CEL interpreter.
//!
//! Most `when` / `deny_if` expressions are a few comparisons of request fields with
//! literals joined by `&&`, `||` and `!` (`labels.plan == "trial"`,
//! `has(estimate.input_tokens) && estimate.input_tokens > 100000`). Interpreting those
//! costs microseconds: the request is bound as CEL maps and every node is resolved
//! dynamically. Here such an expression is compiled once, from the AST the CEL parser
//! produced, into a small tree read straight off the borrowed request.
//!
//! The CEL interpreter stays the reference. An expression with any other node (a
//! function, arithmetic, a macro, an unknown variable, a comparison of mismatched
//! types) is not compiled here at all, and an evaluation that meets an error (a missing
//! map key) gives up, so the interpreter produces the error and its message. What is
//! decided here follows the interpreter's rules exactly, including `&&`/`||` absorbing
//! an error on one side; a differential property test holds the two together.

use std::cmp::Ordering;

use cel::common::ast::{CallExpr, Expr as Ast, IdedExpr, LiteralValue, operators};

use crate::request::{Request, SubjectDim};

/// A compiled boolean expression.
#[derive(Debug)]
pub(crate) enum Direct {
    Literal(bool),
    Not(Box<Direct>),
    And(Box<Direct>, Box<Direct>),
    Or(Box<Direct>, Box<Direct>),
    /// `has(map.key)`.
    Has(Field),
    /// A string field compared with a string literal.
    StrEq {
        field: Field,
        value: String,
        negated: bool,
    },
    /// A string field in a list of string literals.
    StrIn {
        field: Field,
        values: Vec<String>,
    },
    /// A numeric field compared with a numeric literal (`field op literal`).
    Num {
        field: Field,
        op: Op,
        value: Number,
    },
}

/// A request field an expression reads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field {
    Action,
    Resource,
    Model,
    /// `subject.<name>`; `None` for a name that is not a subject dimension (always absent).
    Subject(Option<SubjectDim>),
    Label(String),
    CostUsd,
    InputTokens,
    OutputTokens,
    /// `estimate.<other>`: always absent.
    NoEstimate,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A CEL number: `int` or `double` (as the interpreter binds the estimate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Number {
    Int(i64),
    Double(f64),
}

/// Evaluation failed: the interpreter decides (and words the error).
#[derive(Debug, PartialEq)]
pub(crate) struct GiveUp;

/// What a field holds in one request.
enum Value<'r> {
    Str(&'r str),
    Num(Number),
}

impl Field {
    fn of(expr: &Ast) -> Option<Field> {
        match expr {
            Ast::Ident(name) => match name.as_str() {
                "action" => Some(Field::Action),
                "resource" => Some(Field::Resource),
                "model" => Some(Field::Model),
                _ => None,
            },
            Ast::Select(select) if !select.test => {
                Field::member(&select.operand.expr, &select.field)
            }
            _ => None,
        }
    }

    /// `map.key` for the request's three maps.
    fn member(map: &Ast, key: &str) -> Option<Field> {
        let Ast::Ident(map) = map else { return None };
        match map.as_str() {
            "subject" => Some(Field::Subject(SubjectDim::from_name(key))),
            "labels" => Some(Field::Label(key.to_string())),
            "estimate" => Some(match key {
                "cost_usd" => Field::CostUsd,
                "input_tokens" => Field::InputTokens,
                "output_tokens" => Field::OutputTokens,
                _ => Field::NoEstimate,
            }),
            _ => None,
        }
    }

    fn is_string(&self) -> bool {
        !matches!(
            self,
            Field::CostUsd | Field::InputTokens | Field::OutputTokens | Field::NoEstimate
        )
    }

    /// The value, or `None` when the map has no such key (an error in CEL).
    fn read<'r>(&self, request: &'r Request, model: Option<&'r str>) -> Option<Value<'r>> {
        let e = &request.estimate;
        let tokens = |t: u64| Number::Int(t.min(i64::MAX as u64) as i64);
        Some(match self {
            Field::Action => Value::Str(request.action.as_deref().unwrap_or_default()),
            Field::Resource => Value::Str(request.resource.as_deref().unwrap_or_default()),
            Field::Model => Value::Str(model.unwrap_or_default()),
            Field::Subject(d) => Value::Str(request.subject.get((*d)?)?),
            Field::Label(l) => Value::Str(request.labels.get(l)?),
            Field::CostUsd => Value::Num(Number::Double(e.cost_usd?.as_f64())),
            Field::InputTokens => Value::Num(tokens(e.input_tokens?)),
            Field::OutputTokens => Value::Num(tokens(e.output_tokens?)),
            Field::NoEstimate => return None,
        })
    }
}

impl Op {
    fn of(function: &str) -> Option<Op> {
        Some(match function {
            operators::EQUALS => Op::Eq,
            operators::NOT_EQUALS => Op::Ne,
            operators::LESS => Op::Lt,
            operators::LESS_EQUALS => Op::Le,
            operators::GREATER => Op::Gt,
            operators::GREATER_EQUALS => Op::Ge,
            _ => return None,
        })
    }

    /// The operator with its operands swapped (`5 < x` is `x > 5`).
    fn flipped(self) -> Op {
        match self {
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
            same => same,
        }
    }
}

impl Number {
    fn of(literal: &LiteralValue) -> Option<Number> {
        match literal {
            LiteralValue::Int(i) => Some(Number::Int(*i.inner())),
            LiteralValue::Double(d) if !d.inner().is_nan() => Some(Number::Double(*d.inner())),
            _ => None,
        }
    }

    /// The interpreter's numeric comparison: `int` with `int` exactly, otherwise as `f64`.
    fn compare(self, other: Number) -> Option<Ordering> {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (Number::Int(a), Number::Double(b)) => (a as f64).partial_cmp(&b),
            (Number::Double(a), Number::Int(b)) => a.partial_cmp(&(b as f64)),
            (Number::Double(a), Number::Double(b)) => a.partial_cmp(&b),
        }
    }
}

impl Direct {
    /// Compiles the shapes this module knows; `None` leaves the expression to the
    /// interpreter.
    pub(crate) fn compile(expr: &IdedExpr) -> Option<Direct> {
        match &expr.expr {
            Ast::Literal(LiteralValue::Boolean(b)) => Some(Direct::Literal(*b.inner())),
            Ast::Select(select) if select.test => {
                Field::member(&select.operand.expr, &select.field).map(Direct::Has)
            }
            Ast::Call(call) if call.target.is_none() => Direct::call(call),
            _ => None,
        }
    }

    fn call(call: &CallExpr) -> Option<Direct> {
        let boxed = |e: &IdedExpr| Direct::compile(e).map(Box::new);
        match (call.func_name.as_str(), call.args.as_slice()) {
            (operators::LOGICAL_NOT, [e]) => Some(Direct::Not(boxed(e)?)),
            (operators::LOGICAL_AND, [l, r]) => Some(Direct::And(boxed(l)?, boxed(r)?)),
            (operators::LOGICAL_OR, [l, r]) => Some(Direct::Or(boxed(l)?, boxed(r)?)),
            (operators::IN, [l, r]) => {
                let field = Field::of(&l.expr).filter(Field::is_string)?;
                let Ast::List(list) = &r.expr else {
                    return None;
                };
                if !list.optional_indices.is_empty() {
                    return None;
                }
                let values = list
                    .elements
                    .iter()
                    .map(|e| match &e.expr {
                        Ast::Literal(LiteralValue::String(s)) => Some(s.inner().to_string()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(Direct::StrIn { field, values })
            }
            (function, [l, r]) => {
                let op = Op::of(function)?;
                let (field, literal, op) = match (Field::of(&l.expr), Field::of(&r.expr)) {
                    (Some(f), None) => (f, &r.expr, op),
                    (None, Some(f)) => (f, &l.expr, op.flipped()),
                    _ => return None,
                };
                let Ast::Literal(literal) = literal else {
                    return None;
                };
                match literal {
                    LiteralValue::String(s)
                        if field.is_string() && matches!(op, Op::Eq | Op::Ne) =>
                    {
                        Some(Direct::StrEq {
                            field,
                            value: s.inner().to_string(),
                            negated: op == Op::Ne,
                        })
                    }
                    _ if !field.is_string() => Some(Direct::Num {
                        field,
                        op,
                        value: Number::of(literal)?,
                    }),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Evaluates over the request with `model` the current model.
    pub(crate) fn eval(&self, request: &Request, model: Option<&str>) -> Result<bool, GiveUp> {
        match self {
            Direct::Literal(b) => Ok(*b),
            Direct::Not(e) => e.eval(request, model).map(|b| !b),
            // As the interpreter: the left side decides when it can; an error on the left
            // is absorbed by a deciding right side.
            Direct::And(l, r) => match l.eval(request, model) {
                Ok(false) => Ok(false),
                left => match (left, r.eval(request, model)?) {
                    (Ok(true), right) => Ok(right),
                    (Err(_), false) => Ok(false),
                    _ => Err(GiveUp),
                },
            },
            Direct::Or(l, r) => match l.eval(request, model) {
                Ok(true) => Ok(true),
                left => match (left, r.eval(request, model)?) {
                    (Ok(false), right) => Ok(right),
                    (Err(_), true) => Ok(true),
                    _ => Err(GiveUp),
                },
            },
            Direct::Has(field) => Ok(field.read(request, model).is_some()),
            Direct::StrEq {
                field,
                value,
                negated,
            } => match field.read(request, model).ok_or(GiveUp)? {
                Value::Str(s) => Ok((s == value) != *negated),
                Value::Num(_) => Err(GiveUp),
            },
            Direct::StrIn { field, values } => match field.read(request, model).ok_or(GiveUp)? {
                Value::Str(s) => Ok(values.iter().any(|v| v == s)),
                Value::Num(_) => Err(GiveUp),
            },
            Direct::Num { field, op, value } => {
                let Value::Num(n) = field.read(request, model).ok_or(GiveUp)? else {
                    return Err(GiveUp);
                };
                let ordering = n.compare(*value);
                match op {
                    // Equality of incomparable numbers is false, not an error.
                    Op::Eq => Ok(ordering == Some(Ordering::Equal)),
                    Op::Ne => Ok(ordering != Some(Ordering::Equal)),
                    Op::Lt => Ok(ordering.ok_or(GiveUp)? == Ordering::Less),
                    Op::Le => Ok(ordering.ok_or(GiveUp)? != Ordering::Greater),
                    Op::Gt => Ok(ordering.ok_or(GiveUp)? == Ordering::Greater),
                    Op::Ge => Ok(ordering.ok_or(GiveUp)? != Ordering::Less),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    use super::super::{Expr, context};
    use crate::money::Micros;
    use crate::request::Request;

    fn direct(src: &str) -> bool {
        Expr::compile(src).unwrap().direct.is_some()
    }

    #[test]
    fn common_shapes_compile_and_others_do_not() {
        for src in [
            r#"labels.plan == "trial""#,
            r#"has(estimate.input_tokens) && estimate.input_tokens > 1000000"#,
            r#"!(model in ["gpt-4o", "o1"]) || subject.team != 't'"#,
            r#"1.5 <= estimate.cost_usd"#,
            r#"has(subject.nope) || true"#,
        ] {
            assert!(direct(src), "{src}");
        }
        for src in [
            r#"labels.plan.startsWith("t")"#,
            r#"estimate.input_tokens + 1 > 2"#,
            r#"labels.plan == 1"#,
            r#"estimate.cost_usd == "1""#,
            r#"model < "m""#,
            r#"estimate.input_tokens > 5u"#,
            r#"size(labels) > 0"#,
            r#"other == "x""#,
            r#"labels["plan"] == "x""#,
        ] {
            assert!(!direct(src), "{src}");
        }
    }

    fn field() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "action",
            "resource",
            "model",
            "subject.user",
            "subject.team",
            "subject.nope",
            "labels.plan",
            "labels.tier",
            "estimate.cost_usd",
            "estimate.input_tokens",
            "estimate.output_tokens",
            "estimate.nope",
        ])
    }

    fn literal() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            r#""""#, r#""a""#, r#""b""#, "0", "1", "2", "-1", "1.0", "1.5", "0.000001", "1000",
            "3u", "true",
        ])
    }

    fn atom() -> impl Strategy<Value = String> {
        let op = prop::sample::select(vec!["==", "!=", "<", "<=", ">", ">="]);
        prop_oneof![
            (field(), op.clone(), literal()).prop_map(|(f, o, l)| format!("{f} {o} {l}")),
            (literal(), op, field()).prop_map(|(l, o, f)| format!("{l} {o} {f}")),
            field()
                .prop_filter("has() takes a member", |f| f.contains('.'))
                .prop_map(|f| format!("has({f})")),
            field().prop_map(|f| format!(r#"{f} in ["a", "b"]"#)),
            Just("true".to_string()),
            Just("false".to_string()),
        ]
    }

    fn expression() -> impl Strategy<Value = String> {
        atom().prop_recursive(3, 12, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
                inner.prop_map(|a| format!("!({a})")),
            ]
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        let text = || prop::option::of(prop::sample::select(vec!["", "a", "b", "c"]));
        (
            (text(), text(), text(), text(), text()),
            (text(), text()),
            (
                prop::option::of(prop::sample::select(vec![0i64, 1, 2, 1_000_000, 1_500_000])),
                prop::option::of(prop::sample::select(vec![0u64, 1, 2, 1000, u64::MAX])),
                prop::option::of(prop::sample::select(vec![0u64, 1, 3])),
            ),
        )
            .prop_map(
                |((action, resource, model, user, team), (plan, tier), (cost, input, output))| {
                    let s = |v: Option<&str>| v.map(str::to_string);
                    let mut r = Request {
                        action: s(action),
                        resource: s(resource),
                        model: s(model),
                        ..Request::default()
                    };
                    r.subject.user = s(user);
                    r.subject.team = s(team);
                    for (k, v) in [("plan", plan), ("tier", tier)] {
                        if let Some(v) = v {
                            r.labels.insert(k.into(), v.into());
                        }
                    }
                    r.estimate.cost_usd = cost.map(Micros);
                    r.estimate.input_tokens = input;
                    r.estimate.output_tokens = output;
                    r
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whatever the direct evaluation decides, the interpreter decides the same; it
        /// gives up exactly when the interpreter fails.
        #[test]
        fn agrees_with_the_interpreter(src in expression(), r in request()) {
            let e = Expr::compile(&src).unwrap();
            let interpreted = e.eval_bool(&context(&r, r.model.as_deref()));
            if let Some(d) = &e.direct {
                match d.eval(&r, r.model.as_deref()) {
                    Ok(b) => prop_assert_eq!(Ok(b), interpreted, "{}", src),
                    Err(_) => prop_assert!(interpreted.is_err(), "{} gave up, interpreter: {:?}", src, interpreted),
                }
            }
        }
    }

    #[test]
    fn most_generated_expressions_are_direct() {
        // Guards the property test above against testing nothing: the generator's
        // typical output must be compiled directly.
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut direct = 0;
        for _ in 0..500 {
            let src = expression().new_tree(&mut runner).unwrap().current();
            direct += usize::from(Expr::compile(&src).unwrap().direct.is_some());
        }
        assert!(direct > 100, "only {direct} of 500 compiled directly");
    }
}
