//! Properties: no input makes the library panic.
//!
//! - An edited scenario: one scenario of the repository's own files (a policy document and
//!   the steps run against it: checks, records, leases, runs, settings, usage) with a
//!   token replaced by a value that is out of range, of the wrong type, empty, huge or not
//!   ASCII, or a slice of text cut out or put in. The outcome does not matter (most edits
//!   make an invalid document, which must come back as errors).
//! - A random sequence of engine calls (`random_calls`: checks, acquires, records,
//!   releases, runs, and a clock moved both ways) with extreme amounts and token counts,
//!   against a policy with every rule type, on the memory ledger (sweeping its idle
//!   counters as usual or after every few operations); what is left is never negative.
//!
//! A panic fails the test (debug builds check integer overflow too). `PROPTEST_CASES=<n>`
//! runs more cases than the default.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use tollgate::{MemoryLedger, scenario};

mod random_calls;

/// Values that reach the edges of what a field accepts.
const TRICKY: &[&str] = &[
    "",
    "0",
    "-1",
    "1",
    "0.0000001",
    "-0.5",
    "1e309",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "99999999999999999999999",
    "\"92233720368547.75807\"",
    "NaN",
    ".inf",
    "null",
    "~",
    "true",
    "[]",
    "{}",
    "[[]]",
    "{a: {b: {c: []}}}",
    "é",
    "🙂",
    "\"🙂🙂\"",
    "'",
    "\"",
    "*",
    "**",
    "?",
    "&",
    "!!binary",
    "#",
    "user",
    "labels.",
    "labels.🙂",
    "model",
    "0s",
    "-1s",
    "1ms",
    "99999999999d",
    "9223372036854775807ms",
    "month",
    "rolling:0s",
    "rolling:-1h",
    "rolling:99999999999d",
    "total",
    "2026-02-29T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59Z",
    "labels.plan == ",
    "size(labels) > 1 && ",
    "has(",
    "1 / 0 == 1",
    "9223372036854775807 + 1 > 0",
    "reject",
    "downgrade",
    "alert",
    "shadow",
];

fn scenarios() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.split("\n---\n")
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One edit of a document's text.
#[derive(Clone, Debug)]
enum Edit {
    /// Replace the `n`th token (a run of characters between YAML punctuation or spaces).
    Token(prop::sample::Index, &'static str),
    /// Cut out up to `len` characters from a position.
    Cut(prop::sample::Index, usize),
    /// Insert a value at a position.
    Insert(prop::sample::Index, &'static str),
}

fn edit() -> impl Strategy<Value = Edit> {
    let value = prop::sample::select(TRICKY);
    prop_oneof![
        4 => (any::<prop::sample::Index>(), value.clone()).prop_map(|(i, v)| Edit::Token(i, v)),
        1 => (any::<prop::sample::Index>(), 1usize..12).prop_map(|(i, n)| Edit::Cut(i, n)),
        1 => (any::<prop::sample::Index>(), value).prop_map(|(i, v)| Edit::Insert(i, v)),
    ]
}

/// The character boundaries of `text` (so edits never split a character).
fn boundaries(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect()
}

fn apply(text: &str, edit: &Edit) -> String {
    match edit {
        Edit::Token(index, value) => {
            let is_break = |c: char| c.is_whitespace() || "{}[],:".contains(c);
            let mut tokens = Vec::new();
            let mut start = None;
            for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
                match (start, is_break(c)) {
                    (None, false) => start = Some(i),
                    (Some(s), true) => {
                        tokens.push(s..i);
                        start = None;
                    }
                    _ => {}
                }
            }
            if tokens.is_empty() {
                return text.to_string();
            }
            let range = tokens[index.index(tokens.len())].clone();
            format!("{}{value}{}", &text[..range.start], &text[range.end..])
        }
        Edit::Cut(index, len) => {
            let b = boundaries(text);
            let from = index.index(b.len());
            let to = (from + len).min(b.len() - 1);
            format!("{}{}", &text[..b[from]], &text[b[to]..])
        }
        Edit::Insert(index, value) => {
            let b = boundaries(text);
            let at = b[index.index(b.len())];
            format!("{}{value}{}", &text[..at], &text[at..])
        }
    }
}

proptest! {
    #![proptest_config(random_calls::cases(300))]
    #[test]
    fn an_edited_scenario_never_panics(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        let docs = scenarios();
        let mut text = docs[which.index(docs.len())].clone();
        for e in &edits {
            text = apply(&text, e);
        }
        let load = |_: &str| Err("no files in this test".to_string());
        // Every outcome is fine; reading it (and its messages) must not panic either.
        for outcome in scenario::run_text(&text, &load) {
            let _ = outcome.passed();
            let _ = outcome.failures.join("\n");
        }
    }
}

proptest! {
    #![proptest_config(random_calls::cases(100))]
    #[test]
    fn random_engine_calls_never_panic(
        calls in prop::collection::vec(random_calls::call(), 1..60),
        sweep_every in prop::option::of(0u32..4),
    ) {
        // Sometimes with sweeps of idle counters falling between everything else (by
        // default a shard sweeps after thousands of operations, which 60 calls never reach).
        let ledger = sweep_every.map_or_else(MemoryLedger::new, MemoryLedger::sweeping_every);
        let (engine, clock) = random_calls::engine(Arc::new(ledger));
        random_calls::run(&engine, &clock, calls)?;
    }
}
