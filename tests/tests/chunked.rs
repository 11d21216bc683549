//! Protocol v2's chunked contents, end to end: a Git bundle of 5,000 ConfigMaps
//! and about 50 MiB (three times what one content could take inline) reaches a
//! real cluster in 1 MiB chunks and is Ready; a v1 agent of the same hub is held
//! with the reason as the bundle's status, its session kept. Mixed versions both
//! ways (`--protocol-v1-only`, hidden, on either binary) keep working inline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use flotilla_tests::big::hex_data;
use flotilla_tests::*;

/// ConfigMaps of the large bundle, and the data each carries.
const OBJECTS: usize = 5_000;
const BYTES_PER_OBJECT: usize = 10_000;
/// ConfigMaps per manifest file (files stay about 1 MB, under the 32 MiB cap).
const PER_FILE: usize = 100;

fn big_bundle(ns: &str) -> BTreeMap<String, String> {
    flotilla_tests::big::bundle("big", ns, OBJECTS, BYTES_PER_OBJECT, PER_FILE)
}

fn small_bundle(ns: &str, dir: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            format!("{dir}/ns.yaml"),
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
        ),
        (
            format!("{dir}/cm.yaml"),
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: small\n  namespace: {ns}\ndata:\n  value: \"v1\"\n"
            ),
        ),
    ])
}

fn commit(repo: &GitRepo, files: &BTreeMap<String, String>, msg: &str) -> Result<String> {
    repo.commit(
        &files
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect(),
        msg,
    )
}

/// Waits up to `deadline` for `bundle` to be `state` on `cluster`; the last
/// state seen is in the error.
fn wait_state(
    hub: &Hub,
    bundle: &str,
    cluster: &str,
    state: &str,
    deadline: Duration,
) -> Result<String> {
    wait_until(
        &format!("bundle {bundle} {state} on {cluster}"),
        deadline,
        || match hub.bundle_state(bundle, cluster)? {
            Some((s, m)) if s == state => Ok(Some(m)),
            Some((s, m)) => Err(anyhow!("state is {s}: {m}")),
            None => Ok(None),
        },
    )
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// How many times the hub logged a session of `cluster` connecting.
fn connects(hub: &Hub, cluster: &str) -> usize {
    hub.proc
        .log_text()
        .lines()
        .filter(|l| l.contains("agent connected") && l.contains(&format!("cluster={cluster}")))
        .count()
}

/// The lines of the hub's log that sent `cluster` a set.
fn sets_sent(hub: &Hub, cluster: &str) -> Vec<String> {
    hub.proc
        .log_text()
        .lines()
        .filter(|l| l.contains("sending desired set") && l.contains(&format!("cluster={cluster}")))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_bundle_of_50_mib_reaches_a_cluster_in_chunks() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("chunked-big")?;
    let ns = "e2e-chunked-big";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "big")?;
    let files = big_bundle(ns);
    let yaml: usize = files.values().map(String::len).sum();
    commit(&repo, &files, "5,000 ConfigMaps")?;
    drop(files);
    let mut agent = Agent::start(
        &hub,
        &hub.token()?,
        "chunk-east",
        "size=big",
        east,
        &dir.path().join("east"),
    )?;
    // The same hub's v1 agent cannot take the content in one message: held.
    let mut old = Agent::spawn_with(
        &hub.agent_url,
        Some(&hub.token()?),
        "chunk-v1",
        "size=big",
        &west.kubeconfig,
        &dir.path().join("west"),
        &["--protocol-v1-only"],
    )?;
    let start = Instant::now();
    hub.cli(&[
        "source", "add", "big", "--repo", &repo.url, "--path", "big", "--target", "size=big",
        "--poll", "1s",
    ])?;
    let bundle = "big-big";
    wait_state(
        &hub,
        bundle,
        "chunk-east",
        "Ready",
        Duration::from_secs(900),
    )
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let to_ready = start.elapsed();

    let names = east.kubectl(&["get", "configmaps", "-n", ns, "-o", "name"])?;
    assert_eq!(
        names.lines().filter(|l| l.contains("/cm-")).count(),
        OBJECTS,
        "every ConfigMap applied"
    );
    for i in [0, 1234, 2500, OBJECTS - 1] {
        let cm = east
            .get("configmap", Some(ns), &format!("cm-{i:04}"))?
            .ok_or_else(|| anyhow!("cm-{i:04} missing"))?;
        assert_eq!(
            cm["data"]["blob"].as_str(),
            Some(hex_data(i as u64, BYTES_PER_OBJECT).as_str()),
            "cm-{i:04} holds what Git has"
        );
    }

    // It went in chunks, none over 1 MiB (the agent checks that), no content inline.
    let sent = sets_sent(&hub, "chunk-east");
    let chunked = sent
        .iter()
        .find(|l| l.contains("chunked=1"))
        .ok_or_else(|| anyhow!("no set sent in chunks: {sent:?}"))?;
    assert!(chunked.contains("contents=0"), "{chunked}");
    let bytes: usize = chunked
        .split("chunked_bytes=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no chunked_bytes in {chunked}"))?;
    assert!(
        bytes > 3 * flotilla_proto::MAX_INLINE_BYTES,
        "the content is {bytes} bytes"
    );
    let log = agent.proc.log_text();
    assert!(log.contains("contents received in chunks"), "{log}");

    // The v1 agent: held, with the reason as its status, and still connected
    // (no disconnect loop).
    let msg = wait_state(&hub, bundle, "chunk-v1", "ErrApplied", DEADLINE)?;
    assert!(
        msg.contains("chunked-contents") && msg.contains("inline"),
        "{msg}"
    );
    let v1_sets = sets_sent(&hub, "chunk-v1");
    assert!(
        !v1_sets.iter().any(|l| l.contains("bundles=1")),
        "{v1_sets:?}"
    );
    let clusters = hub.cli_json(&["cluster", "list"])?;
    let row = clusters
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "chunk-v1"))
        .ok_or_else(|| anyhow!("chunk-v1 not listed: {clusters}"))?;
    assert_eq!(row["connected"], true, "{row}");
    assert_eq!(connects(&hub, "chunk-v1"), 1, "one session, kept");
    assert!(west.get("namespace", None, ns)?.is_none());

    // Where the time went: when the hub sent the set, the agent took it, and it applied.
    for l in sent.iter().filter(|l| l.contains("chunked=1")).chain(
        log.lines()
            .filter(|l| {
                l.contains("contents received in chunks")
                    || l.contains("desired state received")
                    || l.contains("\"big-big\"")
                    || l.contains("bundle=big-big")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
            .iter(),
    ) {
        eprintln!("chunked: {}", l.chars().take(220).collect::<String>());
    }
    let (hub_rss, agent_rss) = (peak_rss_mib(hub.proc.pid()), peak_rss_mib(agent.proc.pid()));
    eprintln!(
        "chunked: {OBJECTS} ConfigMaps, {yaml} bytes of YAML, content {bytes} bytes in {} \
         chunks; source added to Ready in {:.1} s; peak RSS hub {hub_rss:?} MiB, agent \
         {agent_rss:?} MiB",
        bytes.div_ceil(flotilla_proto::chunks::MAX_CHUNK_BYTES),
        to_ready.as_secs_f64()
    );
    agent.proc.stop();
    old.proc.stop();
    Ok(())
}

/// A v1 agent (one that advertises no features) of the new hub gets its
/// contents inline, as before.
#[test]
fn a_v1_agent_gets_inline_contents_from_the_new_hub() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [_, west] = shared_clusters();
    let dir = test_dir("chunked-v1-agent")?;
    let ns = "e2e-chunked-v1-agent";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "small")?;
    commit(&repo, &small_bundle(ns, "app"), "small")?;
    let mut agent = Agent::spawn_with(
        &hub.agent_url,
        Some(&hub.token()?),
        "v1-agent",
        "",
        &west.kubeconfig,
        &dir.path().join("west"),
        &["--protocol-v1-only"],
    )?;
    hub.cli(&[
        "source", "add", "small", "--repo", &repo.url, "--path", "app", "--poll", "1s",
    ])?;
    hub.wait_bundle_state("small-app", "v1-agent", "Ready")
        .map_err(|e| e.context(agent.proc.log_text()))?;
    let cm = west
        .get("configmap", Some(ns), "small")?
        .ok_or_else(|| anyhow!("configmap missing"))?;
    assert_eq!(cm["data"]["value"], "v1");
    let log = hub.proc.log_text();
    let connected = log
        .lines()
        .find(|l| l.contains("agent connected") && l.contains("cluster=v1-agent"))
        .ok_or_else(|| anyhow!("no session: {log}"))?;
    assert!(
        connected.contains("features=[]") && connected.contains("chunked_contents=false"),
        "{connected}"
    );
    let sent = sets_sent(&hub, "v1-agent");
    if !sent
        .iter()
        .any(|l| l.contains("contents=1") && l.contains("chunked=0"))
    {
        bail!("the content did not go inline: {sent:?}");
    }
    assert!(!agent
        .proc
        .log_text()
        .contains("contents received in chunks"));
    agent.proc.stop();
    Ok(())
}

/// A v2 agent of a hub that speaks v1 (it ignores the features) takes the
/// contents inline.
#[test]
fn a_v2_agent_works_with_a_v1_hub() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, _] = shared_clusters();
    let dir = test_dir("chunked-v1-hub")?;
    let ns = "e2e-chunked-v1-hub";
    let hub = Hub::start_with(
        &dir.path().join("hub"),
        free_port(),
        free_port(),
        &["--protocol-v1-only"],
        &[],
    )?;
    let repo = GitRepo::new(dir.path(), "small")?;
    commit(&repo, &small_bundle(ns, "app"), "small")?;
    let mut agent = Agent::start(
        &hub,
        &hub.token()?,
        "v2-agent",
        "",
        east,
        &dir.path().join("east"),
    )?;
    hub.cli(&[
        "source", "add", "small", "--repo", &repo.url, "--path", "app", "--poll", "1s",
    ])?;
    hub.wait_bundle_state("small-app", "v2-agent", "Ready")
        .map_err(|e| e.context(agent.proc.log_text()))?;
    assert!(east.get("configmap", Some(ns), "small")?.is_some());
    let log = hub.proc.log_text();
    let connected = log
        .lines()
        .find(|l| l.contains("agent connected") && l.contains("cluster=v2-agent"))
        .ok_or_else(|| anyhow!("no session: {log}"))?;
    // The agent advertised the feature; the hub did not act on it.
    assert!(
        connected.contains("chunked-contents") && connected.contains("chunked_contents=false"),
        "{connected}"
    );
    let sent = sets_sent(&hub, "v2-agent");
    assert!(
        sent.iter()
            .any(|l| l.contains("contents=1") && l.contains("chunked=0")),
        "{sent:?}"
    );
    agent.proc.stop();
    Ok(())
}

/// ConfigMaps of the bundle the one-line change is made in.
const WIRE_OBJECTS: usize = 500;

/// One ConfigMap of the one-line-change bundle, about 540 bytes of YAML.
fn wire_config_map(ns: &str, i: usize, value: &str) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:03}\n  namespace: {ns}\ndata:\n  value: \"{value}\"\n"
    );
    for k in 0..8 {
        s.push_str(&format!(
            "  key{k}: \"some configuration value number {k} of cm-{i:03}\"\n"
        ));
    }
    s
}

/// Bytes the hub sends an agent, counted on the wire by a proxy between them,
/// for a one-line change in one ConfigMap of 500: with "object-deltas" about the
/// changed object and a constant (the signed set, the chunk's header, the
/// acknowledgements of the agent's statuses); with the agent before deltas
/// (`--protocol-v1-only`, inline and gzipped) the whole bundle again. A
/// restarted agent that holds the set resumes from it: the hub signs and sends
/// nothing.
#[test]
fn a_one_line_change_sends_the_changed_object_and_a_restart_resumes() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("chunked-wire")?;
    let ns = "e2e-wire";
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "wire")?;
    let mut files = BTreeMap::from([(
        "wire/0-ns.yaml".to_string(),
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
    )]);
    for i in 0..WIRE_OBJECTS {
        files.insert(format!("wire/cm-{i:03}.yaml"), wire_config_map(ns, i, "v1"));
    }
    let r1 = commit(&repo, &files, "500 ConfigMaps")?;
    let rt = tokio::runtime::Runtime::new()?;
    let port: u16 = hub
        .agent_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no port in {}", hub.agent_url))?;
    let delta_proxy = rt.block_on(flotilla_tests::counting::CountingProxy::start(port))?;
    let v1_proxy = rt.block_on(flotilla_tests::counting::CountingProxy::start(port))?;
    let mut agent = Agent::spawn(
        &format!("https://127.0.0.1:{}", delta_proxy.port),
        Some(&hub.token()?),
        "wire-v2",
        "wire=yes",
        &east.kubeconfig,
        &dir.path().join("v2"),
    )?;
    let mut old = Agent::spawn_with(
        &format!("https://127.0.0.1:{}", v1_proxy.port),
        Some(&hub.token()?),
        "wire-v1",
        "wire=yes",
        &west.kubeconfig,
        &dir.path().join("v1"),
        &["--protocol-v1-only"],
    )?;
    hub.cli(&[
        "source", "add", "wire", "--repo", &repo.url, "--path", "wire", "--target", "wire=yes",
        "--poll", "1s",
    ])?;
    let bundle = "wire-wire";
    let ready_at = |cluster: &str, revision: &str| -> Result<()> {
        wait_until(
            &format!("{bundle} Ready at {revision} on {cluster}"),
            DEADLINE,
            || {
                let b = hub.cli_json(&["bundle", "get", bundle])?;
                let ready = b["clusters"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["cluster"] == cluster
                            && c["state"] == "Ready"
                            && c["appliedRevision"] == revision
                    })
                });
                Ok(ready.then_some(()))
            },
        )
    };
    for (cluster, a) in [("wire-v2", &agent), ("wire-v1", &old)] {
        ready_at(cluster, &r1).map_err(|e| e.context(a.proc.log_text()))?;
    }
    let (v2_before, _) = delta_proxy.counts();
    let (v1_before, _) = v1_proxy.counts();
    let changed = wire_config_map(ns, 250, "v2");
    let r2 = commit(
        &repo,
        &BTreeMap::from([("wire/cm-250.yaml".to_string(), changed.clone())]),
        "one line",
    )?;
    for (cluster, a) in [("wire-v2", &agent), ("wire-v1", &old)] {
        ready_at(cluster, &r2).map_err(|e| e.context(a.proc.log_text()))?;
    }
    let cm = east
        .get("configmap", Some(ns), "cm-250")?
        .ok_or_else(|| anyhow!("cm-250 missing"))?;
    assert_eq!(cm["data"]["value"], "v2");
    let (v2_after, _) = delta_proxy.counts();
    let (v1_after, _) = v1_proxy.counts();
    let (delta_bytes, whole_bytes) = (v2_after - v2_before, v1_after - v1_before);
    let object = changed.len() as u64;
    eprintln!(
        "wire: one line changed in one ConfigMap of {WIRE_OBJECTS} ({object} bytes of YAML): hub -> \
         agent on the wire, object-deltas {delta_bytes} bytes, the agent before them \
         (inline, gzip) {whole_bytes} bytes"
    );
    let log = agent.proc.log_text();
    assert!(log.contains("contents rebuilt from deltas"), "{log}");
    // The stated bound: twice the object, plus 4 KiB for the signed set, the
    // chunk header and the acknowledgements of the agent's statuses.
    assert!(
        delta_bytes <= 2 * object + 4096,
        "{delta_bytes} bytes on the wire for a {object}-byte object"
    );
    assert!(
        delta_bytes * 4 < whole_bytes,
        "deltas {delta_bytes}, whole {whole_bytes}"
    );

    // Restarted, the agent holds the set it acknowledged: the session resumes.
    let sets_before = sets_sent(&hub, "wire-v2").len();
    let connects_before = connects(&hub, "wire-v2");
    agent.restart()?;
    wait_until("the restarted agent's session", DEADLINE, || {
        Ok((connects(&hub, "wire-v2") > connects_before).then_some(()))
    })?;
    wait_until("the hub to resume the session", DEADLINE, || {
        Ok(hub
            .proc
            .log_text()
            .lines()
            .any(|l| l.contains("resuming from it") && l.contains("cluster=wire-v2"))
            .then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    assert_eq!(
        sets_sent(&hub, "wire-v2").len(),
        sets_before,
        "a set was sent again"
    );
    ready_at("wire-v2", &r2)?;
    agent.proc.stop();
    old.proc.stop();
    Ok(())
}
