//! Manifests as the world writes them (`tests/corpus/`, vendored with their
//! licences): every input form `kubectl apply -f` takes is read as kubectl reads
//! it (checked against kubectl itself), and the corpus deploys unchanged through a
//! real hub and agent — kube-prometheus in two bundles, the second `dependsOn`
//! the first, ingress-nginx (whose admission Jobs Kubernetes deletes once
//! finished), cert-manager's CRDs and the prometheus Helm chart with its
//! subcharts vendored — with every object in the cluster and no drift, while `flotilla
//! render`'s output applied with kubectl to another cluster gives the same
//! objects as the agent applied. One cluster (`east`) for the agent, one
//! (`west`) for kubectl.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use flotilla_tests::*;
use serde_json::Value;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// `flotilla render DIR --bundle-name NAME` (offline): stdout, or the error.
fn render(dir: &Path, bundle: &str, extra: &[&str]) -> Result<String> {
    let out = Command::new(bin_dir().join("flotilla"))
        .arg("render")
        .arg(dir)
        .args(["--bundle-name", bundle])
        .args(extra)
        .env("FLOTILLA_HUB", "http://127.0.0.1:9")
        .env("FLOTILLA_HELM", testenv_dir().join("helm"))
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The objects of a YAML stream.
fn objects(text: &str) -> Result<Vec<Value>> {
    flotilla_shared::documents::objects("render output", text.as_bytes())
        .map_err(|e| anyhow!("{e}"))
}

/// An object as `kubectl -o name` names it: `kind.group/name`, lowercase kind.
fn kubectl_name(o: &Value) -> String {
    let api = o["apiVersion"].as_str().unwrap_or_default();
    let kind = o["kind"].as_str().unwrap_or_default().to_lowercase();
    let name = o["metadata"]["name"].as_str().unwrap_or_default();
    match api.split_once('/') {
        Some((group, _)) => format!("{kind}.{group}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

fn cm(name: &str) -> String {
    format!("{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"{name}\"}},\"data\":{{\"k\":\"v\"}}}}")
}

/// Each input form, checked against kubectl itself: a file `kubectl apply
/// --dry-run=server` takes gives the objects it names, in any order; a file it
/// refuses, Flotilla refuses too (duplicate keys excepted: kubectl keeps the last
/// value, Flotilla refuses the file and says why).
#[test]
fn every_input_form_is_read_as_kubectl_reads_it() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [_, west] = shared_clusters();
    let dir = test_dir("corpus-forms")?;
    let ns = "e2e-forms";
    west.kubectl(&["create", "namespace", ns])?;
    let rbac = "apiVersion: rbac.authorization.k8s.io/v1";
    let forms: Vec<(&str, &str, String)> = vec![
        (
            "multi-document YAML with empty documents",
            "multi.yaml",
            "# a comment\n---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n# only a comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n...\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: c}\n".into(),
        ),
        (
            "kind: List",
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: Secret, metadata: {name: b}}\n".into(),
        ),
        (
            "ConfigMapList",
            "cmlist.yaml",
            "apiVersion: v1\nkind: ConfigMapList\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: b}\n".into(),
        ),
        (
            "RoleList and RoleBindingList",
            "rbac.yaml",
            format!("{rbac}\nkind: RoleList\nitems:\n- {rbac}\n  kind: Role\n  metadata: {{name: r}}\n  rules: []\n---\n{rbac}\nkind: RoleBindingList\nitems:\n- {rbac}\n  kind: RoleBinding\n  metadata: {{name: r}}\n  roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: r}}\n  subjects: []\n"),
        ),
        (
            "a list of lists",
            "nested.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMapList\n  items:\n  - {apiVersion: v1, kind: ConfigMap, metadata: {name: inner}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: outer}}\n".into(),
        ),
        (
            "an empty list beside an object",
            "empty-list.yaml",
            "apiVersion: v1\nkind: List\nitems: []\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n".into(),
        ),
        (
            "a kind not ending in List, with items",
            "odd-list.yaml",
            "apiVersion: example.com/v1\nkind: Bag\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n".into(),
        ),
        ("a JSON object", "one.json", cm("a")),
        (
            "a JSON stream of objects",
            "stream.json",
            format!("{}\n{}\n", cm("a"), cm("b")),
        ),
        (
            "a JSON List",
            "list.json",
            format!("{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{},{}]}}", cm("a"), cm("b")),
        ),
        (
            "a JSON array of objects",
            "array.json",
            format!("[{},{}]", cm("a"), cm("b")),
        ),
        (
            "one JSON object, then YAML",
            "json-in.yaml",
            format!("{}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: b}}\n", cm("a")),
        ),
        (
            "two JSON objects, then YAML",
            "json-json-yaml.yaml",
            format!("{}\n{}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n", cm("a"), cm("b")),
        ),
        (
            "a YAML flow mapping",
            "flow.yaml",
            "{apiVersion: v1, kind: ConfigMap, metadata: {name: f}}\n".into(),
        ),
        (
            "a list with null items",
            "null-items.yaml",
            "apiVersion: v1\nkind: List\nitems: null\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n".into(),
        ),
        (
            "a YAML sequence of objects",
            "seq.yaml",
            "- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n".into(),
        ),
        (
            "a list whose items are not a list",
            "bad-items.yaml",
            "apiVersion: v1\nkind: List\nitems: {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n".into(),
        ),
        (
            "an object without a name",
            "noname.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n".into(),
        ),
    ];
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (what, file, text) in &forms {
        let case = dir.path().join(file.replace('.', "-"));
        std::fs::create_dir_all(&case)?;
        std::fs::write(case.join(file), text)?;
        let path = case.join(file);
        let kubectl = west.kubectl(&[
            "apply",
            "--dry-run=server",
            "-o",
            "name",
            "-n",
            ns,
            "-f",
            path.to_str().unwrap(),
        ]);
        let ours = render(&case, "forms", &[]).and_then(|t| objects(&t));
        let kubectl: Result<BTreeSet<String>> = kubectl.map(|out| {
            out.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        });
        let ours: Result<BTreeSet<String>> = ours.map(|os| os.iter().map(kubectl_name).collect());
        report.push(format!(
            "{what}: kubectl {:?}, flotilla {:?}",
            kubectl.as_ref().map_err(|e| e.to_string()),
            ours.as_ref().map_err(|e| e.to_string())
        ));
        match (&kubectl, &ours) {
            (Ok(k), Ok(o)) if k == o => {}
            (Err(_), Err(_)) => {}
            _ => failures.push(report.last().cloned().unwrap_or_default()),
        }
    }
    eprintln!("{}", report.join("\n"));
    ensure!(
        failures.is_empty(),
        "forms read unlike kubectl:\n{}",
        failures.join("\n")
    );

    // Duplicate keys: kubectl keeps the last value; Flotilla refuses, saying so.
    let case = dir.path().join("dup");
    std::fs::create_dir_all(&case)?;
    std::fs::write(
        case.join("dup.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dup\ndata:\n  mode: one\n  mode: two\n",
    )?;
    west.kubectl(&[
        "apply",
        "--dry-run=server",
        "-n",
        ns,
        "-f",
        case.join("dup.yaml").to_str().unwrap(),
    ])?;
    let e = render(&case, "dup", &[]).unwrap_err().to_string();
    ensure!(
        e.contains(
            "dup.yaml:7: duplicate key \"mode\" in a mapping; Kubernetes would keep the last value"
        ),
        "{e}"
    );
    Ok(())
}

/// A repository of the corpus as a user lays it out: kube-prometheus's `setup/`
/// and the rest as two bundles (the second `dependsOn` the first), ingress-nginx,
/// cert-manager's CRDs and the prometheus chart (its subcharts under `charts/`),
/// every vendored file unchanged beside a `fleet.yaml`.
fn corpus_repo(root: &Path) -> Result<GitRepo> {
    let repo = GitRepo::new(root, "corpus")?;
    let copy = |from: &Path, to: &Path| -> Result<()> {
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if e.file_type()?.is_file() && (name.ends_with(".yaml") || name.ends_with(".json")) {
                std::fs::create_dir_all(to)?;
                std::fs::copy(e.path(), to.join(&name))?;
            }
        }
        Ok(())
    };
    let c = corpus_dir();
    copy(
        &c.join("kube-prometheus/manifests"),
        &repo.dir.join("kube-prometheus"),
    )?;
    copy(
        &c.join("kube-prometheus/manifests/setup"),
        &repo.dir.join("kube-prometheus/setup"),
    )?;
    // ingress-nginx's admission Jobs (`ttlSecondsAfterFinished: 0`) are deleted
    // by the TTL controller once finished: collected as they ask, not drift.
    copy(&c.join("ingress-nginx"), &repo.dir.join("ingress-nginx"))?;
    copy(
        &c.join("cert-manager-crds"),
        &repo.dir.join("cert-manager-crds"),
    )?;
    // The prometheus chart with its four subcharts vendored under `charts/`: the
    // hub's helm renders it with no network.
    copy_tree(
        &c.join("prometheus-chart/prometheus"),
        &repo.dir.join("prometheus-chart"),
    )?;
    repo.commit(
        &BTreeMap::from([
            ("kube-prometheus/setup/fleet.yaml", Some("{}\n")),
            (
                "kube-prometheus/fleet.yaml",
                Some("dependsOn:\n- name: corpus-kube-prometheus-setup\n"),
            ),
            ("cert-manager-crds/fleet.yaml", Some("{}\n")),
            ("ingress-nginx/fleet.yaml", Some("{}\n")),
            ("prometheus-chart/fleet.yaml", Some(PROMETHEUS_FLEET)),
        ]),
        "the corpus, unchanged",
    )?;
    Ok(repo)
}

/// The prometheus chart's bundle: a release in its own namespace, without the
/// persistent volumes no test cluster provisions, and node-exporter on another
/// host port than kube-prometheus's, which runs on the same nodes (its only values).
const PROMETHEUS_FLEET: &str = "defaultNamespace: prometheus\nhelm:\n  releaseName: prometheus\n  values:\n    server:\n      persistentVolume: {enabled: false}\n    alertmanager:\n      persistence: {enabled: false}\n    prometheus-node-exporter:\n      service: {port: 9110}\n";

/// Copies a directory tree, every file unchanged.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// Where a case's directory is in the repository.
fn bundle_dir(repo: &GitRepo, _root: &Path, path: &str) -> PathBuf {
    repo.dir.join(path)
}

/// A Job that asks Kubernetes to delete it once finished: it may be gone.
fn collectable(o: &Value) -> bool {
    o["kind"] == "Job" && !o["spec"]["ttlSecondsAfterFinished"].is_null()
}

const BUNDLES: [(&str, &str); 5] = [
    ("corpus-kube-prometheus-setup", "kube-prometheus/setup"),
    ("corpus-kube-prometheus", "kube-prometheus"),
    ("corpus-ingress-nginx", "ingress-nginx"),
    ("corpus-cert-manager-crds", "cert-manager-crds"),
    ("corpus-prometheus-chart", "prometheus-chart"),
];

/// `kind.group`, as kubectl takes it.
fn kind_group(o: &Value) -> String {
    let api = o["apiVersion"].as_str().unwrap_or_default();
    let kind = o["kind"].as_str().unwrap_or_default().to_lowercase();
    match api.split_once('/') {
        Some((g, _)) => format!("{kind}.{g}"),
        None => kind,
    }
}

/// The objects a cluster holds with a bundle's label, by kubectl name, as JSON.
fn labelled(
    cluster: &TestCluster,
    bundle: &str,
    kinds: &BTreeSet<String>,
) -> Result<BTreeMap<String, Value>> {
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    let out = cluster.kubectl(&[
        "get",
        &kinds.join(","),
        "-A",
        "-l",
        &format!("flotilla.io/bundle={bundle}"),
        "-o",
        "json",
    ])?;
    let v: Value = serde_json::from_str(&out)?;
    let mut found = BTreeMap::new();
    for item in v["items"].as_array().cloned().unwrap_or_default() {
        let ns = item["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        found.insert(format!("{ns}:{}", kubectl_name(&item)), item);
    }
    Ok(found)
}

/// What an object's applied fields hold in a live object: the value at each leaf
/// path of `applied`.
fn at_paths(applied: &Value, live: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match applied {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                at_paths(v, &live[k.as_str()], &format!("{prefix}/{k}"), out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                at_paths(
                    v,
                    live.get(i).unwrap_or(&Value::Null),
                    &format!("{prefix}/{i}"),
                    out,
                );
            }
        }
        _ => out.push((prefix.to_string(), live.clone())),
    }
}

/// The corpus through a real hub and agent on `east`: every object the render
/// names is in the cluster with its bundle label (ingress-nginx's admission Jobs
/// until Kubernetes deletes them once finished); the setup bundle is `Ready`
/// before the rest is sent; the Helm chart renders objects of each of its
/// subcharts; nothing drifts once the controllers settled. The same directories
/// rendered by `flotilla render` and applied with kubectl on `west` give the same
/// objects, holding the same values at every applied path. `render
/// --diff-against` shows nothing for unchanged directories, a changed field
/// alone, and a changed Secret value only as hashes.
#[test]
fn the_corpus_deploys_unchanged_and_render_prints_what_the_agent_applies() -> Result<()> {
    if !e2e_available() {
        return Ok(());
    }
    let [east, west] = shared_clusters();
    let dir = test_dir("corpus-deploy")?;
    let repo = corpus_repo(dir.path())?;

    // What render prints, per bundle, timed.
    let mut rendered: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (bundle, path) in BUNDLES {
        let t = Instant::now();
        let text = render(&bundle_dir(&repo, dir.path(), path), bundle, &[])?;
        let objs = objects(&text)?;
        eprintln!(
            "render {bundle}: {} objects, {} bytes of YAML in {:?}",
            objs.len(),
            text.len(),
            t.elapsed()
        );
        for o in &objs {
            ensure!(
                o["metadata"]["labels"]["flotilla.io/bundle"] == bundle,
                "render of {bundle} prints an object without the bundle label: {}",
                kubectl_name(o)
            );
        }
        rendered.insert(bundle, objs);
    }
    ensure!(
        rendered["corpus-kube-prometheus"].len() > 90,
        "kube-prometheus renders {}",
        rendered["corpus-kube-prometheus"].len()
    );
    // The chart and each of its four subcharts bring objects.
    let charts: BTreeSet<&str> = rendered["corpus-prometheus-chart"]
        .iter()
        .filter_map(|o| o["metadata"]["labels"]["helm.sh/chart"].as_str())
        .map(|c| c.rsplit_once('-').map_or(c, |(n, _)| n))
        .collect();
    ensure!(
        charts
            == BTreeSet::from([
                "prometheus",
                "alertmanager",
                "kube-state-metrics",
                "prometheus-node-exporter",
                "prometheus-pushgateway"
            ]),
        "the chart renders objects of {charts:?}"
    );

    // The same, applied with kubectl on west, bundle after bundle.
    for (bundle, path) in BUNDLES {
        let text = render(&bundle_dir(&repo, dir.path(), path), bundle, &[])?;
        if bundle == "corpus-prometheus-chart" {
            // The agent creates a bundle's `defaultNamespace`; kubectl does not.
            west.kubectl(&["create", "namespace", "prometheus"])?;
        }
        west.kubectl_stdin(
            &[
                "apply",
                "--server-side",
                "--field-manager=flotilla",
                "--force-conflicts",
                "-f",
                "-",
            ],
            &text,
        )
        .with_context(|| format!("kubectl apply of the render of {bundle}"))?;
        if bundle == "corpus-kube-prometheus-setup" || bundle == "corpus-cert-manager-crds" {
            west.kubectl(&[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ])?;
        }
    }

    // Through the hub and agent on east.
    let hub = Hub::start(&dir.path().join("hub"))?;
    let _agent = Agent::start(
        &hub,
        &hub.token()?,
        "corpus-east",
        "",
        east,
        &dir.path().join("agent"),
    )?;
    hub.cli(&[
        "source", "add", "corpus", "--repo", &repo.url, "--poll", "2s",
    ])?;
    hub.wait_bundle_state("corpus-kube-prometheus-setup", "corpus-east", "Ready")?;
    hub.wait_bundle_state("corpus-cert-manager-crds", "corpus-east", "Ready")?;
    // ingress-nginx: its LoadBalancer Service is Current with a cluster IP (as
    // kstatus), its admission Jobs run, finish and are deleted by Kubernetes.
    hub.wait_bundle_state("corpus-ingress-nginx", "corpus-east", "Ready")?;
    hub.wait_bundle_state("corpus-prometheus-chart", "corpus-east", "Ready")?;
    wait_until(
        "ingress-nginx's admission Jobs collected on east",
        Duration::from_secs(60),
        || {
            let left = labelled(
                east,
                "corpus-ingress-nginx",
                &BTreeSet::from(["job.batch".to_string()]),
            )?;
            Ok(left.is_empty().then_some(()))
        },
    )?;
    // kube-prometheus: its objects healthy, but for the metrics APIService,
    // which no real prometheus-adapter serves behind simulated nodes.
    let state = wait_until(
        "kube-prometheus applied and settled",
        Duration::from_secs(180),
        || {
            Ok(
                match hub.bundle_state("corpus-kube-prometheus", "corpus-east")? {
                    Some((s, m)) if s == "Ready" => Some((s, m)),
                    Some((s, m))
                        if s == "NotReady"
                            && m.starts_with("APIService v1beta1.metrics.k8s.io")
                            && !m.contains(';') =>
                    {
                        Some((s, m))
                    }
                    Some((s, m)) if s.starts_with("Err") || s == "Modified" => bail!("{s}: {m}"),
                    _ => None,
                },
            )
        },
    )?;
    eprintln!("kube-prometheus on east: {state:?}");

    // Every object is there, in both clusters, and both hold the same values at
    // every path the render sets (which includes the bundle label and namespaces).
    // Jobs that ask to be deleted once finished (ingress-nginx's two) may be gone.
    let key_of = |o: &Value| {
        format!(
            "{}:{}",
            o["metadata"]["namespace"].as_str().unwrap_or_default(),
            kubectl_name(o)
        )
    };
    for (bundle, objs) in &rendered {
        let kinds: BTreeSet<String> = objs.iter().map(kind_group).collect();
        let want: BTreeSet<String> = objs.iter().map(key_of).collect();
        let lasting: BTreeSet<String> = objs
            .iter()
            .filter(|o| !collectable(o))
            .map(key_of)
            .collect();
        let on_east = labelled(east, bundle, &kinds)?;
        let on_west = labelled(west, bundle, &kinds)?;
        let east_names: BTreeSet<String> = on_east.keys().cloned().collect();
        let west_names: BTreeSet<String> = on_west.keys().cloned().collect();
        ensure!(
            east_names.is_subset(&want) && lasting.is_subset(&east_names),
            "{bundle}: the agent applied {:?} beyond the render, and not {:?}",
            east_names.difference(&want).collect::<Vec<_>>(),
            lasting.difference(&east_names).collect::<Vec<_>>()
        );
        ensure!(
            west_names.is_subset(&want) && lasting.is_subset(&west_names),
            "{bundle}: kubectl applied other objects than the render names"
        );
        let mut differ = Vec::new();
        let mut compared = 0;
        for o in objs {
            let key = key_of(o);
            if !(on_east.contains_key(&key) && on_west.contains_key(&key)) {
                continue;
            }
            compared += 1;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            at_paths(o, &on_east[&key], "", &mut a);
            at_paths(o, &on_west[&key], "", &mut b);
            for ((p, x), (_, y)) in a.iter().zip(&b) {
                if x != y {
                    differ.push(format!("{key} {p}: agent {x}, kubectl {y}"));
                }
            }
        }
        ensure!(differ.is_empty(), "{bundle}: {}", differ.join("\n"));
        eprintln!(
            "{bundle}: {} objects, {compared} in both clusters and the same there",
            objs.len()
        );
    }

    // No drift: every object gets a new version (an annotation), which the agent
    // compares with what it applied; a sentinel change then shows that the
    // comparisons ran, and it is the only event.
    for (bundle, _) in BUNDLES {
        for kind in [
            "all",
            "configmaps",
            "secrets",
            "serviceaccounts",
            "roles",
            "rolebindings",
            "networkpolicies",
            "poddisruptionbudgets",
            "clusterroles",
            "clusterrolebindings",
            "customresourcedefinitions",
            "ingressclasses",
            "validatingwebhookconfigurations",
            "prometheuses",
            "alertmanagers",
            "servicemonitors",
            "prometheusrules",
        ] {
            let _ = east.kubectl(&[
                "annotate",
                kind,
                "-A",
                "-l",
                &format!("flotilla.io/bundle={bundle}"),
                "example.com/touched=yes",
                "--overwrite",
            ]);
        }
    }
    east.kubectl(&[
        "patch",
        "-n",
        "monitoring",
        "configmap/adapter-config",
        "--type=merge",
        "-p",
        r#"{"data":{"config.yaml":"sentinel"}}"#,
    ])?;
    let events = wait_until(
        "the sentinel's drift event",
        Duration::from_secs(60),
        || {
            let v = hub.cli_json(&["drift", "list"])?;
            let list = v.as_array().cloned().unwrap_or_default();
            Ok(list
                .iter()
                .any(|e| e["object"]["name"] == "adapter-config")
                .then_some(list))
        },
    )?;
    let others: Vec<String> = events
        .iter()
        .filter(|e| e["object"]["name"] != "adapter-config")
        .map(|e| e.to_string())
        .collect();
    ensure!(others.is_empty(), "false drift: {}", others.join("\n"));

    // `render --diff-against`: nothing changes for what the cluster holds; a
    // change in the directory shows as that field alone.
    let out = hub.cli(&[
        "render",
        repo.dir.join("cert-manager-crds").to_str().unwrap(),
        "--bundle-name",
        "corpus-cert-manager-crds",
        "--diff-against",
        "corpus-east",
    ])?;
    ensure!(out.is_empty(), "diff of an unchanged bundle: {out}");
    let prom = repo.dir.join("kube-prometheus/prometheus-prometheus.yaml");
    let text = std::fs::read_to_string(&prom)?;
    std::fs::write(&prom, text.replace("  replicas: 2\n", "  replicas: 3\n"))?;
    let out = hub.cli(&[
        "render",
        repo.dir.join("kube-prometheus").to_str().unwrap(),
        "--bundle-name",
        "corpus-kube-prometheus",
        "--diff-against",
        "corpus-east",
    ])?;
    ensure!(
        out == "~ Prometheus monitoring/k8s\n    /spec/replicas: 2 -> 3\n",
        "{out}"
    );
    std::fs::write(&prom, text)?;
    // Secret values never show: kube-prometheus's grafana config is a Secret.
    let out = hub.cli(&[
        "render",
        repo.dir.join("kube-prometheus").to_str().unwrap(),
        "--bundle-name",
        "corpus-kube-prometheus",
        "--diff-against",
        "corpus-east",
    ])?;
    ensure!(
        out.is_empty(),
        "diff of an unchanged kube-prometheus: {out}"
    );
    std::fs::write(
        repo.dir.join("kube-prometheus/grafana-config.yaml"),
        std::fs::read_to_string(
            corpus_dir().join("kube-prometheus/manifests/grafana-config.yaml"),
        )?
        .replace(
            "[date_formats]",
            "[date_formats]\n    full_date = MMM Do, YYYY",
        ),
    )?;
    let out = hub.cli(&[
        "render",
        repo.dir.join("kube-prometheus").to_str().unwrap(),
        "--bundle-name",
        "corpus-kube-prometheus",
        "--diff-against",
        "corpus-east",
    ])?;
    ensure!(
        out.starts_with("~ Secret monitoring/grafana-config\n")
            && out.contains("redacted:sha256:")
            && !out.contains("date_formats"),
        "{out}"
    );
    Ok(())
}

/// Budgets, end to end through `flotilla render`: a file of 5,000 documents
/// renders (timed); a 200 MB file and a billion laughs are refused, naming the
/// file, the budget and its limit.
#[test]
fn budgets_protect_without_refusing_real_files() -> Result<()> {
    if !bin_dir().join("flotilla").exists() {
        assert!(
            std::env::var("FLOTILLA_REQUIRE_E2E").is_err(),
            "no flotilla binary"
        );
        return Ok(());
    }
    let dir = test_dir("corpus-budgets")?;
    let many = dir.path().join("many");
    std::fs::create_dir_all(&many)?;
    let mut text = String::new();
    for i in 0..5_000 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\n  labels: {{app: many}}\ndata:\n  index: \"{i}\"\n  note: generated by a template\n"
        ));
    }
    std::fs::write(many.join("all.yaml"), &text)?;
    let t = Instant::now();
    let out = render(&many, "many", &[])?;
    let took = t.elapsed();
    let objs = objects(&out)?;
    ensure!(objs.len() == 5_000, "{} objects", objs.len());
    eprintln!(
        "5,000 documents ({} bytes) rendered in {took:?}",
        text.len()
    );

    let big = dir.path().join("big");
    std::fs::create_dir_all(&big)?;
    let f = std::fs::File::create(big.join("huge.yaml"))?;
    f.set_len(200 * 1000 * 1000)?;
    let e = render(&big, "big", &[]).unwrap_err().to_string();
    ensure!(
        e.contains("huge.yaml: the file is 200000000 bytes, over the byte budget of 33554432 bytes (32 MiB) per manifest file"),
        "{e}"
    );

    let lol = dir.path().join("lol");
    std::fs::create_dir_all(&lol)?;
    let mut text = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: lol}\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let p = i - 1;
        text.push_str(&format!(
            "l{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
        ));
    }
    std::fs::write(lol.join("lol.yaml"), &text)?;
    let t = Instant::now();
    let e = render(&lol, "lol", &[]).unwrap_err().to_string();
    ensure!(
        e.contains("lol.yaml") && e.contains("over the node budget of 2000000 nodes per file"),
        "{e}"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(20),
        "refused after {:?}",
        t.elapsed()
    );
    Ok(())
}
