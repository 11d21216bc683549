//! The parts that need more than the hub: a real agent on a real test cluster
//! (first apply of many objects against `kubectl apply --server-side`, then the
//! idle agent's footprint), and Git (fetch and render of many bundle
//! directories against `git clone`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

/// The objects of bundle `b` of run `run`: ConfigMaps (60 %), Deployments (20 %)
/// and Services (20 %), one file each, in namespace `ns`.
pub fn bundle_files(ns: &str, objects: usize) -> Vec<(String, String)> {
    (0..objects)
        .map(|i| {
            let name = format!("o{i:03}");
            let text = match i % 5 {
                0 => format!(
                    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: app\n        image: registry.example/app:1.0\n        ports:\n        - containerPort: 8080\n"
                ),
                1 => format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - port: 80\n    targetPort: 8080\n"
                ),
                _ => {
                    let mut s = format!(
                        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n"
                    );
                    for k in 0..5 {
                        let _ = writeln!(s, "  key{k}: \"value {k} of {name}\"");
                    }
                    s
                }
            };
            (format!("{name}.yaml"), text)
        })
        .collect()
}

/// Writes `files` under `dir`.
pub fn write_files(dir: &Path, files: &[(String, String)]) -> Result<()> {
    for (path, text) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Timestamps (as wall-clock times) of the agent's log lines containing `needle`.
pub fn log_times(log: &str, needle: &str) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| humantime::parse_rfc3339(t).ok())
        .collect()
}

/// Runs `cmd` and returns how long it took; fails with its stderr.
pub fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// `n` bundle directories `apps/bNNN` of `per` ConfigMaps each.
pub fn many_bundles(n: usize, per: usize, value: &str) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for b in 0..n {
        for o in 0..per {
            files.insert(
                format!("apps/b{b:03}/cm-{o}.yaml"),
                format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b{b:03}-{o}\n  namespace: apps-b{b:03}\ndata:\n  value: \"{value}\"\n"
                ),
            );
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_kinds_and_reads_log_times() {
        let files = bundle_files("ns", 10);
        assert_eq!(files.len(), 10);
        assert_eq!(
            files
                .iter()
                .filter(|(_, t)| t.contains("kind: ConfigMap"))
                .count(),
            6
        );
        let log = "2026-01-02T03:04:05.250000Z  INFO x: bundle applied objects=3\nnoise\n";
        let t = log_times(log, "bundle applied");
        assert_eq!(t.len(), 1);
        assert_eq!(many_bundles(3, 2, "v").len(), 6);
    }
}
