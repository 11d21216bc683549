//! A real Prometheus (Debian's package) on loopback, scraping given targets
//! every second, in a temp dir, stopped by PID when dropped; and PromQL
//! queries against its HTTP API.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::{free_port, wait_until, Proc};

pub const BINARY: &str = "/usr/bin/prometheus";

pub struct Prometheus {
    pub port: u16,
    pub proc: Proc,
}

/// One GET with HTTP/1.0 (no chunking): status and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    crate::parse_response(&out)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) every second.
    pub fn start(dir: &Path, targets: &[String]) -> Result<Prometheus> {
        Self::start_with_rules(dir, targets, &[])
    }

    /// As [`Prometheus::start`], evaluating the rule files every second too.
    pub fn start_with_rules(
        dir: &Path,
        targets: &[String],
        rules: &[std::path::PathBuf],
    ) -> Result<Prometheus> {
        if !Path::new(BINARY).exists() {
            bail!("{BINARY} is missing: `make testenv` installs prometheus");
        }
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        let rule_files: Vec<String> = rules.iter().map(|r| format!("'{}'", r.display())).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: flotilla\n    static_configs:\n      - targets: [{}]\n",
                rule_files.join(", "),
                list.join(", ")
            ),
        )?;
        let mut cmd = Command::new(BINARY);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", &mut cmd, &dir.join("prometheus.log"))?;
        wait_until("prometheus ready", Duration::from_secs(60), || {
            Ok(http_get(port, "/-/ready")
                .is_ok_and(|(s, _)| s == 200)
                .then_some(()))
        })?;
        Ok(Prometheus { port, proc })
    }

    /// An instant PromQL query's result vector (`data.result`).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )?;
        if status != 200 {
            bail!("query {promql}: HTTP {status}: {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Every alerting and recording rule loaded (`/api/v1/rules`), flattened.
    pub fn rules(&self) -> Result<Vec<Value>> {
        let (status, body) = http_get(self.port, "/api/v1/rules")?;
        if status != 200 {
            bail!("rules: HTTP {status}: {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect())
    }

    /// The single value of an instant query, if it has one series.
    pub fn value(&self, promql: &str) -> Result<Option<f64>> {
        let r = self.query(promql)?;
        Ok(match r.as_slice() {
            [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
            _ => None,
        })
    }
}
