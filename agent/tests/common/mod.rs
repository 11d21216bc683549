//! What the agent's cluster tests share: a control plane (kube-testcluster) started
//! for the test binary, per-run namespaces, bundles rendered from YAML, and an agent
//! made of the real store, writer and reconciler on a fixed clock.
//!
//! Runs when `FLOTILLA_TESTENV_BIN` names the directory holding kube-testcluster
//! (or `FLOTILLA_TEST_KUBECONFIG` names a running cluster); skipped with a note
//! otherwise.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::apply::Cluster;
use flotilla_agent::clock::FixedClock;
use flotilla_agent::reconcile::Reconciler;
use flotilla_agent::store::{DesiredBundle, DesiredSet, Store};
use flotilla_agent::writer::Writer;
use flotilla_shared::bundle::{render_plain, Rendered};
use flotilla_shared::state::BundleState;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use prost::Message;

/// How long a condition a test waits for may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct TestCluster {
    pub kubeconfig: PathBuf,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A control plane on `port` (each test binary has its own), and a client for it.
pub async fn cluster(port: u16) -> Option<(TestCluster, kube::Client)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tc = if let Ok(kc) = std::env::var("FLOTILLA_TEST_KUBECONFIG") {
        TestCluster {
            kubeconfig: kc.into(),
            child: None,
            _dir: None,
        }
    } else if let Ok(bin) = std::env::var("FLOTILLA_TESTENV_BIN") {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(PathBuf::from(bin).join("kube-testcluster"))
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--port")
            .arg(port.to_string())
            .arg("--log-file")
            .arg(dir.path().join("log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kube-testcluster");
        TestCluster {
            kubeconfig: dir.path().join("kubeconfig"),
            child: Some(child),
            _dir: Some(dir),
        }
    } else {
        eprintln!("note: FLOTILLA_TESTENV_BIN unset; skipping the cluster test");
        return None;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if tc.kubeconfig.exists() {
            if let Ok(client) = flotilla_agent::kube_client(Some(&tc.kubeconfig)).await {
                if client.apiserver_version().await.is_ok() {
                    let ns: Api<Namespace> = Api::all(client.clone());
                    if ns.get_opt("default").await.ok().flatten().is_some() {
                        return Some((tc, client));
                    }
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "test cluster not ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Namespaces get a per-run suffix so the test can run again on the same cluster.
pub fn ns(base: &str) -> String {
    static SUFFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sfx = SUFFIX.get_or_init(|| format!("{:06x}", rand::random::<u32>() & 0xff_ffff));
    base.replacen("agt-", &format!("agt{sfx}-"), 1)
}

/// A bundle rendered from files; `agt-` in them becomes this run's prefix.
pub fn rendered(files: &[(&str, &str)]) -> Rendered {
    let files: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(p, c)| (p.to_string(), c.replace("agt-", &ns("agt-")).into_bytes()))
        .collect();
    render_plain(&files).unwrap()
}

/// `count` ConfigMaps `{prefix}-NNNN` (from `first` on) in `namespace`, as one YAML file.
pub fn config_maps(namespace: &str, prefix: &str, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {prefix}-{i:04}, namespace: {namespace}}}\ndata: {{i: \"{i}\"}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A Desired set made of (bundle name, rendered) pairs, with their contents.
pub fn desired(
    generation: u64,
    bundles: &[(&str, &Rendered)],
) -> (DesiredSet, Vec<(String, Vec<u8>)>) {
    let mut set = DesiredSet {
        generation,
        bundles: vec![],
        signed: None,
    };
    let mut contents = vec![];
    for (name, r) in bundles {
        let hash = r.content_hash();
        set.bundles.push(DesiredBundle {
            name: name.to_string(),
            content_hash: hash.clone(),
            revision: format!("rev{generation}"),
        });
        contents.push((
            hash.clone(),
            flotilla_proto::bundle_content(&hash, r).encode_to_vec(),
        ));
    }
    (set, contents)
}

/// The clock the test agents run on.
pub const NOW_MS: i64 = 1_750_000_000_000;

/// An agent in this process: its store, the writer, the reconciler, a fixed clock.
pub struct TestAgent {
    pub store: Store,
    pub writer: Writer,
    pub rec: Reconciler,
    pub clock: Arc<FixedClock>,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    pub fn new(client: &kube::Client) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), NOW_MS).unwrap();
        let (writer, _) = Writer::spawn(store.clone()).unwrap();
        let clock = FixedClock::new(NOW_MS);
        let rec = Reconciler::new(writer.clone(), Cluster::new(client.clone()), clock.clone());
        TestAgent {
            store,
            writer,
            rec,
            clock,
            _dir: dir,
        }
    }

    /// Stores a Desired set made of (bundle name, rendered) pairs.
    pub async fn set_desired(&self, generation: u64, bundles: &[(&str, &Rendered)]) {
        let (set, contents) = desired(generation, bundles);
        self.writer.save_desired(set, contents).await.unwrap();
    }

    /// A bundle's last durable status.
    pub async fn state_of(&self, bundle: &str) -> (BundleState, String) {
        self.writer.sync().await.unwrap();
        let s = self.store.last_status(bundle).unwrap().expect("a status");
        (s.state, s.message)
    }

    /// Waits until a bundle's last durable status is `want`.
    pub async fn wait_state(&self, bundle: &str, want: (BundleState, &str)) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            self.writer.sync().await.unwrap();
            let last = self.store.last_status(bundle).unwrap();
            if last
                .as_ref()
                .is_some_and(|s| (s.state, s.message.as_str()) == want)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{bundle}: want {want:?}, last recorded {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
