//! Scope matching: which policies' own `match` holds for a request.
//!
//! Every key of a policy's `match` holds glob patterns (`*`, `?`, `[a-z]`; case-sensitive;
//! `*` crosses `/`). A request field that is absent matches only a pattern that is exactly
//! `*`. Patterns are compiled once at load into one `GlobSet` per field across *all*
//! policies, so a request costs one set match per field it carries, whatever the number
//! of policies.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use smallvec::SmallVec;

use crate::request::{Dimension, Request};

/// Policy indices (matched, or in evaluation order): inline for the usual few.
pub(crate) type Matched = SmallVec<[u32; 8]>;

/// Compiles one pattern with tollgate's glob dialect.
pub(crate) fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    // globset gives `**` path semantics (`**/` may match nothing at all); names are not
    // paths here, so a run of stars is one star.
    let mut collapsed = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        if !(c == '*' && collapsed.ends_with('*') && !collapsed.ends_with("\\*")) {
            collapsed.push(c);
        }
    }
    GlobBuilder::new(&collapsed)
        .literal_separator(false)
        .case_insensitive(false)
        .backslash_escape(true)
        .empty_alternates(false)
        .build()
}

/// A list of patterns, any of which may match (used by `restrict_models` and traces).
#[derive(Clone, Debug)]
pub(crate) struct Patterns {
    pub source: Vec<String>,
    /// The patterns without glob syntax, compared as they are (a model list is mostly
    /// names: a string comparison costs a fraction of a glob set's match).
    literals: Vec<String>,
    /// The others, if any.
    globs: Option<GlobSet>,
}

/// Whether a pattern means only itself.
fn is_literal(pattern: &str) -> bool {
    !pattern.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

impl Patterns {
    pub(crate) fn new(patterns: Vec<String>) -> Result<Patterns, (usize, globset::Error)> {
        let mut b = GlobSetBuilder::new();
        let mut literals = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            if is_literal(p) {
                literals.push(p.clone());
            } else {
                b.add(glob(p).map_err(|e| (i, e))?);
            }
        }
        let globs = (literals.len() < patterns.len())
            .then(|| b.build())
            .transpose()
            .map_err(|e| (0, e))?;
        Ok(Patterns {
            source: patterns,
            literals,
            globs,
        })
    }

    pub(crate) fn is_match(&self, value: &str) -> bool {
        self.literals.iter().any(|l| l == value)
            || self.globs.as_ref().is_some_and(|g| g.is_match(value))
    }

    /// Absent values match only a pattern that is exactly `*`.
    pub(crate) fn matches_absent(&self) -> bool {
        self.source.iter().any(|p| p == "*")
    }
}

/// One key of one policy's `match`.
#[derive(Clone, Debug)]
pub(crate) struct Condition {
    pub field: Dimension,
    pub patterns: Patterns,
}

impl Condition {
    /// `None` when the condition holds, else why not (for explained decisions).
    pub(crate) fn failure(&self, request: &Request) -> Option<String> {
        let patterns = self.patterns.source.join(", ");
        match self.field.value(request, request.model.as_deref()) {
            Some(v) if self.patterns.is_match(v) => None,
            Some(v) => Some(format!("{} `{v}` does not match [{patterns}]", self.field)),
            None if self.patterns.matches_absent() => None,
            None => Some(format!(
                "the request has no {} (only `*` matches an absent field; patterns: [{patterns}])",
                self.field
            )),
        }
    }
}

struct FieldIndex {
    field: Dimension,
    set: GlobSet,
    /// Pattern index in `set` → policy index.
    owner: Vec<u32>,
    /// Policies with a `*` pattern on this field (they match an absent value).
    star: Vec<u32>,
}

/// The compiled `match` blocks of a whole policy set.
pub(crate) struct Matcher {
    /// Each policy's own conditions (for explanations).
    conditions: Vec<Vec<Condition>>,
    fields: Vec<FieldIndex>,
    /// How many fields each policy constrains.
    needed: Vec<u8>,
}

impl Matcher {
    pub(crate) fn new(conditions: &[Vec<Condition>]) -> Matcher {
        let mut fields: Vec<(Dimension, GlobSetBuilder, Vec<u32>, Vec<u32>)> = Vec::new();
        let mut needed = Vec::with_capacity(conditions.len());
        for (p, conds) in conditions.iter().enumerate() {
            needed.push(conds.len().min(u8::MAX as usize) as u8);
            for c in conds {
                let slot = match fields.iter().position(|f| f.0 == c.field) {
                    Some(i) => i,
                    None => {
                        fields.push((c.field.clone(), GlobSetBuilder::new(), vec![], vec![]));
                        fields.len() - 1
                    }
                };
                let entry = &mut fields[slot];
                for pattern in &c.patterns.source {
                    // Already validated when the condition was built.
                    if let Ok(g) = glob(pattern) {
                        entry.1.add(g);
                        entry.2.push(p as u32);
                    }
                }
                if c.patterns.matches_absent() {
                    entry.3.push(p as u32);
                }
            }
        }
        let fields = fields
            .into_iter()
            .map(|(field, builder, owner, star)| FieldIndex {
                field,
                set: builder.build().unwrap_or_else(|_| GlobSet::empty()),
                owner,
                star,
            })
            .collect();
        Matcher {
            conditions: conditions.to_vec(),
            fields,
            needed,
        }
    }

    /// Why a policy's `match` does not hold, condition by condition.
    pub(crate) fn explain(&self, policy: u32, request: &Request) -> String {
        let reasons: Vec<String> = self.conditions[policy as usize]
            .iter()
            .filter_map(|c| c.failure(request))
            .collect();
        reasons.join("; ")
    }

    /// Indices of the policies whose own `match` holds, in document order.
    pub(crate) fn matched(&self, request: &Request) -> Matched {
        let n = self.needed.len();
        // On the stack for up to 64 policies: this runs on every decision.
        let mut count: SmallVec<[u8; 64]> = smallvec::smallvec![0u8; n];
        // The field that last counted each policy, so that two patterns of one key
        // matching the same value count once.
        let mut seen_in: SmallVec<[u16; 64]> = smallvec::smallvec![u16::MAX; n];
        let mut hits = Vec::new();
        for (fi, f) in self.fields.iter().enumerate() {
            let fi = fi as u16;
            match f.field.value(request, request.model.as_deref()) {
                Some(value) => {
                    f.set.matches_into(value, &mut hits);
                    for &h in &hits {
                        let p = f.owner[h] as usize;
                        if seen_in[p] != fi {
                            seen_in[p] = fi;
                            count[p] += 1;
                        }
                    }
                }
                None => {
                    for &p in &f.star {
                        count[p as usize] += 1;
                    }
                }
            }
        }
        (0..n as u32)
            .filter(|&p| count[p as usize] == self.needed[p as usize])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SubjectDim;
    use proptest::prelude::*;

    fn cond(field: Dimension, pats: &[&str]) -> Condition {
        Condition {
            field,
            patterns: Patterns::new(pats.iter().map(|s| s.to_string()).collect()).unwrap(),
        }
    }

    fn team(t: Option<&str>, model: Option<&str>) -> Request {
        let mut r = Request::default();
        r.subject.team = t.map(str::to_string);
        r.model = model.map(str::to_string);
        r
    }

    #[test]
    fn matches_all_keys_and_absent_fields() {
        let team_dim = Dimension::Subject(SubjectDim::Team);
        let policies = vec![
            vec![],
            vec![
                cond(team_dim.clone(), &["free-*"]),
                cond(Dimension::Model, &["gpt-4?"]),
            ],
            vec![cond(team_dim.clone(), &["*"])],
            vec![cond(team_dim.clone(), &["a*", "*a"])],
        ];
        let m = Matcher::new(&policies);
        assert_eq!(
            m.matched(&team(Some("free-eu"), Some("gpt-4o"))).to_vec(),
            vec![0, 1, 2]
        );
        assert_eq!(
            m.matched(&team(Some("free-eu"), Some("gpt-4-turbo")))
                .to_vec(),
            vec![0, 2]
        );
        assert_eq!(m.matched(&team(None, Some("gpt-4o"))).to_vec(), vec![0, 2]);
        assert_eq!(m.matched(&team(Some("aa"), None)).to_vec(), vec![0, 2, 3]);
        assert_eq!(
            m.matched(&team(Some("Free-eu"), Some("gpt-4o"))).to_vec(),
            vec![0, 2]
        );
    }

    #[test]
    fn star_crosses_slashes_and_classes_work() {
        let p = Patterns::new(vec!["org/*".into(), "dev-[0-9]*".into()]).unwrap();
        assert!(p.is_match("org/a/b"));
        assert!(p.is_match("dev-7a"));
        assert!(!p.is_match("dev-x"));
        assert!(Patterns::new(vec!["[a-".into()]).is_err());
        // A literal name is only itself, beside a glob.
        let p = Patterns::new(vec!["gpt-4".into(), "claude-*".into(), "o1\\*".into()]).unwrap();
        assert!(p.is_match("gpt-4") && p.is_match("claude-3") && p.is_match("o1*"));
        assert!(!p.is_match("gpt-4o") && !p.is_match("gpt-") && !p.is_match("o1-mini"));
    }

    /// A direct backtracking matcher for `*`, `?` and `[...]` with ranges, the reference.
    fn reference(pattern: &[char], text: &[char]) -> bool {
        match pattern.first() {
            None => text.is_empty(),
            Some('*') => (0..=text.len()).any(|i| reference(&pattern[1..], &text[i..])),
            Some('?') => !text.is_empty() && reference(&pattern[1..], &text[1..]),
            Some('[') => {
                let close = pattern.iter().position(|&c| c == ']').unwrap();
                let class = &pattern[1..close];
                let Some(&c) = text.first() else { return false };
                let mut i = 0;
                let mut hit = false;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= c && c <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == c;
                        i += 1;
                    }
                }
                hit && reference(&pattern[close + 1..], &text[1..])
            }
            Some(&p) => text.first() == Some(&p) && reference(&pattern[1..], &text[1..]),
        }
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            3 => "[abc/-]".prop_map(|s| s),
            1 => Just("*".to_string()),
            1 => Just("?".to_string()),
            1 => Just("[a-b]".to_string()),
            1 => Just("[c/]".to_string()),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn globs_agree_with_the_reference(
            patterns in prop::collection::vec(pattern_strategy(), 1..4),
            text in "[abc/-]{0,6}",
        ) {
            // Lists mix literal names (compared as strings) and globs (the glob set).
            let ours = Patterns::new(patterns.clone()).unwrap().is_match(&text);
            let t: Vec<char> = text.chars().collect();
            let expected = patterns.iter().any(|p| {
                let p: Vec<char> = p.chars().collect();
                reference(&p, &t)
            });
            prop_assert_eq!(ours, expected, "patterns {:?} text {:?}", patterns, text);
        }
    }
}
