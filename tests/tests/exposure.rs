//! What the hub exposes, tried as an attacker would, against the real binaries
//! (no control plane needed): the admin API speaks TLS with the fleet's
//! certificate and plain HTTP only on loopback; webhooks live on their own
//! listener, wake only the sources whose secret signed them, are not replayed
//! and are rate-limited; secrets are sealed on disk, also across restarts and a
//! key rotation; and the data directory is the hub user's alone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Result};
use flotilla_tests::*;
use serde_json::Value;

fn cm(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: e2e-exposure\ndata:\n  v: \"{value}\"\n")
}

/// Runs the CLI with exactly these environment variables (and PATH).
fn flotilla(envs: &[(&str, &str)], args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin_dir().join("flotilla"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()?)
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn github_push(secret: &str, repo_url: &str, after: &str) -> (Vec<u8>, String) {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": after,
        "repository": {"clone_url": repo_url},
    })
    .to_string()
    .into_bytes();
    let mac = flotilla_shared::webhook::hmac_sha256(secret.as_bytes(), &body);
    let sig: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    (body, format!("sha256={sig}"))
}

/// Posts a GitHub push hook signed with `secret` to `port` (on loopback).
fn post_hook(
    port: u16,
    secret: &str,
    repo: &str,
    after: &str,
    delivery: &str,
) -> Result<(u16, Value)> {
    let (body, sig) = github_push(secret, repo, after);
    let (status, text) = http_post(
        port,
        "/hooks/git",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Delivery", delivery),
        ],
        &body,
    )?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn commit_of(hub: &Hub, source: &str) -> Result<Option<String>> {
    let v = hub.cli_json(&["source", "get", source])?;
    Ok(v["commit"].as_str().map(String::from))
}

fn wait_commit(hub: &Hub, source: &str, commit: &str) -> Result<()> {
    wait_until(&format!("source {source} at {commit}"), DEADLINE, || {
        let v = hub.cli_json(&["source", "get", source])?;
        if let Some(e) = v["lastError"].as_str() {
            return Err(anyhow!("lastError: {e}"));
        }
        Ok((v["commit"].as_str() == Some(commit)).then_some(()))
    })
}

fn write_file(dir: &Path, name: &str, content: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, content)?;
    Ok(p.to_string_lossy().into_owned())
}

/// The admin API on a non-loopback address: the CLI reaches it over TLS,
/// verifying the hub's certificate with the hub's CA (given, or found in the data
/// directory), and refuses a hub whose certificate another CA signed. Plain HTTP
/// there is answered with a 400 telling to use https:// (and the CLI refuses to
/// send the token that way at all); on loopback plain HTTP still works.
#[test]
fn the_api_speaks_tls_and_plain_http_only_on_loopback() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let ip = non_loopback_ipv4()?;
    let dir = test_dir("api-tls")?;
    let addr = format!("{ip}:{}", free_port());
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--api-listen", &addr, "--advertise-host", &ip.to_string()],
        &[],
    )?;
    let url = format!("https://{addr}");
    let ca = hub.ca_file().to_string_lossy().into_owned();
    let token = hub.admin_token.as_str();

    // Verified with the hub's CA.
    let ok = flotilla(
        &[
            ("FLOTILLA_HUB", &url),
            ("FLOTILLA_TOKEN", token),
            ("FLOTILLA_CA", &ca),
        ],
        &["cluster", "list", "-o", "json"],
    )?;
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "[]");
    // The CA found in the hub's data directory, on the hub's host.
    let data_dir = hub.dir.to_string_lossy().into_owned();
    let ok = flotilla(
        &[
            ("FLOTILLA_HUB", &url),
            ("FLOTILLA_TOKEN", token),
            ("FLOTILLA_DATA_DIR", &data_dir),
        ],
        &["cluster", "list"],
    )?;
    assert!(ok.status.success(), "{}", text(&ok));

    // Another hub's CA does not vouch for this hub; nor do the system's roots.
    let other = Hub::start(&dir.path().join("other"))?;
    let other_ca = other.ca_file().to_string_lossy().into_owned();
    let refused = flotilla(
        &[
            ("FLOTILLA_HUB", &url),
            ("FLOTILLA_TOKEN", token),
            ("FLOTILLA_CA", &other_ca),
        ],
        &["cluster", "list"],
    )?;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let msg = text(&refused);
    assert!(
        msg.contains("certificate") && msg.contains("--ca-file"),
        "{msg}"
    );
    assert!(!msg.contains(token), "{msg}");
    let refused = flotilla(
        &[
            ("FLOTILLA_HUB", &url),
            ("FLOTILLA_TOKEN", token),
            ("FLOTILLA_DATA_DIR", "/nonexistent"),
        ],
        &["cluster", "list"],
    )?;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("certificate"), "{}", text(&refused));

    // Plain HTTP on the network address: the hub answers 400 and serves nothing.
    let sock: std::net::SocketAddr = addr.parse()?;
    let (status, body) = http_post_to(
        sock,
        "/api/v1/tokens",
        &[("Authorization", &format!("Bearer {token}"))],
        b"{}",
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(&format!("https://{addr}")), "{body}");
    assert!(!body.contains("flt1."), "no token was made: {body}");
    // The CLI does not even send the admin token in clear to such an address.
    let plain = flotilla(
        &[
            ("FLOTILLA_HUB", &format!("http://{addr}")),
            ("FLOTILLA_TOKEN", token),
        ],
        &["cluster", "list"],
    )?;
    assert_eq!(plain.status.code(), Some(1), "{}", text(&plain));
    assert!(text(&plain).contains("use https://"), "{}", text(&plain));

    // On loopback, plain HTTP (the default http://127.0.0.1:7080) and TLS both work.
    assert_eq!(other.cli_json(&["cluster", "list"])?, serde_json::json!([]));
    let tls_loopback = flotilla(
        &[
            (
                "FLOTILLA_HUB",
                &format!("https://127.0.0.1:{}", other.api_port()),
            ),
            ("FLOTILLA_TOKEN", &other.admin_token),
            ("FLOTILLA_CA", &other_ca),
        ],
        &["cluster", "list"],
    )?;
    assert!(tls_loopback.status.success(), "{}", text(&tls_loopback));
    Ok(())
}

/// `/hooks/git` is not on the API listener (404, even with a valid signature),
/// only on the webhook listener; and the webhook listener serves nothing else.
#[test]
fn webhooks_have_their_own_listener() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let dir = test_dir("hook-listener")?;
    let secret = write_file(dir.path(), "hook-secret", "hub-s3cret\n")?;
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--webhook-secret-file", &secret],
        &[],
    )?;
    let repo = GitRepo::new(dir.path(), "listen")?;
    let c1 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("l", "1").as_str()))]),
        "one",
    )?;
    hub.cli(&[
        "source", "add", "listen", "--repo", &repo.url, "--poll", "1h",
    ])?;
    wait_commit(&hub, "listen", &c1)?;

    let (status, v) = post_hook(hub.api_port(), "hub-s3cret", &repo.url, "x1", "d-api")?;
    assert_eq!(status, 404, "{v}");
    assert!(v.to_string().contains("--webhook-listen"), "{v}");
    let (status, v) = post_hook(hub.webhook_port(), "hub-s3cret", &repo.url, "x1", "d-hook")?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["triggered"], serde_json::json!(["listen"]));
    // The admin API is not reachable through the webhook listener.
    let (status, body) = http_post(
        hub.webhook_port(),
        "/api/v1/tokens",
        &[("Authorization", &format!("Bearer {}", hub.admin_token))],
        b"{}",
    )?;
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("flt1."), "{body}");
    Ok(())
}

/// Sources on one repository, each with its own webhook secret: a hook signed
/// with B's secret wakes B only (A keeps its commit), the hub-wide secret wakes
/// neither, A's secret wakes A. A delivery replayed (same id; or the same signed
/// body under a new id) wakes nothing. A flood from one address is cut off with
/// 429. A source's `webhookSecretRef` works the same way.
#[test]
fn hooks_wake_only_their_sources_once_and_within_limits() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let dir = test_dir("hook-scope")?;
    let hub_secret = write_file(dir.path(), "hub-secret", "hub-s3cret\n")?;
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--webhook-secret-file", &hub_secret],
        &[],
    )?;
    for (name, value) in [
        ("hook-a", "a-s3cret"),
        ("hook-b", "b-s3cret"),
        ("hook-c", "c-s3cret"),
    ] {
        let f = write_file(dir.path(), name, value)?;
        hub.cli(&["secret", "create", name, "--webhook-secret-file", &f])?;
    }
    let repo = GitRepo::new(dir.path(), "shared")?;
    let c1 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("s", "1").as_str()))]),
        "one",
    )?;
    // A and B name their secret with `secretRef` (it holds only a webhook secret).
    for (source, key) in [("src-a", "hook-a"), ("src-b", "hook-b")] {
        hub.cli(&[
            "source", "add", source, "--repo", &repo.url, "--poll", "1h", "--secret", key,
        ])?;
        wait_commit(&hub, source, &c1)?;
    }
    let c2 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("s", "2").as_str()))]),
        "two",
    )?;
    let port = hub.webhook_port();

    let (status, v) = post_hook(port, "b-s3cret", &repo.url, &c2, "d-1")?;
    assert_eq!(
        (status, &v["triggered"]),
        (200, &serde_json::json!(["src-b"])),
        "{v}"
    );
    wait_commit(&hub, "src-b", &c2)?;
    assert_eq!(
        commit_of(&hub, "src-a")?.as_deref(),
        Some(c1.as_str()),
        "B's secret cannot move A"
    );
    let (status, v) = post_hook(port, "hub-s3cret", &repo.url, &c2, "d-2")?;
    assert_eq!(
        (status, &v["triggered"]),
        (200, &serde_json::json!([])),
        "{v}"
    );

    // A replay of B's delivery, then the same signed body under a fresh id.
    let (status, v) = post_hook(port, "b-s3cret", &repo.url, &c2, "d-1")?;
    assert_eq!(
        (status, &v["triggered"], &v["duplicate"]),
        (200, &serde_json::json!([]), &Value::Bool(true)),
        "{v}"
    );
    let (status, v) = post_hook(port, "b-s3cret", &repo.url, &c2, "d-1-forged")?;
    assert_eq!(
        (status, &v["triggered"]),
        (200, &serde_json::json!([])),
        "{v}"
    );
    // The same id under A's secret is A's delivery, not a replay of B's.
    let (status, v) = post_hook(port, "a-s3cret", &repo.url, &c2, "d-1")?;
    assert_eq!(
        (status, &v["triggered"]),
        (200, &serde_json::json!(["src-a"])),
        "{v}"
    );
    wait_commit(&hub, "src-a", &c2)?;

    // A flood of forged hooks from one address: refused (401), then cut off (429).
    let mut codes = Vec::new();
    for i in 0..200 {
        let (status, _) = post_hook(port, "wrong", &repo.url, &format!("f{i}"), &format!("f{i}"))?;
        codes.push(status);
        if status == 429 {
            break;
        }
    }
    assert_eq!(codes.first(), Some(&401), "{codes:?}");
    assert_eq!(
        codes.last(),
        Some(&429),
        "no 429 in {} forged hooks: {codes:?}",
        codes.len()
    );
    // The limit passes; a genuine hook gets through again.
    let c3 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("s", "3").as_str()))]),
        "three",
    )?;
    wait_until("the rate limit to pass", DEADLINE, || {
        let (status, v) = post_hook(port, "a-s3cret", &repo.url, &c3, "d-3")?;
        match status {
            429 => Ok(None),
            200 => Ok(Some(v)),
            _ => Err(anyhow!("{status}: {v}")),
        }
    })?;
    wait_commit(&hub, "src-a", &c3)?;

    // `webhookSecretRef` (`--webhook-secret`): C's secret wakes C alone.
    hub.cli(&[
        "source",
        "add",
        "src-c",
        "--repo",
        &repo.url,
        "--poll",
        "1h",
        "--webhook-secret",
        "hook-c",
    ])?;
    wait_commit(&hub, "src-c", &c3)?;
    let c4 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("s", "4").as_str()))]),
        "four",
    )?;
    let (status, v) = post_hook(port, "c-s3cret", &repo.url, &c4, "d-4")?;
    assert_eq!(
        (status, &v["triggered"]),
        (200, &serde_json::json!(["src-c"])),
        "{v}"
    );
    wait_commit(&hub, "src-c", &c4)?;
    assert_eq!(commit_of(&hub, "src-b")?.as_deref(), Some(c2.as_str()));

    let log = hub.proc.log_text();
    for s in ["a-s3cret", "b-s3cret", "c-s3cret", "hub-s3cret"] {
        assert!(!log.contains(s), "{s} in the hub's log");
    }
    Ok(())
}

/// Every regular file under `dir`, with its bytes.
fn all_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                out.push((entry.path(), std::fs::read(entry.path())?));
            }
        }
    }
    Ok(out)
}

/// Fails naming the file if any of `needles` is in a file under `dir`.
fn assert_nowhere(dir: &Path, needles: &[&str], when: &str) -> Result<()> {
    let files = all_files(dir)?;
    assert!(files.len() > 5, "the data dir holds files: {files:?}");
    for (path, bytes) in files {
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                bail!("{when}: {n:?} in plain text in {}", path.display());
            }
        }
    }
    Ok(())
}

/// Files and directories under `dir` that group or others may use.
fn exposed(dir: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let mode = std::fs::symlink_metadata(&d)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push((d.clone(), mode));
        }
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let mode = entry.metadata()?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    out.push((entry.path(), mode));
                }
            }
        }
    }
    Ok(out)
}

/// Repository credentials, an SSH key and webhook secrets are nowhere in the
/// data directory in plain text (every file, sled's included), after a restart
/// and after `rotate-secrets-key`; the hub still fetches the private repository
/// after each. The data directory and everything in it is the hub user's alone,
/// also one that was open before the hub started.
#[test]
fn secrets_are_sealed_at_rest_and_the_data_dir_is_private() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let dir = test_dir("sealed")?;
    let hub_dir = dir.path().join("hub");
    // An existing, world-readable data directory.
    std::fs::create_dir_all(&hub_dir)?;
    std::fs::set_permissions(&hub_dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(hub_dir.join("notes.txt"), "left by the operator")?;
    std::fs::set_permissions(
        hub_dir.join("notes.txt"),
        std::fs::Permissions::from_mode(0o644),
    )?;

    let password = "pa55-Sealed-7f3c9";
    let hook = "h00k-Sealed-2b8d1";
    let ssh_key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAc2VhbGVkLWtleS1tYXJrZXI\n-----END OPENSSH PRIVATE KEY-----\n";
    let ssh_marker = "b3BlbnNzaC1rZXktdjEAAAAAc2VhbGVkLWtleS1tYXJrZXI";
    let needles = [password, hook, ssh_marker];

    let repo = GitRepo::new(dir.path(), "private")?;
    let c1 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("p", "1").as_str()))]),
        "one",
    )?;
    let server = githttp::GitHttp::start(&dir.path().join("git"), "deploy", password)?;
    let ca = server.ca_file.to_string_lossy().into_owned();
    let mut hub = Hub::start_with(
        &hub_dir,
        free_port(),
        free_port(),
        &[],
        &[("SSL_CERT_FILE", &ca)],
    )?;
    let at_start = exposed(&hub_dir)?;

    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let pw = write_file(&files, "pw", password)?;
    let hk = write_file(&files, "hook", hook)?;
    let key = write_file(&files, "key", ssh_key)?;
    let hosts = write_file(&files, "hosts", "git.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample\n")?;
    hub.cli(&[
        "secret",
        "create",
        "git-creds",
        "--username",
        "deploy",
        "--password-file",
        &pw,
        "--webhook-secret-file",
        &hk,
    ])?;
    hub.cli(&[
        "secret",
        "create",
        "ssh-creds",
        "--ssh-key-file",
        &key,
        "--known-hosts-file",
        &hosts,
    ])?;
    hub.cli(&[
        "source",
        "add",
        "private",
        "--repo",
        &server.url("private"),
        "--secret",
        "git-creds",
        "--poll",
        "1s",
    ])?;
    wait_commit(&hub, "private", &c1)?;
    hub.token()?;
    assert_nowhere(&hub_dir, &needles, "after the first fetch")?;
    assert_eq!(at_start, vec![], "tightened at start");
    assert_eq!(exposed(&hub_dir)?, vec![], "after writes");

    hub.restart()?;
    let c2 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("p", "2").as_str()))]),
        "two",
    )?;
    wait_commit(&hub, "private", &c2)?;
    assert_nowhere(&hub_dir, &needles, "after a restart")?;

    // Rotation refuses to run beside a live hub (the store is in use)...
    let key_file = hub_dir.join("secrets.key");
    let before = std::fs::read_to_string(&key_file)?;
    let rotate = || {
        Command::new(bin_dir().join("flotilla-hub"))
            .args(["rotate-secrets-key", "--data-dir"])
            .arg(&hub_dir)
            .output()
    };
    let busy = rotate()?;
    assert!(!busy.status.success(), "{}", text(&busy));
    assert!(text(&busy).contains("stop it first"), "{}", text(&busy));
    assert_eq!(
        std::fs::read_to_string(&key_file)?,
        before,
        "nothing changed"
    );
    // ...and with the hub stopped, replaces the key and reseals every secret.
    hub.stop();
    let done = rotate()?;
    assert!(done.status.success(), "{}", text(&done));
    assert!(text(&done).contains("2 secrets"), "{}", text(&done));
    let after = std::fs::read_to_string(&key_file)?;
    let ids = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    };
    let (old_ids, new_ids) = (ids(&before), ids(&after));
    assert_eq!(new_ids.len(), 1, "{after}");
    assert!(
        !old_ids.contains(&new_ids[0]),
        "a new key: {old_ids:?} -> {new_ids:?}"
    );
    hub.restart()?;
    let c3 = repo.commit(
        &BTreeMap::from([("cm.yaml", Some(cm("p", "3").as_str()))]),
        "three",
    )?;
    wait_commit(&hub, "private", &c3)?;
    let listed = hub.cli_json(&["secret", "list"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_nowhere(&hub_dir, &needles, "after the rotation")?;
    assert_eq!(exposed(&hub_dir)?, vec![], "after the rotation");
    let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    Ok(())
}
