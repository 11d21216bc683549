//! A real headless Chromium (Debian's `chromium`), driven through Debian's
//! `chromedriver` with the W3C WebDriver protocol: a few JSON commands over
//! HTTP on loopback. Started in a temp dir, stopped by PID when dropped.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::{free_port, wait_until, Proc};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Response headers, names in lower case.
pub type Headers = Vec<(String, String)>;

/// One HTTP/1.1 request with `Connection: close`: status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Headers, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    // Reads to the end of the body: by Content-Length when given (chromedriver
    // keeps the connection open), else to the end of the stream.
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|len| out.len() >= end + 4 + len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, headers, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// chromedriver and one browser session.
pub struct Browser {
    port: u16,
    session: String,
    _driver: Proc,
    shots: PathBuf,
}

impl Browser {
    /// Whether Debian's chromium and chromedriver are installed.
    pub fn available() -> bool {
        Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists()
    }

    /// Starts chromedriver and a headless Chromium whose profile lives in `dir`;
    /// screenshots go to `shots`.
    pub fn start(dir: &Path, shots: &Path) -> Result<Browser> {
        if !Browser::available() {
            bail!("{CHROMIUM} or {CHROMEDRIVER} is missing: `make testenv` installs chromium and chromium-driver");
        }
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(shots)?;
        let port = free_port();
        let driver = Proc::spawn(
            "chromedriver",
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1"),
            &dir.join("chromedriver.log"),
        )?;
        wait_until("chromedriver ready", Duration::from_secs(30), || {
            Ok(http(port, "GET", "/status", &[], b"")
                .ok()
                .filter(|(s, _, b)| *s == 200 && b.contains("\"ready\":true"))
                .map(|_| ()))
        })?;
        let profile = dir.join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let mut b = Browser {
            port,
            session: String::new(),
            _driver: driver,
            shots: shots.to_path_buf(),
        };
        let v = b.call("POST", "/session", Some(caps))?;
        b.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {v}"))?
            .to_string();
        Ok(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, text) = http(
            self.port,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("WebDriver {method} {path}: {status} {text}"))?;
        if status != 200 {
            bail!("WebDriver {method} {path}: {status} {}", v["value"]);
        }
        Ok(v["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url })))?;
        Ok(())
    }

    pub fn url(&self) -> Result<String> {
        Ok(self
            .session_call("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Elements matching a CSS selector (none is not an error).
    pub fn find_all(&self, css: &str) -> Result<Vec<String>> {
        let v = self.session_call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
            .collect())
    }

    pub fn find(&self, css: &str) -> Result<String> {
        self.find_all(css)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no element matches {css}"))
    }

    pub fn text(&self, element: &str) -> Result<String> {
        Ok(self
            .session_call("GET", &format!("/element/{element}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The text of the first element matching `css`.
    pub fn text_of(&self, css: &str) -> Result<String> {
        self.text(&self.find(css)?)
    }

    pub fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css)?;
        self.session_call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )?;
        Ok(())
    }

    pub fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css)?;
        self.session_call("POST", &format!("/element/{e}/click"), Some(json!({})))?;
        Ok(())
    }

    /// Runs a script in the page; its return value.
    pub fn eval(&self, script: &str) -> Result<Value> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Waits until an element matching `css` has text containing `want`.
    pub fn wait_text(&self, css: &str, want: &str, deadline: Duration) -> Result<String> {
        wait_until(&format!("{css} to show {want:?}"), deadline, || {
            for e in self.find_all(css)? {
                let t = self.text(&e)?;
                if t.contains(want) {
                    return Ok(Some(t));
                }
            }
            Ok(None)
        })
    }

    /// Saves a PNG screenshot as `name.png`; its path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let v = self.session_call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .context("screenshot is not base64")?;
        anyhow::ensure!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
    }
}
