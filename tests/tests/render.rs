//! Rendering, end to end: a Kustomize bundle and a Helm bundle with target
//! customisations reach two real clusters, each with its own result; a label
//! change moves a cluster to another customisation's content.

use std::collections::BTreeMap;

use anyhow::Result;
use flotilla_tests::*;

fn files<'a>(list: &[(&'a str, Option<&'a str>)]) -> BTreeMap<&'a str, Option<&'a str>> {
    list.iter().cloned().collect()
}

/// A ConfigMap's `data[key]`, waiting until it equals `want`.
fn wait_data(c: &TestCluster, ns: &str, name: &str, key: &str, want: &str) -> Result<()> {
    wait_until(
        &format!("configmap {ns}/{name} {key}={want} in {}", c.name),
        DEADLINE,
        || {
            let v = c
                .get("configmap", Some(ns), name)?
                .map(|cm| cm["data"][key].as_str().unwrap_or_default().to_string());
            Ok((v.as_deref() == Some(want)).then_some(()))
        },
    )
}

// The namespace is created by the agent because it is the bundle's
// defaultNamespace (as in Fleet); kustomize's own `namespace:` creates nothing.
const KUSTOMIZE_FLEET: &str = "\
defaultNamespace: e2e-render-k
kustomize: {dir: overlays/dev}
targetCustomizations:
- name: prod
  clusterSelector: {matchLabels: {env: prod}}
  kustomize: {dir: overlays/prod}
";
const KUSTOMIZE_BASE: &str = "resources: [cm.yaml]\n";
const KUSTOMIZE_CM: &str =
    "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kapp}\ndata: {tier: base}\n";
const KUSTOMIZE_DEV: &str = "\
namespace: e2e-render-k
resources: [../../base]
patches:
- patch: |-
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: kapp}
    data: {tier: dev}
";
const KUSTOMIZE_PROD: &str = "\
namespace: e2e-render-k
resources: [../../base]
patches:
- patch: |-
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: kapp}
    data: {tier: prod}
";

const HELM_FLEET: &str = "\
defaultNamespace: e2e-render-h
helm:
  releaseName: happ
  values: {size: small}
targetCustomizations:
- name: prod
  clusterSelector: {matchLabels: {env: prod}}
  helm: {values: {size: large}}
";
const CHART: &str = "apiVersion: v2\nname: happ\nversion: 0.1.0\n";
const TEMPLATE: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  size: {{ .Values.size | quote }}\n  release: {{ .Release.Namespace | quote }}\n";

/// A release name that is a flag (helm would run the program).
const EVIL_HELM: &str = "helm: {releaseName: '--post-renderer=/usr/bin/tac'}\n";
/// A resource kustomize would fetch.
const EVIL_KUSTOMIZE: &str = "resources: ['http://127.0.0.1:9/x.yaml']\n";

#[test]
fn kustomize_and_helm_render_per_cluster() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    if !testenv_dir().join("helm").exists() || !testenv_dir().join("kustomize").exists() {
        assert!(
            std::env::var("FLOTILLA_REQUIRE_E2E").as_deref() != Ok("1"),
            "helm/kustomize missing in {} (run `make testenv`)",
            testenv_dir().display()
        );
        eprintln!("skipping: helm/kustomize not built (run `make testenv`)");
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("render")?;
    let hub = Hub::start(&dir.path().join("hub"))?;
    let repo = GitRepo::new(dir.path(), "rendered")?;
    repo.commit(
        &files(&[
            ("kapp/fleet.yaml", Some(KUSTOMIZE_FLEET)),
            ("kapp/base/kustomization.yaml", Some(KUSTOMIZE_BASE)),
            ("kapp/base/cm.yaml", Some(KUSTOMIZE_CM)),
            ("kapp/overlays/dev/kustomization.yaml", Some(KUSTOMIZE_DEV)),
            (
                "kapp/overlays/prod/kustomization.yaml",
                Some(KUSTOMIZE_PROD),
            ),
            ("happ/fleet.yaml", Some(HELM_FLEET)),
            ("happ/Chart.yaml", Some(CHART)),
            ("happ/templates/cm.yaml", Some(TEMPLATE)),
            // Hostile bundles in the same source: refused, the others go on.
            ("evil/fleet.yaml", Some(EVIL_HELM)),
            ("evil/Chart.yaml", Some(CHART)),
            ("evil/templates/cm.yaml", Some(TEMPLATE)),
            ("kevil/fleet.yaml", Some("")),
            ("kevil/kustomization.yaml", Some(EVIL_KUSTOMIZE)),
        ]),
        "kustomize and helm bundles",
    )?;
    let _east_agent = Agent::start(
        &hub,
        &hub.token()?,
        "render-east",
        "env=prod",
        east,
        &dir.path().join("east"),
    )?;
    let _west_agent = Agent::start(
        &hub,
        &hub.token()?,
        "render-west",
        "env=dev",
        west,
        &dir.path().join("west"),
    )?;
    hub.cli(&[
        "source", "add", "rendered", "--repo", &repo.url, "--poll", "1s",
    ])?;

    for (bundle, cluster) in [
        ("rendered-kapp", "render-east"),
        ("rendered-kapp", "render-west"),
        ("rendered-happ", "render-east"),
        ("rendered-happ", "render-west"),
    ] {
        hub.wait_bundle_state(bundle, cluster, "Ready")?;
    }
    // The hostile bundles are ErrApplied with the reason, on every cluster.
    for cluster in ["render-east", "render-west"] {
        let msg = hub.wait_bundle_state("rendered-evil", cluster, "ErrApplied")?;
        assert!(msg.contains("fleet.yaml: helm.releaseName"), "{msg}");
        let msg = hub.wait_bundle_state("rendered-kevil", cluster, "ErrApplied")?;
        assert!(msg.contains("kustomization.yaml: resources[0]"), "{msg}");
        assert!(msg.contains("is a URL"), "{msg}");
    }
    // Kustomize: each cluster its own overlay.
    wait_data(east, "e2e-render-k", "kapp", "tier", "prod")?;
    wait_data(west, "e2e-render-k", "kapp", "tier", "dev")?;
    // Helm: values per cluster, the release in the bundle's namespace.
    wait_data(east, "e2e-render-h", "happ", "size", "large")?;
    wait_data(west, "e2e-render-h", "happ", "size", "small")?;
    wait_data(west, "e2e-render-h", "happ", "release", "e2e-render-h")?;

    // Relabelling west to prod moves it to the prod customisation's content.
    hub.cli(&["cluster", "label", "render-west", "env=prod"])?;
    wait_data(west, "e2e-render-k", "kapp", "tier", "prod")?;
    wait_data(west, "e2e-render-h", "happ", "size", "large")?;

    // A render error is that bundle's ErrApplied with helm's message; the last
    // good content stays and the other bundle goes on.
    repo.commit(
        &files(&[(
            "happ/templates/cm.yaml",
            Some("{{ required \"size is required\" .Values.missing }}\n"),
        )]),
        "broken chart",
    )?;
    let msg = hub.wait_bundle_state("rendered-happ", "render-east", "ErrApplied")?;
    assert!(msg.contains("size is required"), "{msg}");
    wait_data(east, "e2e-render-h", "happ", "size", "large")?;
    Ok(())
}
