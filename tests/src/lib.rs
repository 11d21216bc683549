//! Support for Flotilla's end-to-end tests: real Kubernetes control planes
//! (`kube-testcluster`), a real hub, real agents, real Git (`git daemon`), and the
//! CLI, all as child processes that are stopped by PID when their handle drops.
//!
//! Control planes are costly (seconds and ~0.5 GiB each), so a test binary starts
//! them once ([`shared_clusters`]) and every test works in namespaces of its own.

pub mod big;
pub mod counting;
pub mod faults;
pub mod githttp;
pub mod hung;
pub mod prometheus;
pub mod receiver;
pub mod registry;
pub mod sim;
pub mod torture;
pub mod webdriver;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// How long a test waits for something that should happen within seconds. Generous,
/// because CI machines are noisy; a test that passes never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Polling interval for [`wait_until`]: short enough to notice changes quickly.
const POLL: Duration = Duration::from_millis(250);

/// Where the project's binaries are (`cargo build` output).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("FLOTILLA_BIN_DIR") {
        return PathBuf::from(d);
    }
    // tests/ -> workspace root; honour CARGO_TARGET_DIR like cargo does.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug")
}

/// Where `make testenv` put kube-testcluster and kubectl.
pub fn testenv_dir() -> PathBuf {
    std::env::var("FLOTILLA_TESTENV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/testenv/bin"))
}

/// True when the test control plane has been built; e2e tests are skipped (with a
/// note) otherwise, so `cargo test` works before `make testenv`. `make test` always
/// builds it first, and sets `FLOTILLA_REQUIRE_E2E=1` so a missing binary fails.
pub fn e2e_available() -> bool {
    let ok =
        testenv_dir().join("kube-testcluster").exists() && bin_dir().join("flotilla-hub").exists();
    if !ok {
        if std::env::var("FLOTILLA_REQUIRE_E2E").is_ok() {
            panic!(
                "end-to-end binaries missing: {} or {}",
                testenv_dir().display(),
                bin_dir().display()
            );
        }
        eprintln!("skipping: run `make testenv build` first (or `make test`)");
    }
    ok
}

/// A free loopback port below the ephemeral range (32768+), so servers never clash
/// with client sockets. Ports are handed out from a per-process window and probed.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread test processes over the range by PID so parallel binaries rarely collide.
    let base = 20000 + (std::process::id() % 100) as u16 * 120;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = base + (n % 120);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
        assert!(n < 10_000, "no free port found");
    }
}

/// A listener on a free loopback port, bound for good: a port [`free_port`]
/// probed can be taken by another process before it is bound again, so a
/// taken one is skipped.
pub fn bind_free() -> Result<(u16, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let port = free_port();
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return Ok((port, l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| anyhow!("no free port"), Into::into))
}

/// Polls `f` until it returns `Ok(Some(v))`, or fails with the last error after `deadline`.
pub fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("condition not met");
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > deadline {
            bail!("timed out after {:?} waiting for {what}: {last}", deadline);
        }
        std::thread::sleep(POLL);
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test control plane: etcd, apiserver, controller-manager, scheduler and
/// simulated nodes in one process.
pub struct TestCluster {
    pub name: String,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub proc: Proc,
}

impl TestCluster {
    pub fn start(name: &str, dir: &Path) -> Result<TestCluster> {
        fs::create_dir_all(dir)?;
        let port = free_port();
        // The cluster stops when its stdin closes, that is when the test process exits
        // (clusters shared through a static are never dropped), or on SIGTERM from
        // `Proc::stop`.
        let proc = Proc::spawn(
            &format!("kube-testcluster {name}"),
            Command::new(testenv_dir().join("kube-testcluster"))
                .arg("--data-dir")
                .arg(dir)
                .arg("--port")
                .arg(port.to_string())
                .arg("--name")
                .arg(name)
                .arg("--stop-on-stdin-eof"),
            &dir.join("cluster.log"),
        )?;
        let kubeconfig = dir.join("kubeconfig");
        let c = TestCluster {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            kubeconfig,
            proc,
        };
        wait_until(
            &format!("cluster {name} ready"),
            Duration::from_secs(120),
            || {
                if !c.kubeconfig.exists() {
                    return Ok(None);
                }
                let out = c.kubectl_raw(&["get", "--raw", "/readyz"])?;
                Ok(
                    (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"))
                        .then_some(()),
                )
            },
        )
        .with_context(|| {
            c.proc
                .log_text()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        Ok(c)
    }

    fn kubectl_raw(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(testenv_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs kubectl; fails with its stderr when it fails.
    /// `kubectl edit` with a sed script as the editor, so the change is made as a
    /// user editing by hand would (field manager `kubectl-edit`).
    pub fn kubectl_edit(&self, args: &[&str], sed: &str) -> Result<()> {
        let out = Command::new(testenv_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("edit")
            .args(args)
            .env("EDITOR", format!("sed -i -e '{sed}'"))
            .env("KUBE_EDITOR", format!("sed -i -e '{sed}'"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl edit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_raw(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let mut child = Command::new(testenv_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The object as JSON, or None when it does not exist.
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Option<Value>> {
        let mut args = vec!["get", kind, name, "-o", "json", "--ignore-not-found"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let out = self.kubectl(&args)?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&out)?))
    }
}

/// Two control planes, started once per test binary and shared by its tests (each
/// test uses namespaces of its own). They live until the test process exits:
/// kube-testcluster stops when its stdin closes, which happens when we exit.
pub fn shared_clusters() -> &'static [TestCluster; 2] {
    static CLUSTERS: OnceLock<[TestCluster; 2]> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let root = shared_root();
        let a = std::thread::spawn({
            let root = root.clone();
            move || TestCluster::start("east", &root.join("east"))
        });
        let b = TestCluster::start("west", &root.join("west")).expect("start cluster west");
        let a = a.join().expect("thread").expect("start cluster east");
        [a, b]
    })
}

/// Four control planes, for tests that need more than two (rollouts across
/// partitions); started once per test binary, in parallel, like [`shared_clusters`].
pub fn four_clusters() -> &'static [TestCluster; 4] {
    static CLUSTERS: OnceLock<[TestCluster; 4]> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let root = shared_root();
        let started: Vec<_> = ["c1", "c2", "c3", "c4"]
            .into_iter()
            .map(|n| {
                let root = root.clone();
                std::thread::spawn(move || TestCluster::start(n, &root.join(n)))
            })
            .collect();
        let mut all: Vec<TestCluster> = started
            .into_iter()
            .map(|t| t.join().expect("thread").expect("start cluster"))
            .collect();
        let d = all.pop().unwrap();
        let c = all.pop().unwrap();
        let b = all.pop().unwrap();
        let a = all.pop().unwrap();
        [a, b, c, d]
    })
}

/// A fresh directory for this test binary's shared clusters (the stale ones of
/// binaries no longer running removed first).
fn shared_root() -> PathBuf {
    remove_stale_cluster_dirs();
    tempfile::Builder::new()
        .prefix(&format!("{SHARED_PREFIX}{}-", std::process::id()))
        .tempdir()
        .expect("tempdir")
        .keep()
}

/// Shared clusters live in `<tmp>/flotilla-e2e-<pid>-*`: a static is never dropped,
/// so their data dirs outlive the test binary and are removed by the next one.
const SHARED_PREFIX: &str = "flotilla-e2e-";

/// Removes the shared-cluster dirs of test binaries that are no longer running.
fn remove_stale_cluster_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SHARED_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A running hub. Its API is on loopback (plain HTTP works there), and it has a
/// webhook listener on loopback too.
pub struct Hub {
    pub dir: PathBuf,
    pub api: String,
    pub agent_url: String,
    pub admin_token: String,
    pub proc: Proc,
    agent_port: u16,
    api_port: u16,
    webhook_port: u16,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Hub {
    pub fn start(dir: &Path) -> Result<Hub> {
        Self::start_on(dir, free_port(), free_port())
    }

    /// Starts (or restarts) a hub on given ports, reusing `dir`.
    pub fn start_on(dir: &Path, agent_port: u16, api_port: u16) -> Result<Hub> {
        Self::start_with(dir, agent_port, api_port, &[], &[])
    }

    /// As [`Hub::start_on`], with extra flags and environment variables (kept
    /// for [`Hub::restart`]).
    pub fn start_with(
        dir: &Path,
        agent_port: u16,
        api_port: u16,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Hub> {
        Self::start_full(
            dir,
            (agent_port, api_port, free_port()),
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            &envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    pub(crate) fn start_full(
        dir: &Path,
        (agent_port, api_port, webhook_port): (u16, u16, u16),
        args: &[String],
        envs: &[(String, String)],
    ) -> Result<Hub> {
        fs::create_dir_all(dir)?;
        // An --api-listen among the extra flags replaces the loopback one (and
        // `api` is then https:// on it).
        let own_api = args
            .iter()
            .position(|a| a == "--api-listen")
            .and_then(|i| args.get(i + 1));
        let mut cmd = Command::new(bin_dir().join("flotilla-hub"));
        cmd.args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .arg("--data-dir")
            .arg(dir)
            .arg("--agent-listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--webhook-listen")
            .arg(format!("127.0.0.1:{webhook_port}"));
        if own_api.is_none() {
            cmd.arg("--api-listen").arg(format!("127.0.0.1:{api_port}"));
        }
        let proc = Proc::spawn(
            "flotilla-hub",
            cmd
                // helm and kustomize as `make testenv` builds them, for Helm and
                // Kustomize bundles.
                .arg("--helm")
                .arg(testenv_dir().join("helm"))
                .arg("--kustomize")
                .arg(testenv_dir().join("kustomize"))
                .env(
                    "RUST_LOG",
                    envs.iter()
                        .find(|(k, _)| k == "RUST_LOG")
                        .map_or("info,flotilla_hub=debug", |(_, v)| v.as_str()),
                ),
            &dir.join(format!(
                "hub-{}.log",
                Instant::now().elapsed().as_nanos() % 1000
            )),
        )?;
        let api = match own_api {
            Some(addr) => format!("https://{addr}"),
            None => format!("http://127.0.0.1:{api_port}"),
        };
        let token_file = dir.join("admin-token");
        let mut hub = Hub {
            dir: dir.to_path_buf(),
            api: api.clone(),
            agent_url: format!("https://127.0.0.1:{agent_port}"),
            admin_token: String::new(),
            proc,
            agent_port,
            api_port,
            webhook_port,
            args: args.to_vec(),
            envs: envs.to_vec(),
        };
        hub.admin_token = wait_until("hub API up", Duration::from_secs(30), || {
            if !token_file.exists() {
                return Ok(None);
            }
            let token = fs::read_to_string(&token_file)?.trim().to_string();
            let api_up = match own_api {
                Some(addr) => addr
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| std::net::TcpStream::connect(a).is_ok()),
                None => std::net::TcpStream::connect(("127.0.0.1", api_port)).is_ok(),
            };
            let ok = api_up
                && std::net::TcpStream::connect(("127.0.0.1", webhook_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", agent_port)).is_ok();
            Ok(ok.then_some(token))
        })
        .with_context(|| hub.proc.log_text())?;
        Ok(hub)
    }

    /// The hub's CA certificate (`DATA_DIR/ca.pem`), which verifies its API.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Stops the hub (SIGTERM).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts it again on the same ports, data dir, flags and environment.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        let h = Hub::start_full(
            &self.dir.clone(),
            (self.agent_port, self.api_port, self.webhook_port),
            &self.args,
            &self.envs,
        )?;
        *self = h;
        Ok(())
    }

    /// Runs the CLI against this hub; returns stdout, fails with stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli_output(args)?;
        if !out.status.success() {
            bail!(
                "flotilla {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(bin_dir().join("flotilla"))
            .args(args)
            .env("FLOTILLA_HUB", &self.api)
            .env("FLOTILLA_TOKEN", &self.admin_token)
            // The hub's own CA verifies an https:// API.
            .env("FLOTILLA_CA", self.ca_file())
            .stdin(Stdio::null())
            .output()?)
    }

    /// `flotilla ... -o json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.cli(&a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("parsing JSON from flotilla {}: {out}", args.join(" ")))
    }

    pub fn token(&self) -> Result<String> {
        Ok(self.cli(&["token", "create"])?.trim().to_string())
    }

    /// The state of `bundle` on `cluster` as `bundle get -o json` shows it.
    pub fn bundle_state(&self, bundle: &str, cluster: &str) -> Result<Option<(String, String)>> {
        let out = self.cli_output(&["bundle", "get", bundle, "-o", "json"])?;
        if !out.status.success() {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["clusters"].as_array().and_then(|cs| {
            cs.iter().find(|c| c["cluster"] == cluster).map(|c| {
                (
                    c["state"].as_str().unwrap_or_default().to_string(),
                    c["message"].as_str().unwrap_or_default().to_string(),
                )
            })
        }))
    }

    /// Waits until `bundle` is in `state` on `cluster`.
    pub fn wait_bundle_state(&self, bundle: &str, cluster: &str, state: &str) -> Result<String> {
        wait_until(
            &format!("bundle {bundle} {state} on {cluster}"),
            DEADLINE,
            || {
                Ok(match self.bundle_state(bundle, cluster)? {
                    Some((s, msg)) if s == state => Some(msg),
                    other => {
                        if let Some((s, m)) = other {
                            if s != state {
                                return Err(anyhow!("state is {s}: {m}"));
                            }
                        }
                        None
                    }
                })
            },
        )
    }
}

/// Sends one HTTP/1.1 POST to `127.0.0.1:port` and returns the status code and
/// body (no client library: the tests speak plain HTTP to the hub).
pub fn http_post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String)> {
    http_post_to(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        path,
        headers,
        body,
    )
}

/// [`http_post`] to any address.
pub fn http_post_to(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    parse_response(&out)
}

/// An unchunked HTTP response's status and body.
pub(crate) fn parse_response(out: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

impl Hub {
    /// The port of the hub's HTTP API (on 127.0.0.1).
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The port of the hub's webhook listener (`POST /hooks/git`, on 127.0.0.1).
    pub fn webhook_port(&self) -> u16 {
        self.webhook_port
    }
}

/// A local IPv4 address that is not loopback (to bind a listener on, as a hub
/// reachable from the network would be): the first global one `ip -4 addr`
/// shows. Fails, saying so, when the machine has none.
pub fn non_loopback_ipv4() -> Result<std::net::Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .context("running `ip -4 -o addr show`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .find(|ip: &std::net::Ipv4Addr| !ip.is_loopback() && !ip.is_unspecified())
        .ok_or_else(|| {
            anyhow!(
                "this machine has no non-loopback IPv4 address (`ip -4 addr` shows none); \
                 the test needs one: add one, e.g. `ip link add flt0 type dummy && \
                 ip addr add 10.213.0.1/32 dev flt0 && ip link set flt0 up` as root"
            )
        })
}

/// A running agent for one cluster.
pub struct Agent {
    pub name: String,
    pub state_dir: PathBuf,
    pub proc: Proc,
    hub_url: String,
    kubeconfig: PathBuf,
}

impl Agent {
    pub fn start(
        hub: &Hub,
        token: &str,
        name: &str,
        labels: &str,
        cluster: &TestCluster,
        state_dir: &Path,
    ) -> Result<Agent> {
        Self::spawn(
            &hub.agent_url,
            Some(token),
            name,
            labels,
            &cluster.kubeconfig,
            state_dir,
        )
    }

    pub fn spawn(
        hub_url: &str,
        token: Option<&str>,
        name: &str,
        labels: &str,
        kubeconfig: &Path,
        state_dir: &Path,
    ) -> Result<Agent> {
        Self::spawn_with(hub_url, token, name, labels, kubeconfig, state_dir, &[])
    }

    /// As [`Agent::spawn`], with extra flags (not kept by [`Agent::restart`]).
    pub fn spawn_with(
        hub_url: &str,
        token: Option<&str>,
        name: &str,
        labels: &str,
        kubeconfig: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        fs::create_dir_all(state_dir)?;
        let mut cmd = Command::new(bin_dir().join("flotilla-agent"));
        cmd.args(extra)
            .arg("--hub")
            .arg(hub_url)
            .arg("--cluster-name")
            .arg(name)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--state-dir")
            .arg(state_dir)
            .env("RUST_LOG", "info,flotilla_agent=debug");
        if !labels.is_empty() {
            cmd.arg("--labels").arg(labels);
        }
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        let n = fs::read_dir(state_dir).map(|d| d.count()).unwrap_or(0);
        let proc = Proc::spawn(
            &format!("agent {name}"),
            &mut cmd,
            &state_dir.join(format!("agent-{n}.log")),
        )?;
        Ok(Agent {
            name: name.to_string(),
            state_dir: state_dir.to_path_buf(),
            proc,
            hub_url: hub_url.to_string(),
            kubeconfig: kubeconfig.to_path_buf(),
        })
    }

    /// Starts the agent again from its state dir (no token needed any more).
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        let a = Agent::spawn(
            &self.hub_url,
            None,
            &self.name,
            "",
            &self.kubeconfig,
            &self.state_dir,
        )?;
        *self = a;
        Ok(())
    }
}

/// A Git repository made with the git CLI, served by `git daemon` on loopback.
pub struct GitRepo {
    pub dir: PathBuf,
    pub url: String,
    daemon: Proc,
}

impl GitRepo {
    pub fn new(root: &Path, name: &str) -> Result<GitRepo> {
        let base = root.join("git");
        let dir = base.join(name);
        fs::create_dir_all(&dir)?;
        git(&dir, &["init", "-q", "-b", "main"])?;
        git(&dir, &["config", "user.email", "e2e@flotilla.test"])?;
        git(&dir, &["config", "user.name", "e2e"])?;
        git(&dir, &["config", "receive.denyCurrentBranch", "ignore"])?;
        let port = free_port();
        let daemon = Proc::spawn(
            "git daemon",
            Command::new("git")
                .arg("daemon")
                .arg("--reuseaddr")
                .arg(format!("--base-path={}", base.display()))
                .arg("--export-all")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(&base),
            &root.join(format!("git-daemon-{name}.log")),
        )?;
        wait_until("git daemon up", Duration::from_secs(20), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(()))
        })?;
        Ok(GitRepo {
            dir,
            url: format!("git://127.0.0.1:{port}/{name}"),
            daemon,
        })
    }

    /// Stops the git daemon: the repository becomes unreachable (connection refused).
    pub fn stop_serving(&mut self) {
        self.daemon.stop();
    }

    /// Writes (or with `None`, removes) files and commits; returns the commit id.
    pub fn commit(&self, files: &BTreeMap<&str, Option<&str>>, message: &str) -> Result<String> {
        for (path, content) in files {
            let p = self.dir.join(path);
            match content {
                Some(c) => {
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::write(&p, c)?;
                }
                None => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        git(&self.dir, &["add", "-A"])?;
        git(&self.dir, &["commit", "-q", "--allow-empty", "-m", message])?;
        Ok(git(&self.dir, &["rev-parse", "HEAD"])?.trim().to_string())
    }
}

pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output()?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh temp dir for a test's hub, agents and repositories, removed when the
/// test ends unless `FLOTILLA_KEEP_TEST_DIRS` is set (their logs help debugging).
pub fn test_dir(name: &str) -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("flotilla-{name}-"))
        .tempdir()?;
    if std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some() {
        eprintln!("test dir kept: {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    Ok(dir)
}

/// A TCP proxy on loopback that can cut its traffic, to inject network faults
/// between an agent and its API server (or hub).
pub struct FaultProxy {
    pub port: u16,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:<new port> to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Result<FaultProxy> {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        let (port, listener) = bind_free()?;
        listener.set_nonblocking(true)?;
        let blocked = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, g, s) = (blocked.clone(), generation.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                if b.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let my_gen = g.load(Ordering::Relaxed);
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 16384];
                        loop {
                            if g.load(Ordering::Relaxed) != my_gen {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(FaultProxy {
            port,
            blocked,
            generation,
            stop,
        })
    }

    /// Cuts every open connection and refuses new ones until [`FaultProxy::unblock`].
    pub fn block(&self) {
        self.blocked.store(true, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

/// A copy of `kubeconfig` whose server is 127.0.0.1:`port` (e.g. a [`FaultProxy`]).
pub fn kubeconfig_via(kubeconfig: &Path, port: u16, out: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string(kubeconfig)?;
    let mut done = false;
    let rewritten: Vec<String> = text
        .lines()
        .map(|l| {
            if let Some(idx) = l.find("server: https://127.0.0.1:") {
                done = true;
                format!("{}server: https://127.0.0.1:{port}", &l[..idx])
            } else {
                l.to_string()
            }
        })
        .collect();
    if !done {
        bail!("no loopback server line in {}", kubeconfig.display());
    }
    fs::write(out, rewritten.join("\n") + "\n")?;
    Ok(out.to_path_buf())
}

/// The API server port a test cluster's kubeconfig points at.
pub fn kube_port(kubeconfig: &Path) -> Result<u16> {
    let text = fs::read_to_string(kubeconfig)?;
    let line = text
        .lines()
        .find_map(|l| l.split("server: https://127.0.0.1:").nth(1))
        .ok_or_else(|| anyhow!("no server line in {}", kubeconfig.display()))?;
    Ok(line.trim().parse()?)
}
