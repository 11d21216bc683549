//! Notifications end to end, into a real HTTP receiver on loopback: a hub,
//! four real control planes with an agent each (three `env=prod`, one `env=dev`),
//! a Git repository, and two `kind: Notification`:
//! - `hooks`, a signed JSON webhook for prod clusters: one digest per revision
//!   (three clusters, not four), retried while the receiver answers 500, the same
//!   message (same idempotency key) after a hub killed mid-delivery and never a
//!   second one, drift, and delivery counts in /metrics;
//! - `chat`, Slack-compatible with its URL in a secret: an apply failure whose
//!   hostile text is escaped, a cluster offline past its grace, a source error.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use flotilla_tests::prometheus::http_get;
use flotilla_tests::receiver::{Received, Receiver};
use flotilla_tests::*;

const NS: &str = "e2e-notify";
const HMAC_KEY: &str = "receiver-shared-key";

fn app(version: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: version\ndata:\n  version: {version}\n")
}

/// Changes the managed ConfigMap behind Flotilla's back (manager `kubectl-patch`).
fn edit_version(cluster: &TestCluster, value: &str) -> Result<()> {
    let patch = format!(r#"{{"data":{{"version":"{value}"}}}}"#);
    cluster.kubectl(&[
        "patch",
        "-n",
        NS,
        "configmap/version",
        "--type=merge",
        "-p",
        &patch,
    ])?;
    Ok(())
}

/// The digests `hooks` got for `revision` (not follow-ups), every attempt.
fn digests(rx: &Receiver, revision: &str) -> Vec<Received> {
    rx.received()
        .into_iter()
        .filter(|r| r.path == "/hooks")
        .filter(|r| {
            let b = r.json();
            b["kind"] == "BundleDigest" && b["revision"] == revision && b["update"] == false
        })
        .collect()
}

fn wait_digest_delivered(rx: &Receiver, revision: &str) -> Result<Vec<Received>> {
    wait_until(&format!("digest of {revision} delivered"), DEADLINE, || {
        let d = digests(rx, revision);
        Ok(d.iter().any(|r| r.answered == Some(200)).then_some(d))
    })
}

fn keys(d: &[Received]) -> BTreeSet<String> {
    d.iter()
        .map(|r| r.header("idempotency-key").to_string())
        .collect()
}

fn signature(body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_KEY.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

fn slack_texts(rx: &Receiver) -> Vec<String> {
    rx.received()
        .into_iter()
        .filter(|r| r.path == "/slack")
        .map(|r| r.json()["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_slack(rx: &Receiver, what: &str, f: impl Fn(&str) -> bool) -> Result<String> {
    wait_until(what, DEADLINE, || {
        Ok(slack_texts(rx).into_iter().find(|t| f(t)))
    })
}

#[test]
fn notifications_digest_retry_survive_restart_and_escape() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let clusters = four_clusters();
    let dir = test_dir("notify")?;
    let rx = Receiver::start()?;
    let metrics_port = free_port();
    let mut hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
        &[],
    )?;
    let mut repo = GitRepo::new(dir.path(), "nt")?;
    let fleet_yaml = format!("defaultNamespace: {NS}\nlabels: {{team: pay}}\n");
    let v1 = repo.commit(
        &BTreeMap::from([
            ("web/fleet.yaml", Some(fleet_yaml.as_str())),
            ("web/app.yaml", Some(app("v1").as_str())),
        ]),
        "v1",
    )?;
    let mut agents = Vec::new();
    for (i, (name, env)) in [
        ("nt-a", "prod"),
        ("nt-b", "prod"),
        ("nt-c", "prod"),
        ("nt-d", "dev"),
    ]
    .into_iter()
    .enumerate()
    {
        agents.push(Agent::start(
            &hub,
            &hub.token()?,
            name,
            &format!("env={env}"),
            &clusters[i],
            &dir.path().join(format!("agent-{name}")),
        )?);
    }
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    std::fs::write(files.join("hmac"), HMAC_KEY)?;
    std::fs::write(files.join("slack-url"), rx.url("/slack"))?;
    hub.cli(&[
        "secret",
        "create",
        "hook-hmac",
        "--webhook-secret-file",
        files.join("hmac").to_str().unwrap(),
    ])?;
    hub.cli(&[
        "secret",
        "create",
        "slack-url",
        "--url-file",
        files.join("slack-url").to_str().unwrap(),
    ])?;
    let notifications = format!(
        "apiVersion: flotilla.io/v1alpha1\nkind: Notification\nmetadata: {{name: hooks}}\nspec:\n  type: webhook\n  url: {}\n  secretRef: hook-hmac\n  events: [RevisionReady, ErrApplied, NotReady, Drift]\n  bundleSelector: {{matchLabels: {{team: pay}}}}\n  clusterSelector: {{matchLabels: {{env: prod}}}}\n---\napiVersion: flotilla.io/v1alpha1\nkind: Notification\nmetadata: {{name: chat}}\nspec:\n  type: slack\n  secretRef: slack-url\n  events: [ErrApplied, SourceError, ClusterOffline]\n  offlineGrace: 3s\n",
        rx.url("/hooks")
    );
    std::fs::write(files.join("n.yaml"), &notifications)?;
    hub.cli(&["apply", "-f", files.join("n.yaml").to_str().unwrap()])?;
    let listed = hub.cli_json(&["notification", "list"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed:#}");
    assert!(
        !listed.to_string().contains("/slack"),
        "a URL kept in a secret is never shown: {listed}"
    );
    // A bad notification is refused with the file, the object and the reason.
    std::fs::write(
        files.join("bad.yaml"),
        notifications.replace("url: http", "url: file"),
    )?;
    let out = hub.cli_output(&["apply", "-f", files.join("bad.yaml").to_str().unwrap()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Notification hooks") && err.contains("spec.url"),
        "{err}"
    );

    hub.cli(&[
        "source", "add", "nt", "--repo", &repo.url, "--poll", "1s", "--path", "web",
    ])?;

    // One digest for v1, with the three prod clusters' outcomes, signed.
    let d1 = wait_digest_delivered(&rx, &v1)?;
    assert_eq!(d1.len(), 1, "one message: {d1:#?}");
    let body = d1[0].json();
    assert_eq!(
        body["events"],
        serde_json::json!(["RevisionReady"]),
        "{body:#}"
    );
    assert_eq!(body["bundle"], "nt-web");
    assert_eq!(body["counts"]["Ready"], 3, "{body:#}");
    let listed: BTreeSet<&str> = body["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["cluster"].as_str())
        .collect();
    assert_eq!(listed, BTreeSet::from(["nt-a", "nt-b", "nt-c"]), "{body:#}");
    assert_eq!(
        d1[0].header("idempotency-key"),
        body["id"].as_str().unwrap()
    );
    assert_eq!(
        d1[0].header("x-flotilla-signature-256"),
        signature(&d1[0].body),
        "the body is signed with the secret's key"
    );

    // Retried while the receiver answers 500, with the same key.
    rx.answer_next(2, 500);
    let v2 = repo.commit(
        &BTreeMap::from([("web/app.yaml", Some(app("v2").as_str()))]),
        "v2",
    )?;
    let d2 = wait_digest_delivered(&rx, &v2)?;
    let answers: Vec<Option<u16>> = d2.iter().map(|r| r.answered).collect();
    assert_eq!(answers, vec![Some(500), Some(500), Some(200)], "{d2:#?}");
    assert_eq!(keys(&d2).len(), 1, "every attempt carries one key");
    let attempts: Vec<&str> = d2
        .iter()
        .map(|r| r.header("x-flotilla-delivery-attempt"))
        .collect();
    assert_eq!(attempts, vec!["1", "2", "3"]);

    // The hub is killed while the receiver holds the delivery: after the restart
    // it is sent again with the same key, and no second message is made.
    rx.hold_next();
    let v3 = repo.commit(
        &BTreeMap::from([("web/app.yaml", Some(app("v3").as_str()))]),
        "v3",
    )?;
    wait_until("digest of v3 held", DEADLINE, || {
        Ok((!digests(&rx, &v3).is_empty()).then_some(()))
    })?;
    hub.proc.kill9();
    rx.release();
    hub.restart()?;
    let d3 = wait_digest_delivered(&rx, &v3)?;
    assert_eq!(
        keys(&d3).len(),
        1,
        "the same message after the restart: {d3:#?}"
    );
    assert!(d3.len() >= 2, "{d3:#?}");
    assert_eq!(d3[0].body, d3[d3.len() - 1].body);

    // Drift on a prod cluster: reported to hooks.
    edit_version(&clusters[0], "edited")?;
    let drift = wait_until("drift message", DEADLINE, || {
        Ok(rx
            .received()
            .into_iter()
            .find(|r| r.path == "/hooks" && r.json()["kind"] == "Drift"))
    })?;
    let body = drift.json();
    assert_eq!(body["drift"][0]["cluster"], "nt-a", "{body:#}");
    assert_eq!(
        body["drift"][0]["object"],
        format!("ConfigMap {NS}/version")
    );
    assert_eq!(body["drift"][0]["manager"], "kubectl-patch", "{body:#}");

    // A sink that redirects is not followed (the signed body would go
    // elsewhere): the message is dropped after one attempt.
    rx.answer_next(1, 302);
    edit_version(&clusters[2], "edited-again")?;
    let redirected = wait_until("a redirected message", DEADLINE, || {
        Ok(rx.received().into_iter().find(|r| r.answered == Some(302)))
    })?;
    wait_until(
        "the redirected message counted as dropped",
        DEADLINE,
        || {
            let (_, text) = http_get(metrics_port, "/metrics")?;
            Ok(text
                .lines()
                .any(|l| {
                    l.contains("notification=\"hooks\"")
                        && l.contains("result=\"dropped\"")
                        && !l.ends_with(" 0")
                })
                .then_some(()))
        },
    )?;
    let key = redirected.header("idempotency-key").to_string();
    let attempts = rx
        .received()
        .iter()
        .filter(|r| r.header("idempotency-key") == key)
        .count();
    assert_eq!(attempts, 1, "not retried, not followed");
    // A secret URL that is no http(s) URL is refused, and not echoed.
    std::fs::write(files.join("bad-url"), "file:///etc/passwd")?;
    let out = hub.cli_output(&[
        "secret",
        "create",
        "bad",
        "--url-file",
        files.join("bad-url").to_str().unwrap(),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("url") && !err.contains("/etc/passwd"),
        "{err}"
    );

    // A commit that fails to apply, whose error carries hostile text: chat gets
    // it escaped; hooks gets one ErrApplied digest of the prod clusters.
    let bad = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hostile\n  labels: {{bad: \"<!channel>\"}}\ndata: {{}}\n",
        app("v4")
    );
    let v4 = repo.commit(
        &BTreeMap::from([("web/app.yaml", Some(bad.as_str()))]),
        "v4",
    )?;
    let text = wait_slack(&rx, "ErrApplied on chat", |t| t.contains("ErrApplied"))?;
    assert!(!text.contains("<!channel>"), "{text}");
    assert!(text.contains("&lt;!channel&gt;"), "{text}");
    let hooks_err = wait_until("ErrApplied digest on hooks", DEADLINE, || {
        Ok(rx
            .received()
            .into_iter()
            .find(|r| r.path == "/hooks" && r.json()["events"].to_string().contains("ErrApplied")))
    })?;
    let body = hooks_err.json();
    assert_eq!(body["counts"]["ErrApplied"], 3, "prod only: {body:#}");
    let _ = v4;

    // A cluster offline past the grace period.
    agents[1].proc.stop();
    wait_slack(&rx, "ClusterOffline on chat", |t| {
        t.contains("offline") && t.contains("nt-b")
    })?;

    // A source that fails.
    repo.stop_serving();
    wait_slack(&rx, "SourceError on chat", |t| {
        t.contains("source nt fails")
    })?;

    // Exactly one message per revision, whatever the attempts.
    for rev in [&v1, &v2, &v3] {
        let k = keys(&digests(&rx, rev));
        if k.len() != 1 {
            bail!("revision {rev}: {} messages: {k:?}", k.len());
        }
    }
    // Delivery counts in /metrics.
    let (_, text) = http_get(metrics_port, "/metrics")?;
    let delivered = text
        .lines()
        .find(|l| {
            l.starts_with("flotilla_notification_deliveries_total{")
                && l.contains("notification=\"hooks\"")
                && l.contains("result=\"delivered\"")
        })
        .unwrap_or_default()
        .to_string();
    assert!(!delivered.is_empty(), "{text}");
    assert!(
        !text.contains(&rx.url("/slack")),
        "no secret URL in the metrics"
    );
    for entry in std::fs::read_dir(&hub.dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(&path)?;
            assert!(
                !log.contains("/slack"),
                "no secret URL in {}",
                path.display()
            );
            assert!(!log.contains(HMAC_KEY), "no key in {}", path.display());
        }
    }
    Ok(())
}
