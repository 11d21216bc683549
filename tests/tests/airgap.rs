//! An air-gapped cluster: the agent is never given --hub. It is enrolled by
//! file, installed and updated by file, reports its drift by file, and refuses
//! a replayed or hand-edited file; a signing-key rotation reaches it by file
//! too. Then the same agent is switched to the network and loses nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use flotilla_proto::transfer;
use flotilla_proto::v1::transfer_file::Body;
use flotilla_tests::*;

const NS: &str = "e2e-airgap";
const CLUSTER: &str = "gap-east";

fn cm(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: {NS}\ndata:\n  value: \"{value}\"\n"
    )
}

fn value(c: &TestCluster) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(NS), "app")?
        .map(|v| v["data"]["value"].as_str().unwrap_or_default().to_string()))
}

fn wait_value(c: &TestCluster, want: &str) -> Result<()> {
    wait_until(&format!("configmap {NS}/app = {want}"), DEADLINE, || {
        Ok((value(c)?.as_deref() == Some(want)).then_some(()))
    })
}

/// Runs `flotilla-agent ARGS`; its stdout, or an error with its stderr.
fn agent_cmd(args: &[&str]) -> Result<String> {
    let out = Command::new(bin_dir().join("flotilla-agent"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        bail!(
            "flotilla-agent {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `flotilla bundle export`, retried while the hub has not rendered yet.
fn export(hub: &Hub, out: &Path, since: Option<&Path>) -> Result<flotilla_proto::v1::DesiredFile> {
    let mut args = vec!["bundle", "export", "--cluster", CLUSTER, "-o", p(out)];
    if let Some(s) = since {
        args.extend(["--since", p(s)]);
    }
    wait_until("an export", DEADLINE, || hub.cli(&args).map(Some))?;
    match transfer::decode(&std::fs::read(out)?)? {
        Body::Desired(d) => Ok(d),
        other => bail!("export wrote {}", transfer::kind(Some(&other))),
    }
}

/// Exports the agent's statuses and imports them at the hub; returns the
/// import's line.
fn report(hub: &Hub, state: &Path, file: &Path) -> Result<String> {
    agent_cmd(&["export-status", "--state-dir", p(state), "-o", p(file)])?;
    hub.cli(&["cluster", "import-status", p(file)])
}

fn drift_events(hub: &Hub) -> Result<Vec<serde_json::Value>> {
    let v = hub.cli_json(&["drift", "list", "--cluster", CLUSTER])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn offline_agent(cluster: &TestCluster, state: &Path) -> Result<Proc> {
    let mut cmd = Command::new(bin_dir().join("flotilla-agent"));
    cmd.args(["--cluster-name", CLUSTER, "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "info,flotilla_agent=debug");
    let n = std::fs::read_dir(state).map(|d| d.count()).unwrap_or(0);
    let proc = Proc::spawn(
        "offline agent",
        &mut cmd,
        &state.join(format!("agent-{n}.log")),
    )?;
    wait_until("the agent's control socket", DEADLINE, || {
        Ok(state.join("control.sock").exists().then_some(()))
    })?;
    Ok(proc)
}

#[test]
fn an_agent_that_never_saw_the_network() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("airgap")?;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let f = |name: &str| files.join(name);
    let state = dir.path().join("agent");
    let mut hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "gap")?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm("one").as_str()))]),
        "one",
    )?;
    hub.cli(&["source", "add", "gap", "--repo", &repo.url, "--poll", "1s"])?;

    // Enrolment by file. A request altered on its way is refused, and spends nothing.
    let token = hub.token()?;
    agent_cmd(&[
        "enroll-request",
        "--token",
        &token,
        "--cluster-name",
        CLUSTER,
        "--labels",
        "site=ship",
        "--state-dir",
        p(&state),
        "-o",
        p(&f("req")),
    ])?;
    let mut forged = transfer::decode(&std::fs::read(f("req"))?)?;
    if let Body::EnrollRequest(r) = &mut forged {
        let last = r.request.len() - 1;
        r.request[last] ^= 1;
    }
    std::fs::write(f("req-forged"), transfer::encode(forged))?;
    let e = hub
        .cli(&[
            "cluster",
            "enroll",
            "--request",
            p(&f("req-forged")),
            "-o",
            p(&f("x")),
        ])
        .unwrap_err();
    assert!(format!("{e:#}").contains("does not verify"), "{e:#}");
    hub.cli(&[
        "cluster",
        "enroll",
        "--request",
        p(&f("req")),
        "-o",
        p(&f("resp")),
    ])?;
    // The token is spent: the same request again is refused.
    let e = hub
        .cli(&[
            "cluster",
            "enroll",
            "--request",
            p(&f("req")),
            "-o",
            p(&f("x")),
        ])
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("enrolled") || format!("{e:#}").contains("used"),
        "{e:#}"
    );
    agent_cmd(&[
        "enroll",
        "--response",
        p(&f("resp")),
        "--state-dir",
        p(&state),
    ])?;
    assert!(state.join("hub-signing.pub").exists());
    let c = hub.cli_json(&["cluster", "get", CLUSTER])?;
    assert_eq!(c["labels"]["site"], "ship", "{c}");

    // The agent runs with no --hub at all.
    let mut agent = offline_agent(east, &state)?;

    // First install by file.
    let first = export(&hub, &f("desired-1"), None)?;
    assert_eq!(first.contents.len(), 1);
    agent_cmd(&["import", p(&f("desired-1")), "--state-dir", p(&state)])?;
    wait_value(east, "one")?;
    // Its status, by file.
    wait_until("Ready reported by file", DEADLINE, || {
        report(&hub, &state, &f("status-1"))?;
        Ok((hub
            .bundle_state("gap", CLUSTER)?
            .is_some_and(|(s, _)| s == "Ready"))
        .then_some(()))
    })?;
    // An export since that report leaves out what the agent holds.
    let since = export(&hub, &f("desired-1b"), Some(&f("status-1")))?;
    assert!(
        since.contents.is_empty(),
        "{} contents",
        since.contents.len()
    );
    let full = std::fs::metadata(f("desired-1"))?.len();
    let lean = std::fs::metadata(f("desired-1b"))?.len();
    assert!(lean < full, "--since: {lean} bytes, without: {full}");

    // An update by file.
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm("two").as_str()))]),
        "two",
    )?;
    let rev1 = first.signed.as_ref().map(|s| s.payload.clone());
    let second = wait_until("the new revision exported", DEADLINE, || {
        let d = export(&hub, &f("desired-2"), Some(&f("status-1")))?;
        Ok((!d.contents.is_empty()).then_some(d))
    })?;
    assert_ne!(second.signed.as_ref().map(|s| s.payload.clone()), rev1);
    agent_cmd(&["import", p(&f("desired-2")), "--state-dir", p(&state)])?;
    wait_value(east, "two")?;
    // Importing the same file again changes nothing.
    let again = agent_cmd(&["import", p(&f("desired-2")), "--state-dir", p(&state)])?;
    assert!(again.contains("nothing changed"), "{again}");

    // A replayed older file is refused, and says why.
    let e = agent_cmd(&["import", p(&f("desired-1")), "--state-dir", p(&state)]).unwrap_err();
    assert!(
        format!("{e:#}").contains("older than the one held"),
        "{e:#}"
    );
    // A hand-edited content is refused: it no longer hashes to the signed digest.
    let mut edited = second.clone();
    for m in &mut edited.contents[0].manifests {
        m.json = m.json.replace("\"two\"", "\"evil\"");
    }
    std::fs::write(f("edited-content"), transfer::encode(Body::Desired(edited)))?;
    let e = agent_cmd(&["import", p(&f("edited-content")), "--state-dir", p(&state)]).unwrap_err();
    assert!(format!("{e:#}").contains("it was altered"), "{e:#}");
    assert!(
        format!("{e:#}").contains("edited-content"),
        "names the file: {e:#}"
    );
    // A hand-edited set (a bundle's revision) fails the signature.
    let mut edited = second.clone();
    if let Some(s) = &mut edited.signed {
        let text = String::from_utf8(s.payload.clone())?;
        s.payload = text
            .replacen("\"revision\":\"", "\"revision\":\"x", 1)
            .into_bytes();
    }
    std::fs::write(f("edited-set"), transfer::encode(Body::Desired(edited)))?;
    let e = agent_cmd(&["import", p(&f("edited-set")), "--state-dir", p(&state)]).unwrap_err();
    assert!(
        format!("{e:#}").contains("signature does not verify"),
        "{e:#}"
    );
    // A set for another cluster, imported here, is refused by name. (Another
    // enrolled cluster: a second enrolment by file.)
    let other = dir.path().join("other");
    let token2 = hub.token()?;
    agent_cmd(&[
        "enroll-request",
        "--token",
        &token2,
        "--cluster-name",
        "gap-other",
        "--state-dir",
        p(&other),
        "-o",
        p(&f("req2")),
    ])?;
    hub.cli(&[
        "cluster",
        "enroll",
        "--request",
        p(&f("req2")),
        "-o",
        p(&f("resp2")),
    ])?;
    wait_until("an export for gap-other", DEADLINE, || {
        hub.cli(&[
            "bundle",
            "export",
            "--cluster",
            "gap-other",
            "-o",
            p(&f("other")),
        ])
        .map(Some)
    })?;
    let e = agent_cmd(&["import", p(&f("other")), "--state-dir", p(&state)]).unwrap_err();
    assert!(format!("{e:#}").contains("gap-other"), "{e:#}");
    wait_value(east, "two")?;

    // Drift in the cluster, reported by file; the status imported twice gives one event.
    east.kubectl(&[
        "patch",
        "configmap",
        "app",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        r#"{"data":{"value":"hand"}}"#,
    ])?;
    wait_value(east, "two")?; // corrected
    let line = wait_until("the drift event exported", DEADLINE, || {
        let line = report(&hub, &state, &f("status-2"))?;
        Ok((!drift_events(&hub)?.is_empty()).then_some(line))
    })?;
    let events = drift_events(&hub)?;
    assert_eq!(events.len(), 1, "{events:?} ({line})");
    let twice = hub.cli(&["cluster", "import-status", p(&f("status-2"))])?;
    assert!(
        twice.contains("0 statuses and 0 drift events imported"),
        "{twice}"
    );
    assert_eq!(drift_events(&hub)?.len(), 1, "imported twice, stored once");
    // A hand-edited status file is refused.
    let mut forged = transfer::decode(&std::fs::read(f("status-2"))?)?;
    if let Body::Status(s) = &mut forged {
        let last = s.report.len() - 1;
        s.report[last] ^= 1;
    }
    std::fs::write(f("status-forged"), transfer::encode(forged))?;
    let e = hub
        .cli(&["cluster", "import-status", p(&f("status-forged"))])
        .unwrap_err();
    assert!(format!("{e:#}").contains("it was altered"), "{e:#}");
    assert!(
        format!("{e:#}").contains("status-forged"),
        "names the file: {e:#}"
    );

    // Another cluster's certificate on this cluster's report: refused.
    agent_cmd(&[
        "enroll",
        "--response",
        p(&f("resp2")),
        "--state-dir",
        p(&other),
    ])?;
    agent_cmd(&[
        "export-status",
        "--state-dir",
        p(&other),
        "-o",
        p(&f("status-other")),
    ])?;
    hub.cli(&["cluster", "import-status", p(&f("status-other"))])?;
    let other_cert = match transfer::decode(&std::fs::read(f("status-other"))?)? {
        Body::Status(s) => s.certificate_pem,
        _ => bail!("not a status file"),
    };
    let mut swapped = transfer::decode(&std::fs::read(f("status-2"))?)?;
    if let Body::Status(s) = &mut swapped {
        s.certificate_pem = other_cert;
    }
    std::fs::write(f("status-swapped"), transfer::encode(swapped))?;
    let e = hub
        .cli(&["cluster", "import-status", p(&f("status-swapped"))])
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("gap-other's certificate"),
        "{e:#}"
    );

    // The next export acknowledges what the hub imported: the agent's outbox empties.
    export(&hub, &f("desired-3"), Some(&f("status-2")))?;
    let acked = agent_cmd(&["import", p(&f("desired-3")), "--state-dir", p(&state)])?;
    assert!(acked.contains("1 drift events acknowledged"), "{acked}");

    // A rotation of the hub's signing key reaches the agent by file.
    hub.cli(&["signing-key", "rotate"])?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm("three").as_str()))]),
        "three",
    )?;
    wait_until("revision three exported", DEADLINE, || {
        let d = export(&hub, &f("desired-4"), Some(&f("status-2")))?;
        Ok((!d.contents.is_empty()).then_some(()))
    })?;
    agent_cmd(&["import", p(&f("desired-4")), "--state-dir", p(&state)])?;
    wait_value(east, "three")?;
    let key = hub.cli_json(&["signing-key", "show"])?;
    let pinned = std::fs::read_to_string(state.join("hub-signing.pub"))?;
    assert_eq!(
        pinned.trim(),
        key["publicKey"].as_str().unwrap(),
        "the agent follows the rotation"
    );

    // The same agent, switched to the network: nothing lost.
    agent.stop();
    let mut online = Agent::spawn(&hub.agent_url, None, CLUSTER, "", &east.kubeconfig, &state)?;
    wait_until("agent connected", DEADLINE, || {
        let c = hub.cli_json(&["cluster", "get", CLUSTER])?;
        Ok((c["connected"] == true).then_some(()))
    })?;
    hub.wait_bundle_state("gap", CLUSTER, "Ready")?;
    wait_value(east, "three")?;
    // It keeps following rotations over the network.
    hub.cli(&["signing-key", "rotate"])?;
    repo.commit(
        &BTreeMap::from([("app.yaml", Some(cm("four").as_str()))]),
        "four",
    )?;
    wait_value(east, "four")?;
    let key = hub.cli_json(&["signing-key", "show"])?;
    wait_until("the agent pins the new key", DEADLINE, || {
        let pinned = std::fs::read_to_string(state.join("hub-signing.pub"))?;
        Ok((pinned.trim() == key["publicKey"].as_str().unwrap_or_default()).then_some(()))
    })
    .context(online.proc.log_text())?;
    assert_eq!(
        drift_events(&hub)?.len(),
        1,
        "no drift event repeated on the switch"
    );
    online.proc.stop();
    hub.stop();
    Ok(())
}
