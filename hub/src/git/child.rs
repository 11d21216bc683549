//! Running each fetch in a child process that the hub kills at the deadline or when
//! the fetch is cancelled, one fetch per cache at a time.
//!
//! Why a process: gix's transports block on sockets and pipes (git:// on a TCP
//! stream, HTTPS on reqwest's worker thread, SSH on the `ssh` program, file:// on
//! `git-upload-pack`), and a blocking read on a socket that never answers does not
//! look at an interrupt flag. Socket timeouts would need one mechanism per transport
//! and still leave a slow drip of bytes alive. A child process ends every one of
//! them the same way: SIGKILL to its process group (the helper, and the `ssh` or
//! `git-upload-pack` it started) frees its sockets, threads, memory and the cache
//! lock at once, and the hub keeps no thread per attempt (it waits on the child's
//! pipes asynchronously). The helper also reads the tree, so a repository crafted
//! to make gix parse slowly or allocate much hits the same deadline, in a process
//! that is not the hub.
//!
//! The helper is the hub binary itself, `flotilla-hub __git-fetch`: the request
//! (credentials included) goes on its stdin as JSON, never in its arguments or
//! environment; the reply comes on stdout as one JSON line followed by the files'
//! bytes. A helper whose hub died kills itself (and its group) shortly after its
//! deadline, and its `flock` on the cache keeps a restarted hub's helper waiting
//! until then.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{redact_url, FetchRequest, Fetched, GitError, Limits, Snapshot};

/// First argument that makes `flotilla-hub` the fetch helper.
pub const HELPER_ARG: &str = "__git-fetch";

/// How much longer than its deadline a helper lives before killing itself: the hub
/// kills it at the deadline; this only matters when the hub is gone.
const HELPER_GRACE: Duration = Duration::from_secs(5);

/// Largest request the helper reads: a URL, a ref, paths and an SSH key fit in far less.
const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// What the hub keeps of a helper's stderr (a panic message, say) for its error.
const MAX_STDERR_BYTES: u64 = 16 << 10;

/// Reply bytes beyond the files' own: the JSON line naming each file and its size.
/// Paths are at most 4 KiB (see `tree::MAX_PATH_BYTES`).
fn max_reply_bytes(limits: &Limits) -> u64 {
    limits
        .max_snapshot_bytes
        .saturating_add((limits.max_files as u64).saturating_mul(4096 + 64))
        .saturating_add(1 << 20)
}

/// How a hub runs its fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetcherMode {
    /// In a child process: this program, the `flotilla-hub` binary, run with
    /// [`HELPER_ARG`]. What the hub binary does.
    Child(PathBuf),
    /// On a blocking thread of this process. The deadline is reported on time, but
    /// a socket that never answers keeps its thread (and the cache lock) until the
    /// operating system gives up on it. For tests that run the hub as a library,
    /// where there is no hub binary to start.
    InProcess,
}

/// The line the helper writes before the files' bytes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Reply {
    Unchanged {
        commit: String,
    },
    /// Followed by the files' bytes, in this order.
    Changed {
        commit: String,
        files: Vec<(String, u64)>,
    },
    Failed {
        error: GitError,
    },
}

/// Runs fetches for the hub's pollers: within a deadline, cancellable, one per cache
/// at a time, within [`Limits`].
pub struct Fetcher {
    mode: FetcherMode,
    timeout: Duration,
    limits: Limits,
    /// One lock per cache directory, held for the whole fetch.
    locks: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Resolves when `cancel` says so, or when its sender is gone (nobody wants the
/// result any more).
pub async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    let _ = cancel.wait_for(|c| *c).await;
}

impl Fetcher {
    pub fn new(mode: FetcherMode, timeout: Duration, limits: Limits) -> Fetcher {
        Fetcher {
            mode,
            timeout,
            limits,
            locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn cache_lock(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the locks nobody holds or waits for (deleted sources).
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(dir.to_path_buf()).or_default().clone()
    }

    /// Runs `req` with this fetcher's deadline and limits, after any other fetch
    /// into the same cache finished. Returns [`GitError::Timeout`] at the deadline
    /// and [`GitError::Cancelled`] as soon as `cancel` fires; either way the attempt
    /// is stopped (in [`FetcherMode::Child`], its process group is killed and
    /// reaped before this returns).
    pub async fn fetch(
        &self,
        mut req: FetchRequest,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<Fetched, GitError> {
        req.limits = self.limits;
        req.timeout = self.timeout;
        let shown = redact_url(&req.url);
        let lock = self.cache_lock(&req.cache_dir);
        let guard = tokio::select! {
            g = lock.lock_owned() => g,
            _ = cancelled(cancel) => return Err(GitError::Cancelled { url: shown }),
        };
        let timed_out = || GitError::Timeout {
            url: shown.clone(),
            after: humantime::format_duration(self.timeout).to_string(),
        };
        match &self.mode {
            FetcherMode::Child(program) => {
                let r = run_child(program, &req, cancel).await;
                drop(guard);
                match r {
                    Err(Stopped::Timeout) => Err(timed_out()),
                    Err(Stopped::Cancelled) => Err(GitError::Cancelled { url: shown }),
                    Ok(r) => r,
                }
            }
            FetcherMode::InProcess => {
                let task = tokio::task::spawn_blocking(move || {
                    // Released when the fetch really ends, not at the deadline.
                    let _guard = guard;
                    super::fetch(&req)
                });
                tokio::select! {
                    r = task => r.unwrap_or_else(|e| Err(GitError::Helper {
                        reason: format!("fetch thread failed: {e}"),
                    })),
                    _ = tokio::time::sleep(self.timeout) => Err(timed_out()),
                    _ = cancelled(cancel) => Err(GitError::Cancelled { url: shown }),
                }
            }
        }
    }
}

/// Why a helper was killed.
enum Stopped {
    Timeout,
    Cancelled,
}

/// Kills a helper's process group, unless disarmed (the helper was reaped: its id
/// may then belong to someone else). Also on drop, so that a fetch future dropped
/// half-way (its task aborted, the runtime shut down) leaves nothing running.
struct GroupKill(Option<Pid>);

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn run_child(
    program: &Path,
    req: &FetchRequest,
    cancel: &mut watch::Receiver<bool>,
) -> Result<Result<Fetched, GitError>, Stopped> {
    let helper = |reason: String| Ok(Err(GitError::Helper { reason }));
    let input = match serde_json::to_vec(req) {
        Ok(i) => i,
        Err(e) => return helper(format!("cannot encode the request: {e}")),
    };
    let mut child = match tokio::process::Command::new(program)
        // As `ps` shows it (the program may be `/proc/self/exe`).
        .arg0("flotilla-hub")
        .arg(HELPER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: the kill reaches the ssh or git-upload-pack it runs.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return helper(format!("cannot start {}: {e}", program.display())),
    };
    // Declared after `child`, so dropped (and the group killed) before it.
    let mut group = GroupKill(child.id().and_then(|id| Pid::from_raw(id as i32)));
    let limit = max_reply_bytes(&req.limits);
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let outcome = {
        let io = async {
            let write = async move {
                if let Some(mut s) = stdin {
                    // A helper that died early shows in its exit status and stderr.
                    let _ = s.write_all(&input).await;
                }
            };
            let read_out = async move {
                let mut buf = Vec::new();
                if let Some(s) = stdout {
                    s.take(limit + 1).read_to_end(&mut buf).await?;
                }
                Ok::<_, std::io::Error>(buf)
            };
            let read_err = async move {
                let mut buf = Vec::new();
                if let Some(s) = stderr {
                    let _ = s.take(MAX_STDERR_BYTES).read_to_end(&mut buf).await;
                }
                buf
            };
            let ((), out, err) = tokio::join!(write, read_out, read_err);
            let status = child.wait().await;
            (out, err, status)
        };
        tokio::select! {
            r = io => Ok(r),
            _ = tokio::time::sleep(req.timeout) => Err(Stopped::Timeout),
            _ = cancelled(cancel) => Err(Stopped::Cancelled),
        }
    };
    let (out, err, status) = match outcome {
        Ok(r) => r,
        Err(why) => {
            group.kill();
            let _ = child.wait().await;
            return Err(why);
        }
    };
    // Reaped: its id is free for reuse, never signal it again.
    group.0 = None;
    let stderr_text = || {
        let text = String::from_utf8_lossy(&err).trim().to_string();
        scrub_secrets(&text, req)
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => return helper(format!("waiting for the helper: {e}")),
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => return helper(format!("reading the helper's answer: {e}")),
    };
    if out.len() as u64 > limit {
        return helper(format!(
            "its answer is larger than the limits allow ({limit} bytes)"
        ));
    }
    match decode(&out) {
        Some(r) => Ok(r),
        None => helper(format!(
            "no answer ({status}){}",
            match stderr_text() {
                t if t.is_empty() => String::new(),
                t => format!(": {t}"),
            }
        )),
    }
}

/// No password or key in what the helper's stderr says.
fn scrub_secrets(text: &str, req: &FetchRequest) -> String {
    let mut text = text.replace(&req.url, &redact_url(&req.url));
    if let Some(super::Credentials::Basic { password, .. }) = &req.credentials {
        if !password.is_empty() {
            text = text.replace(password.as_str(), "<redacted>");
        }
    }
    text
}

/// The helper's reply; `None` if it is not one.
fn decode(out: &[u8]) -> Option<Result<Fetched, GitError>> {
    let nl = out.iter().position(|b| *b == b'\n')?;
    let reply: Reply = serde_json::from_slice(&out[..nl]).ok()?;
    let mut rest = &out[nl + 1..];
    Some(match reply {
        Reply::Failed { error } => Err(error),
        Reply::Unchanged { commit } => Ok(Fetched::Unchanged { commit }),
        Reply::Changed { commit, files } => {
            let mut map = std::collections::BTreeMap::new();
            for (path, len) in files {
                let len = usize::try_from(len).ok()?;
                if rest.len() < len {
                    return None;
                }
                let (data, tail) = rest.split_at(len);
                map.insert(path, data.to_vec());
                rest = tail;
            }
            if !rest.is_empty() {
                return None;
            }
            Ok(Fetched::Changed(Snapshot { commit, files: map }))
        }
    })
}

/// The reply the helper writes for `result`.
fn encode(result: Result<Fetched, GitError>, out: &mut impl Write) -> std::io::Result<()> {
    let (reply, files) = match result {
        Err(error) => (Reply::Failed { error }, None),
        Ok(Fetched::Unchanged { commit }) => (Reply::Unchanged { commit }, None),
        Ok(Fetched::Changed(s)) => (
            Reply::Changed {
                commit: s.commit,
                files: s
                    .files
                    .iter()
                    .map(|(p, b)| (p.clone(), b.len() as u64))
                    .collect(),
            },
            Some(s.files),
        ),
    };
    serde_json::to_writer(&mut *out, &reply)?;
    out.write_all(b"\n")?;
    for data in files.iter().flat_map(|f| f.values()) {
        out.write_all(data)?;
    }
    out.flush()
}

/// When the program was started as the fetch helper, runs it and returns its exit
/// code; `None` otherwise. `main` calls this first.
pub fn helper_if_requested() -> Option<i32> {
    let first = std::env::args_os().nth(1)?;
    (first == HELPER_ARG).then(helper_main)
}

fn helper_main() -> i32 {
    // Git over HTTPS (gix's reqwest client) takes the process-wide provider: ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin()
        .lock()
        .take(MAX_REQUEST_BYTES)
        .read_to_end(&mut input)
    {
        eprintln!("reading the request: {e}");
        return 2;
    }
    let req: FetchRequest = match serde_json::from_slice(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("invalid request: {e}");
            return 2;
        }
    };
    // The hub kills us at the deadline. Should it be gone, we go a little later,
    // with the ssh or git-upload-pack we started, when we lead our process group
    // (as the hub starts us); never another group.
    let lifetime = req.timeout.saturating_add(HELPER_GRACE);
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        if rustix::process::getpgrp() == rustix::process::getpid() {
            let _ = rustix::process::kill_current_process_group(Signal::KILL);
        }
        std::process::exit(3);
    });
    let result = super::fetch(&req);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match encode(result, &mut out) {
        Ok(()) => 0,
        // The hub stopped listening (it gave up, or died): nothing to tell.
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn replies_round_trip() {
        let mut files = BTreeMap::new();
        files.insert("a/x.yaml".to_string(), b"x: 1\n".to_vec());
        files.insert("a/empty".to_string(), Vec::new());
        files.insert("b/bin".to_string(), vec![0, b'\n', 255]);
        let snapshot = Snapshot {
            commit: "c".repeat(40),
            files,
        };
        for result in [
            Ok(Fetched::Changed(snapshot)),
            Ok(Fetched::Unchanged {
                commit: "d".repeat(40),
            }),
            Err(GitError::Limit {
                url: "git://h/x".into(),
                commit: "e".repeat(40),
                reason: "file a is 2 MiB".into(),
            }),
        ] {
            let mut out = Vec::new();
            encode(result.clone(), &mut out).unwrap();
            assert_eq!(decode(&out), Some(result));
        }
        // Truncated or trailing bytes are not a reply.
        let mut out = Vec::new();
        let mut files = BTreeMap::new();
        files.insert("f".to_string(), b"12345".to_vec());
        encode(
            Ok(Fetched::Changed(Snapshot {
                commit: "c".into(),
                files,
            })),
            &mut out,
        )
        .unwrap();
        assert_eq!(decode(&out[..out.len() - 1]), None);
        out.push(b'x');
        out.push(b'x');
        assert_eq!(decode(&out), None);
        assert_eq!(decode(b"garbage"), None);
    }
}
