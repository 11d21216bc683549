//! `flotilla.yaml` / Fleet's `fleet.yaml`: parsing, target customisations, and the
//! pure half of rendering — which tool renders a bundle for a customisation and with
//! what inputs (a [`RenderPlan`]), `yaml.overlays`, merged Helm values, bundle
//! labels, and reading a tool's output back into manifests.
//!
//! The hub runs the tools (`render/src/render.rs`); everything decided here is a
//! function of the bundle's files, so it is tested with fixtures.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bundle::{self, BundleOptions, Manifest, RenderError, CONFIG_FILES};
use crate::objects::Target;
use crate::rollout::{self, RolloutStrategy};
use crate::sandbox;
use crate::selector::LabelSelector;

/// The directory `yaml.overlays` names live in.
pub const OVERLAYS_DIR: &str = "overlays";
/// File names that make a directory a Kustomization, as kustomize accepts them.
pub const KUSTOMIZATION_FILES: [&str; 3] =
    ["kustomization.yaml", "kustomization.yml", "Kustomization"];
/// The file Helm's output is written to when Kustomize post-processes it (as Fleet
/// names it); it is added to the kustomization's `resources` if missing.
pub const HELM_OUTPUT_FILE: &str = "manifests.yaml";

/// `kustomize:` options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KustomizeOptions {
    #[serde(default)]
    pub dir: Option<String>,
}

/// `helm:` options (Fleet's names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelmOptions {
    #[serde(default)]
    pub chart: Option<String>,
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub release_name: Option<String>,
    #[serde(default)]
    pub values: Option<Value>,
    #[serde(default)]
    pub values_files: Vec<String>,
}

/// `yaml:` options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct YamlOptions {
    #[serde(default)]
    pub overlays: Vec<String>,
}

/// One entry of `targetCustomizations`: which clusters (every field set must hold)
/// and what changes for them. The first entry that matches a cluster wins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetCustomization {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub cluster_name: Option<String>,
    #[serde(default)]
    pub cluster_selector: Option<LabelSelector>,
    #[serde(default)]
    pub cluster_group: Option<String>,
    #[serde(default)]
    pub cluster_group_selector: Option<LabelSelector>,
    /// Fleet's `doNotDeploy`: matching clusters do not get the bundle at all.
    #[serde(default)]
    pub do_not_deploy: bool,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub default_namespace: Option<String>,
    /// Overrides the bundle's `takeOwnership` for matching clusters.
    #[serde(default)]
    pub take_ownership: Option<bool>,
    #[serde(default)]
    pub kustomize: Option<KustomizeOptions>,
    #[serde(default)]
    pub helm: Option<HelmOptions>,
    #[serde(default)]
    pub yaml: Option<YamlOptions>,
}

impl TargetCustomization {
    /// The clusters it applies to, as a target.
    pub fn target(&self) -> Target {
        Target {
            name: self.name.clone(),
            cluster_name: self.cluster_name.clone(),
            cluster_selector: self.cluster_selector.clone(),
            cluster_group: self.cluster_group.clone(),
            cluster_group_selector: self.cluster_group_selector.clone(),
        }
    }
}

/// A whole `flotilla.yaml` / `fleet.yaml`. Unknown fields are ignored so a Fleet
/// repository loads whatever else it says; `dependsOn` is kept for a later
/// feature. `rolloutStrategy` is checked when the file is parsed (unknown fields
/// inside it are errors) and read with [`BundleSpec::rollout`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleSpec {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub default_namespace: Option<String>,
    /// Fleet's `takeOwnership`: objects that already exist in the cluster without
    /// this bundle's label may be taken over (by default the bundle fails on them).
    #[serde(default)]
    pub take_ownership: bool,
    /// Added to every object of the bundle.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub kustomize: Option<KustomizeOptions>,
    #[serde(default)]
    pub helm: Option<HelmOptions>,
    #[serde(default)]
    pub yaml: Option<YamlOptions>,
    #[serde(default)]
    pub target_customizations: Vec<TargetCustomization>,
    #[serde(default)]
    pub depends_on: Vec<Value>,
    #[serde(default)]
    pub diff: Option<Value>,
    /// Flotilla's drift policy (`mode`, `ignore`); Fleet's `diff.comparePatches`
    /// add ignore rules.
    #[serde(default)]
    pub drift: Option<crate::drift::DriftConfig>,
    /// Fleet's `rolloutStrategy` with Flotilla's additions, as written; see
    /// [`BundleSpec::rollout`].
    #[serde(default)]
    pub rollout_strategy: Option<Value>,
    /// The file this was read from (`flotilla.yaml` or `fleet.yaml`), for errors.
    #[serde(skip)]
    pub config_file: Option<String>,
}

impl BundleSpec {
    /// The bundle's `rolloutStrategy`, validated (`None` when it has none: the
    /// hub then uses [`RolloutStrategy::default`]). The error names the file,
    /// `rolloutStrategy`, the field and the reason.
    pub fn rollout(&self) -> Result<Option<RolloutStrategy>, RenderError> {
        let Some(v) = &self.rollout_strategy else {
            return Ok(None);
        };
        let file = self.config_file.as_deref().unwrap_or(CONFIG_FILES[0]);
        rollout::parse_strategy(v)
            .map(Some)
            .map_err(|e| config_error(file, None, format!("rolloutStrategy: {e}")))
    }
}

fn config_error(file: &str, line: Option<u64>, reason: String) -> RenderError {
    RenderError {
        file: file.to_string(),
        line,
        object: None,
        reason,
    }
}

/// Parses the bundle's config file, if any (`flotilla.yaml` wins over `fleet.yaml`).
pub fn parse_spec(files: &BTreeMap<String, Vec<u8>>) -> Result<BundleSpec, RenderError> {
    for name in CONFIG_FILES {
        let Some(bytes) = files.get(name) else {
            continue;
        };
        let text =
            std::str::from_utf8(bytes).map_err(|_| config_error(name, None, "not UTF-8".into()))?;
        if text.trim().is_empty() {
            return Ok(BundleSpec::default());
        }
        let mut spec: BundleSpec = serde_saphyr::from_str(text).map_err(|e| {
            config_error(
                name,
                e.location().map(|l| l.line()),
                e.to_string().lines().next().unwrap_or_default().to_string(),
            )
        })?;
        for (i, c) in spec.target_customizations.iter().enumerate() {
            c.target()
                .validate()
                .map_err(|e| config_error(name, None, format!("targetCustomizations[{i}]: {e}")))?;
        }
        spec.config_file = Some(name.to_string());
        spec.rollout()?;
        return Ok(spec);
    }
    Ok(BundleSpec::default())
}

/// One way a bundle renders: the default (no customisation matched) or one
/// target customisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// "" for the default; else the customisation's name, or `#N` (its index).
    pub name: String,
    /// `None` for the default.
    pub customization: Option<TargetCustomization>,
}

impl Variant {
    /// Whether clusters of this variant get the bundle at all.
    pub fn deploys(&self) -> bool {
        !self.customization.as_ref().is_some_and(|c| c.do_not_deploy)
    }
}

/// The default variant, then one per target customisation, in order.
pub fn variants(spec: &BundleSpec) -> Vec<Variant> {
    let mut out = vec![Variant {
        name: String::new(),
        customization: None,
    }];
    for (i, c) in spec.target_customizations.iter().enumerate() {
        out.push(Variant {
            name: c
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("#{i}")),
            customization: Some(c.clone()),
        });
    }
    out
}

/// Which tool renders a variant, and with what.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Renderer {
    /// Every manifest file of the bundle (after overlays).
    Plain { overlays: Vec<String> },
    /// `kustomize build DIR`.
    Kustomize { dir: String },
    /// `helm template`, then `kustomize build` over its output when `kustomize_dir`.
    Helm(Box<HelmPlan>),
}

/// Everything `helm template` is run with.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HelmPlan {
    pub release_name: String,
    /// A directory of the bundle, or a chart name in `repo`, or an `oci://` URL.
    pub chart: String,
    pub repo: Option<String>,
    pub version: Option<String>,
    pub namespace: String,
    /// Bundle files, in order, passed with `-f` before `values`.
    pub values_files: Vec<String>,
    /// The bundle's `helm.values` with the customisation's merged over them.
    pub values: Value,
    pub kustomize_dir: Option<String>,
    /// `--kube-version`: the target clusters' Kubernetes version (set by the hub
    /// per version in the fleet; `None` leaves helm's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_version: Option<String>,
    /// `--api-versions`, one per entry: the target clusters' API versions (set by
    /// the hub with `kube_version`; empty leaves helm's defaults).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_versions: Vec<String>,
    /// The config file the plan came from, for errors (not part of the plan's key).
    #[serde(skip)]
    pub config_file: String,
}

impl HelmPlan {
    /// Where helm would fetch the chart from, if not from the bundle: the chart
    /// repository (`helm.repo`) or the chart's URL (`oci://`, an archive URL).
    pub fn remote(&self) -> Option<&str> {
        self.repo
            .as_deref()
            .or_else(|| self.chart.contains("://").then_some(self.chart.as_str()))
    }

    /// The arguments of `helm template` for this plan, the bundle copied to
    /// `root` and the merged values written to `values`. Every value comes as
    /// `--flag=value` and the release name and chart after `--`, so nothing from
    /// the repository (or an agent's reported versions) can become a flag; each is
    /// checked again here, and a remote chart must lie under one of the `allow`ed
    /// prefixes (`--helm-repo-allow`).
    pub fn template_args(
        &self,
        root: &str,
        values: &str,
        allow: &[String],
    ) -> Result<Vec<String>, RenderError> {
        let fail = |reason: String| config_error(&self.config_file, None, reason);
        sandbox::check_release_name(&self.release_name)
            .map_err(|e| fail(format!("helm.releaseName: {e}")))?;
        sandbox::check_namespace(&self.namespace).map_err(|e| fail(format!("namespace: {e}")))?;
        let mut args = vec![
            "template".to_string(),
            format!("--namespace={}", self.namespace),
            "--include-crds".to_string(),
        ];
        let chart = match self.remote() {
            Some(url) => {
                let field = if self.repo.is_some() {
                    "helm.repo"
                } else {
                    "helm.chart"
                };
                sandbox::check_allowed(url, allow).map_err(|e| fail(format!("{field}: {e}")))?;
                if let Some(repo) = &self.repo {
                    sandbox::check_chart_name(&self.chart)
                        .map_err(|e| fail(format!("helm.chart: {e}")))?;
                    args.push(format!("--repo={repo}"));
                }
                self.chart.clone()
            }
            None => {
                let chart =
                    local_path(&self.chart).map_err(|e| fail(format!("helm.chart: {e}")))?;
                if chart == "." {
                    root.to_string()
                } else {
                    format!("{root}/{chart}")
                }
            }
        };
        if let Some(v) = &self.version {
            sandbox::check_version(v).map_err(|e| fail(format!("helm.version: {e}")))?;
            args.push(format!("--version={v}"));
        }
        if let Some(v) = &self.kube_version {
            sandbox::check_kube_version(v)
                .map_err(|e| fail(format!("the clusters' Kubernetes version: {e}")))?;
            args.push(format!("--kube-version={v}"));
        }
        for a in &self.api_versions {
            sandbox::check_api_version(a)
                .map_err(|e| fail(format!("the clusters' API versions: {e}")))?;
            args.push(format!("--api-versions={a}"));
        }
        for f in &self.values_files {
            let f = local_path(f).map_err(|e| fail(format!("helm.valuesFiles: {e}")))?;
            args.push(format!("--values={root}/{f}"));
        }
        args.push(format!("--values={values}"));
        args.push("--".to_string());
        args.push(self.release_name.clone());
        args.push(chart);
        Ok(args)
    }
}

/// How one variant of a bundle is rendered. Equal plans give equal output, so the
/// hub renders each distinct plan once.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RenderPlan {
    pub renderer: Renderer,
    pub options: BundleOptions,
    pub labels: BTreeMap<String, String>,
}

impl RenderPlan {
    /// A stable key for caching renders of this plan.
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.trim().is_empty())
}

/// A bundle-relative directory, normalised ("" and "./" are "."); `..` may not
/// leave the bundle.
pub fn clean_dir(dir: &str) -> Result<String, String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in dir.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{dir:?} leaves the bundle directory"));
                }
            }
            p => parts.push(p),
        }
    }
    Ok(if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    })
}

/// A path of the bundle as `fleet.yaml` may name it (`helm.chart`,
/// `helm.valuesFiles`): relative, inside the bundle, no part starting with `-`.
pub fn local_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') {
        return Err(format!("{path:?} is an absolute path"));
    }
    if path.split('/').any(|p| p.starts_with('-')) {
        return Err(format!("{path:?} has a part starting with '-'"));
    }
    sandbox::bundle_path(".", path)
}

fn join(dir: &str, file: &str) -> String {
    if dir == "." {
        file.to_string()
    } else {
        format!("{dir}/{file}")
    }
}

/// Whether `dir` (bundle-relative, cleaned) holds a kustomization file.
pub fn has_kustomization(files: &BTreeMap<String, Vec<u8>>, dir: &str) -> bool {
    KUSTOMIZATION_FILES
        .iter()
        .any(|k| files.contains_key(&join(dir, k)))
}

fn uses_kustomize(spec: &BundleSpec, files: &BTreeMap<String, Vec<u8>>) -> bool {
    let dir_set =
        |k: &Option<KustomizeOptions>| k.as_ref().is_some_and(|k| non_empty(&k.dir).is_some());
    dir_set(&spec.kustomize)
        || spec
            .target_customizations
            .iter()
            .any(|c| dir_set(&c.kustomize))
        || files.keys().any(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            KUSTOMIZATION_FILES.contains(&name) && !f.starts_with("charts/")
        })
}

/// Deep merge of Helm values: maps merge key by key, anything else in `over` wins
/// (Helm's own rule for `-f` files).
pub fn merge_values(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_values(existing, v)
                    }
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The render plan of one variant of a bundle named `bundle_name`.
///
/// Type detection, as Fleet does it: a `helm` section with a chart or repo, or a
/// `Chart.yaml` at the root, means Helm; a `kustomize.dir` anywhere or a
/// kustomization file means Kustomize (after Helm when both); else plain YAML.
/// A customisation's fields replace the bundle's (`helm.values` merge over them).
pub fn plan(
    spec: &BundleSpec,
    variant: &Variant,
    files: &BTreeMap<String, Vec<u8>>,
    bundle_name: &str,
) -> Result<RenderPlan, RenderError> {
    let cfg = CONFIG_FILES
        .iter()
        .find(|f| files.contains_key(**f))
        .copied()
        .unwrap_or(CONFIG_FILES[0]);
    let err = |reason: String| {
        let reason = if variant.name.is_empty() {
            reason
        } else {
            format!("targetCustomization {}: {reason}", variant.name)
        };
        config_error(cfg, None, reason)
    };
    let custom = variant.customization.as_ref();
    let options = BundleOptions {
        default_namespace: custom
            .and_then(|c| non_empty(&c.default_namespace))
            .or_else(|| non_empty(&spec.default_namespace)),
        target_namespace: custom
            .and_then(|c| non_empty(&c.namespace))
            .or_else(|| non_empty(&spec.namespace)),
        drift: crate::drift::policy(spec.drift.as_ref(), spec.diff.as_ref()).map_err(&err)?,
        take_ownership: custom
            .and_then(|c| c.take_ownership)
            .unwrap_or(spec.take_ownership),
    };
    // Namespaces reach helm's command line and the agent: DNS labels only.
    if let Some(ns) = &options.target_namespace {
        sandbox::check_namespace(ns).map_err(|e| err(format!("namespace: {e}")))?;
    }
    if let Some(ns) = &options.default_namespace {
        sandbox::check_namespace(ns).map_err(|e| err(format!("defaultNamespace: {e}")))?;
    }

    let kustomize_dir = custom
        .and_then(|c| c.kustomize.as_ref())
        .and_then(|k| non_empty(&k.dir))
        .or_else(|| spec.kustomize.as_ref().and_then(|k| non_empty(&k.dir)))
        .map(|d| clean_dir(&d))
        .transpose()
        .map_err(|e| err(format!("kustomize.dir: {e}")))?;

    // Helm: the bundle's section with the customisation's fields over it.
    let base_helm = spec.helm.clone().unwrap_or_default();
    let over_helm = custom.and_then(|c| c.helm.clone()).unwrap_or_default();
    let pick = |o: &Option<String>, b: &Option<String>| non_empty(o).or_else(|| non_empty(b));
    let chart = pick(&over_helm.chart, &base_helm.chart);
    let repo = pick(&over_helm.repo, &base_helm.repo);
    let is_helm = chart.is_some() || repo.is_some() || files.contains_key("Chart.yaml");

    let renderer = if is_helm {
        // Everything below reaches helm's command line: checked as data.
        let chart = match (chart, &repo) {
            (Some(c), None) if !c.contains("://") => {
                local_path(&c).map_err(|e| err(format!("helm.chart: {e}")))?
            }
            (Some(c), None) => {
                sandbox::check_chart_url(&c).map_err(|e| err(format!("helm.chart: {e}")))?;
                c
            }
            (Some(c), Some(_)) => {
                sandbox::check_chart_name(&c).map_err(|e| err(format!("helm.chart: {e}")))?;
                c
            }
            (None, None) => ".".into(),
            (None, Some(_)) => {
                return Err(err("helm.repo needs helm.chart (the chart's name)".into()))
            }
        };
        if let Some(r) = &repo {
            sandbox::check_chart_url(r).map_err(|e| err(format!("helm.repo: {e}")))?;
        }
        let release_name = pick(&over_helm.release_name, &base_helm.release_name)
            .unwrap_or_else(|| bundle_name.to_string());
        sandbox::check_release_name(&release_name)
            .map_err(|e| err(format!("helm.releaseName: {e}")))?;
        let version = pick(&over_helm.version, &base_helm.version);
        if let Some(v) = &version {
            sandbox::check_version(v).map_err(|e| err(format!("helm.version: {e}")))?;
        }
        if repo.is_none()
            && !chart.contains("://")
            && !files.contains_key(&join(&chart, "Chart.yaml"))
        {
            return Err(err(format!("helm.chart: no Chart.yaml in {chart:?}")));
        }
        let mut values = base_helm
            .values
            .clone()
            .unwrap_or(Value::Object(Default::default()));
        if let Some(v) = &over_helm.values {
            merge_values(&mut values, v);
        }
        if !values.is_object() {
            return Err(err("helm.values must be a mapping".into()));
        }
        let mut values_files = Vec::new();
        for f in base_helm.values_files.iter().chain(&over_helm.values_files) {
            let clean = local_path(f).map_err(|e| err(format!("helm.valuesFiles: {e}")))?;
            if !files.contains_key(&clean) {
                return Err(err(format!(
                    "helm.valuesFiles: {f} not found in the bundle"
                )));
            }
            values_files.push(clean);
        }
        let kustomize_dir = match kustomize_dir {
            Some(d) if !has_kustomization(files, &d) => {
                return Err(err(format!(
                    "kustomize.dir: no kustomization.yaml in {d:?}"
                )))
            }
            Some(d) => Some(d),
            None => has_kustomization(files, ".").then(|| ".".to_string()),
        };
        Renderer::Helm(Box::new(HelmPlan {
            release_name,
            chart,
            repo,
            version,
            namespace: options
                .target_namespace
                .clone()
                .or_else(|| options.default_namespace.clone())
                .unwrap_or_else(|| "default".into()),
            values_files,
            values,
            kustomize_dir,
            kube_version: None,
            api_versions: vec![],
            config_file: cfg.to_string(),
        }))
    } else if kustomize_dir.is_some() || uses_kustomize(spec, files) {
        let dir = kustomize_dir.unwrap_or_else(|| ".".into());
        if !has_kustomization(files, &dir) {
            return Err(err(format!(
                "no kustomization.yaml in {dir:?} (set kustomize.dir for this cluster)"
            )));
        }
        Renderer::Kustomize { dir }
    } else {
        let overlays = custom
            .and_then(|c| c.yaml.as_ref())
            .map(|y| y.overlays.clone())
            .filter(|o| !o.is_empty())
            .or_else(|| spec.yaml.as_ref().map(|y| y.overlays.clone()))
            .unwrap_or_default();
        Renderer::Plain { overlays }
    };
    Ok(RenderPlan {
        renderer,
        options,
        labels: spec.labels.clone(),
    })
}

fn stem_and_ext(name: &str) -> (&str, &str) {
    for ext in [".yaml", ".yml", ".json"] {
        if let Some(stem) = name.strip_suffix(ext) {
            return (stem, ext);
        }
    }
    (name, "")
}

/// Applies `yaml.overlays` to a plain bundle's files: for each overlay in order,
/// a file in `overlays/NAME/` replaces (or adds) the file at the same path, and
/// `X_patch.yaml` is merged into `X.yaml` (`.yml`/`.json` too) as a strategic
/// merge patch (see [`strategic_merge`]). The `overlays/` directory itself is
/// never deployed.
pub fn apply_overlays(
    files: &BTreeMap<String, Vec<u8>>,
    overlays: &[String],
) -> Result<BTreeMap<String, Vec<u8>>, RenderError> {
    let prefix = format!("{OVERLAYS_DIR}/");
    let mut out: BTreeMap<String, Vec<u8>> = files
        .iter()
        .filter(|(p, _)| !p.starts_with(&prefix))
        .map(|(p, b)| (p.clone(), b.clone()))
        .collect();
    for name in overlays {
        let dir = format!("{prefix}{}/", name.trim_matches('/'));
        let in_overlay: Vec<(&String, &Vec<u8>)> =
            files.iter().filter(|(p, _)| p.starts_with(&dir)).collect();
        if in_overlay.is_empty() {
            return Err(RenderError {
                file: format!("{prefix}{name}"),
                line: None,
                object: None,
                reason: "yaml.overlays names an overlay that does not exist".into(),
            });
        }
        for (path, bytes) in in_overlay {
            let rel = &path[dir.len()..];
            let (parent, file) = match rel.rsplit_once('/') {
                Some((d, f)) => (format!("{d}/"), f),
                None => (String::new(), rel),
            };
            let (stem, ext) = stem_and_ext(file);
            let base_stem = stem.strip_suffix("_patch").filter(|_| !ext.is_empty());
            let Some(base_stem) = base_stem else {
                out.insert(rel.to_string(), bytes.clone());
                continue;
            };
            let target = [".yaml", ".yml", ".json"]
                .iter()
                .map(|e| format!("{parent}{base_stem}{e}"))
                .find(|p| out.contains_key(p))
                .ok_or_else(|| RenderError {
                    file: path.clone(),
                    line: None,
                    object: None,
                    reason: format!("patches {parent}{base_stem}.yaml, which is not in the bundle"),
                })?;
            let patched = patch_file(&target, &out[&target], path, bytes)?;
            out.insert(target, patched);
        }
    }
    Ok(out)
}

fn parse_docs(path: &str, bytes: &[u8]) -> Result<Vec<Value>, RenderError> {
    crate::documents::documents(path, bytes)
}

fn patch_file(
    base_path: &str,
    base: &[u8],
    patch_path: &str,
    patch: &[u8],
) -> Result<Vec<u8>, RenderError> {
    let mut docs = parse_docs(base_path, base)?;
    for p in parse_docs(patch_path, patch)? {
        let id = |v: &Value| {
            (
                v["kind"].as_str().map(str::to_string),
                v["metadata"]["name"].as_str().map(str::to_string),
            )
        };
        let (kind, name) = id(&p);
        let targets: Vec<usize> = if docs.len() == 1 {
            vec![0]
        } else {
            docs.iter()
                .enumerate()
                .filter(|(_, d)| {
                    let (k, n) = id(d);
                    (kind.is_none() || k == kind) && (name.is_none() || n == name)
                })
                .map(|(i, _)| i)
                .collect()
        };
        if targets.len() != 1 {
            return Err(config_error(
                patch_path,
                None,
                format!(
                    "a patch document must match exactly one object of {base_path} by kind and metadata.name (matched {})",
                    targets.len()
                ),
            ));
        }
        strategic_merge(&mut docs[targets[0]], &p);
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string(&d).unwrap_or_default());
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// Merges `patch` into `target`: a JSON merge patch (RFC 7386: maps merge, `null`
/// deletes a key, anything else replaces), except that lists whose items are all
/// maps with a `name` (containers, env, volumes, ports...) merge item by item on
/// `name`, as a Kubernetes strategic merge patch does for the common cases.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                    continue;
                }
                match t.get_mut(k) {
                    Some(existing) => strategic_merge(existing, v),
                    None => {
                        let mut fresh = Value::Null;
                        strategic_merge(&mut fresh, v);
                        t.insert(k.clone(), fresh);
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if named_items(t) && named_items(p) => {
            for item in p {
                match t.iter_mut().find(|x| x["name"] == item["name"]) {
                    Some(existing) => strategic_merge(existing, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => {
            // A new map still drops the patch's nulls (RFC 7386).
            if let Value::Object(pm) = p {
                let mut m = serde_json::Map::new();
                for (k, v) in pm.iter().filter(|(_, v)| !v.is_null()) {
                    let mut fresh = Value::Null;
                    strategic_merge(&mut fresh, v);
                    m.insert(k.clone(), fresh);
                }
                *t = Value::Object(m);
            } else {
                *t = p.clone();
            }
        }
    }
}

fn named_items(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i["name"].is_string())
}

/// Adds the bundle's `labels` to every object (the object's own value wins).
pub fn add_labels(manifests: &mut [Manifest], labels: &BTreeMap<String, String>) {
    if labels.is_empty() {
        return;
    }
    for m in manifests {
        let Some(obj) = m.object.as_object_mut() else {
            continue;
        };
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        let Some(meta) = meta.as_object_mut() else {
            continue;
        };
        let l = meta
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        if !l.is_object() {
            *l = Value::Object(Default::default());
        }
        if let Some(l) = l.as_object_mut() {
            for (k, v) in labels {
                l.entry(k.clone())
                    .or_insert_with(|| Value::String(v.clone()));
            }
        }
    }
}

/// Reads a tool's output (a multi-document YAML stream) into manifests. Helm's
/// `# Source: chart/templates/x.yaml` comments name each object's file; without
/// one, objects are attributed to `origin` (e.g. `kustomize build overlays/prod`).
pub fn parse_tool_output(origin: &str, output: &str) -> Result<Vec<Manifest>, RenderError> {
    let mut chunks: Vec<(String, String)> = vec![(origin.to_string(), String::new())];
    for line in output.lines() {
        if line == "---" || line.starts_with("--- ") {
            chunks.push((origin.to_string(), String::new()));
            continue;
        }
        if let Some(src) = line.strip_prefix("# Source: ") {
            if let Some(last) = chunks.last_mut() {
                last.0 = src.trim().to_string();
            }
        }
        if let Some(last) = chunks.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    let mut out = Vec::new();
    for (file, text) in chunks {
        for object in crate::documents::objects(&file, text.as_bytes())? {
            out.push(Manifest {
                file: file.clone(),
                object,
            });
        }
    }
    Ok(out)
}

/// The kustomization file of `dir` with `HELM_OUTPUT_FILE` added to its
/// `resources` (if missing), for Kustomize over Helm's output. Returns the file's
/// path and new content.
pub fn kustomization_with_helm_output(
    files: &BTreeMap<String, Vec<u8>>,
    dir: &str,
) -> Result<(String, Vec<u8>), RenderError> {
    let path = KUSTOMIZATION_FILES
        .iter()
        .map(|k| join(dir, k))
        .find(|p| files.contains_key(p))
        .ok_or_else(|| config_error(dir, None, "no kustomization.yaml".into()))?;
    let mut docs = parse_docs(&path, &files[&path])?;
    if docs.len() != 1 || !docs[0].is_object() {
        return Err(config_error(&path, None, "must hold one mapping".into()));
    }
    let k = &mut docs[0];
    let resources = k
        .as_object_mut()
        .map(|m| m.entry("resources").or_insert_with(|| Value::Array(vec![])));
    match resources {
        Some(Value::Array(list)) => {
            if !list.iter().any(|r| r == HELM_OUTPUT_FILE) {
                list.push(Value::String(HELM_OUTPUT_FILE.into()));
            }
        }
        _ => return Err(config_error(&path, None, "resources must be a list".into())),
    }
    Ok((path, serde_json::to_vec(&docs[0]).unwrap_or_default()))
}

/// Objects checked, deduplicated and put in apply order, with the bundle labels
/// added: the common end of every renderer.
pub fn finish(
    mut manifests: Vec<Manifest>,
    plan: &RenderPlan,
) -> Result<bundle::Rendered, RenderError> {
    add_labels(&mut manifests, &plan.labels);
    bundle::finish(manifests, plan.options.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    fn plan_for(f: &BTreeMap<String, Vec<u8>>, variant: usize) -> Result<RenderPlan, RenderError> {
        let spec = parse_spec(f)?;
        plan(&spec, &variants(&spec)[variant], f, "b")
    }

    #[test]
    fn drift_policy_reaches_the_options() {
        let f = files(&[(
            "flotilla.yaml",
            "drift: {mode: report, ignore: [{kind: Deployment, jsonPointers: [/spec/replicas]}]}\n\
             diff: {comparePatches: [{kind: Service, name: s, operations: [{op: remove, path: /spec/ports}]}]}\n",
        )]);
        let p = plan_for(&f, 0).unwrap();
        assert_eq!(p.options.drift.mode, crate::drift::DriftMode::Report);
        assert_eq!(p.options.drift.ignore.len(), 2);
        assert_eq!(p.options.drift.ignore[1].json_pointers, ["/spec/ports"]);
        let bad = files(&[(
            "fleet.yaml",
            "diff: {comparePatches: [{jsonPointers: [spec]}]}\n",
        )]);
        assert!(plan_for(&bad, 0)
            .unwrap_err()
            .reason
            .contains("JSON pointer"));
        assert!(plan_for(&files(&[]), 0).unwrap().options.drift.is_default());
    }

    #[test]
    fn take_ownership_reaches_the_options() {
        assert!(!plan_for(&files(&[]), 0).unwrap().options.take_ownership);
        let f = files(&[(
            "fleet.yaml",
            "takeOwnership: true
targetCustomizations:
- name: careful
  clusterName: c1
  takeOwnership: false
- name: other
  clusterName: c2
",
        )]);
        assert!(plan_for(&f, 0).unwrap().options.take_ownership);
        // Variant 1 is `careful`, variant 2 `other`.
        assert!(
            !plan_for(&f, 1).unwrap().options.take_ownership,
            "a customisation may turn it off"
        );
        assert!(
            plan_for(&f, 2).unwrap().options.take_ownership,
            "and inherits it otherwise"
        );
    }

    #[test]
    fn parses_fleet_yaml() {
        let f = files(&[(
            "fleet.yaml",
            r#"
namespace: apps
labels: {team: web}
helm:
  chart: ./chart
  releaseName: web
  values: {replicas: 1, image: {tag: "1.0"}}
dependsOn: [{name: infra}]
rolloutStrategy: {maxUnavailable: 10%}
diff: {comparePatches: [{kind: Deployment, name: web, jsonPointers: [/spec/replicas]}]}
somethingElse: ignored
targetCustomizations:
- name: prod
  clusterSelector: {matchLabels: {env: prod}}
  helm: {values: {replicas: 3}}
- clusterGroup: edge
  doNotDeploy: true
"#,
        )]);
        let spec = parse_spec(&f).unwrap();
        assert_eq!(spec.namespace.as_deref(), Some("apps"));
        assert_eq!(spec.depends_on.len(), 1);
        assert!(spec.rollout_strategy.is_some() && spec.diff.is_some());
        let rollout = spec.rollout().unwrap().unwrap();
        assert_eq!(
            rollout.max_unavailable,
            Some(crate::rollout::Limit::Percent(10))
        );
        let v = variants(&spec);
        assert_eq!(
            v.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["", "prod", "#1"]
        );
        assert!(!v[2].deploys());
        let bad = files(&[(
            "fleet.yaml",
            "targetCustomizations:\n- clusterSelector: {matchLabels: {'bad key!': x}}\n",
        )]);
        assert!(parse_spec(&bad).is_err());
    }

    #[test]
    fn detects_the_renderer() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        let plain = files(&[("cm.yaml", cm)]);
        assert_eq!(
            plan_for(&plain, 0).unwrap().renderer,
            Renderer::Plain { overlays: vec![] }
        );
        let kust = files(&[
            ("kustomization.yaml", "resources: [cm.yaml]\n"),
            ("cm.yaml", cm),
        ]);
        assert_eq!(
            plan_for(&kust, 0).unwrap().renderer,
            Renderer::Kustomize { dir: ".".into() }
        );
        let chart = files(&[
            ("Chart.yaml", "name: c\nversion: 0.1.0\n"),
            ("templates/cm.yaml", cm),
        ]);
        match plan_for(&chart, 0).unwrap().renderer {
            Renderer::Helm(h) => {
                assert_eq!(
                    (
                        h.chart.as_str(),
                        h.release_name.as_str(),
                        h.namespace.as_str()
                    ),
                    (".", "b", "default")
                );
                assert_eq!(h.kustomize_dir, None);
            }
            r => panic!("{r:?}"),
        }
        // Per-target kustomize dirs; the default has none at the root.
        let per = files(&[
            ("fleet.yaml", "targetCustomizations:\n- name: prod\n  clusterSelector: {matchLabels: {env: prod}}\n  kustomize: {dir: overlays/prod}\n"),
            ("base/kustomization.yaml", "resources: [cm.yaml]\n"),
            ("base/cm.yaml", cm),
            ("overlays/prod/kustomization.yaml", "resources: [../../base]\n"),
        ]);
        assert_eq!(
            plan_for(&per, 1).unwrap().renderer,
            Renderer::Kustomize {
                dir: "overlays/prod".into()
            }
        );
        let e = plan_for(&per, 0).unwrap_err();
        assert!(e.to_string().contains("no kustomization.yaml"), "{e}");
        let escape = files(&[("fleet.yaml", "kustomize: {dir: ../x}\n")]);
        assert!(plan_for(&escape, 0)
            .unwrap_err()
            .to_string()
            .contains("leaves the bundle"));
    }

    #[test]
    fn helm_values_merge_over_the_bundle() {
        let f = files(&[
            ("Chart.yaml", "name: c\nversion: 0.1.0\n"),
            ("values-extra.yaml", "a: 1\n"),
            ("kustomization.yaml", "resources: []\n"),
            (
                "fleet.yaml",
                "defaultNamespace: web\nhelm:\n  valuesFiles: [values-extra.yaml]\n  values: {image: {repo: r, tag: '1'}, replicas: 1}\ntargetCustomizations:\n- name: prod\n  clusterName: p1\n  namespace: prod\n  helm: {values: {image: {tag: '2'}}, releaseName: web-prod}\n",
            ),
        ]);
        let Renderer::Helm(d) = plan_for(&f, 0).unwrap().renderer else {
            panic!()
        };
        assert_eq!(
            d.values,
            json!({"image": {"repo": "r", "tag": "1"}, "replicas": 1})
        );
        assert_eq!(d.namespace, "web");
        assert_eq!(d.values_files, ["values-extra.yaml"]);
        assert_eq!(d.kustomize_dir.as_deref(), Some("."));
        let Renderer::Helm(p) = plan_for(&f, 1).unwrap().renderer else {
            panic!()
        };
        assert_eq!(
            p.values,
            json!({"image": {"repo": "r", "tag": "2"}, "replicas": 1})
        );
        assert_eq!(
            (p.namespace.as_str(), p.release_name.as_str()),
            ("prod", "web-prod")
        );
        let repo = files(&[(
            "fleet.yaml",
            "helm: {repo: 'https://charts.example.com', chart: nginx, version: 1.2.3}\n",
        )]);
        let Renderer::Helm(r) = plan_for(&repo, 0).unwrap().renderer else {
            panic!()
        };
        assert_eq!(
            (r.chart.as_str(), r.version.as_deref()),
            ("nginx", Some("1.2.3"))
        );
        let missing = files(&[("fleet.yaml", "helm: {chart: ./nope}\n")]);
        assert!(plan_for(&missing, 0)
            .unwrap_err()
            .to_string()
            .contains("no Chart.yaml"));
    }

    #[test]
    fn overlays_replace_and_patch() {
        let f = files(&[
            ("deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 1\n  template:\n    spec:\n      containers:\n      - {name: web, image: web:1}\n      - {name: side, image: side:1}\n"),
            ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {k: base}\n"),
            ("overlays/prod/deploy_patch.yaml", "spec:\n  replicas: 3\n  template:\n    spec:\n      containers:\n      - {name: web, image: web:2}\n"),
            ("overlays/prod/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {k: prod}\n"),
        ]);
        let out = apply_overlays(&f, &["prod".into()]).unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["cm.yaml", "deploy.yaml"]);
        let r = bundle::render_plain(&out).unwrap();
        let d = &r
            .manifests
            .iter()
            .find(|m| m.object["kind"] == "Deployment")
            .unwrap()
            .object;
        assert_eq!(d["spec"]["replicas"], 3);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "web:2"
        );
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][1]["image"],
            "side:1"
        );
        let c = &r
            .manifests
            .iter()
            .find(|m| m.object["kind"] == "ConfigMap")
            .unwrap()
            .object;
        assert_eq!(c["data"]["k"], "prod");
        // No overlay: the overlays directory is not deployed.
        assert_eq!(apply_overlays(&f, &[]).unwrap().len(), 2);
        assert!(apply_overlays(&f, &["nope".into()]).is_err());
    }

    #[test]
    fn merge_patch_semantics() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2], "x": 1});
        strategic_merge(
            &mut t,
            &json!({"a": {"b": null, "d": {"e": null, "f": 1}}, "l": [3], "x": null}),
        );
        assert_eq!(t, json!({"a": {"c": 2, "d": {"f": 1}}, "l": [3]}));
    }

    #[test]
    fn tool_output_and_labels() {
        let out = "---\n# Source: c/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n# Source: c/templates/empty.yaml\n---\n# Source: c/templates/svc.yaml\napiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {team: mine}}\n";
        let mut m = parse_tool_output("helm template", out).unwrap();
        assert_eq!(
            m.iter().map(|m| m.file.as_str()).collect::<Vec<_>>(),
            ["c/templates/cm.yaml", "c/templates/svc.yaml"]
        );
        add_labels(
            &mut m,
            &BTreeMap::from([("team".to_string(), "web".to_string())]),
        );
        assert_eq!(m[0].object["metadata"]["labels"]["team"], "web");
        assert_eq!(m[1].object["metadata"]["labels"]["team"], "mine");
        let k = parse_tool_output(
            "kustomize build .",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        )
        .unwrap();
        assert_eq!(k[0].file, "kustomize build .");
    }

    #[test]
    fn helm_arguments_are_data() {
        let chart = ("Chart.yaml", "name: c\nversion: 0.1.0\n");
        for (fleet, field) in [
            (
                "helm: {releaseName: '--post-renderer=/bin/sh'}",
                "helm.releaseName",
            ),
            ("namespace: '--kubeconfig=/x'", "namespace"),
            ("helm: {version: '--post-renderer=x'}", "helm.version"),
            ("helm: {chart: '-x'}", "helm.chart"),
            ("helm: {chart: /etc}", "helm.chart"),
            ("helm: {chart: 'file:///etc'}", "helm.chart"),
            ("helm: {repo: 'https://h', chart: '--x=y'}", "helm.chart"),
            ("helm: {repo: 'file:///x', chart: web}", "helm.repo"),
            (
                "helm: {valuesFiles: ['http://h/v.yaml']}",
                "helm.valuesFiles",
            ),
        ] {
            let f = files(&[chart, ("fleet.yaml", fleet)]);
            let e = plan_for(&f, 0).unwrap_err();
            assert_eq!(e.file, "fleet.yaml");
            assert!(e.reason.starts_with(field), "{fleet}: {e}");
        }
        let f = files(&[
            chart,
            ("v.yaml", "a: 1\n"),
            (
                "fleet.yaml",
                "namespace: apps\nhelm: {releaseName: web, version: '^1.2', valuesFiles: [v.yaml]}",
            ),
        ]);
        let Renderer::Helm(mut h) = plan_for(&f, 0).unwrap().renderer else {
            panic!()
        };
        h.kube_version = Some("v1.34.1".into());
        h.api_versions = vec!["apps/v1".into()];
        let args = h.template_args("/t/bundle", "/t/values.json", &[]).unwrap();
        assert_eq!(
            args,
            [
                "template",
                "--namespace=apps",
                "--include-crds",
                "--version=^1.2",
                "--kube-version=v1.34.1",
                "--api-versions=apps/v1",
                "--values=/t/bundle/v.yaml",
                "--values=/t/values.json",
                "--",
                "web",
                "/t/bundle",
            ]
        );
        // An agent's reported version is checked too.
        h.kube_version = Some("--post-renderer=x".into());
        assert!(h.template_args("/t/bundle", "/t/v.json", &[]).is_err());
        // A remote chart needs an allowed prefix.
        let f = files(&[(
            "fleet.yaml",
            "helm: {repo: 'https://charts.example.com/stable', chart: web}",
        )]);
        let Renderer::Helm(h) = plan_for(&f, 0).unwrap().renderer else {
            panic!()
        };
        let e = h.template_args("/t/b", "/t/v", &[]).unwrap_err();
        assert!(
            e.reason.starts_with("helm.repo") && e.reason.contains("--helm-repo-allow"),
            "{e}"
        );
        let args = h
            .template_args("/t/b", "/t/v", &["https://charts.example.com/".into()])
            .unwrap();
        assert!(args.contains(&"--repo=https://charts.example.com/stable".to_string()));
        assert_eq!(&args[args.len() - 3..], ["--", "b", "web"]);
    }

    #[test]
    fn kustomization_gets_helm_output() {
        let f = files(&[("kustomization.yaml", "namePrefix: x-\n")]);
        let (p, b) = kustomization_with_helm_output(&f, ".").unwrap();
        assert_eq!(p, "kustomization.yaml");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["resources"], json!(["manifests.yaml"]));
    }

    #[test]
    fn an_invalid_rollout_strategy_is_a_render_error_naming_the_file() {
        for (file, text, want) in [
            (
                "fleet.yaml",
                "rolloutStrategy:\n  maxUnavailabel: 1\n",
                "unknown field \"maxUnavailabel\"",
            ),
            (
                "flotilla.yaml",
                "rolloutStrategy: {maxUnavailable: 150%}\n",
                "maxUnavailable: \"150%\" is over 100%",
            ),
            (
                "fleet.yaml",
                "rolloutStrategy: {partitions: [{name: a, clusterSelectr: {}}]}\n",
                "partitions[0]: unknown field \"clusterSelectr\"",
            ),
        ] {
            let e = parse_spec(&files(&[(file, text)])).unwrap_err();
            assert_eq!(e.file, file);
            assert!(
                e.reason.starts_with("rolloutStrategy: ") && e.reason.contains(want),
                "{e}"
            );
        }
        // none at all, or an empty one
        let spec = parse_spec(&files(&[("fleet.yaml", "namespace: x\n")])).unwrap();
        assert_eq!(spec.rollout().unwrap(), None);
        let spec = parse_spec(&files(&[("fleet.yaml", "rolloutStrategy: {}\n")])).unwrap();
        assert_eq!(
            spec.rollout().unwrap(),
            Some(crate::rollout::RolloutStrategy::default())
        );
    }
}
