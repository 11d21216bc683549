//! Contents through a real OCI registry (Debian's docker-registry on loopback):
//! the hub pushes each content by digest, an agent started with --oci-registry
//! fetches it from there, and the hub sends that agent only the signed set.
//! The bytes the hub sends each agent are counted by a proxy in front of it.

use std::collections::BTreeMap;

use anyhow::Result;
use flotilla_tests::counting::CountingProxy;
use flotilla_tests::registry::Registry;
use flotilla_tests::*;

const NS: &str = "e2e-registry";
const OBJECTS: usize = 150;

/// A bundle of ConfigMaps full of incompressible data (about 300 KB as YAML).
fn bundle() -> BTreeMap<String, String> {
    let mut files = BTreeMap::from([(
        "reg/0-ns.yaml".to_string(),
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n"),
    )]);
    for i in 0..OBJECTS {
        let data: String = (0..1024)
            .map(|_| format!("{:x}", rand::random::<u8>() % 16))
            .collect();
        files.insert(
            format!("reg/cm-{i:03}.yaml"),
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:03}\n  namespace: {NS}\ndata:\n  blob: \"{data}\"\n"
            ),
        );
    }
    files
}

#[test]
fn contents_travel_through_the_registry() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("registry")?;
    let registry = Registry::start(&dir.path().join("registry"))?;
    let url = registry.url("flotilla/contents");
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--oci-registry", &url],
        &[],
    )?;
    let repo = GitRepo::new(dir.path(), "reg")?;
    let files = bundle();
    repo.commit(
        &files
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect(),
        "big",
    )?;
    hub.cli(&[
        "source", "add", "reg", "--repo", &repo.url, "--path", "reg", "--poll", "1s",
    ])?;
    wait_until("the bundle rendered", DEADLINE, || {
        Ok(hub
            .cli_output(&["bundle", "get", "reg-reg"])?
            .status
            .success()
            .then_some(()))
    })?;

    let rt = tokio::runtime::Runtime::new()?;
    let inline_proxy = rt.block_on(CountingProxy::start(hub_agent_port(&hub)))?;
    let registry_proxy = rt.block_on(CountingProxy::start(hub_agent_port(&hub)))?;

    // Without a registry: the hub sends the content itself.
    let mut inline = Agent::spawn(
        &format!("https://127.0.0.1:{}", inline_proxy.port),
        Some(&hub.token()?),
        "reg-inline",
        "",
        &east.kubeconfig,
        &dir.path().join("agent-inline"),
    )?;
    hub.wait_bundle_state("reg-reg", "reg-inline", "Ready")
        .map_err(|e| e.context(inline.proc.log_text()))?;
    let (inline_bytes, _) = inline_proxy.counts();

    // With the registry: the hub sends the signed set alone.
    let mut fetching = Agent::spawn_with(
        &format!("https://127.0.0.1:{}", registry_proxy.port),
        Some(&hub.token()?),
        "reg-fetch",
        "",
        &west.kubeconfig,
        &dir.path().join("agent-fetch"),
        &["--oci-registry", &url],
    )?;
    hub.wait_bundle_state("reg-reg", "reg-fetch", "Ready")
        .map_err(|e| e.context(fetching.proc.log_text()))?;
    let (registry_bytes, _) = registry_proxy.counts();
    let cms = west.kubectl(&["get", "configmaps", "-n", NS, "-o", "name"])?;
    assert_eq!(cms.lines().filter(|l| l.contains("cm-")).count(), OBJECTS);

    let log = fetching.proc.log_text();
    assert!(log.contains("contents fetched from the registry"), "{log}");
    assert!(!registry.blobs().is_empty(), "the hub pushed the content");
    let yaml: usize = files.values().map(String::len).sum();
    eprintln!(
        "registry: bundle of {OBJECTS} objects, {yaml} bytes of YAML; hub -> agent bytes on the \
         wire from start to Ready (enrolment, session, set): inline {inline_bytes}, through the \
         registry {registry_bytes}"
    );
    // The content itself (over 100 KB gzipped) no longer crosses the hub's link.
    assert!(
        registry_bytes * 4 < inline_bytes && registry_bytes < 60_000,
        "inline {inline_bytes} bytes, with the registry {registry_bytes}"
    );
    inline.proc.stop();
    fetching.proc.stop();
    Ok(())
}

fn hub_agent_port(hub: &Hub) -> u16 {
    hub.agent_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_default()
}
