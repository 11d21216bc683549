//! Crash safety of the batched apply. The real agent binary, offline (its hub is
//! unreachable, as during a hub outage), applies and prunes a 200-object bundle and
//! removes another, and is killed with SIGKILL at random moments: before it starts,
//! mid-apply, mid-prune, mid-removal, right after converging. After every kill the
//! store opens cleanly and every object carrying Flotilla's bundle label is in that
//! bundle's inventory, so it is pruned or re-owned later, never orphaned. At the end
//! the cluster converges: nothing of the desired bundles missing, nothing else
//! labelled, the bundle `Ready` in the store.
//!
//! `FLOTILLA_CRASH_KILLS` sets the number of kills (default 4; the torture suite
//! runs 100). Needs a test cluster, as `cluster.rs`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{cluster, config_maps, ns, rendered, DEADLINE, NOW_MS};
use flotilla_agent::enroll::{CA_FILE, CERT_FILE, KEY_FILE};
use flotilla_agent::store::{Store, DB_DIR};
use flotilla_shared::bundle::{ObjectRef, Rendered};
use flotilla_shared::state::BundleState;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, PostParams};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// Port for the control plane this test starts (the agent's range is 16500-16599).
const PORT: u16 = 16532;
/// Kills when `FLOTILLA_CRASH_KILLS` is unset: a few, for `make test`.
const DEFAULT_KILLS: usize = 4;
/// The bundle label.
const LABEL: &str = "flotilla.io/bundle";
/// How often the test looks at the cluster while the agent works.
const POLL: Duration = Duration::from_millis(10);

/// A certificate the agent accepts as its identity; the hub it names never answers.
fn identity(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "crash test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "crash");
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join(CA_FILE), ca.pem()).unwrap();
    std::fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
    std::fs::write(dir.join(KEY_FILE), key.serialize_pem()).unwrap();
}

/// The agent process, killed on drop.
struct AgentProc(Child);

impl AgentProc {
    fn start(state: &Path, kubeconfig: &Path, log: &Path) -> AgentProc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"))
            // Port 9 (discard) on loopback: nothing listens, so the agent is offline.
            .args(["--hub", "https://127.0.0.1:9", "--cluster-name", "crash"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--state-dir")
            .arg(state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start flotilla-agent");
        AgentProc(child)
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then waits for it to exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }

    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The bundles of variant `v`: `crash` holds a-0000..a-0199 and `extra` 20 more;
/// then `crash` holds a-0100..a-0299 (100 pruned, 100 new) and `extra` is removed.
fn variant(v: usize) -> Vec<(&'static str, Rendered)> {
    let cms = |prefix: &str, first, count| {
        rendered(&[("cms.yaml", &config_maps("agt-crash", prefix, first, count))])
    };
    if v.is_multiple_of(2) {
        vec![("crash", cms("a", 0, 200)), ("extra", cms("x", 0, 20))]
    } else {
        vec![("crash", cms("a", 100, 200))]
    }
}

/// (bundle, name) of every object of a variant.
fn expected(bundles: &[(&str, Rendered)]) -> BTreeSet<(String, String)> {
    bundles
        .iter()
        .flat_map(|(b, r)| {
            r.manifests
                .iter()
                .map(|m| (b.to_string(), m.object_ref().name))
        })
        .collect()
}

/// (bundle, name) of every ConfigMap in the cluster carrying the bundle label.
async fn labelled(client: &kube::Client) -> BTreeSet<(String, String)> {
    Api::<ConfigMap>::all(client.clone())
        .list_metadata(&ListParams::default().labels(LABEL))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| {
            let bundle = o.metadata.labels?.get(LABEL)?.clone();
            Some((bundle, o.metadata.name?))
        })
        .collect()
}

fn cm_ref(name: &str) -> ObjectRef {
    ObjectRef {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        namespace: Some(ns("agt-crash")),
        name: name.to_string(),
    }
}

/// Opens the store as the agent left it: cleanly, nothing moved aside.
fn open_store(state: &Path) -> Store {
    let store = Store::open(state, NOW_MS).expect("the store opens after a kill");
    let aside: Vec<String> = std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{DB_DIR}.")))
        .collect();
    assert!(aside.is_empty(), "the store was moved aside: {aside:?}");
    store
}

/// The crash guarantee: every labelled object is in its bundle's inventory.
fn assert_no_orphans(store: &Store, live: &BTreeSet<(String, String)>, log: &Path, when: &str) {
    for (bundle, name) in live {
        let inventory = store.inventory(bundle).unwrap().unwrap_or_default();
        assert!(
            inventory.contains(&cm_ref(name)),
            "{when}: ConfigMap {name} of bundle {bundle} exists but is in no inventory: \
             it would be orphaned\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_apply_and_prune_orphans_nothing() {
    let Some((tc, client)) = cluster(PORT).await else {
        return;
    };
    let kills: usize = std::env::var("FLOTILLA_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent");
    std::fs::create_dir_all(&state).unwrap();
    identity(&state);
    let log = dir.path().join("agent.log");
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns("agt-crash"));
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    let mut moments = Vec::new();
    for kill in 0..kills {
        let bundles = variant(kill);
        let target = expected(&bundles);
        {
            let store = open_store(&state);
            let pairs: Vec<(&str, &Rendered)> = bundles.iter().map(|(b, r)| (*b, r)).collect();
            let (set, contents) = common::desired(kill as u64 + 1, &pairs);
            store.save_desired(&set, &contents).unwrap();
            store.flush().unwrap();
        }
        // Kill once the cluster made a random share of the way to the target.
        let start = labelled(&client).await;
        let total = target.difference(&start).count() + start.difference(&target).count();
        let threshold = rand::random_range(0..=total);
        let mut agent = AgentProc::start(&state, &tc.kubeconfig, &log);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let now = labelled(&client).await;
            let done = target
                .difference(&start)
                .filter(|o| now.contains(*o))
                .count()
                + start
                    .difference(&target)
                    .filter(|o| !now.contains(*o))
                    .count();
            if done >= threshold {
                break;
            }
            assert!(
                agent.alive(),
                "the agent exited\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress: {done}/{total}"
            );
            tokio::time::sleep(POLL).await;
        }
        agent.kill9();
        moments.push(format!("{threshold}/{total}"));

        let store = open_store(&state);
        assert_eq!(
            store.desired().unwrap().map(|d| d.generation),
            Some(kill as u64 + 1),
            "the desired set survives"
        );
        assert_no_orphans(
            &store,
            &labelled(&client).await,
            &log,
            &format!("kill {kill} at {threshold}/{total}"),
        );
    }
    eprintln!("killed at (changes made/changes to make): {moments:?}");

    // The last variant again, to the end: the cluster converges.
    let bundles = variant(kills.saturating_sub(1));
    let target = expected(&bundles);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let readies = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("bundle=crash state=Ready")
            .count()
    };
    loop {
        let ready_before = readies(&log);
        let mut agent = AgentProc::start(&state, &tc.kubeconfig, &log);
        while labelled(&client).await != target {
            assert!(agent.alive(), "the agent exited");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster does not converge: {:?}",
                labelled(&client)
                    .await
                    .symmetric_difference(&target)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(POLL).await;
        }
        // Converged: give it the time to record its health before stopping it
        // (a loaded machine may take seconds), then look at what it recorded.
        while readies(&log) == ready_before && tokio::time::Instant::now() < deadline {
            assert!(agent.alive(), "the agent exited");
            tokio::time::sleep(POLL).await;
        }
        agent.stop();
        let store = open_store(&state);
        let live = labelled(&client).await;
        assert_eq!(live, target, "nothing missing, nothing orphaned");
        assert_no_orphans(&store, &live, &log, "converged");
        let desired = store.desired().unwrap().unwrap();
        let crash = desired.bundles.iter().find(|b| b.name == "crash").unwrap();
        let ready = store
            .last_status("crash")
            .unwrap()
            .is_some_and(|s| s.state == BundleState::Ready && s.content_hash == crash.content_hash);
        if ready {
            break;
        }
        // Stopped between converging and recording its state: start it again.
        assert!(tokio::time::Instant::now() < deadline, "never Ready");
    }
}
