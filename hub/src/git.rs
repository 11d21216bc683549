//! Fetching Git sources with gix into a per-source bare cache, and reading the tree of
//! the followed commit as a snapshot of files.
//!
//! Blocking: the hub calls [`fetch_snapshot`] inside `spawn_blocking`, at most once at a
//! time per cache directory (two concurrent fetches into one cache would race on refs).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use flotilla_shared::objects::GitRef;
use gix::bstr::ByteSlice;
use gix::objs::tree::EntryKind;

/// The files of one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Full hex id of the commit the snapshot was read from.
    pub commit: String,
    /// Every regular and executable file, by '/'-separated path relative to the root.
    /// Submodules and symlinks are skipped.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// What went wrong fetching or reading a source. URLs in messages have any password
/// removed.
#[derive(Debug, thiserror::Error)]
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
}

impl GitError {
    /// Errors a fresh cache cannot fix: the URL, the network or the ref is at fault.
    fn is_final(&self) -> bool {
        matches!(
            self,
            GitError::BadUrl { .. }
                | GitError::Unreachable { .. }
                | GitError::MissingBranch { .. }
                | GitError::MissingTag { .. }
                | GitError::BadRevision { .. }
                | GitError::MissingRevision { .. }
        )
    }
}

/// How to authenticate to a private repository, from a secret stored in the hub.
/// `Debug` shows no secret.
#[derive(Clone, PartialEq, Eq)]
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

/// File inside the bare cache recording which URL it mirrors; a cache for another URL
/// is discarded rather than mixed.
const URL_MARKER: &str = "flotilla-url";

/// Fetches `git_ref` from `url` into the bare repository cached in `cache_dir` (created
/// on first use, fetched incrementally later) and returns the files of its commit.
///
/// A cache that cannot be opened, belongs to another URL, or fails in a way the network
/// does not explain is deleted and rebuilt once.
pub fn fetch_snapshot(url: &str, git_ref: &GitRef, cache_dir: &Path) -> Result<Snapshot, GitError> {
    fetch_snapshot_with(url, git_ref, cache_dir, None)
}

/// [`fetch_snapshot`] with credentials for a private repository: basic auth is
/// handed to gix through its credential hook (never put in the URL), an SSH key
/// is written to a private temporary file for the `ssh` program while it runs.
pub fn fetch_snapshot_with(
    url: &str,
    git_ref: &GitRef,
    cache_dir: &Path,
    credentials: Option<&Credentials>,
) -> Result<Snapshot, GitError> {
    let shown = redact_url(url);
    if let GitRef::Revision(r) = git_ref {
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
    let auth = Auth::new(credentials, &shown)?;
    let result = match attempt(url, &parsed, &shown, git_ref, cache_dir, &auth) {
        Ok(s) => Ok(s),
        Err(e) if e.is_final() => Err(e),
        Err(e) => {
            tracing::warn!(cache = %cache_dir.display(), error = %e, "git cache unusable, rebuilding it");
            wipe(cache_dir)?;
            attempt(url, &parsed, &shown, git_ref, cache_dir, &auth)
        }
    };
    result.map_err(|e| auth.scrub_error(e))
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
                let command = format!(
                    "ssh -i '{}' -o IdentitiesOnly=yes -o UserKnownHostsFile='{}' \
                     -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes \
                     -o BatchMode=yes -F /dev/null",
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
    url: &str,
    parsed: &gix::Url,
    shown: &str,
    git_ref: &GitRef,
    cache_dir: &Path,
    auth: &Auth,
) -> Result<Snapshot, GitError> {
    let mut repo = open_cache(url, cache_dir)?;
    if let Some((command, _)) = &auth.ssh {
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
    let commit_id = commit.id;
    let tree = commit
        .tree()
        .map_err(|e| read_err(&format!("tree of {commit_id}"), &e))?;
    let mut recorder = gix::traverse::tree::Recorder::default();
    tree.traverse()
        .breadthfirst(&mut recorder)
        .map_err(|e| read_err(&format!("tree of {commit_id}"), &e))?;
    let mut files = BTreeMap::new();
    for entry in recorder.records {
        match entry.mode.kind() {
            EntryKind::Blob | EntryKind::BlobExecutable => {}
            // Directories are walked; submodules and symlinks are not content we deploy.
            EntryKind::Tree | EntryKind::Commit | EntryKind::Link => continue,
        }
        let path = entry.filepath.to_str_lossy().into_owned();
        let blob = repo
            .find_blob(entry.oid)
            .map_err(|e| read_err(&format!("{path} at {commit_id}"), &e))?;
        files.insert(path, blob.detach().data);
    }
    Ok(Snapshot {
        commit: commit_id.to_string(),
        files,
    })
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
        let same_url = std::fs::read_to_string(&marker).is_ok_and(|u| u == url);
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
    std::fs::write(&marker, url).map_err(|e| cache_err(&e))?;
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

/// The URL with any password removed, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match gix::url::parse(url.as_bytes().as_bstr()) {
        Ok(mut u) if u.password().is_some() => {
            u.set_password(None);
            u.to_bstring().to_string()
        }
        Ok(_) => url.to_string(),
        // Unparseable: show no more than the scheme and host-ish part, which holds no
        // secret, rather than risk echoing one.
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                format!("{scheme}://{host}")
            }
            None => url.to_string(),
        },
    }
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
