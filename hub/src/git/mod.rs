//! Fetching Git sources with gix into a per-source bare cache, and reading, within
//! limits, the files of the followed commit that the source's bundles are made of.
//!
//! A remote is hostile ground: it may accept a connection and never answer, drip
//! bytes forever, or serve a tree of a million files. So the hub never runs a fetch
//! on one of its own threads: [`child::Fetcher`] runs the blocking [`fetch`] below in
//! a child process (`flotilla-hub __git-fetch`) that it kills at the deadline or
//! when the fetch is cancelled, one fetch per cache at a time.

pub mod child;
mod tree;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use flotilla_shared::objects::GitRef;
use gix::bstr::ByteSlice;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use child::{Fetcher, FetcherMode};

/// How long one fetch (connect, negotiate, receive the pack, read the tree) may take:
/// long enough for a first clone of a large repository over a slow link, short
/// enough that a remote that hangs is reported, and retried, within minutes.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Default cap on the bytes of one snapshot (the files of the source's bundle
/// directories). The snapshot is held in memory by the fetch helper and the hub and
/// rendered; deployment repositories hold a few MiB, Helm charts with vendored
/// dependencies tens of MiB, so 256 MiB leaves room without letting one push take
/// the hub's memory.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 256 << 20;

/// Default cap on one file: a Kubernetes object cannot exceed ~1.5 MiB (etcd's
/// request limit) and the largest manifest files (CRD collections) are a few MiB;
/// 32 MiB still fits a vendored chart archive.
pub const DEFAULT_MAX_FILE_BYTES: u64 = flotilla_shared::documents::MAX_FILE_BYTES as u64;

/// Default cap on the number of files read: every file is hashed and handed to a
/// renderer; 10,000 is far beyond the manifests a fleet deploys from one source.
pub const DEFAULT_MAX_FILES: usize = 10_000;

/// Entries of the whole tree (files and directories) listed to choose the bundle
/// directories, read or not. Names only, ~100 bytes each in the helper: 250,000 is
/// almost three times the Linux kernel's tree; a deployment repository beyond it is
/// not one.
pub const MAX_TREE_ENTRIES: usize = 250_000;

/// What a fetch may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Sum of the sizes of the files read.
    pub max_snapshot_bytes: u64,
    /// Size of any one file read.
    pub max_file_bytes: u64,
    /// Number of files read.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// The files of one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Full hex id of the commit the snapshot was read from.
    pub commit: String,
    /// The regular and executable files of the source's bundle directories (all of
    /// them when the bundle is the root), by '/'-separated path relative to the
    /// root. Submodules and symlinks are skipped.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// What a fetch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The ref still points at the commit the caller already holds: nothing read.
    Unchanged { commit: String },
    /// A commit the caller does not hold, read.
    Changed(Snapshot),
}

/// One fetch, as the hub hands it to the fetch helper.
#[derive(Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    pub url: String,
    pub git_ref: GitRef,
    /// The source's bare cache.
    pub cache_dir: PathBuf,
    pub credentials: Option<Credentials>,
    /// The source's `paths` globs: only the files of the bundle directories they
    /// choose (or, without globs, of the directories with a flotilla.yaml or
    /// fleet.yaml, else the root) are read.
    pub paths: Vec<String>,
    /// The commit the caller holds: if the ref still points at it, the tree is not read.
    pub known_commit: Option<String>,
    pub limits: Limits,
    /// The attempt's deadline (see [`child::Fetcher`]); also the longest an HTTP
    /// request may take (reqwest's own default, 30 s, would cut a long clone short).
    pub timeout: Duration,
}

impl std::fmt::Debug for FetchRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchRequest")
            .field("url", &redact_url(&self.url))
            .field("git_ref", &self.git_ref)
            .field("cache_dir", &self.cache_dir)
            .field("credentials", &self.credentials)
            .field("paths", &self.paths)
            .field("known_commit", &self.known_commit)
            .field("limits", &self.limits)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl FetchRequest {
    /// A request for `git_ref` of `url` with no credentials, no paths (default
    /// bundle discovery), nothing known and the default limits.
    pub fn new(url: &str, git_ref: &GitRef, cache_dir: &Path) -> FetchRequest {
        FetchRequest {
            url: url.to_string(),
            git_ref: git_ref.clone(),
            cache_dir: cache_dir.to_path_buf(),
            credentials: None,
            paths: Vec::new(),
            known_commit: None,
            limits: Limits::default(),
            timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// What went wrong fetching or reading a source. URLs in messages have any password
/// removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum GitError {
    #[error("invalid repository URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach repository {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("repository {url}: branch {branch:?} not found")]
    MissingBranch { url: String, branch: String },
    #[error("repository {url}: tag {tag:?} not found")]
    MissingTag { url: String, tag: String },
    #[error("invalid revision {revision:?}: expected a hexadecimal commit id (4 to 40 digits)")]
    BadRevision { revision: String },
    #[error("repository {url}: revision {revision} not found on any branch or tag")]
    MissingRevision { url: String, revision: String },
    #[error("fetching {what} from {url}: {reason}")]
    Fetch {
        url: String,
        what: String,
        reason: String,
    },
    #[error("repository {url}: reading {what}: {reason}")]
    Read {
        url: String,
        what: String,
        reason: String,
    },
    #[error("git cache {path}: {reason}")]
    Cache { path: String, reason: String },
    /// The commit is refused whole: the last good snapshot stays.
    #[error("repository {url} at commit {commit}: {reason}; the last good snapshot is kept")]
    Limit {
        url: String,
        commit: String,
        reason: String,
    },
    #[error("repository {url}: the source's paths: {reason}")]
    BadPaths { url: String, reason: String },
    #[error(
        "fetching from {url}: no result within the {after} deadline (flotilla-hub --git-timeout); \
         the attempt was stopped and will be retried"
    )]
    Timeout { url: String, after: String },
    #[error("fetching from {url}: cancelled")]
    Cancelled { url: String },
    #[error("git fetch helper: {reason}")]
    Helper { reason: String },
}

impl GitError {
    /// Errors a fresh cache cannot fix: the URL, the network, the ref or the
    /// repository's content is at fault.
    fn is_final(&self) -> bool {
        !matches!(
            self,
            GitError::Fetch { .. } | GitError::Read { .. } | GitError::Cache { .. }
        )
    }

    /// The commit a [`GitError::Limit`] refused.
    pub fn refused_commit(&self) -> Option<&str> {
        match self {
            GitError::Limit { commit, .. } => Some(commit),
            _ => None,
        }
    }
}

/// How to authenticate to a private repository, from a secret stored in the hub.
/// `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credentials {
    /// HTTP(S) basic auth; a token goes in `password` (GitHub, GitLab and Gitea take
    /// any user name with a token).
    Basic { username: String, password: String },
    /// SSH: the private key (OpenSSH or PEM) and the `known_hosts` lines the server
    /// must match (host keys are always checked).
    Ssh {
        private_key: Vec<u8>,
        known_hosts: Vec<u8>,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .finish_non_exhaustive(),
            Credentials::Ssh { .. } => f.debug_struct("Ssh").finish_non_exhaustive(),
        }
    }
}

/// File inside the bare cache holding the SHA-256 of the URL it mirrors (never the
/// URL: it could carry a password); a cache for another URL is discarded rather
/// than mixed.
const URL_MARKER: &str = "flotilla-url";

/// Fetches `git_ref` from `url` into the bare repository cached in `cache_dir` (created
/// on first use, fetched incrementally later) and returns every file of its commit
/// that the default bundle discovery chooses, within the default limits. In the
/// calling thread, with no deadline: for tests and tools; the hub uses
/// [`child::Fetcher`].
pub fn fetch_snapshot(url: &str, git_ref: &GitRef, cache_dir: &Path) -> Result<Snapshot, GitError> {
    fetch_snapshot_with(url, git_ref, cache_dir, None)
}

/// [`fetch_snapshot`] with credentials for a private repository.
pub fn fetch_snapshot_with(
    url: &str,
    git_ref: &GitRef,
    cache_dir: &Path,
    credentials: Option<&Credentials>,
) -> Result<Snapshot, GitError> {
    let mut req = FetchRequest::new(url, git_ref, cache_dir);
    req.credentials = credentials.cloned();
    match fetch(&req)? {
        Fetched::Changed(s) => Ok(s),
        Fetched::Unchanged { .. } => unreachable!("nothing was known"),
    }
}

/// Runs one fetch in the calling thread (blocking, no deadline of its own: the fetch
/// helper process runs this, and is killed at the deadline). Basic auth is handed
/// to gix through its credential hook (never put in the URL); an SSH key is written
/// to a private temporary file for the `ssh` program while it runs.
///
/// Holds an exclusive lock on the cache (a `flock` on a file beside it) for the
/// whole fetch, so that no two processes ever write one cache: a helper left over
/// from a hub that died finishes, or dies at its own deadline, first.
///
/// A cache that cannot be opened, belongs to another URL, or fails in a way the
/// network does not explain is deleted and rebuilt once.
pub fn fetch(req: &FetchRequest) -> Result<Fetched, GitError> {
    let url = req.url.as_str();
    let shown = redact_url(url);
    if let GitRef::Revision(r) = &req.git_ref {
        if !is_hex_revision(r) {
            return Err(GitError::BadRevision {
                revision: r.clone(),
            });
        }
    }
    let parsed: gix::Url =
        gix::url::parse(url.as_bytes().as_bstr()).map_err(|e| GitError::BadUrl {
            url: shown.clone(),
            reason: scrub(&e.to_string(), url, &shown),
        })?;
    let auth = Auth::new(req.credentials.as_ref(), &shown)?;
    let _lock = lock_cache(&req.cache_dir)?;
    let result = match attempt(req, &parsed, &shown, &auth) {
        Ok(s) => Ok(s),
        Err(e) if e.is_final() => Err(e),
        Err(e) => {
            tracing::warn!(cache = %req.cache_dir.display(), error = %e, "git cache unusable, rebuilding it");
            wipe(&req.cache_dir)?;
            attempt(req, &parsed, &shown, &auth)
        }
    };
    result.map_err(|e| auth.scrub_error(e))
}

/// Takes the cache's lock file (`<cache>.lock`, beside the cache so that wiping the
/// cache keeps it), waiting for whoever holds it. Released when the file closes,
/// also when the process dies.
fn lock_cache(cache_dir: &Path) -> Result<std::fs::File, GitError> {
    let err = |e: &dyn std::fmt::Display| GitError::Cache {
        path: cache_dir.display().to_string(),
        reason: format!("cannot lock: {e}"),
    };
    let mut name = cache_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "cache".into());
    name.push(".lock");
    let path = cache_dir.with_file_name(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(&e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(&e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| err(&e))?;
    Ok(file)
}

/// Credentials prepared for one fetch.
struct Auth {
    /// The URL as messages show it.
    shown: String,
    basic: Option<(String, String)>,
    /// `core.sshCommand` for this fetch, and the directory holding the key (removed
    /// on drop).
    ssh: Option<(String, tempfile::TempDir)>,
}

impl Auth {
    fn new(credentials: Option<&Credentials>, shown: &str) -> Result<Auth, GitError> {
        let cache_err = |e: std::io::Error| GitError::Fetch {
            url: shown.to_string(),
            what: "SSH key".into(),
            reason: format!("cannot prepare a private key file: {e}"),
        };
        Ok(match credentials {
            None => Auth {
                shown: shown.to_string(),
                basic: None,
                ssh: None,
            },
            Some(Credentials::Basic { username, password }) => Auth {
                shown: shown.to_string(),
                basic: Some((username.clone(), password.clone())),
                ssh: None,
            },
            Some(Credentials::Ssh {
                private_key,
                known_hosts,
            }) => {
                use std::os::unix::fs::OpenOptionsExt;
                let dir = tempfile::tempdir().map_err(cache_err)?;
                let key = dir.path().join("id");
                let hosts = dir.path().join("known_hosts");
                let mut key_bytes = private_key.clone();
                if !key_bytes.ends_with(b"\n") {
                    // ssh refuses a key whose last line has no newline.
                    key_bytes.push(b'\n');
                }
                std::io::Write::write_all(
                    &mut std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&key)
                        .map_err(cache_err)?,
                    &key_bytes,
                )
                .map_err(cache_err)?;
                std::fs::write(&hosts, known_hosts).map_err(cache_err)?;
                // The deadline is enforced by killing the helper's process group
                // (ssh included); ConnectTimeout and the keep-alives only make a
                // dead server fail sooner, with ssh's own reason.
                let command = format!(
                    "ssh -i '{}' -o IdentitiesOnly=yes -o UserKnownHostsFile='{}' \
                     -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes \
                     -o BatchMode=yes -o ConnectTimeout=30 -o ServerAliveInterval=15 \
                     -o ServerAliveCountMax=4 -F /dev/null",
                    key.display(),
                    hosts.display()
                );
                Auth {
                    shown: shown.to_string(),
                    basic: None,
                    ssh: Some((command, dir)),
                }
            }
        })
    }

    /// No secret in a message, whatever a transport put there; SSH failures say
    /// what to check (gix does not pass on ssh's own complaint).
    fn scrub_error(&self, e: GitError) -> GitError {
        if let (Some(_), GitError::Unreachable { url, reason }) = (&self.ssh, &e) {
            return GitError::Unreachable {
                url: url.clone(),
                reason: format!(
                    "{reason} (ssh: check the secret's key, its known_hosts line for this host and port, and the user in the URL)"
                ),
            };
        }
        let Some((_, password)) = &self.basic else {
            return e;
        };
        if password.is_empty() || !e.to_string().contains(password.as_str()) {
            return e;
        }
        GitError::Read {
            url: self.shown.clone(),
            what: "credentials".into(),
            reason: e.to_string().replace(password.as_str(), "<redacted>"),
        }
    }
}

fn attempt(
    req: &FetchRequest,
    parsed: &gix::Url,
    shown: &str,
    auth: &Auth,
) -> Result<Fetched, GitError> {
    let (url, cache_dir, git_ref) = (req.url.as_str(), req.cache_dir.as_path(), &req.git_ref);
    let mut repo = open_cache(url, cache_dir)?;
    if let Some((command, _)) = &auth.ssh {
        // In memory only: nothing of the credentials reaches the cache's config file.
        let mut config = repo.config_snapshot_mut();
        config
            .set_raw_value(gix::config::tree::Core::SSH_COMMAND, command.as_str())
            .map_err(|e| GitError::Cache {
                path: cache_dir.display().to_string(),
                reason: format!("cannot set the SSH command: {e}"),
            })?;
        config.commit().map_err(|e| GitError::Cache {
            path: cache_dir.display().to_string(),
            reason: format!("cannot set the SSH command: {e}"),
        })?;
    }
    let fetch_err = |what: &str, e: &dyn std::error::Error| GitError::Fetch {
        url: shown.to_string(),
        what: what.to_string(),
        reason: scrub(&chain(e), url, shown),
    };
    let (what, specs): (String, Vec<String>) = match git_ref {
        GitRef::Branch(b) => (
            format!("branch {b:?}"),
            vec![format!("+refs/heads/{b}:refs/remotes/origin/{b}")],
        ),
        GitRef::Tag(t) => (
            format!("tag {t:?}"),
            vec![format!("+refs/tags/{t}:refs/tags/{t}")],
        ),
        GitRef::Revision(r) => (
            format!("revision {r}"),
            vec![
                "+refs/heads/*:refs/remotes/origin/*".to_string(),
                "+refs/tags/*:refs/tags/*".to_string(),
            ],
        ),
    };
    let remote = repo
        .remote_at(parsed.clone())
        .map_err(|e| fetch_err(&what, &e))?
        .with_fetch_tags(gix::remote::fetch::Tags::None)
        .with_refspecs(
            specs.iter().map(String::as_str),
            gix::remote::Direction::Fetch,
        )
        .map_err(|e| fetch_err(&what, &e))?;

    let unreachable = |e: &dyn std::error::Error| {
        let reason = scrub(&chain(e), url, shown);
        GitError::Unreachable {
            url: shown.to_string(),
            reason: if reason.contains("No credentials were returned") {
                "the repository asks for credentials and the source names no secret (secretRef)"
                    .to_string()
            } else {
                reason
            },
        }
    };
    let mut connection = remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|e| unreachable(&e))?;
    if let Some(options) = http_options(&repo, url, req.timeout) {
        connection = connection.with_transport_options(options);
    }
    // gix asks this hook when the server wants credentials; nothing else sees them.
    // Without credentials the answer is "none" (never a terminal prompt).
    let basic = auth.basic.clone();
    connection = connection.with_credentials(move |action| match (action, &basic) {
        (gix::credentials::helper::Action::Get(ctx), Some((username, password))) => {
            Ok(Some(gix::credentials::protocol::Outcome {
                identity: gix::sec::identity::Account {
                    username: username.clone(),
                    password: password.clone(),
                    oauth_refresh_token: None,
                },
                next: ctx.into(),
            }))
        }
        _ => Ok(None),
    });
    // The handshake and ref listing: failures here mean the server refused or is absent.
    let prepare = connection
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| unreachable(&e))?;
    let remote_id =
        match git_ref {
            GitRef::Branch(b) => Some(mapped_id(prepare.ref_map(), false).ok_or_else(|| {
                GitError::MissingBranch {
                    url: shown.to_string(),
                    branch: b.clone(),
                }
            })?),
            GitRef::Tag(t) => {
                Some(
                    mapped_id(prepare.ref_map(), true).ok_or_else(|| GitError::MissingTag {
                        url: shown.to_string(),
                        tag: t.clone(),
                    })?,
                )
            }
            GitRef::Revision(_) => None,
        };
    if let (Some(id), Some(known)) = (remote_id, req.known_commit.as_deref()) {
        if gix::ObjectId::from_hex(known.as_bytes()).is_ok_and(|k| k == id) {
            // Still the commit the caller holds: no pack, no tree.
            return Ok(Fetched::Unchanged {
                commit: known.to_string(),
            });
        }
    }
    // The helper is killed at the deadline; nothing needs to interrupt it from
    // inside.
    let interrupt = AtomicBool::new(false);
    prepare
        .receive(gix::progress::Discard, &interrupt)
        .map_err(|e| fetch_err(&what, &e))?;

    let read_err = |what: &str, e: &dyn std::error::Error| GitError::Read {
        url: shown.to_string(),
        what: what.to_string(),
        reason: scrub(&chain(e), url, shown),
    };
    let start = match (git_ref, remote_id) {
        (_, Some(id)) => id,
        (GitRef::Revision(r), None) => {
            let missing = || GitError::MissingRevision {
                url: shown.to_string(),
                revision: r.clone(),
            };
            repo.rev_parse_single(r.as_bytes().as_bstr())
                .map_err(|_| missing())?
                .detach()
        }
        (_, None) => unreachable!("branches and tags always resolve to an id above"),
    };
    let commit = repo
        .find_object(start)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| read_err(&format!("commit {start}"), &e))?;
    let commit_id = commit.id.to_string();
    if req.known_commit.as_deref() == Some(commit_id.as_str()) {
        return Ok(Fetched::Unchanged { commit: commit_id });
    }
    let tree = commit
        .tree()
        .map_err(|e| read_err(&format!("tree of {commit_id}"), &e))?;
    let files = tree::read(
        &repo,
        &tree,
        &commit_id,
        &req.paths,
        &req.limits,
        url,
        shown,
    )?;
    Ok(Fetched::Changed(Snapshot {
        commit: commit_id,
        files,
    }))
}

/// For HTTP(S) URLs: gix's options from the (isolated) configuration, with
/// reqwest's whole-request timeout raised from its 30 s default to the fetch's
/// deadline, so that a long first clone is cut by the deadline only.
fn http_options(
    repo: &gix::Repository,
    url: &str,
    timeout: Duration,
) -> Option<Box<dyn std::any::Any>> {
    use gix::protocol::transport::client::blocking_io::http;
    let mut options = repo.transport_options(url, None).ok()??;
    let http_options = options.downcast_mut::<http::Options>()?;
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |builder| Ok(builder.timeout(timeout)))),
        configure_request: None,
    };
    http_options.backend = Some(std::sync::Arc::new(std::sync::Mutex::new(backend)));
    Some(options)
}

/// Parses a size: bytes, or with a binary unit (`512KiB`, `256MiB`, `1GiB`; `K`,
/// `M`, `G` mean the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits].parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number of bytes, or with KiB, MiB or GiB")
    })?;
    let shift = match t[digits..].trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// A size for messages: `32 MiB`, `1.5 KiB`, `17 bytes`.
pub fn format_size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit {
            // Units are powers of two.
            return if n & (unit - 1) == 0 {
                format!("{} {name}", n / unit)
            } else {
                format!("{:.1} {name}", n as f64 / unit as f64)
            };
        }
    }
    format!("{n} bytes")
}

/// The marker a cache for `url` holds.
fn url_marker(url: &str) -> String {
    hex::encode(Sha256::digest(url.as_bytes()))
}

/// The commit a branch or tag refspec resolved to on the remote, peeled through
/// annotated tags.
fn mapped_id(map: &gix::remote::fetch::RefMap, peel: bool) -> Option<gix::ObjectId> {
    let m = map.mappings.first()?;
    let id = if peel {
        m.remote.peeled_id()
    } else {
        m.remote.as_id()
    };
    id.map(ToOwned::to_owned)
}

/// Opens the bare cache, creating it if absent. A cache that cannot be opened or that
/// mirrors another URL is replaced.
fn open_cache(url: &str, cache_dir: &Path) -> Result<gix::Repository, GitError> {
    let cache_err = |e: &dyn std::fmt::Display| GitError::Cache {
        path: cache_dir.display().to_string(),
        reason: e.to_string(),
    };
    let marker = cache_dir.join(URL_MARKER);
    if cache_dir.exists() {
        let same_url = std::fs::read_to_string(&marker).is_ok_and(|u| u == url_marker(url));
        if same_url {
            match gix::open_opts(cache_dir, gix::open::Options::isolated()) {
                Ok(repo) if repo.is_bare() => return Ok(repo),
                Ok(_) => {
                    tracing::warn!(cache = %cache_dir.display(), "git cache is not bare, rebuilding it")
                }
                Err(error) => {
                    tracing::warn!(cache = %cache_dir.display(), %error, "git cache cannot be opened, rebuilding it")
                }
            }
        }
        wipe(cache_dir)?;
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| cache_err(&e))?;
    gix::init_bare(cache_dir).map_err(|e| cache_err(&e))?;
    std::fs::write(&marker, url_marker(url)).map_err(|e| cache_err(&e))?;
    gix::open_opts(cache_dir, gix::open::Options::isolated()).map_err(|e| cache_err(&e))
}

fn wipe(cache_dir: &Path) -> Result<(), GitError> {
    match std::fs::remove_dir_all(cache_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(GitError::Cache {
            path: cache_dir.display().to_string(),
            reason: format!("cannot delete: {e}"),
        }),
    }
}

fn is_hex_revision(r: &str) -> bool {
    (4..=40).contains(&r.len()) && r.chars().all(|c| c.is_ascii_hexdigit())
}

/// The URL with any password or token removed, for messages and logs.
pub fn redact_url(url: &str) -> String {
    flotilla_shared::objects::redact_repo_url(url)
}

/// An error and its causes, `outer: inner: innermost`, skipping causes that repeat
/// their parent's text.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !msg.is_empty() && !last.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        last = msg;
        cur = c.source();
    }
    out
}

/// Replaces the raw URL in an underlying error message with its redacted form.
fn scrub(message: &str, url: &str, shown: &str) -> String {
    if url == shown {
        message.to_string()
    } else {
        message.replace(url, shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A work repository made with the git CLI, on branch `main`.
    struct Origin {
        _tmp: tempfile::TempDir,
        dir: std::path::PathBuf,
    }

    impl Origin {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("repo");
            std::fs::create_dir(&dir).unwrap();
            git(&dir, &["init", "-q"]);
            Origin { _tmp: tmp, dir }
        }

        fn write(&self, path: &str, content: &str) -> &Self {
            let p = self.dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
            self
        }

        fn commit(&self, msg: &str) -> String {
            git(&self.dir, &["add", "-A"]);
            git(&self.dir, &["commit", "-q", "-m", msg]);
            git(&self.dir, &["rev-parse", "HEAD"])
        }

        fn url(&self) -> String {
            format!("file://{}", self.dir.display())
        }
    }

    fn branch(b: &str) -> GitRef {
        GitRef::Branch(b.into())
    }

    fn text(s: &Snapshot, path: &str) -> String {
        String::from_utf8(s.files[path].clone()).unwrap()
    }

    #[test]
    fn initial_fetch_then_new_commit_then_deleted_file() {
        let origin = Origin::new();
        origin
            .write("apps/web/deploy.yaml", "kind: Deployment\n")
            .write("README.md", "hi\n");
        for i in 0..8 {
            origin.write(&format!("static/f{i}.txt"), &format!("file {i}\n"));
        }
        let c1 = origin.commit("one");
        let cache = tempfile::tempdir().unwrap();
        let cache_dir = cache.path().join("src-a");

        let s1 = fetch_snapshot(&origin.url(), &branch("main"), &cache_dir).unwrap();
        assert_eq!(s1.commit, c1);
        assert_eq!(s1.files.len(), 10);
        assert!(s1.files.contains_key("README.md"));
        assert_eq!(text(&s1, "apps/web/deploy.yaml"), "kind: Deployment\n");
        assert!(cache_dir.join("HEAD").exists(), "bare cache created");

        origin.write("apps/web/deploy.yaml", "kind: Service\n");
        std::fs::remove_file(origin.dir.join("README.md")).unwrap();
        let c2 = origin.commit("two");
        let s2 = fetch_snapshot(&origin.url(), &branch("main"), &cache_dir).unwrap();
        assert_eq!(s2.commit, c2);
        assert_eq!(text(&s2, "apps/web/deploy.yaml"), "kind: Service\n");
        assert!(!s2.files.contains_key("README.md"), "deleted file gone");
        assert_eq!(text(&s2, "static/f7.txt"), "file 7\n");
        // Incremental: the second pack holds only what the new commit added.
        let mut packs = pack_sizes(&cache_dir);
        packs.sort();
        assert_eq!(packs.len(), 2, "{packs:?}");
        assert!(packs[0] <= 5 && packs[1] >= 14, "{packs:?}");

        // Nothing new: same answer, from the cache.
        let s3 = fetch_snapshot(&origin.url(), &branch("main"), &cache_dir).unwrap();
        assert_eq!(s3, s2);
    }

    /// Object counts of the packs in a bare repository.
    fn pack_sizes(bare: &Path) -> Vec<usize> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(bare.join("objects/pack")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "idx") {
                let idx = std::fs::File::open(&p).unwrap();
                let o = Command::new("git")
                    .arg("show-index")
                    .stdin(idx)
                    .output()
                    .unwrap();
                out.push(String::from_utf8_lossy(&o.stdout).lines().count());
            }
        }
        out
    }

    fn request(origin: &Origin, dir: &Path) -> FetchRequest {
        FetchRequest::new(&origin.url(), &branch("main"), dir)
    }

    fn changed(f: Fetched) -> Snapshot {
        match f {
            Fetched::Changed(s) => s,
            other => panic!("expected a new snapshot: {other:?}"),
        }
    }

    #[test]
    fn only_the_bundle_directories_are_read() {
        let origin = Origin::new();
        origin
            .write("apps/web/fleet.yaml", "defaultNamespace: web\n")
            .write("apps/web/cm.yaml", "a: 1\n")
            .write("apps/web/sub/x.yaml", "x: 1\n")
            .write("apps/db/cm.yaml", "b: 1\n")
            .write("vendor/huge.bin", &"x".repeat(4096))
            .write("README.md", "hi\n");
        let c1 = origin.commit("one");
        let cache = tempfile::tempdir().unwrap();
        let mut req = request(&origin, &cache.path().join("c"));
        // Over the file cap, but outside every bundle directory: never read.
        req.limits.max_file_bytes = 1024;

        // Default discovery: the directories with a fleet.yaml.
        let s = changed(fetch(&req).unwrap());
        assert_eq!(s.commit, c1);
        assert_eq!(
            s.files.keys().collect::<Vec<_>>(),
            [
                "apps/web/cm.yaml",
                "apps/web/fleet.yaml",
                "apps/web/sub/x.yaml"
            ]
        );
        // Globs.
        req.paths = vec!["apps/*".into()];
        let s = changed(fetch(&req).unwrap());
        assert_eq!(
            s.files.keys().collect::<Vec<_>>(),
            [
                "apps/db/cm.yaml",
                "apps/web/cm.yaml",
                "apps/web/fleet.yaml",
                "apps/web/sub/x.yaml"
            ]
        );
        // The root: everything, so the cap trips, naming the file.
        req.paths = vec![".".into()];
        let err = fetch(&req).unwrap_err();
        assert_eq!(err.refused_commit(), Some(c1.as_str()), "{err}");
        assert!(err.to_string().contains("vendor/huge.bin"), "{err}");
    }

    #[test]
    fn limits_refuse_a_commit_naming_the_cap_and_the_path() {
        let origin = Origin::new();
        for i in 0..5 {
            origin.write(&format!("f{i}.yaml"), &"a".repeat(100));
        }
        let c1 = origin.commit("one");
        let cache = tempfile::tempdir().unwrap();
        let mut req = request(&origin, &cache.path().join("c"));
        req.limits = Limits {
            max_snapshot_bytes: 10_000,
            max_file_bytes: 1000,
            max_files: 4,
        };
        let err = fetch(&req).unwrap_err();
        eprintln!("{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("--git-max-files") && msg.contains("f4.yaml"),
            "{msg}"
        );
        assert!(
            msg.contains(&c1) && msg.contains("last good snapshot"),
            "{msg}"
        );

        req.limits.max_files = 5;
        req.limits.max_file_bytes = 99;
        let msg = fetch(&req).unwrap_err().to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("--git-max-file-size") && msg.contains("f0.yaml"),
            "{msg}"
        );
        assert!(
            msg.contains("100 bytes") && msg.contains("99 bytes"),
            "{msg}"
        );

        req.limits.max_file_bytes = 100;
        req.limits.max_snapshot_bytes = 250;
        let msg = fetch(&req).unwrap_err().to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains("--git-max-snapshot-size") && msg.contains("f2.yaml"),
            "{msg}"
        );

        req.limits.max_snapshot_bytes = 500;
        assert_eq!(changed(fetch(&req).unwrap()).files.len(), 5);
    }

    #[test]
    fn an_unchanged_commit_is_not_read() {
        let origin = Origin::new();
        origin.write("a.yaml", "a: 1\n");
        let c1 = origin.commit("one");
        let cache = tempfile::tempdir().unwrap();
        let mut req = request(&origin, &cache.path().join("c"));
        assert_eq!(changed(fetch(&req).unwrap()).commit, c1);
        req.known_commit = Some(c1.clone());
        assert_eq!(
            fetch(&req).unwrap(),
            Fetched::Unchanged { commit: c1.clone() }
        );
        // A pinned revision and an annotated tag too.
        git(&origin.dir, &["tag", "-a", "v1", "-m", "v1"]);
        for r in [GitRef::Revision(c1.clone()), GitRef::Tag("v1".into())] {
            req.git_ref = r;
            assert_eq!(
                fetch(&req).unwrap(),
                Fetched::Unchanged { commit: c1.clone() }
            );
        }
        origin.write("a.yaml", "a: 2\n");
        let c2 = origin.commit("two");
        req.git_ref = branch("main");
        assert_eq!(changed(fetch(&req).unwrap()).commit, c2);
    }

    #[test]
    fn no_password_reaches_the_cache() {
        let origin = Origin::new();
        origin.write("a.yaml", "a: 1\n");
        let c1 = origin.commit("one");
        let daemon = Daemon::start(origin.dir.parent().unwrap()).expect("git daemon starts");
        // Refused by the API; here straight to the fetch, which must still not keep it.
        let url = format!("git://u:pw-Zq9Tk@127.0.0.1:{}/repo", daemon.port);
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("c");
        match fetch(&FetchRequest::new(&url, &branch("main"), &dir)) {
            Ok(f) => assert_eq!(changed(f).commit, c1),
            Err(e) => assert!(!e.to_string().contains("Zq9Tk"), "{e}"),
        }
        let mut stack = vec![cache.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    assert!(
                        !bytes.windows(5).any(|w| w == b"Zq9Tk"),
                        "{} holds the password",
                        p.display()
                    );
                }
            }
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert_eq!(parse_size("256MiB").unwrap(), DEFAULT_MAX_SNAPSHOT_BYTES);
        assert_eq!(parse_size(" 1 GiB ").unwrap(), 1 << 30);
        assert_eq!(parse_size("32M").unwrap(), DEFAULT_MAX_FILE_BYTES);
        for bad in ["", "MiB", "1.5MiB", "3TB", "-1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(17), "17 bytes");
        assert_eq!(format_size(2048), "2 KiB");
        assert_eq!(format_size(3000), "2.9 KiB");
        assert_eq!(format_size(DEFAULT_MAX_SNAPSHOT_BYTES), "256 MiB");
    }

    #[test]
    fn plain_path_urls_work() {
        let origin = Origin::new();
        origin.write("a.yaml", "a\n");
        let c1 = origin.commit("one");
        let cache = tempfile::tempdir().unwrap();
        let s = fetch_snapshot(
            origin.dir.to_str().unwrap(),
            &branch("main"),
            &cache.path().join("c"),
        )
        .unwrap();
        assert_eq!(s.commit, c1);
    }

    #[test]
    fn branch_tag_and_revision() {
        let origin = Origin::new();
        origin.write("v.txt", "1\n");
        let c1 = origin.commit("one");
        git(&origin.dir, &["tag", "-a", "v1", "-m", "release 1"]);
        git(&origin.dir, &["tag", "light", c1.as_str()]);
        origin.write("v.txt", "2\n");
        let c2 = origin.commit("two");
        git(&origin.dir, &["checkout", "-q", "-b", "feature"]);
        origin.write("v.txt", "3\n");
        let c3 = origin.commit("three");
        git(&origin.dir, &["checkout", "-q", "main"]);

        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("c");
        let url = origin.url();
        let s = fetch_snapshot(&url, &branch("main"), &dir).unwrap();
        assert_eq!(
            (s.commit.as_str(), text(&s, "v.txt").as_str()),
            (c2.as_str(), "2\n")
        );
        let s = fetch_snapshot(&url, &branch("feature"), &dir).unwrap();
        assert_eq!(
            (s.commit.as_str(), text(&s, "v.txt").as_str()),
            (c3.as_str(), "3\n")
        );
        let s = fetch_snapshot(&url, &GitRef::Tag("v1".into()), &dir).unwrap();
        assert_eq!(s.commit, c1, "annotated tag peeled to its commit");
        let s = fetch_snapshot(&url, &GitRef::Tag("light".into()), &dir).unwrap();
        assert_eq!(s.commit, c1);
        let s = fetch_snapshot(&url, &GitRef::Revision(c1.clone()), &dir).unwrap();
        assert_eq!(
            (s.commit.as_str(), text(&s, "v.txt").as_str()),
            (c1.as_str(), "1\n")
        );
        let s = fetch_snapshot(&url, &GitRef::Revision(c3[..10].to_string()), &dir).unwrap();
        assert_eq!(s.commit, c3, "abbreviated revision");
        // A revision only on a branch, in a fresh cache.
        let s =
            fetch_snapshot(&url, &GitRef::Revision(c3.clone()), &cache.path().join("d")).unwrap();
        assert_eq!(s.commit, c3);
    }

    #[test]
    fn missing_branch_tag_and_revision_are_clear_errors() {
        let origin = Origin::new();
        origin.write("a", "a\n");
        origin.commit("one");
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("c");
        let url = origin.url();

        let err = fetch_snapshot(&url, &branch("nope"), &dir).unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, GitError::MissingBranch { .. }), "{err}");
        assert!(err.to_string().contains("\"nope\""), "{err}");
        assert!(err.to_string().contains(&url), "{err}");

        let err = fetch_snapshot(&url, &GitRef::Tag("v9".into()), &dir).unwrap_err();
        assert!(matches!(err, GitError::MissingTag { .. }), "{err}");

        let absent = "0123456789abcdef0123456789abcdef01234567";
        let err = fetch_snapshot(&url, &GitRef::Revision(absent.into()), &dir).unwrap_err();
        assert!(matches!(err, GitError::MissingRevision { .. }), "{err}");
        assert!(err.to_string().contains(absent), "{err}");

        let err = fetch_snapshot(&url, &GitRef::Revision("main~1".into()), &dir).unwrap_err();
        assert!(matches!(err, GitError::BadRevision { .. }), "{err}");
    }

    #[test]
    fn unreachable_repositories() {
        let cache = tempfile::tempdir().unwrap();
        let err = fetch_snapshot(
            "git://127.0.0.1:1/x",
            &branch("main"),
            &cache.path().join("a"),
        )
        .unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, GitError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("git://127.0.0.1:1/x"), "{err}");

        let missing = cache.path().join("no-such-repo");
        let err = fetch_snapshot(
            &format!("file://{}", missing.display()),
            &branch("main"),
            &cache.path().join("b"),
        )
        .unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, GitError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn credentials_never_in_messages() {
        let cache = tempfile::tempdir().unwrap();
        let err = fetch_snapshot(
            "git://user:s3cret@127.0.0.1:1/x",
            &branch("main"),
            &cache.path().join("a"),
        )
        .unwrap_err();
        eprintln!("{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(!redact_url("https://u:s3cret@example.com/r.git").contains("s3cret"));
        assert_eq!(
            redact_url("https://example.com/r.git"),
            "https://example.com/r.git"
        );
    }

    #[test]
    fn corrupt_or_foreign_cache_is_rebuilt() {
        let origin = Origin::new();
        origin.write("a", "a\n");
        let c1 = origin.commit("one");
        let cache = tempfile::tempdir().unwrap();

        // Garbage where the cache should be.
        let dir = cache.path().join("garbage");
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        std::fs::write(dir.join("HEAD"), "not a ref").unwrap();
        let s = fetch_snapshot(&origin.url(), &branch("main"), &dir).unwrap();
        assert_eq!(s.commit, c1);

        // A cache made for another repository.
        let other = Origin::new();
        other.write("b", "b\n");
        let c_other = other.commit("other");
        let s = fetch_snapshot(&other.url(), &branch("main"), &dir).unwrap();
        assert_eq!(s.commit, c_other);
        assert_eq!(s.files.keys().collect::<Vec<_>>(), ["b"]);

        // Objects deleted behind our back: refs point at nothing.
        let objects = dir.join("objects");
        std::fs::remove_dir_all(&objects).unwrap();
        std::fs::create_dir_all(objects.join("pack")).unwrap();
        std::fs::create_dir_all(objects.join("info")).unwrap();
        let s = fetch_snapshot(&other.url(), &branch("main"), &dir).unwrap();
        assert_eq!(s.commit, c_other);
    }

    #[test]
    fn skips_symlinks_and_submodules_keeps_executables() {
        let origin = Origin::new();
        origin
            .write("run.sh", "#!/bin/sh\n")
            .write("x/y.yaml", "y\n");
        std::process::Command::new("chmod")
            .args(["+x", origin.dir.join("run.sh").to_str().unwrap()])
            .status()
            .unwrap();
        std::os::unix::fs::symlink("x/y.yaml", origin.dir.join("link.yaml")).unwrap();
        let c1 = origin.commit("one");
        // A gitlink entry, as a submodule leaves in the tree.
        git(
            &origin.dir,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{c1},sub"),
            ],
        );
        git(&origin.dir, &["commit", "-q", "-m", "sub"]);
        let cache = tempfile::tempdir().unwrap();
        let s = fetch_snapshot(&origin.url(), &branch("main"), &cache.path().join("c")).unwrap();
        assert_eq!(s.files.keys().collect::<Vec<_>>(), ["run.sh", "x/y.yaml"]);
    }

    #[test]
    fn private_repository_over_http_with_basic_auth() {
        // gix's HTTP client takes the process-wide provider (ring), as the hub sets it.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let origin = Origin::new();
        origin.write("apps/a.yaml", "a: 1\n");
        let c1 = origin.commit("one");
        let server = flotilla_tests::githttp::GitHttp::start(
            origin.dir.parent().unwrap(),
            "alice",
            "pw-s3cret",
        )
        .unwrap();
        let url = server.url("repo");
        // The hub trusts the system roots, or those SSL_CERT_FILE names; no other
        // test in this process speaks HTTPS.
        std::env::set_var("SSL_CERT_FILE", &server.ca_file);
        let cache = tempfile::tempdir().unwrap();
        let good = Credentials::Basic {
            username: "alice".into(),
            password: "pw-s3cret".into(),
        };
        let s = fetch_snapshot_with(&url, &branch("main"), &cache.path().join("a"), Some(&good))
            .unwrap();
        assert_eq!(s.commit, c1);
        assert_eq!(text(&s, "apps/a.yaml"), "a: 1\n");
        origin.write("apps/a.yaml", "a: 2\n");
        let c2 = origin.commit("two");
        let s = fetch_snapshot_with(&url, &branch("main"), &cache.path().join("a"), Some(&good))
            .unwrap();
        assert_eq!(
            (s.commit.as_str(), text(&s, "apps/a.yaml").as_str()),
            (c2.as_str(), "a: 2\n")
        );
        assert!(server.served() > 0);

        let refused = server.refused();
        let bad = Credentials::Basic {
            username: "alice".into(),
            password: "wrong-pw-s3cret".into(),
        };
        let err = fetch_snapshot_with(&url, &branch("main"), &cache.path().join("b"), Some(&bad))
            .unwrap_err();
        eprintln!("wrong password: {err}");
        let msg = err.to_string();
        assert!(
            !msg.contains("wrong-pw-s3cret") && !msg.contains("pw-s3cret"),
            "{msg}"
        );
        assert!(msg.contains("127.0.0.1"), "names the repository: {msg}");
        assert!(
            server.refused() > refused,
            "the server saw the wrong password"
        );
        assert!(format!("{bad:?}").find("s3cret").is_none());

        let err = fetch_snapshot(&url, &branch("main"), &cache.path().join("c")).unwrap_err();
        eprintln!("no credentials: {err}");
        assert!(!err.to_string().contains("tty"), "never prompts: {err}");
    }

    /// Debian's sshd on a loopback port (as root, with a test config and keys made
    /// by ssh-keygen); `None` where it cannot run (not installed, not root).
    struct Sshd {
        child: Child,
        port: u16,
        client_key: String,
        known_hosts: String,
        _dir: tempfile::TempDir,
    }

    impl Sshd {
        fn start() -> Option<Sshd> {
            let sshd = Path::new("/usr/sbin/sshd");
            let root = Command::new("id").arg("-u").output().ok()?.stdout == b"0\n";
            if !sshd.exists() || !root {
                return None;
            }
            std::fs::create_dir_all("/run/sshd").ok()?;
            let dir = tempfile::tempdir().ok()?;
            let keygen = |name: &str| {
                let path = dir.path().join(name);
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&path)
                    .status()
                    .ok()
                    .filter(|s| s.success())
                    .map(|_| path)
            };
            let host_key = keygen("host")?;
            let client_key = keygen("client")?;
            let authorized = dir.path().join("authorized_keys");
            std::fs::copy(client_key.with_extension("pub"), &authorized).ok()?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            let config = dir.path().join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n\
                     UsePAM no\nPidFile none\n",
                    host_key.display(),
                    authorized.display()
                ),
            )
            .ok()?;
            let child = Command::new(sshd)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let host_pub = std::fs::read_to_string(host_key.with_extension("pub")).ok()?;
            let known_hosts = format!("[127.0.0.1]:{port} {}", host_pub.trim());
            let sshd = Sshd {
                child,
                port,
                client_key: std::fs::read_to_string(&client_key).ok()?,
                known_hosts,
                _dir: dir,
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Some(sshd)
        }
    }

    impl Drop for Sshd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn private_repository_over_ssh_with_key_and_known_hosts() {
        let Some(sshd) = Sshd::start() else {
            eprintln!("sshd cannot run here (needs /usr/sbin/sshd and root): skipped");
            return;
        };
        let origin = Origin::new();
        origin.write("apps/a.yaml", "a: 1\n");
        let c1 = origin.commit("one");
        let url = format!("ssh://root@127.0.0.1:{}{}", sshd.port, origin.dir.display());
        let cache = tempfile::tempdir().unwrap();
        let good = Credentials::Ssh {
            private_key: sshd.client_key.clone().into_bytes(),
            known_hosts: sshd.known_hosts.clone().into_bytes(),
        };
        let s = fetch_snapshot_with(&url, &branch("main"), &cache.path().join("a"), Some(&good))
            .unwrap();
        assert_eq!(s.commit, c1);
        assert_eq!(text(&s, "apps/a.yaml"), "a: 1\n");

        // A host key that does not match: refused, whatever the client key.
        let other_host = "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBZKbKJgZ3hb8Yt3AXmwRj4S3RjOHEoUmZMBLjRbuVUX";
        let wrong_host = Credentials::Ssh {
            private_key: sshd.client_key.clone().into_bytes(),
            known_hosts: other_host.as_bytes().to_vec(),
        };
        let err = fetch_snapshot_with(
            &url,
            &branch("main"),
            &cache.path().join("b"),
            Some(&wrong_host),
        )
        .unwrap_err();
        eprintln!("unknown host key: {err}");
        assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    }

    /// `git daemon` on a free loopback port, killed by PID when dropped.
    struct Daemon {
        child: Child,
        port: u16,
    }

    impl Daemon {
        fn start(base: &Path) -> Option<Self> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            let child = Command::new("git")
                .arg("daemon")
                .arg("--reuseaddr")
                .arg(format!("--base-path={}", base.display()))
                .arg("--export-all")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(base)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let daemon = Daemon { child, port };
            // Wait, with a deadline, until it accepts connections.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Some(daemon)
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn fetches_over_git_daemon() {
        let origin = Origin::new();
        origin.write("apps/a.yaml", "a: 1\n");
        let c1 = origin.commit("one");
        let daemon = Daemon::start(origin.dir.parent().unwrap()).expect("git daemon starts");
        let url = format!("git://127.0.0.1:{}/repo", daemon.port);
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("c");
        let s = fetch_snapshot(&url, &branch("main"), &dir).unwrap();
        assert_eq!(s.commit, c1);
        assert_eq!(text(&s, "apps/a.yaml"), "a: 1\n");

        origin.write("apps/a.yaml", "a: 2\n");
        let c2 = origin.commit("two");
        let s = fetch_snapshot(&url, &branch("main"), &dir).unwrap();
        assert_eq!(
            (s.commit.as_str(), text(&s, "apps/a.yaml").as_str()),
            (c2.as_str(), "a: 2\n")
        );

        let err = fetch_snapshot(&url, &branch("gone"), &dir).unwrap_err();
        assert!(matches!(err, GitError::MissingBranch { .. }), "{err}");
        let err = fetch_snapshot(
            &format!("git://127.0.0.1:{}/absent", daemon.port),
            &branch("main"),
            &cache.path().join("e"),
        )
        .unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, GitError::Unreachable { .. }), "{err}");
    }
}
