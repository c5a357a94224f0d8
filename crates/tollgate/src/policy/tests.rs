//! Validation: every error kind, reported at once, at the right line and column.

use super::*;

fn errors(text: &str) -> Vec<Diagnostic> {
    match PolicySet::compile(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.errors().cloned().collect(),
    }
}

/// The one error whose text contains `needle`, with its line and column.
fn find(errs: &[Diagnostic], needle: &str) -> (u32, u32, String) {
    let hits: Vec<_> = errs
        .iter()
        .filter(|d| d.to_string().contains(needle))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one error containing {needle:?} in {errs:#?}"
    );
    (hits[0].line, hits[0].column, hits[0].to_string())
}

#[test]
fn every_error_is_reported_at_once_with_its_position() {
    let text = "\
policies:
  - name: p
    match: {teamz: [t]}
    rules:
      - {id: r, type: rate, limit: 3, per: 10 parsecs}
      - {id: r, type: budget, limit_usd: \"-1\", period: month}
  - name: p
";
    let errs = errors(text);
    assert_eq!(find(&errs, "teamz").0, 3);
    assert_eq!(find(&errs, "teamz").1, 13);
    let (line, col, msg) = find(&errs, "parsecs");
    assert_eq!((line, col), (5, 44));
    assert_eq!(
        msg,
        "policies[0].rules[0].per: rule `r` of policy `p`: bad duration `10 parsecs` (write a positive number with a unit: 500ms, 10s, 1m, 1h, 7d; at most 36500d)"
    );
    assert_eq!(find(&errs, "duplicate rule id").0, 6);
    let (line, _, msg) = find(&errs, "limit_usd");
    assert_eq!(line, 6);
    assert!(msg.contains("must not be negative"), "{msg}");
    let (line, col, _) = find(&errs, "duplicate policy name");
    assert_eq!((line, col), (7, 11));
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

#[test]
fn json_documents_get_positions_too() {
    let errs = errors(
        "{\"policies\": [\n  {\"name\": \"p\", \"rules\": [{\"id\": \"r\", \"type\": \"rate\", \"limit\": 1, \"per\": \"x\"}]}\n]}",
    );
    let (line, _, msg) = find(&errs, "bad duration");
    assert_eq!(line, 2);
    assert!(msg.starts_with("policies[0].rules[0].per"), "{msg}");
}

#[test]
fn syntax_errors_are_located() {
    let err = PolicySet::compile("policies:\n  - name: [unclosed\n").unwrap_err();
    let d = &err.diagnostics[0];
    assert!(d.message.starts_with("syntax error"), "{d}");
    assert!(d.line >= 2, "{d:?}");
}

#[test]
fn unknown_fields_everywhere() {
    let errs = errors(
        "polcies: []\npolicies: [{name: p, rulez: [], guardrails: {ad: [x]}}]\nsettings:\n  k: {type: string, default: x, descr: y}\npricing:\n  m: {input: 1, outptu: 2}\n",
    );
    for field in ["polcies", "rulez", "`ad`", "`descr`", "outptu"] {
        find(&errs, field);
    }
}

#[test]
fn rule_fields_must_belong_to_their_type() {
    let errs = errors(
        "policies: [{name: p, rules: [{id: b, type: budget, limit_usd: 1, period: day, burst: 5, colour: red}]}]",
    );
    let (_, _, msg) = find(&errs, "burst");
    assert!(
        msg.contains("does not belong to rule type `budget`"),
        "{msg}"
    );
    let (_, _, msg) = find(&errs, "colour");
    assert!(msg.contains("unknown field `colour`"), "{msg}");
}

#[test]
fn references_cycles_and_guardrails() {
    let errs = errors(
        "known_guardrails: [g]\npolicies:\n  - {name: a, inherit: [b], guardrails: [g, h]}\n  - {name: b, inherit: [c]}\n  - {name: c, inherit: [a]}\n  - {name: d, inherit: [zz], guardrails: {remove: [q]}}\n",
    );
    let (_, _, msg) = find(&errs, "cycle");
    assert!(msg.contains("a -> b -> c -> a"), "{msg}");
    find(&errs, "unknown parent policy `zz`");
    find(&errs, "unknown guardrail `h`");
    find(&errs, "unknown guardrail `q` in remove");
}

#[test]
fn self_inheritance_is_a_cycle() {
    let errs = errors("policies: [{name: a, inherit: [a]}]");
    find(&errs, "inheritance cycle: a -> a");
}

#[test]
fn settings_types_bounds_and_unknown_keys() {
    let errs = errors(
        "\
settings:
  n: {type: integer, default: 500, min: 1, max: 100}
  f: {type: number, default: 0.5, min: 1, max: 0}
  s: {type: string, default: 3}
  l: {type: list, default: x}
  b: {type: bool, default: yes}
  t: {type: colour, default: red}
  m: {type: string, default: x, min: 1}
policies:
  - {name: p, settings: {undefined.key: 1}}
",
    );
    let (line, col, msg) = find(&errs, "`n`");
    assert_eq!((line, col), (2, 31));
    assert!(msg.contains("above the maximum 100"), "{msg}");
    find(&errs, "max 0 is below min 1");
    find(&errs, "setting `s` is of type string");
    find(&errs, "setting `l` is of type list");
    find(&errs, "setting `b` is of type bool");
    find(&errs, "`colour` is not one of");
    find(&errs, "min/max only apply");
    find(&errs, "`undefined.key` is not defined");
}

#[test]
fn cel_that_does_not_compile_names_the_rule() {
    let errs = errors(
        "policies: [{name: p, rules: [{id: bad, type: expression, deny_if: 'labels.plan == '}, {id: w, type: downgrade, to: m, when: '((('}]}]",
    );
    let (_, _, msg) = find(&errs, "rule `bad`");
    assert!(msg.contains("does not compile"), "{msg}");
    find(&errs, "rule `w`");
}

#[test]
fn globs_and_match_keys() {
    let errs = errors(
        "policies: [{name: p, match: {team: ['[a-'], model: [], labels.: [x], labels: {plan: ['[']}}}]",
    );
    find(&errs, "match.team[0]");
    find(&errs, "empty pattern list");
    find(&errs, "unknown match key `labels.`");
    find(&errs, "match.labels.plan[0]");
}

#[test]
fn rule_specific_checks() {
    let errs = errors(
        "\
policies:
  - name: p
    rules:
      - {id: a, type: rate, limit: 0, per: 1s}
      - {id: b, type: rate, limit: 1, per: 1s, algorithm: leaky, burst: 2}
      - {id: c, type: rate, limit: 1, per: 1s, algorithm: fixed_window, burst: 2}
      - {id: d, type: budget, limit_usd: 1, period: day, overrides: {u: 2}}
      - {id: e, type: budget, limit_usd: 1, period: day, alert_at: 1.5}
      - {id: f, type: budget, limit_usd: 1, period: day, downgrade_to: m}
      - {id: g, type: quota, max: 1}
      - {id: h, type: access, clearances: {x: [a]}}
      - {id: i, type: restrict_models}
      - {id: j, type: expression, deny_if: 'true', code: ALLOWED}
      - {id: k, type: rate, limit: 1, per: 1s, mode: loud}
      - {id: l, type: forecast, monthly_budget_usd: abc}
      - {id: m, type: cost_velocity, limit_usd: 1}
      - {id: n, type: rate, limit: 1, per: 1s, by: [user, user]}
",
    );
    find(&errs, "must be at least 1, found 0");
    find(&errs, "`leaky` is not one of");
    find(&errs, "`burst` only applies");
    find(&errs, "`overrides` give limits per value");
    find(&errs, "`alert_at` is a fraction");
    find(&errs, "`downgrade_to` only applies");
    find(
        &errs,
        "rule `g` of policy `p`: missing required field `resource`",
    );
    find(
        &errs,
        "rule `h` of policy `p`: missing required field `label_keys`",
    );
    find(&errs, "needs `deny` or `allow`");
    find(&errs, "`ALLOWED` is not one of");
    find(&errs, "`loud` is not one of");
    find(&errs, "`abc` is not a decimal amount");
    find(
        &errs,
        "rule `m` of policy `p`: missing required field `window`",
    );
    find(&errs, "dimension `user` is listed twice");
}

#[test]
fn warnings_do_not_refuse() {
    let set = PolicySet::compile("pricing: {gpt-4o: {input: 1, output: 2}}\npolicies: [{name: p, match: {model: [gpt-4o, claude-3, 'gpt-*']}, rules: [{id: w, type: downgrade, to: m, when: 'lables.x == 1'}]}]").unwrap();
    let w: Vec<String> = set.warnings().iter().map(|d| d.to_string()).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w.iter()
            .any(|w| w.contains("`claude-3` has no entry in `pricing`")),
        "{w:?}"
    );
    assert!(w.iter().any(|w| w.contains("`lables`")), "{w:?}");
}

#[test]
fn pricing_is_exact_and_rounds_up() {
    let p = Price {
        input: 2_500_000,
        output: 10_000_000,
    };
    assert_eq!(p.cost(20_000, 5_000), Micros(100_000));
    assert_eq!(p.cost(1, 0), Micros(3)); // 2.5 micro-dollars, rounded up
    assert_eq!(p.cost(0, 0), Micros(0));
}

#[test]
fn chains_and_guardrails_fold() {
    let set = PolicySet::compile(
        "\
policies:
  - {name: a, guardrails: [g1, g2]}
  - {name: b, inherit: [a], guardrails: {add: [g3], remove: [g1]}}
  - {name: c, inherit: [b, a], guardrails: {add: [g1]}}
  - {name: d, inherit: [c, b]}
",
    )
    .unwrap();
    let chain = |i: usize| set.policies[i].chain.clone();
    assert_eq!(chain(2), vec![0, 1, 2]);
    assert_eq!(chain(3), vec![0, 1, 2, 3]);
    assert_eq!(set.policies[1].guardrails, vec!["g2", "g3"]);
    assert_eq!(set.policies[2].guardrails, vec!["g1", "g2", "g3"]);
    assert_eq!(set.evaluation_order(&[3, 1]).to_vec(), vec![0, 1, 2, 3]);
    assert_eq!(set.evaluation_order(&[1, 0]).to_vec(), vec![0, 1]);
}
