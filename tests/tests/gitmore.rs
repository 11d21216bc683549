//! Git beyond polling public repositories, end to end: a push webhook is applied
//! without waiting for the poll; a private repository over HTTPS with basic auth
//! (the real `git http-backend`); `dependsOn` holds a bundle back until its
//! dependency is Ready on the cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use flotilla_tests::*;

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

fn config_map(ns: &str, name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  v: \"{value}\"\n"
    )
}

/// The `data.v` of a ConfigMap in the cluster, if it exists.
fn cm_value(cluster: &TestCluster, ns: &str, name: &str) -> Result<Option<String>> {
    Ok(cluster
        .get("configmap", Some(ns), name)?
        .and_then(|o| o["data"]["v"].as_str().map(String::from)))
}

fn wait_cm(cluster: &TestCluster, ns: &str, name: &str, value: &str) -> Result<()> {
    wait_until(
        &format!("configmap {ns}/{name} = {value}"),
        DEADLINE,
        || Ok((cm_value(cluster, ns, name)?.as_deref() == Some(value)).then_some(())),
    )
}

fn github_push(secret: &str, repo_url: &str, git_ref: &str) -> (Vec<u8>, String) {
    let body = serde_json::json!({
        "ref": git_ref,
        "repository": {"clone_url": repo_url, "html_url": "https://example.invalid/x"},
    })
    .to_string()
    .into_bytes();
    let sig = format!(
        "sha256={}",
        hex_lower(&flotilla_shared::webhook::hmac_sha256(
            secret.as_bytes(),
            &body
        ))
    );
    (body, sig)
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A source polled hourly gets a new commit within seconds of the push webhook;
/// a hook with a bad signature is refused (401) and triggers nothing.
#[test]
fn webhook_push_is_applied_without_waiting_for_the_poll() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("webhook")?;
    let ns = "e2e-webhook";
    let secret_file = dir.path().join("webhook-secret");
    std::fs::write(&secret_file, "hook-s3cret\n")?;
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--webhook-secret-file", &secret_file.to_string_lossy()],
        &[],
    )?;
    let repo = GitRepo::new(dir.path(), "hooked")?;
    repo.commit(
        &BTreeMap::from([
            ("ns.yaml", Some(namespace(ns).as_str())),
            ("cm.yaml", Some(config_map(ns, "hooked", "one").as_str())),
        ]),
        "one",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "hook-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "hooked", "--repo", &repo.url, "--poll", "1h",
    ])?;
    wait_cm(east, ns, "hooked", "one")?;

    repo.commit(
        &BTreeMap::from([("cm.yaml", Some(config_map(ns, "hooked", "two").as_str()))]),
        "two",
    )?;
    // A forged hook: refused, nothing fetched.
    let (body, _) = github_push("hook-s3cret", &repo.url, "refs/heads/main");
    let (_, bad_sig) = github_push("wrong", &repo.url, "refs/heads/main");
    let (status, text) = http_post(
        hub.webhook_port(),
        "/hooks/git",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &bad_sig),
        ],
        &body,
    )?;
    assert_eq!(status, 401, "{text}");
    // A push to another branch triggers nothing either.
    let (other_body, other_sig) = github_push("hook-s3cret", &repo.url, "refs/heads/dev");
    let (status, text) = http_post(
        hub.webhook_port(),
        "/hooks/git",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &other_sig),
        ],
        &other_body,
    )?;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"triggered\":[]"), "{text}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cm_value(east, ns, "hooked")?.as_deref(),
        Some("one"),
        "no fetch without a valid hook for the branch"
    );

    let (body, sig) = github_push("hook-s3cret", &repo.url, "refs/heads/main");
    let pushed = Instant::now();
    let (status, text) = http_post(
        hub.webhook_port(),
        "/hooks/git",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &body,
    )?;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("hooked"), "{text}");
    wait_cm(east, ns, "hooked", "two")?;
    eprintln!(
        "webhook to object in the cluster: {} ms (poll interval 1h)",
        pushed.elapsed().as_millis()
    );

    // GitLab's form: the token header.
    repo.commit(
        &BTreeMap::from([("cm.yaml", Some(config_map(ns, "hooked", "three").as_str()))]),
        "three",
    )?;
    let gl = serde_json::json!({
        "object_kind": "push", "ref": "refs/heads/main",
        "project": {"git_http_url": repo.url},
    })
    .to_string();
    let (status, text) = http_post(
        hub.webhook_port(),
        "/hooks/git",
        &[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", "hook-s3cret"),
        ],
        gl.as_bytes(),
    )?;
    assert_eq!(status, 200, "{text}");
    wait_cm(east, ns, "hooked", "three")?;
    let log = hub.proc.log_text();
    assert!(!log.contains("hook-s3cret"), "the secret is never logged");
    Ok(())
}

/// A private repository over HTTPS behind basic auth (`git http-backend`): with a
/// wrong password the source shows the refusal without the password; with the right
/// one (the same secret, replaced) the bundle reaches the cluster.
#[test]
fn private_repository_over_https_with_basic_auth() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("private")?;
    let ns = "e2e-private";
    let repo = GitRepo::new(dir.path(), "private")?;
    repo.commit(
        &BTreeMap::from([
            ("ns.yaml", Some(namespace(ns).as_str())),
            ("cm.yaml", Some(config_map(ns, "private", "one").as_str())),
        ]),
        "one",
    )?;
    let server = githttp::GitHttp::start(&dir.path().join("git"), "deploy", "pa55-right")?;
    let ca = server.ca_file.to_string_lossy().to_string();
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &[],
        &[("SSL_CERT_FILE", &ca)],
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "private-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pa55-wrong\n")?;
    let pw_arg = pw.to_string_lossy().to_string();
    hub.cli(&[
        "secret",
        "create",
        "git-creds",
        "--username",
        "deploy",
        "--password-file",
        &pw_arg,
    ])?;
    let listed = hub.cli_json(&["secret", "list"])?;
    assert!(!listed.to_string().contains("pa55"), "{listed}");
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
    let error = wait_until("the refusal on the source", DEADLINE, || {
        let v = hub.cli_json(&["source", "get", "private"])?;
        Ok(v["lastError"].as_str().map(String::from))
    })?;
    eprintln!("wrong password: {error}");
    assert!(
        error.contains("401") || error.contains("not accepted"),
        "{error}"
    );
    assert!(!error.contains("pa55"), "no password in the error: {error}");
    assert!(server.refused() > 0);

    std::fs::write(&pw, "pa55-right\n")?;
    hub.cli(&[
        "secret",
        "create",
        "git-creds",
        "--username",
        "deploy",
        "--password-file",
        &pw_arg,
    ])?;
    wait_cm(east, ns, "private", "one")?;
    let v = hub.cli_json(&["source", "get", "private"])?;
    assert!(v["lastError"].is_null(), "{v}");
    let log = hub.proc.log_text();
    assert!(!log.contains("pa55"), "passwords never logged");
    Ok(())
}

fn deployment(ns: &str, name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n      annotations: {annotations}\n    spec:\n      containers:\n      - name: app\n        image: registry.example/{name}:1\n"
    )
}

/// B depends on A. A's Deployment never gets Ready: B is held back (Pending,
/// "waiting for bundle ...") and absent from the cluster. A fixed in Git: B applied.
#[test]
fn depends_on_holds_a_bundle_until_its_dependency_is_ready() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("depends")?;
    let (ns_a, ns_b) = ("e2e-dep-a", "e2e-dep-b");
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "dep")?;
    let stuck = deployment(ns_a, "db", r#"{sim.flotilla.io/ready: "false"}"#);
    let fleet_b = "defaultNamespace: e2e-dep-b\ndependsOn:\n- name: dep-a\n";
    repo.commit(
        &BTreeMap::from([
            ("a/fleet.yaml", Some("defaultNamespace: e2e-dep-a\n")),
            ("a/db.yaml", Some(stuck.as_str())),
            ("b/fleet.yaml", Some(fleet_b)),
            ("b/cm.yaml", Some(config_map(ns_b, "app", "b").as_str())),
        ]),
        "a stuck, b depends on a",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "dep-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&["source", "add", "dep", "--repo", &repo.url, "--poll", "1s"])?;
    wait_until("a NotReady, b waiting", DEADLINE, || {
        let a = hub.bundle_state("dep-a", "dep-east")?;
        let b = hub.bundle_state("dep-b", "dep-east")?;
        match (a, b) {
            (Some((sa, _)), Some((sb, mb))) if sa == "NotReady" => {
                if sb != "Pending" {
                    return Err(anyhow!("b is {sb}: {mb}"));
                }
                Ok(mb.contains("waiting for bundle dep-a").then_some(()))
            }
            (a, b) => Err(anyhow!(
                "a: {a:?}, b: {b:?}; bundles: {}",
                hub.cli(&["bundle", "list"])
                    .unwrap_or_else(|e| e.to_string())
            )),
        }
    })?;
    // Give the agent time it would need to apply B, had it been sent.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cm_value(east, ns_b, "app")?, None, "b is not applied");
    let (_, msg) = hub
        .bundle_state("dep-b", "dep-east")?
        .ok_or_else(|| anyhow!("no state"))?;
    eprintln!("b: {msg}");

    let fixed = deployment(ns_a, "db", "{}");
    repo.commit(
        &BTreeMap::from([("a/db.yaml", Some(fixed.as_str()))]),
        "a fixed",
    )?;
    let fixed_at = Instant::now();
    hub.wait_bundle_state("dep-a", "dep-east", "Ready")?;
    wait_cm(east, ns_b, "app", "b")?;
    hub.wait_bundle_state("dep-b", "dep-east", "Ready")?;
    eprintln!(
        "dependency fixed in Git to dependent Ready: {} ms",
        fixed_at.elapsed().as_millis()
    );
    Ok(())
}

/// Helm sees the target cluster's Kubernetes version and API versions (reported
/// by its agent) as `.Capabilities.KubeVersion` and `.Capabilities.APIVersions`,
/// not helm's built-in defaults (which lack `group/version/Kind` forms such as
/// `apps/v1/Deployment`).
#[test]
fn helm_sees_the_clusters_kubernetes_version() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("kubeversion")?;
    let ns = "e2e-kubeversion";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "kv")?;
    let template = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: versioned\ndata:\n  v: {{ printf \"%s deployment=%t servicemonitor=%t\" .Capabilities.KubeVersion.Version (.Capabilities.APIVersions.Has \"apps/v1/Deployment\") (.Capabilities.APIVersions.Has \"monitoring.coreos.com/v1\") | quote }}\n";
    let fleet_yaml = format!("defaultNamespace: {ns}\n");
    repo.commit(
        &BTreeMap::from([
            (
                "chart/Chart.yaml",
                Some("apiVersion: v2\nname: versioned\nversion: 0.1.0\n"),
            ),
            ("chart/fleet.yaml", Some(fleet_yaml.as_str())),
            ("chart/templates/cm.yaml", Some(template)),
        ]),
        "chart",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "kv-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    let reported = wait_until("the agent's Kubernetes version", DEADLINE, || {
        let v = hub.cli_json(&["cluster", "get", "kv-east"])?;
        Ok(v["kubernetesVersion"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from))
    })?;
    hub.cli(&["source", "add", "kv", "--repo", &repo.url, "--poll", "1s"])?;
    // The test cluster serves Deployments and has no Prometheus operator.
    wait_cm(
        east,
        ns,
        "versioned",
        &format!("{reported} deployment=true servicemonitor=false"),
    )?;
    eprintln!("helm rendered with the cluster's version {reported} and API versions");
    Ok(())
}
