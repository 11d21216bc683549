//! A release `flotilla-hub` started as a child process for a benchmark run, and the
//! few API calls the benchmarks make (join tokens, sources, bundles).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flotilla_tests::{free_port, Proc};
use serde_json::Value;

/// Where the benchmarked binaries are: `FLOTILLA_BENCH_BIN_DIR`, else the release
/// directory of `CARGO_TARGET_DIR` (or `target/`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FLOTILLA_BENCH_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("release")
}

/// A running hub.
pub struct BenchHub {
    pub proc: Proc,
    pub api: String,
    /// The webhook listener (`POST /hooks/git`), on loopback.
    pub webhook: String,
    pub agent_port: u16,
    pub agent_url: String,
    admin_token: String,
    http: reqwest::Client,
    /// How it was started, for a restart on the same ports and data.
    dir: std::path::PathBuf,
    extra: Vec<String>,
    ports: (u16, u16, u16),
}

impl BenchHub {
    /// Starts a hub on fresh ports with its data in `dir`; logs at `warn` so that
    /// logging does not weigh on what is measured.
    pub async fn start(dir: &Path) -> Result<BenchHub> {
        Self::start_with(dir, &[]).await
    }

    /// [`BenchHub::start`] with extra command-line arguments for the hub.
    pub async fn start_with(dir: &Path, extra: &[&str]) -> Result<BenchHub> {
        let ports = (free_port(), free_port(), free_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_on(dir, &extra, ports).await
    }

    /// Kills the hub (`kill -9`) and starts it again on the same ports and data;
    /// returns once it listens again.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.kill9();
        let (dir, extra, ports) = (self.dir.clone(), self.extra.clone(), self.ports);
        *self = Self::start_on(&dir, &extra, ports).await?;
        Ok(())
    }

    async fn start_on(dir: &Path, extra: &[String], ports: (u16, u16, u16)) -> Result<BenchHub> {
        std::fs::create_dir_all(dir)?;
        let (agent_port, api_port, webhook_port) = ports;
        // A profiler may wrap the hub (`FLOTILLA_BENCH_HUB_WRAPPER="heaptrack -o
        // FILE"`); the readings of such a run are the wrapper's, not the hub's.
        let wrapper = std::env::var("FLOTILLA_BENCH_HUB_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(bin_dir().join("flotilla-hub"));
                c
            }
            None => Command::new(bin_dir().join("flotilla-hub")),
        };
        let proc = Proc::spawn(
            "flotilla-hub",
            cmd.arg("--data-dir")
                .arg(dir)
                .arg("--agent-listen")
                .arg(format!("127.0.0.1:{agent_port}"))
                .arg("--api-listen")
                .arg(format!("127.0.0.1:{api_port}"))
                .arg("--webhook-listen")
                .arg(format!("127.0.0.1:{webhook_port}"))
                .args(extra)
                .env("RUST_LOG", "warn"),
            &dir.join("hub.log"),
        )?;
        let token_file = dir.join("admin-token");
        let start = Instant::now();
        let admin_token = loop {
            if token_file.exists()
                && tokio::net::TcpStream::connect(("127.0.0.1", api_port))
                    .await
                    .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", agent_port))
                    .await
                    .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", webhook_port))
                    .await
                    .is_ok()
            {
                break std::fs::read_to_string(&token_file)?.trim().to_string();
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("hub did not start: {}", proc.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(BenchHub {
            proc,
            api: format!("http://127.0.0.1:{api_port}"),
            webhook: format!("http://127.0.0.1:{webhook_port}"),
            agent_port,
            agent_url: format!("https://127.0.0.1:{agent_port}"),
            admin_token,
            http: reqwest::Client::new(),
            dir: dir.to_path_buf(),
            extra: extra.to_vec(),
            ports,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `n` join tokens from the API, `concurrency` requests at a time.
    pub async fn tokens(&self, n: usize, concurrency: usize) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(n);
        let mut set = tokio::task::JoinSet::new();
        let mut issued = 0;
        while out.len() < n {
            while issued < n && set.len() < concurrency {
                let (http, api, t) = (
                    self.http.clone(),
                    self.api.clone(),
                    self.admin_token.clone(),
                );
                set.spawn(async move {
                    let v: Value = http
                        .post(format!("{api}/api/v1/tokens"))
                        .bearer_auth(t)
                        .body(r#"{"ttl": "2h"}"#)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
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

    /// Adds a Git source for `paths`, polled every `poll`, targeting every cluster.
    pub async fn add_source(
        &self,
        name: &str,
        repo: &str,
        paths: &[&str],
        poll: &str,
    ) -> Result<()> {
        let paths = paths
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let yaml = format!(
            "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {{name: {name}}}\n\
             spec:\n  repo: {repo}\n  paths: [{paths}]\n  pollInterval: {poll}\n"
        );
        self.call(reqwest::Method::POST, "/api/v1/apply", Some(yaml))
            .await
            .map(|_| ())
    }

    /// Posts a GitHub push event for `repo_url` and `git_ref`, signed with
    /// `secret` (`X-Hub-Signature-256`), to the webhook listener's `POST /hooks/git`; returns the source
    /// names the hub says it woke.
    pub async fn github_push(
        &self,
        secret: &str,
        repo_url: &str,
        git_ref: &str,
    ) -> Result<Vec<String>> {
        let body = serde_json::json!({
            "ref": git_ref,
            "repository": {"clone_url": repo_url},
        })
        .to_string();
        let mac = flotilla_shared::webhook::hmac_sha256(secret.as_bytes(), body.as_bytes());
        let sig: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        let resp = self
            .http
            .post(format!("{}/hooks/git", self.webhook))
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", format!("sha256={sig}"))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .context("posting the push hook")?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("/hooks/git: {status}: {text}");
        }
        let v: Value = serde_json::from_str(&text)?;
        Ok(v["triggered"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The bundles as `GET /api/v1/bundles` lists them, every page.
    /// `GET /api/v1/clusters/{name}`: the cluster with its bundles.
    pub async fn cluster(&self, name: &str) -> Result<Value> {
        self.call(
            reqwest::Method::GET,
            &format!("/api/v1/clusters/{name}"),
            None,
        )
        .await
    }

    pub async fn bundles(&self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut path = "/api/v1/bundles?limit=5000".to_string();
        loop {
            let v = self.call(reqwest::Method::GET, &path, None).await?;
            out.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["continue"].as_str() {
                Some(t) => path = format!("/api/v1/bundles?limit=5000&continue={t}"),
                None => return Ok(out),
            }
        }
    }

    /// Waits until `count` bundles are at `revision` (any revision when `None`).
    pub async fn wait_bundles(
        &self,
        count: usize,
        revision: Option<&str>,
        deadline: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let bundles = self.bundles().await?;
            let at = bundles
                .iter()
                .filter(|b| revision.is_none_or(|r| b["revision"].as_str() == Some(r)))
                .count();
            if at >= count {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!("{at} of {count} bundles at {revision:?} after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
