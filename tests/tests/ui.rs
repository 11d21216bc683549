//! The web UI in a real headless Chromium (Debian's, through chromedriver),
//! against a real hub, agent and test cluster:
//! - logged-out requests, forged sessions, missing CSRF tokens and cross-origin
//!   posts are refused, and change nothing;
//! - a user logs in with the admin token and watches a drift event appear on the
//!   drift page without a reload, then opens its diff (a hostile value from the
//!   cluster is shown as text, never run);
//! - they pause and resume a rollout with the bundle page's buttons;
//! - the matrix filters on the hub.
//!
//! Screenshots are saved under `target/artefacts/ui/` (or `$FLOTILLA_ARTEFACTS/ui/`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{ensure, Result};
use flotilla_tests::webdriver::{http, Browser};
use flotilla_tests::*;

const NS: &str = "e2e-ui";
/// What a cluster-side user writes into a ConfigMap: markup that would run
/// script if the UI ever rendered it as HTML.
const HOSTILE: &str = "<img src=x onerror=\"document.title='pwned'\">";

fn artefacts() -> PathBuf {
    std::env::var_os("FLOTILLA_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/artefacts"))
        .join("ui")
}

fn rollout_phase(hub: &Hub) -> Result<String> {
    let v = hub.cli_json(&["rollout", "status", "ui-web"])?;
    Ok(v["phase"].as_str().unwrap_or_default().to_string())
}

fn wait_rollout_phase(hub: &Hub, phase: &str) -> Result<()> {
    wait_until(&format!("rollout phase {phase}"), DEADLINE, || {
        Ok((rollout_phase(hub)? == phase).then_some(()))
    })
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_user_watches_drift_live_and_pauses_a_rollout() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    if !Browser::available() && std::env::var_os("FLOTILLA_REQUIRE_E2E").is_none() {
        eprintln!("skipping: chromium and chromedriver are not installed (make testenv)");
        return Ok(());
    }
    let cluster = &shared_clusters()[0];
    let dir = test_dir("ui")?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let port = hub.api_port();
    let base = format!("http://127.0.0.1:{port}");
    let repo = GitRepo::new(dir.path(), "ui")?;
    // Partition one bakes for ten minutes: the rollout stays in progress for the
    // whole test, ready to be paused and resumed.
    let fleet = format!(
        "defaultNamespace: {NS}\nrolloutStrategy:\n  partitions:\n  - name: one\n    clusterSelector: {{matchLabels: {{wave: \"1\"}}}}\n  - name: two\n    clusterSelector: {{matchLabels: {{wave: \"2\"}}}}\n  bakeTime: 10m\n  progressDeadline: 5m\n"
    );
    let ns = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n");
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: {NS}\ndata:\n  mode: calm\n"
    );
    repo.commit(
        &BTreeMap::from([
            ("web/fleet.yaml", Some(fleet.as_str())),
            ("web/ns.yaml", Some(ns.as_str())),
            ("web/app.yaml", Some(cm.as_str())),
        ]),
        "web",
    )?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "ui-edge-1",
        "wave=1,env=prod",
        cluster,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "ui", "--repo", &repo.url, "--poll", "1s", "--path", "web",
    ])?;
    hub.wait_bundle_state("ui-web", "ui-edge-1", "Ready")?;
    wait_rollout_phase(&hub, "Progressing")?;

    // ---- refused while logged out, or without the session's CSRF token -------
    let (status, headers, _) = http(port, "GET", "/", &[], b"")?;
    ensure!(status == 303, "logged-out page: {status}");
    ensure!(
        header(&headers, "location") == Some("/login?next=%2F"),
        "{headers:?}"
    );
    for (method, path, extra) in [
        ("GET", "/ui/events", vec![]),
        ("GET", "/matrix", vec![("X-Flotilla-Fragment", "1")]),
        ("POST", "/bundles/ui-web/pause", vec![]),
        (
            "POST",
            "/bundles/ui-web/pause",
            vec![(
                "Cookie",
                "flotilla_session=0000000000000000000000000000000000000000000000000000000000000000",
            )],
        ),
    ] {
        let mut h = extra.clone();
        h.push(("Content-Type", "application/x-www-form-urlencoded"));
        let (status, _, body) = http(port, method, path, &h, b"csrf=x")?;
        ensure!(status == 401, "{method} {path} {extra:?}: {status} {body}");
    }
    // A wrong token gets no cookie.
    let (status, headers, _) = http(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"token=not-the-token&next=%2F",
    )?;
    ensure!(status == 401, "wrong token: {status}");
    ensure!(header(&headers, "set-cookie").is_none(), "{headers:?}");
    // The admin token gets an HttpOnly, SameSite=Strict session cookie; a login
    // redirect never leaves the hub.
    let form = format!("token={}&next=%2F%2Fevil.example%2F", hub.admin_token);
    let (status, headers, _) = http(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )?;
    ensure!(status == 303, "login: {status}");
    ensure!(header(&headers, "location") == Some("/"), "{headers:?}");
    let cookie = header(&headers, "set-cookie")
        .unwrap_or_default()
        .to_string();
    ensure!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap_or_default().to_string();
    // Signed in, but no CSRF token, or a cross-origin form: refused.
    for (extra, body) in [
        (vec![], "csrf=wrong".to_string()),
        (
            vec![("Origin", "http://evil.example")],
            "csrf=wrong".to_string(),
        ),
    ] {
        let mut h = vec![
            ("Cookie", session.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        h.extend(extra.iter().cloned());
        let (status, _, _) = http(port, "POST", "/bundles/ui-web/pause", &h, body.as_bytes())?;
        ensure!(status == 403, "{extra:?}: {status}");
    }
    let (status, headers, page) = http(port, "GET", "/", &[("Cookie", session.as_str())], b"")?;
    ensure!(status == 200, "signed-in overview: {status}");
    ensure!(
        header(&headers, "content-security-policy")
            .is_some_and(|c| c.contains("script-src 'self'")),
        "{headers:?}"
    );
    ensure!(page.contains("ui-web"), "the overview lists the bundle");
    ensure!(
        rollout_phase(&hub)? == "Progressing",
        "nothing refused changed the rollout"
    );

    // ---- the browser -----------------------------------------------------------
    let shots = artefacts();
    let browser = Browser::start(&dir.path().join("browser"), &shots)?;
    browser.goto(&format!("{base}/drift"))?;
    ensure!(
        browser.url()?.contains("/login?next=%2Fdrift"),
        "logged out, the browser is sent to the login page: {}",
        browser.url()?
    );
    browser.screenshot("01-login")?;
    browser.type_into("input[name=token]", &hub.admin_token)?;
    browser.click("form.login button")?;
    wait_until("the drift page after login", DEADLINE, || {
        Ok(browser.url()?.ends_with("/drift").then_some(()))
    })?;
    browser.wait_text("#live-status", "live", DEADLINE)?;
    let rows = browser.find_all("[data-testid=drift-list] tbody tr")?;
    ensure!(rows.is_empty(), "no drift yet: {} rows", rows.len());
    // A marker a reload would lose.
    browser.eval("window.__stay = 1;")?;

    // Someone changes the ConfigMap by hand, with markup in the value.
    let patch = serde_json::json!({"data": {"mode": HOSTILE}}).to_string();
    cluster.kubectl(&[
        "patch",
        "configmap",
        "app",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        &patch,
    ])?;
    browser.wait_text(
        "[data-testid=drift-list] tbody tr",
        "ConfigMap/e2e-ui/app",
        DEADLINE,
    )?;
    ensure!(
        browser.eval("return window.__stay === 1;")?.as_bool() == Some(true),
        "the event appeared without a reload"
    );
    browser.screenshot("02-drift-live")?;

    browser.click("[data-testid=drift-list] tbody tr a")?;
    let diff = browser.wait_text("[data-testid=drift-diff]", "mode", DEADLINE)?;
    ensure!(diff.contains("calm"), "desired value shown: {diff}");
    ensure!(
        diff.contains(HOSTILE),
        "the hostile value is shown as text: {diff}"
    );
    ensure!(
        browser.find_all("#live img")?.is_empty(),
        "no markup from the cluster became an element"
    );
    ensure!(
        browser.eval("return document.title;")?.as_str() != Some("pwned"),
        "no script from the cluster ran"
    );
    let manager = browser.text_of("[data-testid=drift-manager]")?;
    ensure!(manager.contains("kubectl"), "who changed it: {manager}");
    browser.wait_text("[data-testid=drift-corrected]", "yes", DEADLINE)?;
    browser.screenshot("03-drift-diff")?;

    // ---- pause and resume the rollout -------------------------------------------
    browser.goto(&format!("{base}/bundles/ui-web"))?;
    browser.wait_text("[data-testid=rollout-phase]", "Progressing", DEADLINE)?;
    browser.screenshot("04-rollout-progressing")?;
    browser.click("[data-testid=rollout-pause]")?;
    browser.wait_text("[data-testid=rollout-phase]", "Paused", DEADLINE)?;
    ensure!(rollout_phase(&hub)? == "Paused", "the hub paused it");
    browser.screenshot("05-rollout-paused")?;
    browser.click("[data-testid=rollout-resume]")?;
    browser.wait_text("[data-testid=rollout-phase]", "Progressing", DEADLINE)?;
    ensure!(rollout_phase(&hub)? == "Progressing", "the hub resumed it");

    // ---- the matrix, filtered on the hub -----------------------------------------
    browser.goto(&format!("{base}/matrix?selector=env%3Dprod"))?;
    let summary = browser.wait_text("[data-testid=matrix-summary]", "1 of 1 clusters", DEADLINE)?;
    ensure!(summary.contains("1 online"), "{summary}");
    ensure!(
        browser.text_of("table.matrix tbody")?.contains("ui-edge-1"),
        "the cluster's row"
    );
    browser.screenshot("06-matrix")?;
    browser.goto(&format!("{base}/matrix?state=ErrApplied"))?;
    browser.wait_text("[data-testid=matrix-summary]", "0 of 1 clusters", DEADLINE)?;
    browser.goto(&format!("{base}/matrix?selector=%3D%3D%3D"))?;
    browser.wait_text("p.error", "label selector", DEADLINE)?;

    // ---- the cluster page, then logout ---------------------------------------------
    browser.goto(&format!("{base}/clusters/ui-edge-1"))?;
    browser.wait_text("[data-testid=connected]", "yes", DEADLINE)?;
    browser.screenshot("07-cluster")?;
    browser.click("form.logout button")?;
    wait_until("the login page after logout", DEADLINE, || {
        Ok(browser.url()?.contains("/login").then_some(()))
    })?;
    browser.goto(&format!("{base}/"))?;
    ensure!(
        browser.url()?.contains("/login"),
        "signed out: {}",
        browser.url()?
    );
    // The first session is unaffected; once it logs out, its cookie is dead on
    // the hub too, not only in a browser.
    let (status, _, _) = http(port, "GET", "/", &[("Cookie", session.as_str())], b"")?;
    ensure!(status == 200, "another session is unaffected: {status}");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default();
    let form = format!("csrf={csrf}");
    let (status, _, _) = http(
        port,
        "POST",
        "/logout",
        &[
            ("Cookie", session.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )?;
    ensure!(status == 303, "logout: {status}");
    let (status, _, _) = http(port, "GET", "/", &[("Cookie", session.as_str())], b"")?;
    ensure!(status == 303, "a logged-out cookie is refused: {status}");
    eprintln!("screenshots in {}", shots.display());
    Ok(())
}
