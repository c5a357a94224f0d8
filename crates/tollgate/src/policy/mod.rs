//! Policy documents: read (YAML or JSON), validate (every error at once, located), and
//! compile into an immutable, versioned [`PolicySet`].
//!
//! Reading and validation are split like a compiler's front end: [`crate::yaml`] gives
//! a tree with positions, the readers here check the schema node by node, then the
//! cross-references (parents, cycles, guardrails, settings) are checked on the whole.

pub mod diag;
pub(crate) mod reader;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value as Json;

use crate::duration::Millis;
use smallvec::SmallVec;

use crate::matcher::{Condition, Matched, Matcher, Patterns};
use crate::money::{Micros, div_ceil_i128};
use crate::request::Dimension;
use crate::rules::custom::Registry;
use crate::rules::{self, Rule};
use crate::settings::{SettingDef, SettingType};
use crate::yaml::{self, Node, Pos, Value};

use diag::{Diagnostic, Diags, PolicyErrors};
use reader::At;

/// Prices of one model in micro-dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Price {
    input: i64,
    output: i64,
}

impl Price {
    /// The exact cost of a call, rounded up to the micro-dollar.
    pub(crate) fn cost(self, input_tokens: u64, output_tokens: u64) -> Micros {
        let total = i128::from(input_tokens) * i128::from(self.input)
            + i128::from(output_tokens) * i128::from(self.output);
        Micros(div_ceil_i128(total, 1_000_000).min(i128::from(i64::MAX)) as i64)
    }
}

/// One compiled policy.
pub(crate) struct Policy {
    pub name: crate::decision::Name,
    /// Ancestors (depth-first, parents left to right, each once), then itself.
    pub chain: Vec<u32>,
    pub rules: Vec<Rule>,
    /// The guardrails this policy yields when it matches (its chain folded).
    pub guardrails: Vec<crate::decision::Name>,
    pub settings: Vec<(String, Json)>,
    /// Whether a call goes ahead when the ledger cannot be reached.
    pub allow_on_backend_error: bool,
    add: Vec<String>,
    remove: Vec<String>,
}

/// The result of [`PolicySet::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution<'a> {
    /// Policies whose own `match` holds, in document order.
    pub matched_policies: Vec<&'a str>,
    /// Policies whose rules apply (matched chains), in evaluation order.
    pub evaluation_order: Vec<&'a str>,
    /// Guardrails, sorted.
    pub guardrails: Vec<&'a str>,
}

/// A validated, compiled, immutable policy document.
pub struct PolicySet {
    pub(crate) version: u64,
    pub(crate) document: Json,
    pub(crate) policies: Vec<Policy>,
    pub(crate) matcher: Matcher,
    pub(crate) settings: BTreeMap<String, SettingDef>,
    pub(crate) pricing: HashMap<String, Price>,
    pub(crate) reservation_ttl: Millis,
    pub(crate) warnings: Vec<Diagnostic>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field(
                "policies",
                &self.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PolicySet {
    /// The longest trailing window over which any rule reads recorded spend (0: none).
    pub(crate) fn longest_trailing_spend_window_ms(&self) -> i64 {
        self.policies
            .iter()
            .flat_map(|p| &p.rules)
            .filter_map(Rule::trailing_spend_window_ms)
            .max()
            .unwrap_or(0)
    }

    /// Reads, validates and compiles a YAML or JSON document.
    pub fn compile(text: &str) -> Result<PolicySet, PolicyErrors> {
        PolicySet::compile_with(text, &Registry::default())
    }

    pub(crate) fn compile_with(text: &str, custom: &Registry) -> Result<PolicySet, PolicyErrors> {
        let root = yaml::load_one(text).map_err(|e| PolicyErrors {
            diagnostics: vec![Diagnostic {
                severity: diag::Severity::Error,
                path: String::new(),
                line: e.pos.line,
                column: e.pos.column,
                message: format!("syntax error: {}", e.message),
            }],
        })?;
        compile_node(&root, custom)
    }

    /// Compiles an already parsed document (positions are the tree's own).
    pub(crate) fn compile_tree(root: &Node, custom: &Registry) -> Result<PolicySet, PolicyErrors> {
        compile_node(root, custom)
    }

    /// The version number (0 until the set is installed in an engine).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The document as JSON.
    pub fn document(&self) -> &Json {
        &self.document
    }

    /// Warnings found while validating.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// The policy names, in document order.
    pub fn policy_names(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|p| p.name.as_str())
    }

    /// The reservation TTL in milliseconds.
    pub fn reservation_ttl_ms(&self) -> i64 {
        self.reservation_ttl.0
    }

    /// The definition of a setting key.
    pub fn setting(&self, key: &str) -> Option<&crate::settings::SettingDef> {
        self.settings.get(key)
    }

    pub(crate) fn with_version(mut self, version: u64) -> PolicySet {
        self.version = version;
        self
    }

    /// Scope resolution alone: the policies whose own `match` holds (document order),
    /// the policies whose rules apply (evaluation order), and the guardrails (sorted).
    pub fn resolve(&self, request: &crate::request::Request) -> Resolution<'_> {
        let matched = self.matcher.matched(request);
        let order = self.evaluation_order(&matched);
        let name = |&i: &u32| self.policies[i as usize].name.as_str();
        Resolution {
            guardrails: self.guardrails(&matched),
            matched_policies: matched.iter().map(name).collect(),
            evaluation_order: order.iter().map(name).collect(),
        }
    }

    /// The union of the matched policies' guardrails, sorted.
    pub(crate) fn guardrails(&self, matched: &[u32]) -> Vec<&str> {
        let mut out: Vec<&str> = matched
            .iter()
            .flat_map(|&m| {
                self.policies[m as usize]
                    .guardrails
                    .iter()
                    .map(|g| g.as_str())
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// [`PolicySet::guardrails`] as a decision lists them: no allocation for a policy
    /// that matches alone with up to two guardrails.
    pub(crate) fn guardrail_names(&self, matched: &[u32]) -> crate::decision::Names {
        match matched {
            [only] => self.policies[*only as usize]
                .guardrails
                .iter()
                .cloned()
                .collect(),
            _ => self
                .guardrails(matched)
                .into_iter()
                .map(crate::decision::Name::from)
                .collect(),
        }
    }

    /// Whether the policy named `policy` lets calls through when the ledger fails
    /// (`on_backend_error: allow`); run budgets (`run:<id>`) never do.
    pub(crate) fn allows_backend_error(&self, policy: &str) -> bool {
        self.policies
            .iter()
            .find(|p| p.name == policy)
            .is_some_and(|p| p.allow_on_backend_error)
    }

    /// Whether the document declares any setting (without one, every decision's
    /// `settings` is empty, whatever the overrides).
    pub(crate) fn declares_settings(&self) -> bool {
        !self.settings.is_empty()
    }

    /// Every defined setting for a subject, given the policies that apply (evaluation
    /// order) and the overrides.
    pub(crate) fn resolve_settings(
        &self,
        order: &[u32],
        overrides: &crate::settings::Overrides,
        subject: &crate::request::Subject,
    ) -> BTreeMap<String, crate::settings::EffectiveSetting> {
        if self.settings.is_empty() {
            return BTreeMap::new();
        }
        let layers = order.iter().map(|&p| {
            let p = &self.policies[p as usize];
            (p.name.as_str(), p.settings.as_slice())
        });
        crate::settings::resolve(&self.settings, layers, overrides, subject)
    }

    /// Finds a rule by policy name and id.
    pub(crate) fn rule(&self, policy: &str, id: &str) -> Option<&Rule> {
        self.policies
            .iter()
            .find(|p| p.name == policy)?
            .rules
            .iter()
            .find(|r| &*r.id == id)
    }

    /// The policies whose rules apply, in evaluation order: each matched policy's chain,
    /// in document order, each policy at most once.
    pub(crate) fn evaluation_order(&self, matched: &[u32]) -> Matched {
        let mut seen: SmallVec<[bool; 64]> = smallvec::smallvec![false; self.policies.len()];
        let mut order = Matched::new();
        for &m in matched {
            for &p in &self.policies[m as usize].chain {
                if !std::mem::replace(&mut seen[p as usize], true) {
                    order.push(p);
                }
            }
        }
        order
    }
}

const TOP: &[&str] = &[
    "version",
    "settings",
    "pricing",
    "known_guardrails",
    "reservation_ttl",
    "policies",
];
const POLICY: &[&str] = &[
    "name",
    "on_backend_error",
    "description",
    "inherit",
    "match",
    "guardrails",
    "settings",
    "rules",
];
const MATCH: &[&str] = &[
    "product", "team", "key", "user", "agent", "model", "action", "labels",
];

struct RawPolicy {
    name: Option<(String, Pos)>,
    allow_on_backend_error: bool,
    inherit: Vec<(String, Pos)>,
    conditions: Vec<Condition>,
    add: Vec<(String, Pos)>,
    remove: Vec<(String, Pos)>,
    settings: Vec<(String, Json, Pos)>,
    rules: Vec<Rule>,
    at: At,
    pos: Pos,
}

fn compile_node(root: &Node, custom: &Registry) -> Result<PolicySet, PolicyErrors> {
    let mut d = Diags::default();
    let top = At::root();
    let fields = reader::mapping(root, &top, TOP, &mut d);
    let get = |name: &str| fields.as_ref().and_then(|f| f.get(name));

    if let Some(n) = get("version")
        && reader::integer(n, &top.field("version"), &mut d, 1).is_some_and(|v| v != 1)
    {
        top.field("version").error(
            &mut d,
            n.pos,
            "unsupported document version (this tollgate reads version 1)",
        );
    }
    let settings = get("settings").map_or_else(BTreeMap::new, |n| {
        setting_defs(n, &top.field("settings"), &mut d)
    });
    let pricing =
        get("pricing").map_or_else(HashMap::new, |n| pricing(n, &top.field("pricing"), &mut d));
    let known_guardrails: Option<HashSet<String>> = get("known_guardrails").and_then(|n| {
        reader::string_list(n, &top.field("known_guardrails"), &mut d)
            .map(|l| l.into_iter().map(|(s, _)| s).collect())
    });
    let reservation_ttl = get("reservation_ttl")
        .and_then(|n| reader::duration(n, &top.field("reservation_ttl"), &mut d))
        .unwrap_or(Millis(15 * 60_000));

    let mut raw = Vec::new();
    if let Some(n) = get("policies") {
        let at = top.field("policies");
        match &n.value {
            Value::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    raw.push(read_policy(item, &at.index(i), &settings, custom, &mut d));
                }
            }
            Value::Null => {}
            _ => at.error(
                &mut d,
                n.pos,
                format!("expected a list of policies, found {}", n.kind()),
            ),
        }
    }

    // Names: unique.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, p) in raw.iter().enumerate() {
        if let Some((name, pos)) = &p.name {
            if let Some(&first) = index.get(name.as_str()) {
                p.at.field("name").error(
                    &mut d,
                    *pos,
                    format!(
                        "duplicate policy name `{name}` (first defined at line {})",
                        raw[first].pos.line
                    ),
                );
            } else {
                index.insert(name, i);
            }
        }
    }
    // Parents: known.
    let mut parents: Vec<Vec<usize>> = Vec::with_capacity(raw.len());
    for p in &raw {
        let mut list = Vec::new();
        for (j, (parent, pos)) in p.inherit.iter().enumerate() {
            match index.get(parent.as_str()) {
                Some(&pi) => list.push(pi),
                None => p.at.field("inherit").index(j).error(
                    &mut d,
                    *pos,
                    format!("unknown parent policy `{parent}`"),
                ),
            }
        }
        parents.push(list);
    }
    // Cycles: named.
    let cycles = find_cycles(&parents);
    for cycle in &cycles {
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| raw[i].name.as_ref().map_or("?", |(n, _)| n.as_str()))
            .collect();
        let first = cycle[0];
        raw[first].at.field("inherit").error(
            &mut d,
            raw[first]
                .inherit
                .first()
                .map_or(raw[first].pos, |(_, p)| *p),
            format!("inheritance cycle: {} -> {}", names.join(" -> "), names[0]),
        );
    }
    // Guardrails: known, when a registry is given.
    if let Some(known) = &known_guardrails {
        for p in &raw {
            for (list, what) in [(&p.add, "add"), (&p.remove, "remove")] {
                for (g, pos) in list.iter() {
                    if !known.contains(g) {
                        let mut names: Vec<&String> = known.iter().collect();
                        names.sort();
                        p.at.field("guardrails").error(
                            &mut d,
                            *pos,
                            format!(
                                "unknown guardrail `{g}` in {what} (known_guardrails: {})",
                                names
                                    .iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }
    // Model patterns without pricing: a warning (the estimate would be 0).
    if !pricing.is_empty() {
        for p in &raw {
            for c in p.conditions.iter().filter(|c| c.field == Dimension::Model) {
                for pat in &c.patterns.source {
                    let literal = !pat.contains(['*', '?', '[', '{', '\\']);
                    if literal && !pricing.contains_key(pat) {
                        p.at.field("match").field("model").warning(
                            &mut d,
                            p.pos,
                            format!("model `{pat}` has no entry in `pricing`: token-based estimates for it are 0"),
                        );
                    }
                }
            }
        }
    }

    if d.has_errors() {
        let mut diagnostics = d.list;
        diagnostics.sort_by_key(|d| (d.line, d.column));
        return Err(PolicyErrors { diagnostics });
    }

    let chains: Vec<Vec<u32>> = (0..raw.len()).map(|i| chain(i, &parents)).collect();
    let matcher = Matcher::new(&raw.iter().map(|p| p.conditions.clone()).collect::<Vec<_>>());
    let mut policies: Vec<Policy> = raw
        .into_iter()
        .map(|p| Policy {
            name: p.name.map(|(n, _)| n).unwrap_or_default().into(),
            chain: Vec::new(),
            rules: p.rules,
            guardrails: Vec::new(),
            settings: p.settings.into_iter().map(|(k, v, _)| (k, v)).collect(),
            allow_on_backend_error: p.allow_on_backend_error,
            add: p.add.into_iter().map(|(g, _)| g).collect(),
            remove: p.remove.into_iter().map(|(g, _)| g).collect(),
        })
        .collect();
    for (i, chain) in chains.into_iter().enumerate() {
        let mut set: Vec<String> = Vec::new();
        for &member in &chain {
            let m = &policies[member as usize];
            for g in &m.add {
                if !set.contains(g) {
                    set.push(g.clone());
                }
            }
            set.retain(|g| !m.remove.contains(g));
        }
        set.sort();
        policies[i].guardrails = set.into_iter().map(Into::into).collect();
        policies[i].chain = chain;
    }
    Ok(PolicySet {
        version: 0,
        document: root.to_json(),
        policies,
        matcher,
        settings,
        pricing,
        reservation_ttl,
        warnings: d.list,
    })
}

/// Ancestors depth-first (parents left to right, each once), then the policy itself.
fn chain(i: usize, parents: &[Vec<usize>]) -> Vec<u32> {
    fn visit(i: usize, parents: &[Vec<usize>], out: &mut Vec<u32>) {
        for &p in &parents[i] {
            if !out.contains(&(p as u32)) {
                visit(p, parents, out);
            }
        }
        if !out.contains(&(i as u32)) {
            out.push(i as u32);
        }
    }
    let mut out = Vec::new();
    visit(i, parents, &mut out);
    out
}

/// Every inheritance cycle, each reported once (as a list of policy indices).
fn find_cycles(parents: &[Vec<usize>]) -> Vec<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        Active,
        Done,
    }
    fn dfs(
        i: usize,
        parents: &[Vec<usize>],
        state: &mut [State],
        stack: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        state[i] = State::Active;
        stack.push(i);
        for &p in &parents[i] {
            match state[p] {
                State::New => dfs(p, parents, state, stack, out),
                State::Active => {
                    let start = stack.iter().position(|&s| s == p).unwrap_or(0);
                    out.push(stack[start..].to_vec());
                }
                State::Done => {}
            }
        }
        stack.pop();
        state[i] = State::Done;
    }
    let mut state = vec![State::New; parents.len()];
    let mut out = Vec::new();
    for i in 0..parents.len() {
        if state[i] == State::New {
            dfs(i, parents, &mut state, &mut Vec::new(), &mut out);
        }
    }
    out
}

fn read_policy(
    node: &Node,
    at: &At,
    defs: &BTreeMap<String, SettingDef>,
    custom: &Registry,
    d: &mut Diags,
) -> RawPolicy {
    let fields = reader::mapping(node, at, POLICY, d);
    let get = |n: &str| fields.as_ref().and_then(|f| f.get(n));
    let name = match get("name") {
        Some(n) => reader::nonempty_string(n, &at.field("name"), d).map(|s| (s, n.pos)),
        None => {
            if fields.is_some() {
                at.field("name")
                    .error(d, node.pos, "missing required field `name`");
            }
            None
        }
    };
    let at = at.with_context(match &name {
        Some((n, _)) => format!("policy `{n}`: "),
        None => String::new(),
    });
    let policy_name = name.as_ref().map_or("?", |(n, _)| n.as_str()).to_string();
    let inherit = get("inherit")
        .and_then(|n| reader::string_list(n, &at.field("inherit"), d))
        .unwrap_or_default();
    let allow_on_backend_error = get("on_backend_error").is_some_and(|n| {
        reader::one_of(n, &at.field("on_backend_error"), d, &["deny", "allow"])
            .is_some_and(|v| v == "allow")
    });
    let conditions = get("match").map_or_else(Vec::new, |n| conditions(n, &at.field("match"), d));
    let (add, remove) = get("guardrails").map_or_else(Default::default, |n| {
        guardrails(n, &at.field("guardrails"), d)
    });
    let settings = get("settings").map_or_else(Vec::new, |n| {
        policy_settings(n, &at.field("settings"), defs, d)
    });
    let mut rules = Vec::new();
    if let Some(n) = get("rules") {
        let rat = at.field("rules");
        match &n.value {
            Value::Seq(items) => {
                let mut ids: HashMap<String, u32> = HashMap::new();
                for (i, item) in items.iter().enumerate() {
                    let iat = rat.index(i);
                    if let Some(id) = item.get("id").and_then(Node::as_str) {
                        if let Some(line) = ids.get(id) {
                            iat.field("id").error(
                                d,
                                item.get("id").map_or(item.pos, |n| n.pos),
                                format!(
                                    "duplicate rule id `{id}` in this policy (first at line {line})"
                                ),
                            );
                        } else {
                            ids.insert(id.to_string(), item.pos.line);
                        }
                    }
                    if let Some(rule) = rules::parse_rule(item, &iat, &policy_name, custom, d) {
                        rules.push(rule);
                    }
                }
            }
            Value::Null => {}
            _ => rat.error(
                d,
                n.pos,
                format!("expected a list of rules, found {}", n.kind()),
            ),
        }
    }
    RawPolicy {
        name,
        allow_on_backend_error,
        inherit,
        conditions,
        add,
        remove,
        settings,
        rules,
        at,
        pos: node.pos,
    }
}

fn conditions(node: &Node, at: &At, d: &mut Diags) -> Vec<Condition> {
    let Some(entries) = reader::entries(node, at, d) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in entries {
        let kat = at.field(&key.name);
        if key.name == "labels" {
            if let Some(labels) = reader::entries(value, &kat, d) {
                for (label, pats) in labels {
                    if let Some(c) = condition(
                        Dimension::Label(label.name.clone()),
                        pats,
                        &kat.field(&label.name),
                        d,
                    ) {
                        out.push(c);
                    }
                }
            }
            continue;
        }
        let field = match key.name.strip_prefix("labels.") {
            Some(l) if !l.is_empty() => Some(Dimension::Label(l.to_string())),
            _ if MATCH.contains(&key.name.as_str()) => Dimension::parse(&key.name),
            _ => None,
        };
        match field {
            Some(field) => {
                if let Some(c) = condition(field, value, &kat, d) {
                    out.push(c);
                }
            }
            None => kat.error(
                d,
                key.pos,
                format!(
                    "unknown match key `{}` (expected one of: {}, labels.<name>)",
                    key.name,
                    MATCH.join(", ")
                ),
            ),
        }
    }
    out
}

fn condition(field: Dimension, node: &Node, at: &At, d: &mut Diags) -> Option<Condition> {
    let list = reader::string_list(node, at, d)?;
    if list.is_empty() {
        at.error(
            d,
            node.pos,
            "an empty pattern list matches nothing; remove the key to match any value",
        );
        return None;
    }
    let (patterns, positions): (Vec<String>, Vec<Pos>) = list.into_iter().unzip();
    match Patterns::new(patterns) {
        Ok(patterns) => Some(Condition { field, patterns }),
        Err((i, e)) => {
            at.index(i).error(d, positions[i], format!("bad glob: {e}"));
            None
        }
    }
}

type GuardrailLists = (Vec<(String, Pos)>, Vec<(String, Pos)>);

fn guardrails(node: &Node, at: &At, d: &mut Diags) -> GuardrailLists {
    match &node.value {
        Value::Seq(_) => (
            reader::string_list(node, at, d).unwrap_or_default(),
            Vec::new(),
        ),
        _ => {
            let Some(f) = reader::mapping(node, at, &["add", "remove"], d) else {
                return Default::default();
            };
            let list = |name: &str, d: &mut Diags| {
                f.get(name)
                    .and_then(|n| reader::string_list(n, &at.field(name), d))
                    .unwrap_or_default()
            };
            (list("add", d), list("remove", d))
        }
    }
}

fn setting_defs(node: &Node, at: &At, d: &mut Diags) -> BTreeMap<String, SettingDef> {
    let mut out = BTreeMap::new();
    let Some(entries) = reader::entries(node, at, d) else {
        return out;
    };
    for (key, value) in entries {
        let kat = at.field(&key.name);
        let Some(f) = reader::mapping(
            value,
            &kat,
            &["type", "default", "min", "max", "description"],
            d,
        ) else {
            continue;
        };
        let ty = match f.get("type") {
            Some(n) => reader::one_of(
                n,
                &kat.field("type"),
                d,
                &["string", "integer", "number", "bool", "list"],
            )
            .and_then(|t| SettingType::from_name(&t)),
            None => {
                kat.field("type").error(
                    d,
                    value.pos,
                    format!("setting `{}`: missing required field `type`", key.name),
                );
                None
            }
        };
        let bound = |name: &str, d: &mut Diags| {
            f.get(name)
                .and_then(|n| reader::number(n, &kat.field(name), d).map(|v| (v, n.pos)))
        };
        let (min, max) = (bound("min", d), bound("max", d));
        if let (Some((lo, _)), Some((hi, pos))) = (min, max)
            && lo > hi
        {
            kat.field("max").error(
                d,
                pos,
                format!("setting `{}`: max {hi} is below min {lo}", key.name),
            );
        }
        if let Some(ty) = ty
            && !matches!(ty, SettingType::Integer | SettingType::Number)
            && (min.is_some() || max.is_some())
        {
            kat.error(
                d,
                value.pos,
                format!(
                    "setting `{}`: min/max only apply to integer and number settings",
                    key.name
                ),
            );
        }
        let Some(default) = f.get("default") else {
            kat.field("default").error(
                d,
                value.pos,
                format!("setting `{}`: missing required field `default`", key.name),
            );
            continue;
        };
        let Some(ty) = ty else { continue };
        let mut def = SettingDef {
            key: key.name.clone(),
            ty,
            default: Json::Null,
            min: min.map(|(v, _)| v),
            max: max.map(|(v, _)| v),
        };
        match def.check(&default.to_json()) {
            Ok(v) => {
                def.default = v;
                out.insert(key.name.clone(), def);
            }
            Err(e) => kat
                .field("default")
                .error(d, default.pos, format!("default: {e}")),
        }
    }
    out
}

fn policy_settings(
    node: &Node,
    at: &At,
    defs: &BTreeMap<String, SettingDef>,
    d: &mut Diags,
) -> Vec<(String, Json, Pos)> {
    let mut out = Vec::new();
    let Some(entries) = reader::entries(node, at, d) else {
        return out;
    };
    for (key, value) in entries {
        let kat = at.field(&key.name);
        match defs.get(&key.name) {
            None => kat.error(
                d,
                key.pos,
                format!(
                    "setting `{}` is not defined in the top-level `settings`",
                    key.name
                ),
            ),
            Some(def) => match def.check(&value.to_json()) {
                Ok(v) => out.push((key.name.clone(), v, value.pos)),
                Err(e) => kat.error(d, value.pos, e),
            },
        }
    }
    out
}

fn pricing(node: &Node, at: &At, d: &mut Diags) -> HashMap<String, Price> {
    let mut out = HashMap::new();
    let Some(entries) = reader::entries(node, at, d) else {
        return out;
    };
    for (model, value) in entries {
        let mat = at.field(&model.name);
        let Some(f) = reader::mapping(value, &mat, &["input", "output"], d) else {
            continue;
        };
        let price = |name: &str, d: &mut Diags| match f.get(name) {
            Some(n) => reader::money(n, &mat.field(name), d),
            None => {
                mat.field(name).error(
                    d,
                    value.pos,
                    format!(
                        "model `{}`: missing required field `{name}` (USD per 1M tokens)",
                        model.name
                    ),
                );
                None
            }
        };
        if let (Some(input), Some(output)) = (price("input", d), price("output", d)) {
            out.insert(
                model.name.clone(),
                Price {
                    input: input.0,
                    output: output.0,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests;
