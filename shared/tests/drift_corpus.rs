//! The drift comparison against a corpus: every document of `tests/drift/*.yaml`
//! is a case with the object applied (`desired`), the object as the API server
//! returns it (`live`, with managedFields), optional `ignore` pointers, optional
//! `applied` (the object the apply returned, for the baseline), and the drifted
//! fields expected (`expect`, in order).

use std::path::Path;

use flotilla_shared::drift::{baseline, detect, FieldDiff};
use serde_json::Value;

#[test]
fn corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drift");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut cases = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for case in docs {
            cases += 1;
            let name = case["name"].as_str().unwrap_or_default();
            let ignore: Vec<String> =
                serde_json::from_value(case["ignore"].clone()).unwrap_or_default();
            let want: Vec<FieldDiff> = serde_json::from_value(case["expect"].clone())
                .unwrap_or_else(|e| panic!("{name}: expect: {e}"));
            let base = case
                .get("applied")
                .map(|a| baseline(&case["desired"], a))
                .unwrap_or_default();
            let got = detect(&case["desired"], &case["live"], &ignore, &base);
            if got != want {
                failures.push(format!("{name}:\n  want {want:?}\n  got  {got:?}"));
            }
        }
    }
    assert!(cases >= 8, "the corpus has its cases");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
