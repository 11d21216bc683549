//! `flotilla rollout plan DIR --clusters FILE`: the real binary, offline, on a
//! bundle directory and a file of clusters in a temporary directory.

use std::path::Path;
use std::process::{Command, Output};

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn plan(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("rollout")
        .arg("plan")
        .args(args)
        .current_dir(dir)
        // Offline: an unreachable hub must not matter.
        .env("FLOTILLA_HUB", "http://127.0.0.1:9")
        .env_remove("FLOTILLA_OUTPUT")
        .output()
        .unwrap()
}

const CLUSTERS: &str = "\
apiVersion: flotilla.io/v1alpha1
kind: Cluster
metadata: {name: us-1, labels: {region: us}}
---
apiVersion: flotilla.io/v1alpha1
kind: Cluster
metadata: {name: eu-2, labels: {region: eu}}
---
apiVersion: flotilla.io/v1alpha1
kind: Cluster
metadata: {name: eu-1, labels: {region: eu, canary: \"true\"}}
---
apiVersion: flotilla.io/v1alpha1
kind: Cluster
metadata: {name: edge-1, labels: {tier: edge}}
---
apiVersion: flotilla.io/v1alpha1
kind: ClusterGroup
metadata: {name: edge}
spec: {selector: {matchLabels: {tier: edge}}}
";

const FLEET_YAML: &str = "\
rolloutStrategy:
  maxUnavailable: 50%
  partitions:
  - name: canary
    maxUnavailable: 1
    clusterSelector: {matchLabels: {canary: \"true\"}}
  - name: eu
    clusterSelector: {matchLabels: {region: eu}}
  - name: edge
    clusterGroup: edge
";

#[test]
fn prints_partitions_in_order_with_rounding_and_strays() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "app/fleet.yaml", FLEET_YAML);
    write(
        tmp.path(),
        "app/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
    );
    write(tmp.path(), "clusters.yaml", CLUSTERS);
    let out = plan(
        tmp.path(),
        &["app", "--clusters", "clusters.yaml", "-o", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parts: Vec<(String, Vec<String>, u64)> = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                serde_json::from_value(p["clusters"].clone()).unwrap(),
                p["maxUnavailable"].as_u64().unwrap(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        parts,
        vec![
            ("canary".to_string(), s(&["eu-1"]), 1),
            ("eu".to_string(), s(&["eu-2"]), 1),
            ("edge".to_string(), s(&["edge-1"]), 1),
            ("unmatched".to_string(), s(&["us-1"]), 1),
        ]
    );
    assert_eq!(
        v["matchedSeveral"],
        serde_json::json!({"eu-1": ["canary", "eu"]})
    );
    assert_eq!(v["unmatched"], serde_json::json!(["us-1"]));
    assert_eq!(v["maxUnavailable"], 2, "50% of 4 clusters");

    // the table says the same, for people
    let out = plan(tmp.path(), &["app", "--clusters", "clusters.yaml"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert!(rows[0].starts_with("#   PARTITION"), "{text}");
    assert!(
        rows[1].contains("canary") && rows[1].ends_with("eu-1"),
        "{text}"
    );
    assert!(
        rows[4].contains("unmatched") && rows[4].ends_with("us-1"),
        "{text}"
    );
    assert!(
        text.contains(
            "matched by several partitions (each belongs to the first):\n  eu-1: canary, eu"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "matched by no partition (they form the last partition, \"unmatched\"): us-1"
        ),
        "{text}"
    );

    // clusters from standard input
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["rollout", "plan", "app", "--clusters", "-", "-o", "json"])
        .current_dir(tmp.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(CLUSTERS.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v2: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v2, v);
}

#[test]
fn without_a_strategy_one_partition_below_200_clusters_and_chunks_from_200() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "app/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
    );
    let docs = |n: usize| {
        (0..n)
            .map(|i| format!("apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {{name: c{i:03}}}\n"))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    for (n, want) in [(199usize, vec![199usize]), (200, vec![50, 50, 50, 50])] {
        write(tmp.path(), "clusters.yaml", &docs(n));
        let out = plan(
            tmp.path(),
            &["app", "--clusters", "clusters.yaml", "-o", "json"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let sizes: Vec<usize> = v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["clusters"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, want, "{n} clusters");
    }
}

#[test]
fn errors_name_the_file_and_the_document() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "bad/fleet.yaml",
        "rolloutStrategy:\n  maxUnavailabel: 1\n",
    );
    write(
        tmp.path(),
        "good/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
    );
    write(tmp.path(), "clusters.yaml", CLUSTERS);
    write(
        tmp.path(),
        "broken.yaml",
        "apiVersion: flotilla.io/v1alpha1\nkind: Cluster\nmetadata: {name: a}\n---\napiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: s}\n",
    );
    let err = |args: &[&str]| {
        let out = plan(tmp.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty());
        String::from_utf8(out.stderr).unwrap()
    };
    let e = err(&["bad", "--clusters", "clusters.yaml"]);
    assert!(
        e.contains("bad/fleet.yaml: rolloutStrategy: unknown field \"maxUnavailabel\""),
        "{e}"
    );
    let e = err(&["good", "--clusters", "broken.yaml"]);
    assert!(
        e.contains(
            "broken.yaml: document 2: kind must be Cluster or ClusterGroup, not \"GitSource\""
        ),
        "{e}"
    );
    let e = err(&["good", "--clusters", "missing.yaml"]);
    assert!(e.contains("reading missing.yaml"), "{e}");
    let e = err(&["nowhere", "--clusters", "clusters.yaml"]);
    assert!(e.contains("reading nowhere"), "{e}");
}
