//! The ledger conformance suite and every scenario file against Redis (needs
//! `TOLLGATE_TEST_REDIS`; skipped with a note without it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::ledger::{Ledger, conformance};
use tollgate_redis::RedisLedger;

fn url() -> Option<String> {
    let url = std::env::var("TOLLGATE_TEST_REDIS").ok();
    if url.is_none() {
        eprintln!("note: TOLLGATE_TEST_REDIS is not set; skipping the Redis ledger tests");
    }
    url
}

/// The keys of one test of this process.
fn namespace(test: &str) -> String {
    format!("tollgate-test:{}:{test}", std::process::id())
}

/// A ledger in a namespace of its own, so no two ledgers see each other's keys.
fn fresh(url: &str, test: &str) -> RedisLedger {
    static N: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("{}:{}", namespace(test), N.fetch_add(1, Ordering::Relaxed));
    RedisLedger::connect(url, &prefix, 2).expect("TOLLGATE_TEST_REDIS must be reachable")
}

/// Removes every key one test wrote.
fn cleanup(url: &str, test: &str) {
    RedisLedger::connect(url, &namespace(test), 1)
        .unwrap()
        .delete_all()
        .unwrap();
}

#[test]
fn redis_ledger_conforms() {
    let Some(url) = url() else { return };
    conformance::run_all("redis", &|| Box::new(fresh(&url, "conformance")));
    cleanup(&url, "conformance");
}

#[test]
fn scenario_files_pass_on_redis() {
    let Some(url) = url() else { return };
    let dirs = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/scenarios"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/conformance"),
    ];
    let mut failures = Vec::new();
    let mut count = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let base = file.parent().unwrap().to_path_buf();
            let load =
                move |rel: &str| std::fs::read_to_string(base.join(rel)).map_err(|e| e.to_string());
            let make = || -> Arc<dyn Ledger> { Arc::new(fresh(&url, "scenarios")) };
            for o in tollgate::scenario::run_text_with(&text, &load, &make) {
                count += 1;
                for f in o.failures {
                    failures.push(format!("{}: {}: {f}", file.display(), o.name));
                }
            }
        }
    }
    cleanup(&url, "scenarios");
    assert!(count > 50, "only {count} scenarios found");
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
