//! Shared pieces of the torture suite (`tests/tests/torture_*.rs`): the short and
//! full scales, each part's figures (written as JSON for `flotilla-reliability`,
//! which makes RELIABILITY.md), hubs killed with -9 and started again, a log file
//! followed as it grows, and the hub's API from async code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{bin_dir, free_port, wait_until, Hub};

/// True for `make torture` (`FLOTILLA_TORTURE=full`): the full counts and
/// durations. Otherwise the short version that `make test` runs.
pub fn full() -> bool {
    std::env::var("FLOTILLA_TORTURE").is_ok_and(|v| v == "full")
}

/// `short` in `make test`, `full` in `make torture`; `FLOTILLA_TORTURE_<NAME>`
/// overrides both (e.g. `FLOTILLA_TORTURE_AGENT_KILLS=5`).
pub fn scale<T: std::str::FromStr>(name: &str, short: T, full_value: T) -> T {
    if let Some(v) = std::env::var(format!("FLOTILLA_TORTURE_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return v;
    }
    if full() {
        full_value
    } else {
        short
    }
}

/// What one part of the suite measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PartReport {
    /// e.g. "agent kill -9".
    pub part: String,
    /// "full" or "short".
    pub mode: String,
    pub started_unix_s: u64,
    pub duration_s: f64,
    /// Figures in the order they are shown: (name, value).
    pub figures: Vec<(String, String)>,
    /// What went wrong, one line each (empty when the part passed).
    pub failures: Vec<String>,
    /// Anything else worth reading next to the figures.
    pub notes: Vec<String>,
}

impl PartReport {
    pub fn new(part: &str) -> PartReport {
        let overrides: Vec<String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("FLOTILLA_TORTURE_") && k != "FLOTILLA_TORTURE_OUT")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let notes = if overrides.is_empty() {
            Vec::new()
        } else {
            vec![format!("scale overridden: {}", overrides.join(" "))]
        };
        PartReport {
            notes,
            part: part.to_string(),
            mode: if full() { "full" } else { "short" }.to_string(),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ..Default::default()
        }
    }

    pub fn figure(&mut self, name: &str, value: impl std::fmt::Display) {
        self.figures.push((name.to_string(), value.to_string()));
    }

    pub fn fail(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("torture FAILURE: {what}");
        self.failures.push(what);
    }

    pub fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    /// Writes the report to the results dir (for RELIABILITY.md) under `file`, and
    /// fails when anything failed.
    pub fn finish(mut self, file: &str, started: Instant) -> Result<()> {
        self.duration_s = started.elapsed().as_secs_f64();
        let dir = results_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{file}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&self)?)?;
        eprintln!("torture: {} written to {}", self.part, path.display());
        for (k, v) in &self.figures {
            eprintln!("  {k}: {v}");
        }
        if !self.failures.is_empty() {
            bail!(
                "{}: {} failure(s):\n{}",
                self.part,
                self.failures.len(),
                self.failures.join("\n")
            );
        }
        Ok(())
    }
}

/// Where each part writes its JSON: `FLOTILLA_TORTURE_OUT`, or
/// `<target>/torture-<mode>`.
pub fn results_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FLOTILLA_TORTURE_OUT") {
        return PathBuf::from(d);
    }
    let target = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    target.join(if full() {
        "torture-full"
    } else {
        "torture-short"
    })
}

/// Percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The largest number of `times` inside any window of `window` (sliding).
pub fn peak_rate(times: &[Instant], window: Duration) -> usize {
    let mut t: Vec<Instant> = times.to_vec();
    t.sort();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..t.len() {
        while t[hi].duration_since(t[lo]) >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// A log file followed as it grows (the agent's and the hub's logs tell the
/// torture when to strike).
pub struct LogTail {
    path: PathBuf,
    offset: usize,
    pub text: String,
}

impl LogTail {
    /// Follows `path` from its current end.
    pub fn from_end(path: &Path) -> LogTail {
        let len = std::fs::metadata(path)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        LogTail {
            path: path.to_path_buf(),
            offset: len,
            text: String::new(),
        }
    }

    /// Follows `path` from its start.
    pub fn from_start(path: &Path) -> LogTail {
        LogTail {
            path: path.to_path_buf(),
            offset: 0,
            text: String::new(),
        }
    }

    /// Reads what was appended; returns the new text.
    pub fn poll(&mut self) -> String {
        let Ok(all) = std::fs::read(&self.path) else {
            return String::new();
        };
        if all.len() <= self.offset {
            return String::new();
        }
        // Only whole lines: a line being written is read next time.
        let new = &all[self.offset..];
        let Some(end) = new.iter().rposition(|b| *b == b'\n') else {
            return String::new();
        };
        let chunk = String::from_utf8_lossy(&new[..=end]).into_owned();
        self.offset += end + 1;
        self.text.push_str(&chunk);
        chunk
    }

    /// Waits (polling every few ms) until the followed text contains `needle`.
    pub fn wait_for(&mut self, needle: &str, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.poll();
            if self.text.contains(needle) {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!(
                    "timed out after {deadline:?} waiting for {needle:?} in {}",
                    self.path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(3));
        }
    }
}

/// The hub's log files in `dir`, newest last.
pub fn hub_logs(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hub-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort();
    logs.into_iter().map(|(_, p)| p).collect()
}

impl Hub {
    /// Starts a hub whose log level is `rust_log` (a thousand agents at debug
    /// would make the hub's logging what is measured).
    pub fn start_logging(
        dir: &Path,
        agent_port: u16,
        api_port: u16,
        rust_log: &str,
    ) -> Result<Hub> {
        Hub::start_full(
            dir,
            (agent_port, api_port, free_port()),
            &[],
            &[("RUST_LOG".to_string(), rust_log.to_string())],
        )
    }

    /// kill -9, then the same hub again (same ports, same data dir, same log
    /// level). Returns the time from the kill until it listens again.
    pub fn kill9_and_restart(&mut self, rust_log: &str) -> Result<Duration> {
        let t = Instant::now();
        self.proc.kill9();
        let h = Hub::start_logging(&self.dir.clone(), self.agent_port, self.api_port, rust_log)?;
        *self = h;
        Ok(t.elapsed())
    }

    pub fn agent_port(&self) -> u16 {
        self.agent_port
    }
}

/// The hub's HTTP API from async code.
#[derive(Clone)]
pub struct HubApi {
    pub api: String,
    pub token: String,
    http: reqwest::Client,
}

impl HubApi {
    pub fn new(hub: &Hub) -> HubApi {
        // reqwest is built without a provider of its own: ring, as everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        HubApi {
            api: hub.api.clone(),
            token: hub.admin_token.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Every item of a paginated list (`{"items": [...], "continue": ...}`),
    /// page after page.
    pub async fn list(&self, path: &str) -> Result<Vec<Value>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut next = format!("{path}{sep}limit=5000");
        loop {
            let page = self.get(&next).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["continue"].as_str() {
                Some(t) => next = format!("{path}{sep}limit=5000&continue={t}"),
                None => return Ok(items),
            }
        }
    }

    pub async fn post(&self, path: &str, body: String) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `n` join tokens, `concurrency` requests at a time.
    pub async fn tokens(&self, n: usize, concurrency: usize) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(n);
        let mut set = tokio::task::JoinSet::new();
        let mut issued = 0;
        while out.len() < n {
            while issued < n && set.len() < concurrency {
                let api = self.clone();
                set.spawn(async move {
                    let v = api
                        .post("/api/v1/tokens", r#"{"ttl": "4h"}"#.into())
                        .await?;
                    v["token"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("no token in {v}"))
                });
                issued += 1;
            }
            match set.join_next().await {
                Some(r) => out.push(r??),
                None => break,
            }
        }
        Ok(out)
    }

    /// Per cluster: (state, message) of `bundle`, as the API shows it.
    pub async fn bundle_states(&self, bundle: &str) -> Result<BTreeMap<String, (String, String)>> {
        let v = self.get(&format!("/api/v1/bundles/{bundle}")).await?;
        Ok(v["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["cluster"].as_str().unwrap_or_default().to_string(),
                    (
                        c["state"].as_str().unwrap_or_default().to_string(),
                        c["message"].as_str().unwrap_or_default().to_string(),
                    ),
                )
            })
            .collect())
    }
}

// ---- a small workload for the partition and API-server parts ---------------------

/// A namespace, a ConfigMap `app` (data.value = `value`) and a Deployment `web`
/// of one replica, whose pod the tests can make not Ready.
pub fn workload(ns: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {ns}\nspec:\n  replicas: 1\n  \
         selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      \
         containers:\n      - name: app\n        image: registry.example/web:1\n"
    )
}

/// The ConfigMap `app`'s data.value.
pub fn app_value(c: &crate::TestCluster, ns: &str) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(ns), "app")?
        .and_then(|v| v["data"]["value"].as_str().map(str::to_string)))
}

/// Changes `app` behind Flotilla's back to `marker`, then waits until the agent
/// has put `want` back; returns how long the correction took.
pub fn drift_and_wait_corrected(
    c: &crate::TestCluster,
    ns: &str,
    marker: &str,
    want: &str,
) -> Result<Duration> {
    let patch = format!(r#"{{"data":{{"value":"{marker}"}}}}"#);
    c.kubectl(&[
        "patch",
        "configmap",
        "app",
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        &patch,
    ])?;
    let t = Instant::now();
    wait_until(
        &format!("drift {marker} corrected"),
        crate::DEADLINE,
        || Ok((app_value(c, ns)?.as_deref() == Some(want)).then_some(())),
    )?;
    Ok(t.elapsed())
}

/// Sets `sim.flotilla.io/ready` on the pods of `web`.
pub fn set_pod_ready(c: &crate::TestCluster, ns: &str, ready: bool) -> Result<()> {
    c.kubectl(&[
        "annotate",
        "pods",
        "-n",
        ns,
        "-l",
        "app=web",
        &format!("sim.flotilla.io/ready={ready}"),
        "--overwrite",
    ])?;
    Ok(())
}

/// Per drift marker (the live value of `/data/value` in the hub's events of
/// `cluster`), how many events show it.
pub fn drift_markers(hub: &Hub, cluster: &str) -> Result<BTreeMap<String, usize>> {
    let v = hub.cli_json(&["drift", "list", "--cluster", cluster])?;
    let mut out = BTreeMap::new();
    for e in v.as_array().into_iter().flatten() {
        for f in e["fields"].as_array().into_iter().flatten() {
            if f["path"] == "/data/value" {
                if let Some(live) = f["live"].as_str() {
                    *out.entry(live.to_string()).or_default() += 1;
                }
            }
        }
    }
    Ok(out)
}

/// (lost, duplicated) of `markers` among the hub's drift events.
pub fn exactly_once(shown: &BTreeMap<String, usize>, markers: &[String]) -> (usize, usize) {
    let lost = markers.iter().filter(|m| !shown.contains_key(*m)).count();
    let dup = markers
        .iter()
        .map(|m| shown.get(m).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    (lost, dup)
}

/// Whether the hub shows `cluster` connected.
pub fn connected(hub: &Hub, cluster: &str) -> Result<bool> {
    Ok(hub.cli_json(&["cluster", "get", cluster])?["connected"] == true)
}
