//! The `tollgate` binary: exit codes and output formats of validate, check and test.

use std::path::PathBuf;
use std::process::Command;

fn tollgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_prints_file_line_column_and_exits_1() {
    let bad = temp(
        "bad.yaml",
        "policies:\n  - name: p\n    rules:\n      - {id: r, type: rate, limit: 3, per: 10 parsecs}\n",
    );
    let (code, out, _) = tollgate(&["validate", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let expected = format!(
        "{}:4:44: error: policies[0].rules[0].per: rule `r` of policy `p`: bad duration `10 parsecs`",
        bad.display()
    );
    assert!(out.starts_with(&expected), "{out}");
    let good = temp("good.yaml", "policies: [{name: p}]\n");
    let (code, out, _) = tollgate(&["validate", good.to_str().unwrap()]);
    assert_eq!(
        (code, out.trim_end()),
        (0, format!("{}: ok", good.display()).as_str())
    );
}

#[test]
fn check_prints_the_decision() {
    let policy = temp(
        "p.yaml",
        "policies: [{name: p, rules: [{id: no, type: restrict_models, deny: [gpt-4o]}]}]\n",
    );
    let req = temp("r.json", r#"{"model": "gpt-4o"}"#);
    let (code, out, _) = tollgate(&[
        "check",
        policy.to_str().unwrap(),
        "--request",
        req.to_str().unwrap(),
        "--explain",
    ]);
    assert_eq!(code, 0);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["code"], "POLICY_DENIED");
    assert_eq!(d["rule"], "no");
    assert!(!d["trace"].as_array().unwrap().is_empty());
    let bad_req = temp("bad.json", r#"{"subjcet": {}}"#);
    let (code, _, err) = tollgate(&[
        "check",
        policy.to_str().unwrap(),
        "--request",
        bad_req.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown field `subjcet`"), "{err}");
}

#[test]
fn test_reports_failing_steps_and_counts() {
    let cases = temp(
        "cases.yaml",
        "name: passes\npolicy: {}\nsteps: [{check: {}, expect: {allowed: true}}]\n---\nname: fails\npolicy: {}\nsteps: [{check: {}, expect: {allowed: false}}]\n",
    );
    let (code, out, _) = tollgate(&["test", cases.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("fails: step 1 (check): expected {\"allowed\":false}, got {\"allowed\":true}"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("1 passed, 1 failed"));
    let (code, out, _) = tollgate(&[
        "test",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/scenarios"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
}
