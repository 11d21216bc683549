//! Git sources: a poller task per source fetches its repository (one fetch per
//! repository, however many bundles, and one at a time per cache), renders every
//! bundle of a new commit and hands the snapshot to the fleet; failures back off
//! and keep the last good one.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_shared::bundle::{
    bundle_dirs, bundle_files, bundle_name, collision_reason, name_collisions,
};
use flotilla_shared::objects::GitSourceSpec;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::fleet::{Fleet, RenderedBundle};
use crate::git::child::cancelled;
use crate::git::{FetchRequest, Fetched, Fetcher, GitError};
use crate::render::{RenderCache, Tools};
use crate::store::SecretRecord;

/// First retry after a failed fetch: soon enough to ride out a blip.
const BACKOFF_START: Duration = Duration::from_secs(5);
/// Longest wait between retries: a broken repository is retried at least this often.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long to wait before retrying after `failures` consecutive failed fetches.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Renders every bundle of a source's tree, for every target customisation, one
/// bundle after the other (renders are CPU-heavy; the hub shares its machine).
/// Bundles whose files did not change since `previous` are not rendered again;
/// `next` collects this snapshot's renders. Err when the source's own settings
/// make no sense for this tree (an invalid path glob); per-bundle render errors are
/// kept per bundle.
pub async fn render_snapshot(
    tools: &Tools,
    previous: &RenderCache,
    next: &mut RenderCache,
    source: &str,
    spec: &GitSourceSpec,
    files: &BTreeMap<String, Vec<u8>>,
    profiles: &[flotilla_shared::capabilities::Profile],
) -> Result<Vec<RenderedBundle>, String> {
    let paths: Vec<String> = files.keys().cloned().collect();
    let dirs = bundle_dirs(&paths, &spec.paths).map_err(|e| format!("paths: {e}"))?;
    let mut out = Vec::with_capacity(dirs.len());
    // Directories whose names fold to one bundle name are all refused: one
    // bundle carrying the error, nothing rendered, nothing merged.
    let collisions = name_collisions(dirs.iter().map(|d| (source, d.as_str())));
    for (name, holders) in &collisions {
        let reason = collision_reason(name, holders);
        tracing::warn!(bundle = %name, %reason, "bundle name collision");
        out.push(RenderedBundle {
            name: name.clone(),
            path: holders.first().map(|h| h.dir.clone()).unwrap_or_default(),
            result: Err(flotilla_shared::bundle::RenderError {
                file: holders
                    .iter()
                    .map(|h| {
                        if h.dir.is_empty() {
                            ".".to_string()
                        } else {
                            h.dir.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                line: None,
                object: None,
                reason,
            }),
            customizations: vec![],
            depends_on: vec![],
            labels: flotilla_shared::depends::bundle_labels(source, &Default::default()),
            rollout: None,
        });
    }
    for dir in &dirs {
        let name = bundle_name(source, dir);
        if collisions.contains_key(&name) {
            continue;
        }
        let bundle: BTreeMap<String, Vec<u8>> = bundle_files(&paths, dir, &dirs)
            .into_iter()
            .filter_map(|(full, rel)| files.get(full).map(|b| (rel, b.clone())))
            .collect();
        let span = tracing::info_span!("render", bundle = %name);
        let r = next
            .render(previous, tools, &name, &bundle, profiles)
            .instrument(span)
            .await;
        // A fleet.yaml that does not parse fails the render itself; its dependsOn
        // and labels then do not matter.
        let spec = flotilla_shared::fleetyaml::parse_spec(&bundle).unwrap_or_default();
        // An invalid rolloutStrategy fails parse_spec, so the render itself.
        let rollout = spec.rollout().ok().flatten();
        out.push(RenderedBundle {
            depends_on: flotilla_shared::depends::parse_depends_on(&spec.depends_on),
            labels: flotilla_shared::depends::bundle_labels(source, &spec.labels),
            name,
            path: dir.clone(),
            result: r.default,
            customizations: r.customizations,
            rollout,
        });
    }
    Ok(out)
}

struct Poller {
    spec: GitSourceSpec,
    wake: Arc<Notify>,
    /// Set to stop the poller: its fetch (helper process and all) is stopped at
    /// once, and the next poller of the same cache waits for that.
    cancel: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running pollers, one per source.
pub struct Pollers {
    fleet: Arc<Fleet>,
    tools: Arc<Tools>,
    fetcher: Arc<Fetcher>,
    cache_root: PathBuf,
    enabled: bool,
    tasks: Mutex<HashMap<String, Poller>>,
}

impl Pollers {
    /// `enabled: false` keeps sources static (tests inject snapshots instead).
    pub fn new(
        fleet: Arc<Fleet>,
        tools: Arc<Tools>,
        fetcher: Arc<Fetcher>,
        cache_root: PathBuf,
        enabled: bool,
    ) -> Pollers {
        Pollers {
            fleet,
            tools,
            fetcher,
            cache_root,
            enabled,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Poller>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the poller of `name` match its current spec and fetch now: a new or
    /// changed source gets a fresh poller (the old one's fetch is cancelled), an
    /// unchanged one is woken.
    pub fn sync(&self, name: &str, spec: &GitSourceSpec) {
        if !self.enabled {
            return;
        }
        let mut tasks = self.tasks();
        if let Some(p) = tasks.get(name) {
            if p.spec == *spec && !p.task.is_finished() {
                p.wake.notify_one();
                return;
            }
            p.cancel.send_replace(true);
        }
        let wake = Arc::new(Notify::new());
        let (cancel, cancelled) = watch::channel(false);
        let span = tracing::info_span!("source", source = %name);
        let task = tokio::spawn(
            poll_loop(
                Poll {
                    fleet: self.fleet.clone(),
                    tools: self.tools.clone(),
                    fetcher: self.fetcher.clone(),
                    name: name.to_string(),
                    spec: spec.clone(),
                    cache_dir: self.cache_root.join(name),
                },
                wake.clone(),
                cancelled,
            )
            .instrument(span),
        );
        tasks.insert(
            name.to_string(),
            Poller {
                spec: spec.clone(),
                wake,
                cancel,
                task,
            },
        );
    }

    /// Makes the named sources fetch now (a webhook said they changed). Returns
    /// those that have a poller. A poller in the middle of a fetch fetches again
    /// right after it: never two fetches of one source at once.
    pub fn wake(&self, names: &[String]) -> Vec<String> {
        let tasks = self.tasks();
        names
            .iter()
            .filter(|n| match tasks.get(n.as_str()) {
                Some(p) if !p.task.is_finished() => {
                    p.wake.notify_one();
                    true
                }
                _ => false,
            })
            .cloned()
            .collect()
    }

    /// Wakes the sources that use the secret `name` (it was created or changed).
    pub fn wake_using_secret(&self, name: &str) {
        let using: Vec<String> = self
            .tasks()
            .iter()
            .filter(|(_, p)| p.spec.secret_ref.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect();
        self.wake(&using);
    }

    /// Stops the poller of a deleted source, and its fetch in flight.
    pub fn stop(&self, name: &str) {
        if let Some(p) = self.tasks().remove(name) {
            p.cancel.send_replace(true);
        }
    }

    /// Stops every poller (hub shutdown), and their fetches in flight.
    pub fn stop_all(&self) {
        for (_, p) in self.tasks().drain() {
            p.cancel.send_replace(true);
        }
    }
}

/// The Git credentials in the secret a source names, if any.
fn credentials(
    fleet: &Fleet,
    secret: Option<&str>,
) -> Result<Option<crate::git::Credentials>, String> {
    let Some(name) = secret else {
        return Ok(None);
    };
    let s = fleet
        .store()
        .get_secret(name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("secret {name} not found (flotilla secret create {name} ...)"))?;
    credentials_of(&s)
}

/// SSH key (with its known_hosts), else user name and password, else nothing (a
/// secret that only holds a webhook secret).
pub fn credentials_of(s: &SecretRecord) -> Result<Option<crate::git::Credentials>, String> {
    if let Some(key) = &s.ssh_private_key {
        let Some(hosts) = s.known_hosts.as_ref().filter(|h| !h.trim().is_empty()) else {
            return Err(format!(
                "secret {}: an SSH key needs known_hosts (host keys are always checked)",
                s.name
            ));
        };
        return Ok(Some(crate::git::Credentials::Ssh {
            private_key: key.as_bytes().to_vec(),
            known_hosts: hosts.as_bytes().to_vec(),
        }));
    }
    Ok(s.password.as_ref().map(|p| crate::git::Credentials::Basic {
        // Token-only forges (GitHub, GitLab, Gitea) accept any user name.
        username: s.username.clone().unwrap_or_else(|| "git".to_string()),
        password: p.clone(),
    }))
}

/// What one poller works with.
struct Poll {
    fleet: Arc<Fleet>,
    tools: Arc<Tools>,
    fetcher: Arc<Fetcher>,
    name: String,
    spec: GitSourceSpec,
    cache_dir: PathBuf,
}

/// Fetches the source on its interval (or when woken), renders new commits, backs
/// off on failures, until cancelled. A commit the fetch says is still the one held
/// is neither read nor rendered again; nor is a commit already refused for its size.
async fn poll_loop(p: Poll, wake: Arc<Notify>, mut cancel: watch::Receiver<bool>) {
    let Poll {
        fleet,
        tools,
        fetcher,
        name,
        spec,
        cache_dir,
    } = p;
    // A source stored before such URLs were refused is not fetched: the URL would
    // hand its credentials to the transport and the cache.
    if let Err(e) = flotilla_shared::objects::validate_repo_url(&spec.repo) {
        fleet.set_source_error(&name, e.to_string());
        cancelled(&mut cancel).await;
        return;
    }
    let mut last_commit: Option<String> = None;
    // The commit last refused by a limit, with the error: kept until the ref moves.
    let mut refused: Option<(String, String)> = None;
    // The fleet's Kubernetes versions at the last render: Helm bundles render per
    // version, so a new version re-reads and re-renders (at the next fetch).
    let mut last_versions: Vec<flotilla_shared::capabilities::Profile> = Vec::new();
    let mut renders = RenderCache::default();
    let mut failures = 0u32;
    loop {
        let versions = fleet.render_profiles();
        // Read at every fetch: a secret changed with `flotilla secret create` applies
        // at once.
        let fetched = match credentials(&fleet, spec.secret_ref.as_deref()) {
            Ok(credentials) => {
                let known = if versions == last_versions {
                    refused
                        .as_ref()
                        .map(|(c, _)| c.clone())
                        .or_else(|| last_commit.clone())
                } else {
                    None
                };
                let mut req = FetchRequest::new(&spec.repo, &spec.git_ref(), &cache_dir);
                req.credentials = credentials;
                req.paths = spec.paths.clone();
                req.known_commit = known;
                let started = std::time::Instant::now();
                let fetched = fetcher.fetch(req, &mut cancel).await;
                let label = crate::metrics::source(&name);
                fleet
                    .metrics
                    .source_fetch_duration
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
                if matches!(&fetched, Err(e) if !matches!(e, GitError::Cancelled { .. })) {
                    fleet
                        .metrics
                        .source_fetch_errors
                        .get_or_create(&label)
                        .inc();
                }
                fetched
            }
            Err(reason) => {
                failures += 1;
                tracing::warn!(error = %reason, failures, "fetch failed");
                fleet.set_source_error(&name, reason);
                if !pause(backoff(failures), &wake, &mut cancel).await {
                    return;
                }
                continue;
            }
        };
        let delay = match fetched {
            Err(GitError::Cancelled { .. }) => return,
            Ok(Fetched::Unchanged { commit }) => {
                failures = 0;
                match &refused {
                    Some((c, error)) if *c == commit => {
                        fleet.set_source_error(&name, error.clone())
                    }
                    _ => fleet.set_fetched(&name, crate::now_ms()),
                }
                tracing::debug!(%commit, "commit unchanged, tree not read");
                spec.poll_interval()
            }
            Ok(Fetched::Changed(snapshot)) => {
                failures = 0;
                refused = None;
                tracing::info!(
                    commit = %snapshot.commit,
                    files = snapshot.files.len(),
                    "read the tree of a new commit"
                );
                let mut next = RenderCache::default();
                let started = std::time::Instant::now();
                let rendered = tokio::select! {
                    r = render_snapshot(
                        &tools,
                        &renders,
                        &mut next,
                        &name,
                        &spec,
                        &snapshot.files,
                        &versions,
                    ) => r,
                    _ = cancelled(&mut cancel) => return,
                };
                last_versions = versions;
                renders = next;
                let label = crate::metrics::source(&name);
                fleet
                    .metrics
                    .render_duration
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
                let failed = match &rendered {
                    Ok(bundles) => bundles.iter().filter(|b| b.result.is_err()).count(),
                    Err(_) => 1,
                };
                if failed > 0 {
                    fleet
                        .metrics
                        .render_errors
                        .get_or_create(&label)
                        .inc_by(failed as u64);
                }
                match rendered {
                    Ok(bundles) => {
                        let failed = bundles.iter().filter(|b| b.result.is_err()).count();
                        tracing::info!(
                            commit = %snapshot.commit,
                            bundles = bundles.len(),
                            failed,
                            "new commit"
                        );
                        let (f, n, c) = (fleet.clone(), name.clone(), snapshot.commit.clone());
                        let stored = tokio::task::spawn_blocking(move || {
                            f.set_snapshot(&n, &c, bundles, crate::now_ms())
                        })
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        if let Err(error) = stored {
                            // Not stored, not served: the last stored snapshot stays,
                            // and the next fetch renders this commit again.
                            tracing::error!(%error, "cannot store the snapshot");
                            fleet.set_source_error(&name, format!("storing the snapshot: {error}"));
                            failures += 1;
                            if !pause(backoff(failures), &wake, &mut cancel).await {
                                return;
                            }
                            continue;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, commit = %snapshot.commit, "cannot render");
                        fleet.set_source_error(&name, error);
                    }
                }
                last_commit = Some(snapshot.commit);
                spec.poll_interval()
            }
            Err(error) => match error.refused_commit() {
                // The repository's content is at fault, not the network: retrying
                // sooner than the interval cannot help (a push wakes us anyway).
                Some(commit) => {
                    failures = 0;
                    tracing::warn!(%error, "commit refused");
                    refused = Some((commit.to_string(), error.to_string()));
                    fleet.set_source_error(&name, error.to_string());
                    spec.poll_interval()
                }
                None => {
                    failures += 1;
                    tracing::warn!(%error, failures, "fetch failed");
                    fleet.set_source_error(&name, error.to_string());
                    backoff(failures)
                }
            },
        };
        if !pause(delay, &wake, &mut cancel).await {
            return;
        }
    }
}

/// Waits `delay` or until woken; false when cancelled.
async fn pause(delay: Duration, wake: &Notify, cancel: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = wake.notified() => true,
        _ = cancelled(cancel) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn renders_each_bundle_dir() {
        let spec = GitSourceSpec {
            repo: "x".into(),
            paths: vec!["apps/*".into()],
            ..Default::default()
        };
        let files = tree(&[
            ("README.md", "hi"),
            (
                "apps/web/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\n",
            ),
            ("apps/bad/cm.yaml", "apiVersion: v1\nkind: ConfigMap\n"),
        ]);
        let mut next = RenderCache::default();
        let out = render_snapshot(
            &Tools::default(),
            &RenderCache::default(),
            &mut next,
            "src",
            &spec,
            &files,
            &[],
        )
        .await
        .unwrap();
        let names: Vec<&str> = out.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["src-apps-bad", "src-apps-web"]);
        assert!(out[0].result.is_err());
        let web = out[1].result.as_ref().unwrap();
        assert_eq!(web.manifests.len(), 1);
        assert_eq!(web.manifests[0].file, "cm.yaml");
    }

    /// A repository of 200 bundle directories renders each once; a commit that
    /// touches one directory renders exactly that one again.
    #[tokio::test]
    async fn two_hundred_bundles_render_incrementally() {
        let spec = GitSourceSpec {
            repo: "x".into(),
            ..Default::default()
        };
        let cm = |i: usize, v: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm{i}}}\ndata: {{v: \"{v}\"}}\n")
        };
        let mut files = BTreeMap::new();
        for i in 0..200 {
            files.insert(
                format!("apps/b{i}/fleet.yaml"),
                b"defaultNamespace: x\n".to_vec(),
            );
            files.insert(format!("apps/b{i}/cm.yaml"), cm(i, "1").into_bytes());
        }
        let tools = Tools::default();
        let mut first = RenderCache::default();
        let start = std::time::Instant::now();
        let out = render_snapshot(
            &tools,
            &RenderCache::default(),
            &mut first,
            "s",
            &spec,
            &files,
            &[],
        )
        .await
        .unwrap();
        let full = start.elapsed();
        assert_eq!(out.len(), 200);
        assert!(out.iter().all(|b| b.result.is_ok()));
        assert_eq!(first.fresh_renders(), 200);

        files.insert("apps/b42/cm.yaml".into(), cm(42, "2").into_bytes());
        // A file outside every bundle changes nothing.
        files.insert("README.md".into(), b"hi\n".to_vec());
        let mut second = RenderCache::default();
        let start = std::time::Instant::now();
        let out2 = render_snapshot(&tools, &first, &mut second, "s", &spec, &files, &[])
            .await
            .unwrap();
        let incremental = start.elapsed();
        assert_eq!(
            second.fresh_renders(),
            1,
            "exactly one bundle rendered again"
        );
        let changed: Vec<&str> = out
            .iter()
            .zip(&out2)
            .filter(|(a, b)| {
                a.result.as_ref().map(|r| r.content_hash()).ok()
                    != b.result.as_ref().map(|r| r.content_hash()).ok()
            })
            .map(|(_, b)| b.name.as_str())
            .collect();
        assert_eq!(changed, ["s-apps-b42"]);
        eprintln!("200 bundles: full render {full:?}, one changed {incremental:?}");
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
