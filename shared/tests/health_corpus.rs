//! The health rules against a corpus: every document of `tests/health/*.yaml` is an
//! object as the API server returns it, with its expected health in the annotations
//! `health.flotilla.io/expect-status` and `health.flotilla.io/expect-message`.

use std::path::Path;

use flotilla_shared::health::{health, objects_in_yaml, HealthStatus};

const EXPECT_STATUS: &str = "health.flotilla.io/expect-status";
const EXPECT_MESSAGE: &str = "health.flotilla.io/expect-message";

#[test]
fn corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/health");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "one file per kind, and the generic rule");
    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let objects = objects_in_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!objects.is_empty(), "{}: no objects", file.display());
        for (i, obj) in objects.iter().enumerate() {
            let ann = &obj["metadata"]["annotations"];
            let want_status: HealthStatus = ann[EXPECT_STATUS]
                .as_str()
                .unwrap_or_else(|| panic!("{} #{i}: no {EXPECT_STATUS}", file.display()))
                .parse()
                .unwrap();
            let want_message = ann[EXPECT_MESSAGE].as_str().unwrap_or_default();
            let got = health(obj);
            seen.insert(want_status);
            if got.status != want_status || got.message != want_message {
                failures.push(format!(
                    "{} #{i} ({} {}): want {want_status} {want_message:?}, got {} {:?}",
                    file.file_name().unwrap().to_string_lossy(),
                    obj["kind"].as_str().unwrap_or_default(),
                    obj["metadata"]["name"].as_str().unwrap_or_default(),
                    got.status,
                    got.message
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    for st in [
        HealthStatus::Current,
        HealthStatus::InProgress,
        HealthStatus::Failed,
        HealthStatus::Terminating,
    ] {
        assert!(seen.contains(&st), "the corpus covers {st}");
    }
}
