//! Tidy checks (in the manner of rust-analyzer's): rules of ARCHITECTURE.md that the compiler cannot state, read
//! off the workspace's sources. Each names the only modules allowed to do a thing; a line elsewhere fails with
//! its file and line.

use std::path::{Path, PathBuf};

/// The workspace's crates whose sources these rules cover (tests and vendored code are not covered).
const CRATES: [&str; 6] = ["common", "protocol", "participant", "coordinator", "loadgen", "migrations"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds common/").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every non-comment line of every crate's `src/`, as (path relative to the workspace, line number, text), up to
/// the file's `#[cfg(test)]` module: a unit test may reach into anything.
fn source_lines() -> Vec<(String, usize, String)> {
    let root = workspace();
    let mut files = Vec::new();
    for krate in CRATES {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 40, "found the workspace's sources: {} files", files.len());
    let mut lines = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&root).expect("under the root").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{relative}: {e}"));
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            if !line.trim_start().starts_with("//") {
                lines.push((relative.clone(), number + 1, line.to_owned()));
            }
        }
    }
    lines
}

/// The lines outside `allowed` (paths, or path prefixes ending in `/`) where `matches` holds.
fn offenders(allowed: &[&str], matches: impl Fn(&str) -> bool) -> Vec<String> {
    source_lines()
        .into_iter()
        .filter(|(path, _, line)| {
            matches(line) && !allowed.iter().any(|a| path == a || (a.ends_with('/') && path.starts_with(a)))
        })
        .map(|(path, number, line)| format!("{path}:{number}: {}", line.trim()))
        .collect()
}

/// Only the store's own modules and the two that own each node's records touch sled or the run files; every
/// other module goes through them, so every write is in the redo log first.
#[test]
fn only_the_stores_touch_sled_or_the_run_files() {
    let allowed = [
        "common/src/store.rs",
        "common/src/redo.rs",
        "common/src/runs.rs",
        "migrations/src/",
        "participant/src/storage.rs",
        "coordinator/src/wal.rs",
    ];
    let found = offenders(&allowed, |line| {
        line.contains("sled::") || line.contains(".db.") || line.contains(".db)") || line.contains("runs::")
    });
    assert!(found.is_empty(), "sled or run files outside the stores:\n{}", found.join("\n"));
}

/// Only the modules that speak HTTP know status codes: the routes (which turn errors into them, once) and the
/// plain HTTP clients between the nodes. The cores, the engine, the stores, the journal and the audit know none.
#[test]
fn only_the_http_layers_know_status_codes() {
    let allowed = [
        "common/src/http.rs",
        "coordinator/src/api.rs",
        "coordinator/src/participants.rs",
        "participant/src/server.rs",
        "participant/src/books.rs",
        "participant/src/stream.rs",
        "participant/src/resolver.rs",
        // The command-line tools are clients of the public API.
        "loadgen/src/",
    ];
    let found = offenders(&allowed, |line| {
        line.contains("StatusCode") || line.contains(".status().is_") || line.contains(".status() ==")
    });
    assert!(found.is_empty(), "status codes outside the HTTP layers:\n{}", found.join("\n"));
}

/// The rules above read what they mean to: a line each would flag, in a module they do not allow.
#[test]
fn the_rules_flag_what_they_describe() {
    let lines = source_lines();
    assert!(lines.iter().any(|(p, _, l)| p == "participant/src/storage.rs" && l.contains(".db.")), "sled reads seen");
    assert!(lines.iter().any(|(p, _, l)| p == "coordinator/src/api.rs" && l.contains("StatusCode")), "codes seen");
}
