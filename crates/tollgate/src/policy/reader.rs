//! Typed reading of a position-annotated tree, collecting errors instead of stopping.

use crate::duration::Millis;
use crate::money::Micros;
use crate::policy::diag::Diags;
use crate::yaml::{Key, Node, Pos, Value};

/// Where a reader stands: the document path and the human context prefix
/// (e.g. ``rule `rpm` of policy `free-tier`: ``) every message starts with.
#[derive(Clone)]
pub(crate) struct At {
    pub path: String,
    pub context: String,
}

impl At {
    pub(crate) fn root() -> At {
        At {
            path: String::new(),
            context: String::new(),
        }
    }

    pub(crate) fn field(&self, name: &str) -> At {
        At {
            path: if self.path.is_empty() {
                name.to_string()
            } else {
                format!("{}.{name}", self.path)
            },
            context: self.context.clone(),
        }
    }

    pub(crate) fn index(&self, i: usize) -> At {
        At {
            path: format!("{}[{i}]", self.path),
            context: self.context.clone(),
        }
    }

    pub(crate) fn with_context(&self, context: String) -> At {
        At {
            path: self.path.clone(),
            context,
        }
    }

    pub(crate) fn error(&self, d: &mut Diags, pos: Pos, message: impl AsRef<str>) {
        d.error(
            &self.path,
            pos,
            format!("{}{}", self.context, message.as_ref()),
        );
    }

    pub(crate) fn warning(&self, d: &mut Diags, pos: Pos, message: impl AsRef<str>) {
        d.warning(
            &self.path,
            pos,
            format!("{}{}", self.context, message.as_ref()),
        );
    }
}

/// The entries of a mapping node whose keys were checked against a list of known fields.
pub(crate) struct Fields<'n> {
    pub entries: &'n [(Key, Node)],
    pub pos: Pos,
}

impl<'n> Fields<'n> {
    pub(crate) fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
    }
}

/// Reads a mapping; every key not in `known` is an error naming the key.
pub(crate) fn mapping<'n>(
    node: &'n Node,
    at: &At,
    known: &[&str],
    d: &mut Diags,
) -> Option<Fields<'n>> {
    let entries = entries(node, at, d)?;
    for (key, _) in entries {
        if !known.contains(&key.name.as_str()) {
            at.field(&key.name).error(
                d,
                key.pos,
                format!(
                    "unknown field `{}` (expected one of: {})",
                    key.name,
                    known.join(", ")
                ),
            );
        }
    }
    Some(Fields {
        entries,
        pos: node.pos,
    })
}

/// The entries of a mapping node with free-form keys.
pub(crate) fn entries<'n>(node: &'n Node, at: &At, d: &mut Diags) -> Option<&'n [(Key, Node)]> {
    match &node.value {
        Value::Map(entries) => Some(entries),
        Value::Null => Some(&[]),
        _ => {
            at.error(
                d,
                node.pos,
                format!("expected a mapping, found {}", node.kind()),
            );
            None
        }
    }
}

pub(crate) fn string(node: &Node, at: &At, d: &mut Diags) -> Option<String> {
    match &node.value {
        Value::Str(s) => Some(s.clone()),
        // Plain scalars such as `gpt-4` are strings already; numbers used as names are
        // accepted in their text form (`team: [42]`).
        Value::Int(i) => Some(i.to_string()),
        _ => {
            at.error(
                d,
                node.pos,
                format!("expected a string, found {}", node.kind()),
            );
            None
        }
    }
}

pub(crate) fn nonempty_string(node: &Node, at: &At, d: &mut Diags) -> Option<String> {
    let s = string(node, at, d)?;
    if s.is_empty() {
        at.error(d, node.pos, "must not be empty");
        return None;
    }
    Some(s)
}

/// A list of strings; a single string is not accepted (say `[a]`).
pub(crate) fn string_list(node: &Node, at: &At, d: &mut Diags) -> Option<Vec<(String, Pos)>> {
    match &node.value {
        Value::Seq(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match string(item, &at.index(i), d) {
                    Some(s) => out.push((s, item.pos)),
                    None => ok = false,
                }
            }
            ok.then_some(out)
        }
        _ => {
            at.error(
                d,
                node.pos,
                format!("expected a list, found {}", node.kind()),
            );
            None
        }
    }
}

/// A whole number `>= min`.
pub(crate) fn integer(node: &Node, at: &At, d: &mut Diags, min: i64) -> Option<i64> {
    let value = match &node.value {
        Value::Int(i) => *i,
        Value::Str(s) if s.trim().parse::<i64>().is_ok() => s.trim().parse().ok()?,
        _ => {
            at.error(
                d,
                node.pos,
                format!("expected a whole number, found {}", node.kind()),
            );
            return None;
        }
    };
    if value < min {
        let what = if min == 0 {
            "must not be negative".to_string()
        } else {
            format!("must be at least {min}")
        };
        at.error(d, node.pos, format!("{what}, found {value}"));
        return None;
    }
    Some(value)
}

/// A real number.
pub(crate) fn number(node: &Node, at: &At, d: &mut Diags) -> Option<f64> {
    match &node.value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => {
            at.error(
                d,
                node.pos,
                format!("expected a number, found {}", node.kind()),
            );
            None
        }
    }
}

/// A non-negative amount in USD: a decimal number or a decimal string.
pub(crate) fn money(node: &Node, at: &At, d: &mut Diags) -> Option<Micros> {
    let parsed = match &node.value {
        Value::Int(i) => i
            .checked_mul(Micros::PER_USD)
            .map(Micros)
            .ok_or_else(|| format!("`{i}` is too large")),
        Value::Float(f) => Micros::from_f64(*f).map_err(|e| e.to_string()),
        Value::Str(s) => Micros::parse(s).map_err(|e| e.to_string()),
        _ => Err(format!(
            "expected an amount in USD (a number or a decimal string), found {}",
            node.kind()
        )),
    };
    match parsed {
        Ok(m) if m.0 < 0 => {
            at.error(d, node.pos, format!("must not be negative, found `{m}`"));
            None
        }
        Ok(m) => Some(m),
        Err(e) => {
            at.error(d, node.pos, e);
            None
        }
    }
}

pub(crate) fn duration(node: &Node, at: &At, d: &mut Diags) -> Option<Millis> {
    let text = match &node.value {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        _ => {
            at.error(
                d,
                node.pos,
                format!("expected a duration such as `10s`, found {}", node.kind()),
            );
            return None;
        }
    };
    match Millis::parse(&text) {
        Some(ms) => Some(ms),
        None => {
            at.error(
                d,
                node.pos,
                format!("bad duration `{text}` (write a positive number with a unit: 500ms, 10s, 1m, 1h, 7d; at most 36500d)"),
            );
            None
        }
    }
}

/// One of a fixed set of words.
pub(crate) fn one_of(node: &Node, at: &At, d: &mut Diags, choices: &[&str]) -> Option<String> {
    let s = string(node, at, d)?;
    if choices.contains(&s.as_str()) {
        Some(s)
    } else {
        at.error(
            d,
            node.pos,
            format!("`{s}` is not one of: {}", choices.join(", ")),
        );
        None
    }
}
