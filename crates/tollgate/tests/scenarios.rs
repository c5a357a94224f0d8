//! Runs every scenario file of the repository (and the shared conformance cases, when
//! they are beside the repository) through the library, as `tollgate test` does.

use std::path::{Path, PathBuf};

use tollgate::scenario;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn run_dir(dir: &Path) -> usize {
    let mut failures = Vec::new();
    let mut count = 0;
    for file in yaml_files(dir) {
        let text = std::fs::read_to_string(&file).unwrap();
        let base = file.parent().unwrap().to_path_buf();
        let load =
            move |rel: &str| std::fs::read_to_string(base.join(rel)).map_err(|e| e.to_string());
        for outcome in scenario::run_text(&text, &load) {
            count += 1;
            for f in outcome.failures {
                failures.push(format!("{}: {}: {f}", file.display(), outcome.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing steps:\n{}",
        failures.len(),
        failures.join("\n")
    );
    count
}

#[test]
fn repository_scenarios_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios");
    let n = run_dir(&dir);
    assert!(n >= 60, "only {n} scenarios found in {}", dir.display());
}

#[test]
fn shared_conformance_scenarios_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance");
    if !dir.exists() {
        eprintln!(
            "note: {} not found; skipping the shared conformance cases",
            dir.display()
        );
        return;
    }
    assert!(run_dir(&dir) >= 20);
}
