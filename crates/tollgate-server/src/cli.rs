//! The offline commands: `validate`, `check`, `test`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tollgate::{Engine, ManualClock, PolicySet, Request, Severity};

pub fn read(path: &Path) -> Result<String, String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("-: {e}"))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        let text = match read(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                failed = true;
                continue;
            }
        };
        let diagnostics = match PolicySet::compile(&text) {
            Ok(set) => set.warnings().to_vec(),
            Err(e) => {
                failed = true;
                e.diagnostics
            }
        };
        for d in &diagnostics {
            let level = match d.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            println!("{}:{}:{}: {level}: {d}", file.display(), d.line, d.column);
        }
        if !diagnostics.iter().any(|d| d.severity == Severity::Error) {
            println!("{}: ok", file.display());
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub fn check(file: &Path, request: &Path, explain: bool) -> ExitCode {
    let run = || -> Result<String, String> {
        let text = read(file)?;
        let set = PolicySet::compile(&text).map_err(|e| {
            e.errors()
                .map(|d| format!("{}:{}:{}: error: {d}", file.display(), d.line, d.column))
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        let request = Request::from_json(&read(request)?).map_err(|e| e.message)?;
        let clock = std::sync::Arc::new(ManualClock::new(tollgate::Clock::now_ms(
            &tollgate::SystemClock,
        )));
        let engine = Engine::builder().clock(clock).build(set);
        let decision = if explain {
            engine.check_explained(&request)
        } else {
            engine.check(&request)
        };
        serde_json::to_string_pretty(&decision).map_err(|e| e.to_string())
    };
    match run() {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Every scenario file under the given paths, in a stable order.
fn scenario_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                if e.is_dir() {
                    out.extend(scenario_files(&[e])?);
                } else if e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                    out.push(e);
                }
            }
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    Ok(out)
}

pub fn test(paths: &[PathBuf]) -> ExitCode {
    let files = match scenario_files(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let text = match read(&file) {
            Ok(t) => t,
            Err(e) => {
                println!("FAIL {e}");
                failed += 1;
                continue;
            }
        };
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let load = |rel: &str| read(&dir.join(rel));
        for outcome in tollgate::scenario::run_text(&text, &load) {
            if outcome.passed() {
                passed += 1;
            } else {
                failed += 1;
                for f in &outcome.failures {
                    println!("FAIL {}: {}: {f}", file.display(), outcome.name);
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
