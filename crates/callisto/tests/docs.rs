//! The guides say what the code does: every metric the code names is
//! described in docs/operators.md or docs/turn.md, where operators look
//! for it when they build dashboards and alerts.

use std::path::{Path, PathBuf};

/// The workspace's `crates/` folder.
fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/callisto is inside crates/")
        .to_path_buf()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// String literals that start with `callisto_` and are not metrics.
const NOT_METRICS: &[&str] = &[
    // The kernel relay's XDP program.
    "callisto_turn_relay",
];

/// The metrics `text` names: its string literals that start with
/// `callisto_` (in `counter!(…)`, or handed to code that counts, or
/// written out by the telemetry module), but for [`NOT_METRICS`].
fn metric_names(text: &str) -> Vec<String> {
    text.match_indices("\"callisto_")
        .map(|(at, _)| {
            text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !NOT_METRICS.contains(&name.as_str()))
        .collect()
}

/// Whether `guides` name the metric `name` as a whole word; a histogram's
/// series (`_bucket`, `_sum`, `_count`) are documented with it.
fn documented(guides: &str, name: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let named = |name: &str| {
        guides.match_indices(name).any(|(at, _)| {
            let before = guides[..at].chars().next_back();
            let after = guides[at + name.len()..].chars().next();
            !before.is_some_and(word) && !after.is_some_and(word)
        })
    };
    named(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|series| name.strip_suffix(series).is_some_and(named))
}

#[test]
fn every_metric_is_in_the_guides() {
    let root = crates_dir();
    let docs = root.parent().unwrap().join("docs");
    let guides = ["operators.md", "turn.md"]
        .map(|g| std::fs::read_to_string(docs.join(g)).unwrap())
        .join("\n");
    let mut files = Vec::new();
    for krate in std::fs::read_dir(&root).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            sources(&src, &mut files);
        }
    }
    let mut seen = 0;
    let mut missing = Vec::new();
    for file in &files {
        for name in metric_names(&std::fs::read_to_string(file).unwrap()) {
            seen += 1;
            if !documented(&guides, &name) {
                missing.push(format!("{name} ({})", file.display()));
            }
        }
    }
    assert!(seen > 30, "found only {seen} metrics: is the scan broken?");
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "describe these metrics in docs/operators.md or docs/turn.md:\n{}",
        missing.join("\n")
    );
}
