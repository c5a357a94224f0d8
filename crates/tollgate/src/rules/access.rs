//! `access`: security-label clearance. Only subjects listed in `clearances` are
//! constrained (unless `default: deny`); every value of the request's `label_keys`
//! labels must be in the subject's clearance list. No labels, no constraint.

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::decision::Code;
use crate::eval::EvalCtx;
use crate::policy::reader;
use crate::request::{Dimension, SubjectDim};

use super::{RuleInput, Verdict};

pub(crate) const FIELDS: &[&str] = &["subject", "clearances", "label_keys", "default"];

pub(crate) struct Access {
    subject: Dimension,
    clearances: FxHashMap<String, Vec<String>>,
    label_keys: Vec<String>,
    default_allow: bool,
}

impl Access {
    pub(crate) fn parse(input: &mut RuleInput<'_, '_>) -> Option<Access> {
        let subject = match input.optional("subject") {
            None => Some(Dimension::Subject(SubjectDim::Agent)),
            Some(n) => {
                let at = input.at("subject");
                reader::string(n, &at, input.d).and_then(|s| {
                    let d = Dimension::parse(&s);
                    if d.is_none() {
                        at.error(input.d, n.pos, format!("unknown dimension `{s}`"));
                    }
                    d
                })
            }
        };
        let clearances = input.required("clearances").and_then(|n| {
            let at = input.at("clearances");
            let entries = reader::entries(n, &at, input.d)?;
            let mut map = FxHashMap::default();
            let mut ok = true;
            for (k, v) in entries {
                match reader::string_list(v, &at.field(&k.name), input.d) {
                    Some(list) => {
                        map.insert(k.name.clone(), list.into_iter().map(|(s, _)| s).collect());
                    }
                    None => ok = false,
                }
            }
            ok.then_some(map)
        });
        let label_keys = input.required("label_keys").and_then(|n| {
            reader::string_list(n, &input.at("label_keys"), input.d)
                .map(|l| l.into_iter().map(|(s, _)| s).collect())
        });
        let default_allow = match input.optional("default") {
            None => Some(true),
            Some(n) => reader::one_of(n, &input.at("default"), input.d, &["allow", "deny"])
                .map(|s| s == "allow"),
        };
        Some(Access {
            subject: subject?,
            clearances: clearances?,
            label_keys: label_keys?,
            default_allow: default_allow?,
        })
    }

    pub(crate) fn evaluate(&self, ctx: &mut EvalCtx<'_>) -> Verdict<'static> {
        let request = ctx.request;
        let labels: SmallVec<[(&str, &str); 4]> = self
            .label_keys
            .iter()
            .filter_map(|k| request.labels.get(k).map(|v| (k.as_str(), v.as_str())))
            .collect();
        if labels.is_empty() {
            return super::pass(ctx.explain, || "no labels to check".into());
        }
        let who = self.subject.value(request, ctx.model());
        let cleared = who.and_then(|w| self.clearances.get(w));
        match cleared {
            Some(list) => {
                for (k, v) in &labels {
                    if !list.iter().any(|c| c == v) {
                        return Verdict::Deny {
                            code: Code::PolicyDenied,
                            reason: format!(
                                "{} `{}` is not cleared for label {k}={v} (cleared: {})",
                                self.subject,
                                who.unwrap_or_default(),
                                list.join(", ")
                            ),
                        };
                    }
                }
                super::pass(ctx.explain, || "every label is cleared".into())
            }
            None if self.default_allow => super::pass(ctx.explain, || {
                format!(
                    "{} {} has no clearance list: open by default",
                    self.subject,
                    who.map_or("(absent)".to_string(), |w| format!("`{w}`"))
                )
            }),
            None => Verdict::Deny {
                code: Code::PolicyDenied,
                reason: format!(
                    "{} {} has no clearance for labelled input (default: deny)",
                    self.subject,
                    who.map_or("(absent)".to_string(), |w| format!("`{w}`"))
                ),
            },
        }
    }
}
