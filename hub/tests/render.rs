//! Data-driven render tests: each `tests/render/<case>/bundle/` is rendered for
//! every `tests/render/<case>/expected/<cluster>@<labels>.yaml` (labels as
//! `k=v,k2=v2`, possibly empty; `<cluster>~<version>` for a cluster of that
//! Kubernetes version, `<cluster>~<version>~<set>` for one that also serves the API
//! versions listed in `tests/render/<case>/api-versions/<set>`) and compared with that file. Cases that need helm
//! or kustomize take them from `FLOTILLA_TESTENV_BIN` (`make testenv`); without it
//! they are skipped with a note (failed under `FLOTILLA_REQUIRE_E2E=1`).
//! `FLOTILLA_BLESS=1` rewrites the expected files from the current output.

use std::path::{Path, PathBuf};

use flotilla_hub::render::{read_bundle_dir, render_for_cluster, to_yaml_stream, Tools};
use flotilla_shared::labels::parse_labels;
use flotilla_shared::targeting::ClusterInfo;

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/render")
}

/// Whether a bundle needs the external tools.
fn needs_tools(files: &std::collections::BTreeMap<String, Vec<u8>>) -> bool {
    files.iter().any(|(p, b)| {
        let name = p.rsplit('/').next().unwrap_or(p);
        name == "Chart.yaml"
            || name.starts_with("kustomization.")
            || (name == "fleet.yaml" || name == "flotilla.yaml")
                && String::from_utf8_lossy(b).contains("kustomize:")
    })
}

fn tools() -> Option<Tools> {
    let dir = std::env::var_os("FLOTILLA_TESTENV_BIN").map(PathBuf::from)?;
    Some(Tools::new(
        Some(dir.join("helm")),
        Some(dir.join("kustomize")),
    ))
}

#[tokio::test]
async fn render_cases() {
    let bless = std::env::var_os("FLOTILLA_BLESS").is_some();
    let require = std::env::var("FLOTILLA_REQUIRE_E2E").as_deref() == Ok("1");
    let tools = tools();
    if tools.is_none() && require {
        panic!("FLOTILLA_REQUIRE_E2E=1 but FLOTILLA_TESTENV_BIN is not set (run `make testenv`)");
    }
    let mut cases: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    let (mut checked, mut failures) = (0, Vec::new());
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let files = read_bundle_dir(&case.join("bundle")).unwrap();
        let tools = match (&tools, needs_tools(&files)) {
            (Some(t), _) => t.clone(),
            (None, false) => Tools::default(),
            (None, true) => {
                eprintln!("skipping render case {name}: needs helm/kustomize (set FLOTILLA_TESTENV_BIN, see `make testenv`)");
                continue;
            }
        };
        let mut expected: Vec<PathBuf> = std::fs::read_dir(case.join("expected"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        expected.sort();
        assert!(!expected.is_empty(), "case {name} has no expected output");
        for path in expected {
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            let (cluster, labels) = stem.split_once('@').expect("<cluster>@<labels>.yaml");
            // `<cluster>~<kubernetes version>`: a cluster of that version;
            // `<cluster>~<version>~<set>`: one that also serves the API versions
            // listed in the case's `api-versions/<set>` (one a line).
            let mut parts = cluster.split('~');
            let cluster = parts.next().unwrap();
            let kube_version = parts.next();
            let api_versions: Vec<String> = match parts.next() {
                Some(set) => std::fs::read_to_string(case.join("api-versions").join(set))
                    .unwrap()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect(),
                None => vec![],
            };
            let cluster = ClusterInfo {
                name: cluster.to_string(),
                labels: parse_labels(labels).unwrap(),
            };
            let got = match render_for_cluster(
                &tools,
                &name,
                &files,
                &cluster,
                &[],
                kube_version,
                &api_versions,
            )
            .await
            {
                Ok(Some(r)) => to_yaml_stream(&name, &r),
                Ok(None) => "# not deployed (doNotDeploy)\n".to_string(),
                Err(e) => format!("# error: {e}\n"),
            };
            checked += 1;
            if bless {
                std::fs::write(&path, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap();
            if got != want {
                failures.push(format!(
                    "{name}/{stem}: output differs\n--- expected ({})\n{want}\n--- got\n{got}",
                    path.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{checked} render expectations checked");
}

/// Two clusters of the same Kubernetes version but different API-version sets each
/// get the render for their own set (the hub's profile-pinned twins).
#[tokio::test]
async fn each_cluster_gets_the_render_for_its_own_api_set() {
    use flotilla_shared::capabilities::Profile;
    let Some(tools) = tools() else {
        assert!(
            std::env::var("FLOTILLA_REQUIRE_E2E").as_deref() != Ok("1"),
            "FLOTILLA_REQUIRE_E2E=1 but FLOTILLA_TESTENV_BIN is not set"
        );
        eprintln!("skipping: needs helm (set FLOTILLA_TESTENV_BIN)");
        return;
    };
    let files = read_bundle_dir(&cases_dir().join("helm-api-versions/bundle")).unwrap();
    let plain = Profile::new("v1.34.4", ["apps/v1"]);
    let prom = Profile::new("v1.34.4", ["apps/v1", "monitoring.coreos.com/v1"]);
    let r =
        flotilla_hub::render::render_bundle(&tools, "mon", &files, &[plain.clone(), prom.clone()])
            .await;
    let info = flotilla_shared::assign::BundleInfo {
        name: "mon".into(),
        source: String::new(),
        path: String::new(),
        good: None,
        render_error: None,
        targets: vec![],
        customizations: r.customizations.iter().map(|(c, _)| c.clone()).collect(),
        depends_on: vec![],
        labels: Default::default(),
    };
    for (profile, monitored) in [(plain, false), (prom, true), (Profile::default(), false)] {
        let cluster = ClusterInfo {
            name: "c".into(),
            labels: profile.labels(),
        };
        let pick = info.pick(&cluster, &[]).unwrap();
        let rendered = match pick.customization {
            Some(name) => r
                .customizations
                .iter()
                .find(|(c, _)| c.name == name)
                .unwrap()
                .1
                .clone(),
            None => r.default.clone(),
        }
        .unwrap();
        let has_monitor = rendered
            .manifests
            .iter()
            .any(|m| m.object["kind"] == "ServiceMonitor");
        assert_eq!(has_monitor, monitored, "{profile:?}");
    }
}
