//! Runtime settings: typed keys with defaults and bounds, layered with provenance.
//!
//! Precedence, lowest to highest: `default` < `policy:<name>` (matched policies, later in
//! evaluation order wins) < `override:global` < `override:product:<id>` <
//! `override:team:<id>` < `override:key:<id>` < `override:user:<id>`. A run freezes the
//! result at creation and reports every value as `run:<id>`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::Subject;

/// The type of a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// A real number.
    Number,
    /// `true` / `false`.
    Bool,
    /// A list of values.
    List,
}

impl SettingType {
    /// Reads `string`, `integer`, `number`, `bool` or `list`.
    pub fn from_name(name: &str) -> Option<SettingType> {
        Some(match name {
            "string" => SettingType::String,
            "integer" => SettingType::Integer,
            "number" => SettingType::Number,
            "bool" => SettingType::Bool,
            "list" => SettingType::List,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SettingType::String => "string",
            SettingType::Integer => "integer",
            SettingType::Number => "number",
            SettingType::Bool => "bool",
            SettingType::List => "list",
        }
    }
}

/// The definition of one setting key.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingDef {
    /// The key, e.g. `worker.claim_batch_size`.
    pub key: String,
    /// Its type.
    pub ty: SettingType,
    /// The lowest layer's value.
    pub default: Value,
    /// Inclusive lower bound (integer and number).
    pub min: Option<f64>,
    /// Inclusive upper bound (integer and number).
    pub max: Option<f64>,
}

impl SettingDef {
    /// Checks a value against the type and bounds; returns the value normalised.
    pub fn check(&self, value: &Value) -> Result<Value, String> {
        let key = &self.key;
        let wrong = || {
            format!(
                "setting `{key}` is of type {}, got {}",
                self.ty.name(),
                describe(value)
            )
        };
        let (normalised, numeric) = match self.ty {
            SettingType::String => (
                value.as_str().map(|_| value.clone()).ok_or_else(wrong)?,
                None,
            ),
            SettingType::Bool => (
                value.as_bool().map(|_| value.clone()).ok_or_else(wrong)?,
                None,
            ),
            SettingType::List => (
                value.as_array().map(|_| value.clone()).ok_or_else(wrong)?,
                None,
            ),
            SettingType::Integer => {
                let i = value.as_i64().ok_or_else(wrong)?;
                (Value::from(i), Some(i as f64))
            }
            SettingType::Number => {
                let f = value.as_f64().ok_or_else(wrong)?;
                (value.clone(), Some(f))
            }
        };
        if let Some(n) = numeric {
            if let Some(min) = self.min
                && n < min
            {
                return Err(format!(
                    "setting `{key}`: {value} is below the minimum {min}"
                ));
            }
            if let Some(max) = self.max
                && n > max
            {
                return Err(format!(
                    "setting `{key}`: {value} is above the maximum {max}"
                ));
            }
        }
        Ok(normalised)
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("the string \"{s}\""),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// An effective value and the layer it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EffectiveSetting {
    /// The value.
    pub value: Value,
    /// `default`, `policy:<name>`, `override:<scope>` or `run:<id>`.
    pub source: String,
}

/// Where an override applies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Everyone.
    Global,
    /// One product.
    Product(String),
    /// One team.
    Team(String),
    /// One API key.
    Key(String),
    /// One user.
    User(String),
}

impl Scope {
    /// Reads `global`, `product:<id>`, `team:<id>`, `key:<id>`, `user:<id>`.
    pub fn parse(text: &str) -> Result<Scope, String> {
        if text == "global" {
            return Ok(Scope::Global);
        }
        let (kind, id) = text.split_once(':').ok_or_else(|| bad_scope(text))?;
        if id.is_empty() {
            return Err(bad_scope(text));
        }
        let id = id.to_string();
        Ok(match kind {
            "product" => Scope::Product(id),
            "team" => Scope::Team(id),
            "key" => Scope::Key(id),
            "user" => Scope::User(id),
            _ => return Err(bad_scope(text)),
        })
    }
}

fn bad_scope(text: &str) -> String {
    format!("bad scope `{text}` (expected global, product:<id>, team:<id>, key:<id> or user:<id>)")
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Product(id) => write!(f, "product:{id}"),
            Scope::Team(id) => write!(f, "team:{id}"),
            Scope::Key(id) => write!(f, "key:{id}"),
            Scope::User(id) => write!(f, "user:{id}"),
        }
    }
}

/// The override layers: values set at run time for a scope, above every policy.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    by_scope: HashMap<Scope, BTreeMap<String, Value>>,
}

impl Overrides {
    /// Sets `key` at `scope`; the caller has checked the value.
    pub fn set(&mut self, scope: Scope, key: String, value: Value) -> Option<Value> {
        self.by_scope.entry(scope).or_default().insert(key, value)
    }

    /// Removes `key` at `scope`, returning the old value.
    pub fn remove(&mut self, scope: &Scope, key: &str) -> Option<Value> {
        let map = self.by_scope.get_mut(scope)?;
        let old = map.remove(key);
        if map.is_empty() {
            self.by_scope.remove(scope);
        }
        old
    }

    /// The value set at exactly `scope`.
    pub fn get(&self, scope: &Scope, key: &str) -> Option<&Value> {
        self.by_scope.get(scope)?.get(key)
    }

    /// No override at all.
    pub fn is_empty(&self) -> bool {
        self.by_scope.is_empty()
    }

    /// Every override, as (scope, key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&Scope, &String, &Value)> {
        self.by_scope
            .iter()
            .flat_map(|(s, m)| m.iter().map(move |(k, v)| (s, k, v)))
    }

    /// The scopes that apply to a subject, lowest precedence first.
    fn scopes_for(subject: &Subject) -> impl Iterator<Item = Scope> + '_ {
        std::iter::once(Scope::Global)
            .chain(subject.product.clone().map(Scope::Product))
            .chain(subject.team.clone().map(Scope::Team))
            .chain(subject.key.clone().map(Scope::Key))
            .chain(subject.user.clone().map(Scope::User))
    }
}

/// Resolves every defined setting for a subject.
///
/// `policy_layers` are the `settings` blocks of the policies that apply, in evaluation
/// order (each with the name of the policy that wrote it).
pub(crate) fn resolve<'a>(
    defs: &BTreeMap<String, SettingDef>,
    policy_layers: impl Iterator<Item = (&'a str, &'a [(String, Value)])>,
    overrides: &Overrides,
    subject: &Subject,
) -> BTreeMap<String, EffectiveSetting> {
    let mut out: BTreeMap<String, EffectiveSetting> = defs
        .values()
        .map(|d| {
            (
                d.key.clone(),
                EffectiveSetting {
                    value: d.default.clone(),
                    source: "default".into(),
                },
            )
        })
        .collect();
    for (policy, values) in policy_layers {
        for (key, value) in values {
            if let Some(slot) = out.get_mut(key) {
                slot.value = value.clone();
                slot.source = format!("policy:{policy}");
            }
        }
    }
    if !overrides.is_empty() {
        for scope in Overrides::scopes_for(subject) {
            if let Some(map) = overrides.by_scope.get(&scope) {
                for (key, value) in map {
                    // An override outlives a policy edit that dropped or retyped its key:
                    // it only applies while it is still valid.
                    if let (Some(slot), Some(def)) = (out.get_mut(key), defs.get(key))
                        && def.check(value).is_ok()
                    {
                        slot.value = value.clone();
                        slot.source = format!("override:{scope}");
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(ty: SettingType, default: Value, min: Option<f64>, max: Option<f64>) -> SettingDef {
        SettingDef {
            key: "k".into(),
            ty,
            default,
            min,
            max,
        }
    }

    #[test]
    fn checks_types_and_bounds() {
        let int = def(SettingType::Integer, json!(8), Some(1.0), Some(64.0));
        assert_eq!(int.check(&json!(10)), Ok(json!(10)));
        assert!(int.check(&json!(0)).unwrap_err().contains("minimum"));
        assert!(int.check(&json!(65)).unwrap_err().contains("maximum"));
        assert!(int.check(&json!(1.5)).is_err());
        assert!(int.check(&json!("8")).is_err());
        let num = def(SettingType::Number, json!(0.2), Some(0.0), Some(2.0));
        assert!(num.check(&json!(1)).is_ok());
        assert!(num.check(&json!("hot")).unwrap_err().contains("`k`"));
        assert!(
            def(SettingType::Bool, json!(true), None, None)
                .check(&json!(1))
                .is_err()
        );
        assert!(
            def(SettingType::List, json!([]), None, None)
                .check(&json!(["a"]))
                .is_ok()
        );
        assert!(
            def(SettingType::String, json!(""), None, None)
                .check(&json!(["a"]))
                .is_err()
        );
    }

    #[test]
    fn scopes_parse_and_print() {
        for s in ["global", "product:p", "team:eu-1", "key:k", "user:u:7"] {
            assert_eq!(Scope::parse(s).unwrap().to_string(), s);
        }
        for bad in ["", "team", "team:", "org:x", "Global"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layers_apply_in_precedence_order() {
        let mut defs = BTreeMap::new();
        defs.insert("k".into(), def(SettingType::Integer, json!(1), None, None));
        let layer_a = [("k".to_string(), json!(2))];
        let layer_b = [("k".to_string(), json!(3))];
        let subject = Subject {
            team: Some("t".into()),
            user: Some("u".into()),
            ..Subject::default()
        };
        let mut o = Overrides::default();
        let r = resolve(
            &defs,
            [("a", &layer_a[..]), ("b", &layer_b[..])].into_iter(),
            &o,
            &subject,
        );
        assert_eq!(r["k"].source, "policy:b");
        o.set(Scope::User("u".into()), "k".into(), json!(9));
        o.set(Scope::Global, "k".into(), json!(5));
        o.set(Scope::Team("t".into()), "k".into(), json!(7));
        let r = resolve(&defs, std::iter::empty(), &o, &subject);
        assert_eq!(r["k"].value, json!(9));
        assert_eq!(r["k"].source, "override:user:u");
        o.remove(&Scope::User("u".into()), "k");
        let r = resolve(&defs, std::iter::empty(), &o, &subject);
        assert_eq!(r["k"].source, "override:team:t");
        let r = resolve(&defs, std::iter::empty(), &o, &Subject::default());
        assert_eq!(r["k"].source, "override:global");
    }
}
