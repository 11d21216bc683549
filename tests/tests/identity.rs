//! Identities and their life cycle, end to end on real clusters: a bound join
//! token decides the cluster's labels whatever its agent claims; `cluster
//! delete` cuts the agent off at once and refuses its certificate for good,
//! while what the agent applied stays in the cluster and is still looked after;
//! short-lived certificates are renewed by the agent while it keeps working.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_client::FleetClient;
use flotilla_tests::*;

fn files<'a>(list: &[(&'a str, Option<&'a str>)]) -> BTreeMap<&'a str, Option<&'a str>> {
    list.iter().cloned().collect()
}

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

fn config_map(ns: &str, name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n"
    )
}

fn cm_value(c: &TestCluster, ns: &str, name: &str) -> Result<Option<String>> {
    Ok(c.get("configmap", Some(ns), name)?
        .map(|cm| cm["data"]["value"].as_str().unwrap_or_default().to_string()))
}

fn wait_cm(c: &TestCluster, ns: &str, name: &str, want: Option<&str>) -> Result<()> {
    wait_until(
        &format!("configmap {ns}/{name} = {want:?} in {}", c.name),
        DEADLINE,
        || Ok((cm_value(c, ns, name)?.as_deref() == want).then_some(())),
    )
}

/// An identity as an agent keeps it in its state directory: (CA, cert, key).
fn stored_identity(state_dir: &Path) -> Result<(String, String, String)> {
    let read = |f: &str| {
        std::fs::read_to_string(state_dir.join(f))
            .with_context(|| format!("{}", state_dir.join(f).display()))
    };
    Ok((read("ca.pem")?, read("client.pem")?, read("client.key")?))
}

/// Opens a Fleet session with an agent's identity, as the agent does, and
/// returns the code the hub answers with (`Ok` when it serves a Desired set;
/// `Unavailable` when the connection fails, as with an expired certificate).
fn dial_with(hub: &Hub, (ca, cert, key): &(String, String, String)) -> Result<tonic::Code> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let uri = flotilla_agent::transport::parse_hub(&hub.agent_url)?;
        let tls = flotilla_agent::transport::mutual_config(ca, cert, key)?;
        let Ok(channel) = flotilla_agent::transport::channel(&uri, tls).await else {
            return Ok(tonic::Code::Unavailable);
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
                agent_version: "probe".into(),
                ..Default::default()
            })),
        })
        .await?;
        let answer = FleetClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let code = match answer {
            Err(status) => status.code(),
            Ok(resp) => {
                let mut inbound = resp.into_inner();
                match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
                    Ok(Ok(Some(_))) => tonic::Code::Ok,
                    Ok(Err(status)) => status.code(),
                    Ok(Ok(None)) => tonic::Code::Aborted,
                    Err(_) => tonic::Code::DeadlineExceeded,
                }
            }
        };
        drop(tx);
        Ok::<_, anyhow::Error>(code)
    })
}

fn cluster_names(hub: &Hub) -> Result<Vec<String>> {
    let v = hub.cli_json(&["cluster", "list"])?;
    Ok(v.as_array()
        .ok_or_else(|| anyhow!("not a list: {v}"))?
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect())
}

fn log_count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// A token bound to a name and labels: the agent's claimed labels do not count.
/// `cluster delete`: the agent's stream closes within a second, the cluster
/// leaves `cluster list`, the agent keeps its objects (and still corrects a
/// deletion of one), and its certificate is refused, also once the name is
/// enrolled again.
#[test]
fn a_deleted_cluster_is_cut_off_and_keeps_its_objects() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _west] = shared_clusters();
    let dir = test_dir("identity-delete")?;
    let ns = "e2e-identity-delete";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "apps")?;
    repo.commit(
        &files(&[
            ("web/ns.yaml", Some(&namespace(ns))),
            ("web/config.yaml", Some(&config_map(ns, "web", "v1"))),
        ]),
        "first",
    )?;
    hub.cli(&[
        "source", "add", "apps", "--repo", &repo.url, "--path", "web", "--target", "env=prod",
        "--poll", "1s",
    ])?;
    let bundle = "apps-web";

    // The token binds env=prod; the agent claims env=dev and gets prod anyway.
    let token = hub
        .cli(&[
            "token",
            "create",
            "--cluster-name",
            "id-east",
            "--labels",
            "env=prod",
        ])?
        .trim()
        .to_string();
    let state = dir.path().join("east");
    let mut agent = Agent::start(&hub, &token, "id-east", "env=dev", east, &state)?;
    hub.wait_bundle_state(bundle, "id-east", "Ready")?;
    wait_cm(east, ns, "web", Some("v1"))?;
    let c = hub.cli_json(&["cluster", "get", "id-east"])?;
    assert_eq!(c["labels"], serde_json::json!({"env": "prod"}), "{c}");
    let old = stored_identity(&state)?;
    wait_until("id-east connected", DEADLINE, || {
        Ok((hub.cli_json(&["cluster", "get", "id-east"])?["connected"] == true).then_some(()))
    })?;

    let refusals_before = log_count(&agent.proc.log_text(), "PermissionDenied");
    let started = Instant::now();
    let out = hub.cli(&["cluster", "delete", "id-east"])?;
    assert!(out.starts_with("cluster/id-east deleted"), "{out}");
    // The agent's stream is closed by the hub at once: the agent logs the refusal.
    let closed_after = wait_until("the agent told of the refusal", DEADLINE, || {
        let n = log_count(&agent.proc.log_text(), "PermissionDenied");
        Ok((n > refusals_before).then(|| started.elapsed()))
    })?;
    assert!(
        closed_after < Duration::from_secs(3),
        "the stream closed only after {closed_after:?}"
    );
    assert!(
        hub.proc
            .log_text()
            .contains("cluster deleted or its certificate revoked: session closed"),
        "the live stream was closed by the hub: {}",
        hub.proc.log_text()
    );
    eprintln!("stream closed {closed_after:?} after `cluster delete`");
    assert!(!cluster_names(&hub)?.contains(&"id-east".to_string()));
    assert!(hub.bundle_state(bundle, "id-east")?.is_none());

    // The objects stay, and the agent, cut off, still looks after them: a
    // deleted ConfigMap comes back (drift correction from its own store).
    assert_eq!(cm_value(east, ns, "web")?.as_deref(), Some("v1"));
    east.kubectl(&["delete", "configmap", "web", "-n", ns])?;
    wait_cm(east, ns, "web", Some("v1"))?;
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());

    // The old certificate is refused on every call.
    assert_eq!(dial_with(&hub, &old)?, tonic::Code::PermissionDenied);

    // The name enrolled again (new state, new token): the old certificate stays
    // refused, the new agent is served.
    agent.proc.stop();
    let token = hub
        .cli(&[
            "token",
            "create",
            "--cluster-name",
            "id-east",
            "--labels",
            "env=prod",
        ])?
        .trim()
        .to_string();
    let state2 = dir.path().join("east-again");
    let _again = Agent::start(&hub, &token, "id-east", "", east, &state2)?;
    hub.wait_bundle_state(bundle, "id-east", "Ready")?;
    assert_eq!(dial_with(&hub, &old)?, tonic::Code::PermissionDenied);
    assert_eq!(cm_value(east, ns, "web")?.as_deref(), Some("v1"));
    east.kubectl(&["delete", "namespace", ns, "--wait=false"])?;
    Ok(())
}

/// With agent certificates of 20 s, the agent renews its own before two thirds
/// of their life, again and again, and keeps getting commits; each old
/// certificate is refused once the new one is in use.
#[test]
fn agents_renew_short_lived_certificates_and_keep_working() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [_east, west] = shared_clusters();
    let dir = test_dir("identity-renew")?;
    let ns = "e2e-identity-renew";
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--agent-cert-ttl", "20s"],
        &[],
    )?;
    let repo = GitRepo::new(dir.path(), "apps")?;
    repo.commit(
        &files(&[
            ("web/ns.yaml", Some(&namespace(ns))),
            ("web/config.yaml", Some(&config_map(ns, "web", "v1"))),
        ]),
        "first",
    )?;
    hub.cli(&[
        "source", "add", "apps", "--repo", &repo.url, "--path", "web", "--target", "env=dev",
        "--poll", "1s",
    ])?;
    let state = dir.path().join("west");
    let agent = Agent::start(&hub, &hub.token()?, "id-west", "env=dev", west, &state)?;
    hub.wait_bundle_state("apps-web", "id-west", "Ready")?;
    let first = stored_identity(&state)?;
    let renewals = || log_count(&agent.proc.log_text(), "certificate renewed: reconnecting");

    // Renewed at about 13 s of a 20 s life (two thirds of it, backdating included).
    let started = Instant::now();
    wait_until("a renewal", Duration::from_secs(40), || {
        Ok((renewals() >= 1).then_some(()))
    })?;
    eprintln!("first renewal {:?} after Ready", started.elapsed());
    let second = stored_identity(&state)?;
    assert_ne!(second.1, first.1, "the certificate file changed");
    assert_ne!(second.2, first.2, "with a new key");
    assert_eq!(dial_with(&hub, &second)?, tonic::Code::Ok);
    // And again: the second certificate, not expired yet, is refused once the
    // third is in use.
    wait_until("a second renewal", Duration::from_secs(40), || {
        Ok((renewals() >= 2).then_some(()))
    })?;
    let third = stored_identity(&state)?;
    assert_ne!(third.1, second.1);
    // The agent logs its renewal before it dials again with the new
    // certificate; the old one is refused from the new one's first use.
    wait_until(
        "the third certificate in use",
        Duration::from_secs(20),
        || {
            let used = log_count(&hub.proc.log_text(), "renewed certificate in use");
            Ok((used >= 2).then_some(()))
        },
    )?;
    let (_, not_after) = flotilla_agent::enroll::validity(&second.1)?;
    let code = dial_with(&hub, &second)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    if now_ms < not_after - 1_000 {
        assert_eq!(
            code,
            tonic::Code::PermissionDenied,
            "a replaced certificate"
        );
    }
    assert_ne!(
        dial_with(&hub, &first)?,
        tonic::Code::Ok,
        "expired and replaced"
    );

    // Still served: a new commit arrives.
    repo.commit(
        &files(&[("web/config.yaml", Some(&config_map(ns, "web", "v2")))]),
        "second",
    )?;
    wait_cm(west, ns, "web", Some("v2"))?;
    hub.wait_bundle_state("apps-web", "id-west", "Ready")?;
    let c = hub.cli_json(&["cluster", "get", "id-west"])?;
    assert_eq!(c["connected"], true, "{c}");
    assert!(
        !agent.proc.log_text().contains("PermissionDenied"),
        "{}",
        agent.proc.log_text()
    );
    west.kubectl(&["delete", "namespace", ns, "--wait=false"])?;
    Ok(())
}

/// A certificate that expired while the hub was away is refused (no grace):
/// the agent keeps its objects, and comes back by enrolling again with a new
/// token after `cluster delete`, keeping its store.
#[test]
fn an_expired_certificate_is_renewed_when_the_hub_returns() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _west] = shared_clusters();
    let dir = test_dir("identity-expired")?;
    let ns = "e2e-identity-expired";
    let mut hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--agent-cert-ttl", "10s"],
        &[],
    )?;
    let repo = GitRepo::new(dir.path(), "apps")?;
    repo.commit(
        &files(&[
            ("web/ns.yaml", Some(&namespace(ns))),
            ("web/config.yaml", Some(&config_map(ns, "web", "v1"))),
        ]),
        "first",
    )?;
    hub.cli(&[
        "source", "add", "apps", "--repo", &repo.url, "--path", "web", "--target", "env=qa",
        "--poll", "1s",
    ])?;
    let state = dir.path().join("east");
    let token = hub.cli(&[
        "token",
        "create",
        "--cluster-name",
        "id-exp",
        "--labels",
        "env=qa",
    ])?;
    let mut agent = Agent::start(&hub, token.trim(), "id-exp", "", east, &state)?;
    hub.wait_bundle_state("apps-web", "id-exp", "Ready")?;

    // The hub goes away for longer than the certificate lives.
    hub.stop();
    let (_, not_after) = flotilla_agent::enroll::validity(&stored_identity(&state)?.1)?;
    wait_until("the certificate expired", Duration::from_secs(30), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        Ok((now > not_after + 1_000).then_some(()))
    })?;
    // Read before the hub returns: with it back, the agent renews at once.
    let expired = stored_identity(&state)?;
    hub.restart()?;
    assert_ne!(
        dial_with(&hub, &expired)?,
        tonic::Code::Ok,
        "an expired certificate"
    );
    // The agent keeps its objects, and renews its expired certificate with the
    // returned hub (the one call an expired certificate may make).
    assert_eq!(cm_value(east, ns, "web")?.as_deref(), Some("v1"));
    wait_until("the expired certificate renewed", DEADLINE, || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        let current = stored_identity(&state)?;
        let (_, not_after) = flotilla_agent::enroll::validity(&current.1)?;
        Ok((current.1 != expired.1 && not_after > now).then_some(()))
    })?;
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());
    // And works with it: a new commit arrives.
    repo.commit(
        &files(&[("web/config.yaml", Some(&config_map(ns, "web", "v2")))]),
        "second",
    )?;
    wait_until("v2 applied after the renewal", DEADLINE, || {
        Ok((cm_value(east, ns, "web")?.as_deref() == Some("v2")).then_some(()))
    })?;
    east.kubectl(&["delete", "namespace", ns, "--wait=false"])?;
    Ok(())
}
