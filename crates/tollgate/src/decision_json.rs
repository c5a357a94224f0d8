//! A decision's JSON written straight into a buffer, for the server's hot path.
//!
//! `serde_json` spends most of a decision's serialisation on the machinery around each
//! field (a call per key, a scan and three appends per string): ≈ 6,300 instructions for
//! a 10-rule check's decision, half of what the engine spends deciding it. Here the keys
//! are written as literals, and a string that needs no escaping (every name and reason
//! the engine writes) is appended as it is. Whatever needs escaping, and the nested
//! values that are empty on a plain check (settings, alerts, trace), are left to
//! `serde_json`, so the text is the same as `serde_json::to_writer` gives: a test holds
//! the two equal for every field.

use serde::Serialize;

use crate::decision::{Decision, Remaining};

impl Decision {
    /// Appends the decision's JSON to `out`: the same text as `serde_json::to_writer`.
    ///
    /// # Errors
    ///
    /// Only when `serde_json` would fail too (a setting whose value cannot be written).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.extend_from_slice(if self.allowed {
            b"{\"allowed\":true,\"code\":\""
        } else {
            b"{\"allowed\":false,\"code\":\""
        });
        out.extend_from_slice(self.code.as_str().as_bytes());
        out.extend_from_slice(b"\",\"reason\":");
        optional_string(out, self.reason.as_deref())?;
        out.extend_from_slice(b",\"policy\":");
        optional_string(out, self.policy.as_deref())?;
        out.extend_from_slice(b",\"rule\":");
        optional_string(out, self.rule.as_deref())?;
        out.extend_from_slice(b",\"policy_version\":");
        integer(out, self.policy_version);
        out.extend_from_slice(b",\"matched_policies\":");
        strings(out, &self.matched_policies)?;
        out.extend_from_slice(b",\"model\":");
        optional_string(out, self.model.as_deref())?;
        out.extend_from_slice(b",\"guardrails\":");
        strings(out, &self.guardrails)?;
        out.extend_from_slice(b",\"settings\":");
        nested(out, &self.settings, self.settings.is_empty(), b"{}")?;
        out.extend_from_slice(b",\"alerts\":");
        nested(out, &self.alerts, self.alerts.is_empty(), b"[]")?;
        out.extend_from_slice(b",\"retry_after_ms\":");
        match self.retry_after_ms {
            Some(ms) => integer(out, ms),
            None => out.extend_from_slice(b"null"),
        }
        // Hex digits and hyphens: nothing to escape.
        out.extend_from_slice(b",\"decision_id\":\"");
        out.extend_from_slice(self.decision_id.as_bytes());
        out.extend_from_slice(b"\",\"remaining\":{");
        for (i, (rule, remaining)) in self.remaining.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, rule)?;
            out.push(b':');
            match remaining {
                Remaining::Count(n) => integer(out, *n),
                Remaining::Usd(amount) => {
                    out.push(b'"');
                    out.extend_from_slice(amount.write_decimal_ascii(&mut [0u8; 28]));
                    out.push(b'"');
                }
            }
        }
        out.extend_from_slice(b"},\"trace\":");
        nested(out, &self.trace, self.trace.is_empty(), b"[]")?;
        if let Some(lease) = &self.lease_id {
            out.extend_from_slice(b",\"lease_id\":");
            string(out, lease)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// A JSON string. Text without a quote, a backslash or a control character is written as
/// it is (JSON escapes nothing else, and neither does `serde_json`); other text is
/// escaped by `serde_json`.
fn string(out: &mut Vec<u8>, text: &str) -> Result<(), serde_json::Error> {
    // Every byte is looked at (no early exit), so the loop runs on whole vectors.
    let plain = text.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, text)
    }
}

fn optional_string(out: &mut Vec<u8>, text: Option<&str>) -> Result<(), serde_json::Error> {
    match text {
        Some(text) => string(out, text),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn strings(out: &mut Vec<u8>, texts: &[crate::decision::Name]) -> Result<(), serde_json::Error> {
    out.push(b'[');
    for (i, text) in texts.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, text)?;
    }
    out.push(b']');
    Ok(())
}

fn integer(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A value written by `serde_json`, or `empty` when there is nothing in it.
fn nested(
    out: &mut Vec<u8>,
    value: &impl Serialize,
    is_empty: bool,
    empty: &[u8],
) -> Result<(), serde_json::Error> {
    if is_empty {
        out.extend_from_slice(empty);
        Ok(())
    } else {
        serde_json::to_writer(out, value)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use crate::decision::{
        Alert, Code, Decision, DecisionId, Name, Remaining, RemainingByRule, TraceEntry,
    };
    use crate::money::Micros;
    use crate::settings::EffectiveSetting;

    fn written(decision: &Decision) -> String {
        let mut out = Vec::new();
        decision.write_json(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn plain() -> Decision {
        Decision {
            allowed: true,
            code: Code::Allowed,
            reason: None,
            policy: None,
            rule: None,
            policy_version: 1,
            matched_policies: [Name::from("tenant")].into_iter().collect(),
            model: Some("gpt-4o".into()),
            guardrails: [Name::from("pii-mask")].into_iter().collect(),
            settings: BTreeMap::new(),
            alerts: Vec::new(),
            retry_after_ms: None,
            decision_id: DecisionId::from_u128(0x0190_f2c4_1234_7abc_8def_0123_4567_89ab),
            remaining: [
                (Name::from("rpm"), Remaining::Count(99)),
                (Name::from("monthly"), Remaining::Usd(Micros(12_340_000))),
            ]
            .into_iter()
            .collect(),
            trace: Vec::new(),
            lease_id: None,
        }
    }

    #[test]
    fn a_plain_decision_is_written_as_serde_json_writes_it() {
        let decision = plain();
        assert_eq!(
            written(&decision),
            r#"{"allowed":true,"code":"ALLOWED","reason":null,"policy":null,"rule":null,"policy_version":1,"matched_policies":["tenant"],"model":"gpt-4o","guardrails":["pii-mask"],"settings":{},"alerts":[],"retry_after_ms":null,"decision_id":"0190f2c4-1234-7abc-8def-0123456789ab","remaining":{"monthly":"12.340000","rpm":99},"trace":[]}"#
        );
        assert_eq!(
            written(&decision),
            serde_json::to_string(&decision).unwrap()
        );
    }

    #[test]
    fn every_field_filled_is_written_as_serde_json_writes_it() {
        let mut decision = plain();
        decision.allowed = false;
        decision.code = Code::RateLimited;
        decision.reason = Some("rate \"rpm\" exceeded\n\tby \\ u\u{1}ser é ☃ \u{7f}".into());
        decision.policy = Some("tenant".into());
        decision.rule = Some("r\"pm".into());
        decision.policy_version = u64::MAX;
        decision.model = None;
        decision.guardrails = Default::default();
        decision.settings.insert(
            "llm.temperature".into(),
            EffectiveSetting {
                value: serde_json::json!({"a": [1, 2.5, "x\n"]}),
                source: "override:team:t\"1".into(),
            },
        );
        decision.alerts.push(Alert {
            policy: "p".into(),
            rule: "b".into(),
            reason: "90% of \"monthly\"".into(),
        });
        decision.retry_after_ms = Some(1500);
        decision.remaining = [
            (Name::from("neg"), Remaining::Usd(Micros(-1))),
            (Name::from("min"), Remaining::Count(i64::MIN)),
            (Name::from("big"), Remaining::Usd(Micros(i64::MAX))),
        ]
        .into_iter()
        .collect();
        decision.trace.push(TraceEntry {
            policy: Some("tenant".into()),
            rule: None,
            outcome: "skipped".into(),
            detail: "no `user`".into(),
        });
        decision.lease_id = Some("lease-\u{0}".into());
        assert_eq!(
            written(&decision),
            serde_json::to_string(&decision).unwrap()
        );
    }

    proptest! {
        /// Any text in any string field, any numbers: the same JSON as serde_json's.
        #[test]
        fn any_decision_is_written_as_serde_json_writes_it(
            allowed: bool,
            reason: Option<String>,
            rule in "\\PC*",
            control in "[\\x00-\\x1f\"\\\\a-z]{0,8}",
            names in proptest::collection::vec("\\PC{0,30}", 0..4),
            version: u64,
            retry: Option<u64>,
            counts in proptest::collection::vec(any::<i64>(), 0..6),
        ) {
            let mut decision = plain();
            decision.allowed = allowed;
            decision.reason = reason;
            decision.rule = Some(rule.as_str().into());
            decision.policy = Some(control.as_str().into());
            decision.matched_policies = names.iter().map(|n| Name::from(n.as_str())).collect();
            decision.guardrails = names.iter().rev().map(|n| Name::from(n.as_str())).collect();
            decision.policy_version = version;
            decision.retry_after_ms = retry;
            decision.remaining = counts
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let remaining = if i % 2 == 0 { Remaining::Count(*n) } else { Remaining::Usd(Micros(*n)) };
                    (Name::from(format!("{}{i}", names.first().map_or("", String::as_str))), remaining)
                })
                .collect::<RemainingByRule>();
            prop_assert_eq!(written(&decision), serde_json::to_string(&decision).unwrap());
        }
    }
}
