//! The answer: allowed or not, why, and under which model, guardrails and settings.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, Index};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use crate::money::Micros;
use crate::settings::EffectiveSetting;

/// A policy name, rule id, guardrail or model: text kept inline up to 24 bytes, so that a
/// decision names what it names without an allocation (or a shared reference count that
/// two threads would both write) per name.
pub type Name = compact_str::CompactString;

/// The names a decision lists (matched policies, guardrails): the first two inline.
pub type Names = SmallVec<[Name; 2]>;

/// A decision's id: a UUID, kept as its 36 characters of text (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecisionId([u8; uuid::fmt::Hyphenated::LENGTH]);

impl DecisionId {
    /// The id whose 128 bits are `id`.
    pub fn from_u128(id: u128) -> DecisionId {
        // Every decision gets one: eight hex digits at a time in a `u64`, where `uuid`'s
        // encoder took ≈ 350 instructions (a test holds the two texts equal).
        let mut digits = [0u8; 32];
        for (i, chunk) in digits.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&hex8((id >> (96 - 32 * i)) as u32));
        }
        let mut text = [b'-'; uuid::fmt::Hyphenated::LENGTH];
        text[..8].copy_from_slice(&digits[..8]);
        text[9..13].copy_from_slice(&digits[8..12]);
        text[14..18].copy_from_slice(&digits[12..16]);
        text[19..23].copy_from_slice(&digits[16..20]);
        text[24..].copy_from_slice(&digits[20..]);
        DecisionId(text)
    }

    /// The id's text as bytes (ASCII), without checking them as UTF-8 again.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id as text, e.g. `0190f2c4-…`.
    pub fn as_str(&self) -> &str {
        // Always ASCII: `encode_lower` wrote it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// The eight lower-case hex digits of `x`, most significant first.
fn hex8(x: u32) -> [u8; 8] {
    // Spread the nibbles one to a byte (the first nibble in the highest byte)...
    let x = u64::from(x);
    let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    let x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // ...then make each byte its digit: '0' + n, and 39 more ('a' - '0' - 10) when n > 9.
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (x + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
}

impl Deref for DecisionId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for DecisionId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::str::FromStr for DecisionId {
    type Err = uuid::Error;
    /// Any UUID text; kept in its hyphenated lower-case form.
    fn from_str(text: &str) -> Result<DecisionId, uuid::Error> {
        uuid::Uuid::parse_str(text).map(|u| DecisionId::from_u128(u.as_u128()))
    }
}

impl PartialEq<str> for DecisionId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for DecisionId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for DecisionId {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl From<DecisionId> for String {
    fn from(id: DecisionId) -> String {
        id.as_str().to_string()
    }
}

impl Serialize for DecisionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DecisionId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<DecisionId, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What is left on each stateful rule that applied, by rule id (a map in JSON, in rule
/// id order). The first four are kept inline: a decision builds it without allocating.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemainingByRule(SmallVec<[(Name, Remaining); 4]>);

impl RemainingByRule {
    /// What is left on `rule`, if it applied.
    pub fn get(&self, rule: &str) -> Option<&Remaining> {
        let i = self
            .0
            .binary_search_by(|(r, _)| r.as_str().cmp(rule))
            .ok()?;
        Some(&self.0[i].1)
    }

    /// How many rules are listed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no rule is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rules and what is left on each, in rule id order.
    pub fn iter(&self) -> std::slice::Iter<'_, (Name, Remaining)> {
        self.0.iter()
    }

    /// Lists `rule` unless it is listed already (the first rule of an id reports).
    pub(crate) fn insert_first(&mut self, rule: &Name, remaining: Remaining) {
        if let Err(i) = self.0.binary_search_by(|(r, _)| r.as_str().cmp(rule)) {
            self.0.insert(i, (rule.clone(), remaining));
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// # Panics
///
/// When `rule` is not listed, as a `BTreeMap` index does.
impl Index<&str> for RemainingByRule {
    type Output = Remaining;
    fn index(&self, rule: &str) -> &Remaining {
        self.get(rule)
            .unwrap_or_else(|| panic!("no remaining amount for rule `{rule}`"))
    }
}

impl<'a> IntoIterator for &'a RemainingByRule {
    type Item = &'a (Name, Remaining);
    type IntoIter = std::slice::Iter<'a, (Name, Remaining)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<(Name, Remaining)> for RemainingByRule {
    fn from_iter<I: IntoIterator<Item = (Name, Remaining)>>(items: I) -> Self {
        let mut map = RemainingByRule::default();
        for (rule, remaining) in items {
            map.insert_first(&rule, remaining);
        }
        map
    }
}

impl Serialize for RemainingByRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for RemainingByRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<Name, Remaining>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

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
    pub policy: Option<Name>,
    /// The deciding rule.
    pub rule: Option<Name>,
    /// The policy version the decision was made on.
    pub policy_version: u64,
    /// Policies whose own `match` held, in document order.
    pub matched_policies: Names,
    /// The model to use (after downgrades); null when the request named none.
    pub model: Option<Name>,
    /// Guardrails to apply, sorted.
    pub guardrails: Names,
    /// Settings that differ from their defaults for this subject (every setting, in a run).
    pub settings: BTreeMap<String, EffectiveSetting>,
    /// Would-be denials reported without blocking.
    pub alerts: Vec<Alert>,
    /// When to retry (rate limits).
    pub retry_after_ms: Option<u64>,
    /// The id to `record` actual usage against.
    pub decision_id: DecisionId,
    /// What is left on each stateful rule that applied, by rule id.
    pub remaining: RemainingByRule,
    /// The explanation (empty unless asked for).
    pub trace: Vec<TraceEntry>,
    /// The lease granted by an `acquire`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_by_rule_is_a_sorted_map_that_keeps_the_first_value() {
        let mut map = RemainingByRule::default();
        map.insert_first(&Name::from("velocity"), Remaining::Usd(Micros(5)));
        map.insert_first(&Name::from("rpm"), Remaining::Count(9));
        map.insert_first(&Name::from("monthly"), Remaining::Usd(Micros(7)));
        // A second rule of the same id does not replace the first one's figure.
        map.insert_first(&Name::from("rpm"), Remaining::Count(1));
        let names: Vec<&str> = map.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["monthly", "rpm", "velocity"]);
        assert_eq!(map.get("rpm"), Some(&Remaining::Count(9)));
        assert_eq!(map["monthly"], Remaining::Usd(Micros(7)));
        assert_eq!(map.get("nope"), None);
        assert_eq!(map.len(), 3);

        // The JSON is the map's, in the same order as a BTreeMap's.
        let reference: BTreeMap<&str, &Remaining> =
            map.iter().map(|(n, r)| (n.as_str(), r)).collect();
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(json, serde_json::to_string(&reference).unwrap());
        assert_eq!(
            json,
            r#"{"monthly":"0.000007","rpm":9,"velocity":"0.000005"}"#
        );
        let back: RemainingByRule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, map);
    }

    #[test]
    fn decision_ids_are_uuid_text_inline() {
        let raw = 0x0190_f2c4_1234_7abc_8def_0123_4567_89ab_u128;
        let id = DecisionId::from_u128(raw);
        let expected = uuid::Uuid::from_u128(raw).hyphenated().to_string();
        assert_eq!(id.as_str(), expected);
        assert_eq!(id, expected.as_str());
        assert_eq!(id.to_string(), expected);
        // Any UUID text parses, kept in its hyphenated lower-case form.
        let simple = uuid::Uuid::from_u128(raw)
            .simple()
            .to_string()
            .to_uppercase();
        assert_eq!(simple.parse::<DecisionId>().unwrap(), id);
        assert!("not-a-uuid".parse::<DecisionId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{expected}\""));
        assert_eq!(serde_json::from_str::<DecisionId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<DecisionId>("\"x\"").is_err());
    }

    proptest::proptest! {
        /// The id's text is `uuid`'s hyphenated lower-case text of the same 128 bits.
        #[test]
        fn decision_id_text_is_uuid_text(raw in proptest::prelude::any::<u128>()) {
            let expected = uuid::Uuid::from_u128(raw).hyphenated().to_string();
            let id = DecisionId::from_u128(raw);
            proptest::prop_assert_eq!(id.as_str(), expected);
        }
    }
}
