//! Git cannot hang or flood the hub, tried as an attacker would, on the real hub
//! binary with real Git (`git daemon`, the git CLI) and servers that accept and never
//! answer: fetches end at their deadline and when cancelled, without leaking
//! threads; oversized commits are refused with the last good snapshot kept; only
//! the bundle directories are read; an unchanged commit is not read again; URLs
//! carrying credentials are refused.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use flotilla_tests::hung::HungServer;
use flotilla_tests::{free_port, test_dir, wait_until, GitRepo, Hub, DEADLINE};
use serde_json::Value;

fn hub(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Hub> {
    Hub::start_with(&dir.join("hub"), free_port(), free_port(), args, envs)
}

fn source(hub: &Hub, name: &str) -> Result<Value> {
    hub.cli_json(&["source", "get", name])
}

fn config_map(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{v: \"{value}\"}}\n"
    )
}

/// Threads of a process, as the kernel lists them.
fn threads(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?.count())
}

/// Processes whose parent is `pid` (the hub's fetch helpers among them).
fn children(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(pid.to_string().as_str()) {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    out
}

fn wait_source(
    hub: &Hub,
    name: &str,
    what: &str,
    mut ok: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    wait_until(&format!("source {name}: {what}"), DEADLINE, || {
        let s = source(hub, name)?;
        Ok(ok(&s).then_some(s))
    })
}

fn last_error(s: &Value) -> &str {
    s["lastError"].as_str().unwrap_or_default()
}

/// Three hung remotes (git:// that never answers, HTTPS that never completes the
/// handshake, HTTPS that handshakes and never answers the request): each shows a
/// lastError naming the deadline, and is retried with backoff; a healthy source of
/// the same hub follows its branch meanwhile; the hub's thread count stays flat
/// over the attempts. (Before: the first attempt hung forever, pinning its poller
/// and a thread.)
#[test]
fn hung_remotes_hit_the_deadline_while_other_sources_keep_fetching() -> Result<()> {
    let dir = test_dir("git-hung")?;
    let tcp = HungServer::tcp()?;
    let tls = HungServer::tls(dir.path())?;
    let ca = tls.ca_file.clone().unwrap_or_default();
    let healthy = GitRepo::new(dir.path(), "healthy")?;
    let c1 = healthy.commit(
        &BTreeMap::from([("cm.yaml", Some(config_map("a", "1").as_str()))]),
        "one",
    )?;
    let hub = hub(
        dir.path(),
        &[],
        &[
            ("FLOTILLA_GIT_TIMEOUT", "2s"),
            ("SSL_CERT_FILE", ca.to_str().unwrap_or_default()),
        ],
    )?;
    hub.cli(&[
        "source",
        "add",
        "healthy",
        "--repo",
        &healthy.url,
        "--poll",
        "1s",
    ])?;
    let hung = [
        ("hung-git", format!("git://127.0.0.1:{}/x.git", tcp.port)),
        ("hung-tls", format!("https://127.0.0.1:{}/x.git", tcp.port)),
        ("hung-http", format!("https://127.0.0.1:{}/x.git", tls.port)),
    ];
    for (name, url) in &hung {
        hub.cli(&["source", "add", name, "--repo", url])?;
    }
    for (name, _) in &hung {
        let s = wait_source(&hub, name, "lastError names the deadline", |s| {
            last_error(s).contains("deadline")
        })?;
        eprintln!("{name}: {}", last_error(&s));
        assert!(last_error(&s).contains("--git-timeout"), "{s}");
    }
    let baseline = threads(hub.proc.pid())?;
    wait_source(&hub, "healthy", "first commit", |s| {
        s["commit"] == c1.as_str()
    })?;
    let c2 = healthy.commit(
        &BTreeMap::from([("cm.yaml", Some(config_map("a", "2").as_str()))]),
        "two",
    )?;
    wait_source(&hub, "healthy", "second commit while others hang", |s| {
        s["commit"] == c2.as_str() && s["lastError"].is_null()
    })?;
    // Retried with backoff (5 s, then 10 s): three attempts each, nine in all.
    for (name, _) in &hung {
        wait_source(&hub, name, "three failed attempts", |s| {
            s["consecutiveFailures"].as_u64() >= Some(3)
        })?;
    }
    assert!(
        tcp.accepted() >= 6 && tls.accepted() >= 3,
        "attempts reached the servers"
    );
    let after = threads(hub.proc.pid())?;
    eprintln!(
        "hub threads: {baseline} after the first attempts, {after} after {} more",
        tcp.accepted() + tls.accepted() - 3
    );
    // A thread kept per hung attempt would add six; tokio's blocking pool may add
    // a couple for the store.
    assert!(after <= baseline + 3, "threads grew: {baseline} -> {after}");
    wait_until(
        "every stopped attempt's connection closed",
        DEADLINE,
        || {
            // At most one attempt per source in flight.
            Ok((tcp.open() <= 2 && tls.open() <= 1).then_some(()))
        },
    )?;
    Ok(())
}

/// With a deadline far away, a fetch hung on a remote stops at once when its source
/// changes (a new attempt starts), when it is deleted, and when the hub shuts down:
/// the connection closes and no helper process is left. (Before: the attempt kept
/// its connection and thread until the remote gave up, here never.)
#[test]
fn hung_fetches_stop_when_the_source_changes_or_goes_or_the_hub_stops() -> Result<()> {
    let dir = test_dir("git-cancel")?;
    let tcp = HungServer::tcp()?;
    let mut hub = hub(dir.path(), &[], &[("FLOTILLA_GIT_TIMEOUT", "10m")])?;
    let url = format!("git://127.0.0.1:{}/x.git", tcp.port);
    hub.cli(&["source", "add", "hung", "--repo", &url])?;
    wait_until("a fetch connected", DEADLINE, || {
        Ok((tcp.accepted() == 1 && tcp.open() == 1).then_some(()))
    })?;
    let pid = hub.proc.pid();

    hub.cli(&["source", "add", "hung", "--repo", &url, "--poll", "2m"])?;
    wait_until(
        "the changed source's old fetch stopped, a new one started",
        DEADLINE,
        || Ok((tcp.closed() == 1 && tcp.accepted() == 2 && tcp.open() == 1).then_some(())),
    )?;
    assert!(
        children(pid).iter().any(|c| c.contains("__git-fetch")),
        "the fetch runs in a helper: {:?}",
        children(pid)
    );

    hub.cli(&["source", "delete", "hung"])?;
    wait_until("the deleted source's fetch stopped", DEADLINE, || {
        Ok((tcp.open() == 0 && children(pid).is_empty()).then_some(()))
    })?;

    hub.cli(&["source", "add", "hung2", "--repo", &url])?;
    wait_until("a fetch connected", DEADLINE, || {
        Ok((tcp.open() == 1).then_some(()))
    })?;
    let helpers: Vec<u32> = helper_pids(pid);
    hub.stop();
    wait_until("the stopped hub's fetch ended", DEADLINE, || {
        Ok((tcp.open() == 0 && helpers.iter().all(|p| !alive(*p))).then_some(()))
    })?;
    Ok(())
}

fn helper_pids(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if let Some((_, rest)) = stat.rsplit_once(')') {
            if rest.split_whitespace().nth(1) == Some(parent.to_string().as_str()) {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Commits over each cap (file count, one file's size, the snapshot's size) are
/// refused with a lastError naming the cap and the path, and the last good
/// snapshot stays; files outside the bundle directories are never read, so they
/// trip nothing, with `paths` as with the default discovery.
#[test]
fn oversized_commits_are_refused_and_only_bundle_directories_are_read() -> Result<()> {
    let dir = test_dir("git-caps")?;
    let repo = GitRepo::new(dir.path(), "caps")?;
    let big = "x".repeat(3000);
    let mid = "y".repeat(1600);
    // Outside every bundle directory: over each cap, never read.
    let many: Vec<String> = (0..8).map(|i| format!("vendor/f{i}.txt")).collect();
    let mut files: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    let cm = config_map("web", "1");
    files.insert("apps/web/fleet.yaml", Some("defaultNamespace: web\n"));
    files.insert("apps/web/cm.yaml", Some(&cm));
    files.insert("vendor/huge.bin", Some(&big));
    for f in &many {
        files.insert(f, Some(&mid));
    }
    let good = repo.commit(&files, "good")?;
    let hub = hub(
        dir.path(),
        &[],
        &[
            ("FLOTILLA_GIT_MAX_FILES", "4"),
            ("FLOTILLA_GIT_MAX_FILE_SIZE", "2KiB"),
            ("FLOTILLA_GIT_MAX_SNAPSHOT_SIZE", "3KiB"),
        ],
    )?;
    // The default discovery: apps/web has a fleet.yaml; vendor/ is not read.
    hub.cli(&[
        "source", "add", "found", "--repo", &repo.url, "--poll", "1s",
    ])?;
    hub.cli(&[
        "source", "add", "globbed", "--repo", &repo.url, "--path", "apps/*", "--poll", "1s",
    ])?;
    for name in ["found", "globbed"] {
        let s = wait_source(&hub, name, "the good commit", |s| {
            s["commit"] == good.as_str()
        })?;
        assert!(s["lastError"].is_null(), "{s}");
        assert_eq!(
            s["bundles"],
            serde_json::json!([format!("{name}-apps-web")]),
            "{s}"
        );
    }

    // What is wrong, the change that makes it so, the cap named, the path named.
    type Case<'a> = (&'a str, &'a [(&'a str, Option<&'a str>)], &'a str, &'a str);
    let cases: [Case; 3] = [
        (
            "too many files",
            &[
                ("apps/web/a.yaml", Some("a: 1\n")),
                ("apps/web/b.yaml", Some("b: 1\n")),
                ("apps/web/c.yaml", Some("c: 1\n")),
            ],
            "--git-max-files",
            "apps/web/fleet.yaml",
        ),
        (
            "a file too large",
            &[
                ("apps/web/a.yaml", None),
                ("apps/web/b.yaml", None),
                ("apps/web/c.yaml", None),
                ("apps/web/big.txt", Some(&big)),
            ],
            "--git-max-file-size",
            "apps/web/big.txt",
        ),
        (
            "the snapshot too large",
            &[
                ("apps/web/big.txt", None),
                ("apps/web/m1.txt", Some(&mid)),
                ("apps/web/m2.txt", Some(&mid)),
            ],
            "--git-max-snapshot-size",
            "apps/web/m2.txt",
        ),
    ];
    for (what, change, cap, path) in cases {
        let bad = repo.commit(&change.iter().copied().collect(), what)?;
        for name in ["found", "globbed"] {
            let s = wait_source(&hub, name, what, |s| last_error(s).contains(&bad))?;
            let e = last_error(&s);
            eprintln!("{name}, {what}: {e}");
            assert!(e.contains(cap) && e.contains(path), "{e}");
            assert!(e.contains("last good snapshot is kept"), "{e}");
            assert_eq!(
                s["commit"],
                good.as_str(),
                "the last good snapshot stays: {s}"
            );
            let b = hub.cli_json(&["bundle", "get", &format!("{name}-apps-web")])?;
            assert_eq!(b["revision"], good.as_str(), "{b}");
        }
    }
    // Fixed: the next commit is read again.
    let fixed = repo.commit(
        &BTreeMap::from([("apps/web/m1.txt", None), ("apps/web/m2.txt", None)]),
        "fixed",
    )?;
    for name in ["found", "globbed"] {
        wait_source(&hub, name, "the fixed commit", |s| {
            s["commit"] == fixed.as_str() && s["lastError"].is_null()
        })?;
    }

    // Without any flotilla.yaml/fleet.yaml the root is the bundle: everything is
    // read, vendor/ too, and refused.
    let root = GitRepo::new(dir.path(), "root")?;
    let mut files: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    files.insert("cm.yaml", Some(&cm));
    files.insert("vendor/huge.bin", Some(&big));
    let c = root.commit(&files, "root")?;
    hub.cli(&["source", "add", "rooted", "--repo", &root.url])?;
    let s = wait_source(&hub, "rooted", "refused", |s| last_error(s).contains(&c))?;
    assert!(last_error(&s).contains("vendor/huge.bin"), "{s}");
    Ok(())
}

/// A source polled every second whose branch does not move is fetched again and
/// again (lastFetched advances) but its tree is read once: the hub says so in its
/// log, as an operator would check.
#[test]
fn an_unchanged_commit_is_not_read_again() -> Result<()> {
    let dir = test_dir("git-unchanged")?;
    let repo = GitRepo::new(dir.path(), "same")?;
    let c1 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(config_map("a", "1").as_str()))]),
        "one",
    )?;
    let hub = hub(dir.path(), &[], &[])?;
    hub.cli(&["source", "add", "same", "--repo", &repo.url, "--poll", "1s"])?;
    let first = wait_source(&hub, "same", "first commit", |s| s["commit"] == c1.as_str())?;
    let mut seen = vec![first["lastFetched"].clone()];
    wait_until("three more fetches", DEADLINE, || {
        let s = source(&hub, "same")?;
        if !seen.contains(&s["lastFetched"]) {
            seen.push(s["lastFetched"].clone());
        }
        Ok((seen.len() >= 4).then_some(()))
    })?;
    let log = hub.proc.log_text();
    let ours = |msg: &str| {
        log.lines()
            .filter(|l| l.contains("source=same") && l.contains(msg))
            .count()
    };
    assert_eq!(ours("read the tree of a new commit"), 1, "{log}");
    assert!(ours("commit unchanged, tree not read") >= 3, "{log}");
    Ok(())
}

/// A repository URL carrying credentials is refused by `source add` and by
/// `apply -f`, with the hint to use a secret, and the password shows nowhere; an
/// SSH user name alone is fine.
#[test]
fn urls_carrying_credentials_are_refused() -> Result<()> {
    let dir = test_dir("git-creds")?;
    let hub = hub(dir.path(), &[], &[])?;
    let secret = "Zq9TkW3";
    let urls = [
        format!("https://alice:{secret}@git.example.com/x.git"),
        format!("https://{secret}@git.example.com/x.git"),
        format!("ssh://git:{secret}@git.example.com/x.git"),
    ];
    for url in &urls {
        let out = hub.cli_output(&["source", "add", "leaky", "--repo", url])?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        eprintln!("source add {}: {stderr}", url.replace(secret, "***"));
        assert!(!out.status.success(), "accepted: {stdout}");
        assert!(
            stderr.contains("flotilla secret create") && stderr.contains("--secret"),
            "{stderr}"
        );
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stderr}"
        );

        let file = dir.path().join("leaky.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {{name: leaky}}\nspec:\n  repo: {url}\n"
            ),
        )?;
        let out = hub.cli_output(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        eprintln!("apply -f: {stderr}");
        assert!(!out.status.success(), "accepted: {stdout}");
        assert!(
            stderr.contains("leaky.yaml") && stderr.contains("flotilla secret create"),
            "{stderr}"
        );
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stderr}"
        );
    }
    hub.cli(&[
        "source",
        "add",
        "ssh-user",
        "--repo",
        "ssh://git@git.example.com/x.git",
    ])?;
    let list = hub.cli(&["source", "list", "-o", "json"])?;
    if list.contains(secret) || list.contains("leaky") {
        bail!("{list}");
    }
    // Nothing reached the store or a Git cache either.
    let hub_dir = dir.path().join("hub");
    let mut found = Vec::new();
    grep_dir(&hub_dir, secret.as_bytes(), &mut found);
    assert!(found.is_empty(), "{found:?}");
    Ok(())
}

fn grep_dir(dir: &Path, needle: &[u8], found: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            grep_dir(&p, needle, found);
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            found.push(p.display().to_string());
        }
    }
}

/// Two fetches into one cache never overlap, whoever asks: the second (a healthy
/// repository) starts only once the first (hung, stopped at its deadline) is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fetch_per_cache_at_a_time() -> Result<()> {
    use flotilla_hub::git::{FetchRequest, Fetched, Fetcher, FetcherMode, GitError, Limits};
    use flotilla_shared::objects::GitRef;
    let dir = test_dir("git-one")?;
    let tcp = HungServer::tcp()?;
    let repo = GitRepo::new(dir.path(), "good")?;
    let c1 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(config_map("a", "1").as_str()))]),
        "one",
    )?;
    let fetcher = std::sync::Arc::new(Fetcher::new(
        FetcherMode::Child(env!("CARGO_BIN_EXE_flotilla-hub").into()),
        std::time::Duration::from_secs(3),
        Limits::default(),
    ));
    let cache = dir.path().join("cache");
    let main = GitRef::Branch("main".into());
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let hung = {
        let (fetcher, mut cancel) = (fetcher.clone(), cancel.clone());
        let req = FetchRequest::new(&format!("git://127.0.0.1:{}/x", tcp.port), &main, &cache);
        tokio::spawn(async move { fetcher.fetch(req, &mut cancel).await })
    };
    while tcp.accepted() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let good = fetcher
        .fetch(
            FetchRequest::new(&repo.url, &main, &cache),
            &mut cancel.clone(),
        )
        .await;
    assert!(hung.is_finished(), "the second fetch ran beside the first");
    assert!(matches!(hung.await?, Err(GitError::Timeout { .. })));
    match good {
        Ok(Fetched::Changed(s)) => assert_eq!(s.commit, c1),
        other => bail!("{other:?}"),
    }
    Ok(())
}
