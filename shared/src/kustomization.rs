//! What a bundle's kustomizations may make `kustomize build` read: only files of
//! the bundle. Every `kustomization.yaml`/`kustomization.yml`/`Kustomization` of
//! the bundle is read here before kustomize runs, and refused (naming the file,
//! the field and the reason) when it names a URL or remote repository, an
//! absolute path, a path leaving the bundle or missing from it, a Helm chart
//! (`helmCharts`, `helmGlobals`: kustomize would run helm and fetch), a plugin or
//! KRM function, or a field the hub does not know. What was checked is what
//! kustomize reads: each kustomization, and each generator/transformer/validator
//! configuration, is written back as the JSON of what was parsed here, with
//! kustomize's own spelling of each key (kustomize matches keys without regard to
//! case), so no YAML or key-folding trick can make kustomize see something else.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::bundle::RenderError;
use crate::fleetyaml::KUSTOMIZATION_FILES;
use crate::sandbox::bundle_path;

/// Kustomization fields that name no file.
const PLAIN_FIELDS: [&str; 18] = [
    "apiVersion",
    "kind",
    "metadata",
    "namePrefix",
    "nameSuffix",
    "namespace",
    "commonLabels",
    "labels",
    "commonAnnotations",
    "images",
    "imageTags",
    "replicas",
    "vars",
    "generatorOptions",
    "sortOptions",
    "buildMetadata",
    "inventory",
    "openapi",
];
/// Kustomization fields that are lists of bundle paths (files or directories).
const PATH_LISTS: [&str; 5] = ["resources", "bases", "components", "crds", "configurations"];
/// Kustomization fields naming configuration files of generators, transformers
/// and validators (plugins when not `builtin`).
const PLUGIN_LISTS: [&str; 3] = ["generators", "transformers", "validators"];
/// Kustomization fields that make kustomize run helm (which fetches charts).
const HELM_FIELDS: [&str; 3] = ["helmCharts", "helmGlobals", "helmChartInflationGenerator"];
/// The other fields, each checked on its own.
const OTHER_FIELDS: [&str; 6] = [
    "patches",
    "patchesJson6902",
    "patchesStrategicMerge",
    "replacements",
    "configMapGenerator",
    "secretGenerator",
];
/// Top-level keys of kustomize's built-in generator and transformer
/// configurations that name files (`PatchTransformer.path`,
/// `PatchStrategicMergeTransformer.paths`, `ConfigMapGenerator.files`...): checked
/// as bundle paths, relative to the kustomization that names the configuration.
const CONFIG_PATH_KEYS: [&str; 5] = ["path", "paths", "files", "envs", "env"];
/// Annotations that turn a configuration into a KRM function (a container or a
/// program kustomize would run).
const FUNCTION_ANNOTATIONS: [&str; 2] = ["config.kubernetes.io/function", "config.k8s.io/function"];

fn err(file: &str, reason: String) -> RenderError {
    RenderError {
        file: file.to_string(),
        line: None,
        object: None,
        reason,
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or(".")
}

/// The known key that `key` spells, as kustomize matches JSON keys (regardless of
/// ASCII case; anything else is unknown).
fn canonical<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().copied().find(|k| k.eq_ignore_ascii_case(key))
}

/// `map` with each key replaced by its known spelling; unknown or repeated keys
/// are refused.
fn canonical_map(
    map: &Map<String, Value>,
    known: &[&str],
    what: &str,
) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (k, v) in map {
        let Some(c) = canonical(k, known) else {
            return Err(format!(
                "{what}{k:?} is not a field the hub's render sandbox knows (known: {})",
                known.join(", ")
            ));
        };
        if out.insert(c.to_string(), v.clone()).is_some() {
            return Err(format!("{what}{c} is given twice"));
        }
    }
    Ok(out)
}

struct Bundle<'a> {
    files: &'a BTreeMap<String, Vec<u8>>,
    also: &'a [String],
}

impl Bundle<'_> {
    fn is_file(&self, p: &str) -> bool {
        self.files.contains_key(p) || self.also.iter().any(|a| a == p)
    }

    fn exists(&self, p: &str) -> bool {
        if p == "." || self.is_file(p) {
            return true;
        }
        let prefix = format!("{p}/");
        self.files
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
            || self.also.iter().any(|a| a.starts_with(&prefix))
    }

    /// A path written in the kustomization of `dir`: inside the bundle and in it.
    fn local(&self, dir: &str, path: &Value, field: &str) -> Result<String, String> {
        let Some(path) = path.as_str() else {
            return Err(format!("{field}: {path} is not a path"));
        };
        let resolved = bundle_path(dir, path).map_err(|e| format!("{field}: {e}"))?;
        if !self.exists(&resolved) {
            return Err(format!(
                "{field}: {path:?} is not in the bundle (kustomize would fetch it or read it from elsewhere; the hub renders from the repository only)"
            ));
        }
        Ok(resolved)
    }
}

fn list<'a>(v: &'a Value, field: &str) -> Result<&'a Vec<Value>, String> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(format!("{field} must be a list")),
    }
}

fn parse_docs(path: &str, bytes: &[u8]) -> Result<Vec<Value>, RenderError> {
    let text = std::str::from_utf8(bytes).map_err(|_| err(path, "not UTF-8".into()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| RenderError {
        file: path.to_string(),
        line: e.location().map(|l| l.line()),
        object: None,
        reason: format!(
            "invalid YAML: {}",
            e.to_string().lines().next().unwrap_or_default()
        ),
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Checks one patch entry (`patches`, `patchesJson6902`): an inline patch or a
/// bundle file.
fn patch_item(b: &Bundle, dir: &str, item: &Value, field: &str) -> Result<Value, String> {
    let Value::Object(m) = item else {
        return Err(format!("{field} must be a mapping"));
    };
    let m = canonical_map(
        m,
        &["path", "patch", "target", "options"],
        &format!("{field}."),
    )?;
    if let Some(p) = m.get("path") {
        b.local(dir, p, &format!("{field}.path"))?;
    }
    Ok(Value::Object(m))
}

/// Checks one `configMapGenerator`/`secretGenerator` entry: its files and env
/// files must be bundle files.
fn generator_item(b: &Bundle, dir: &str, item: &Value, field: &str) -> Result<Value, String> {
    let Value::Object(m) = item else {
        return Err(format!("{field} must be a mapping"));
    };
    let known = [
        "name",
        "namespace",
        "behavior",
        "literals",
        "files",
        "envs",
        "env",
        "options",
        "type",
    ];
    let m = canonical_map(m, &known, &format!("{field}."))?;
    if let Some(files) = m.get("files") {
        for (i, f) in list(files, &format!("{field}.files"))?.iter().enumerate() {
            let f = f
                .as_str()
                .ok_or_else(|| format!("{field}.files[{i}] is not a path"))?;
            // `key=path` or `path`, as kustomize splits it.
            let path = f.split_once('=').map(|(_, p)| p).unwrap_or(f);
            b.local(
                dir,
                &Value::String(path.into()),
                &format!("{field}.files[{i}]"),
            )?;
        }
    }
    if let Some(envs) = m.get("envs") {
        for (i, e) in list(envs, &format!("{field}.envs"))?.iter().enumerate() {
            b.local(dir, e, &format!("{field}.envs[{i}]"))?;
        }
    }
    if let Some(e) = m.get("env") {
        b.local(dir, e, &format!("{field}.env"))?;
    }
    Ok(Value::Object(m))
}

/// Checks the file inputs of a built-in configuration: its top-level `path`,
/// `paths`, `files`, `envs`, `env`, and `replacements[].path`.
fn config_paths(b: &Bundle, dir: &str, m: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in m {
        if !k.is_ascii() {
            return Err(format!("{k:?}: keys must be ASCII"));
        }
        let Some(c) = canonical(k, &CONFIG_PATH_KEYS) else {
            if k.eq_ignore_ascii_case("replacements") {
                for (i, r) in list(v, k)?.iter().enumerate() {
                    for (rk, p) in r.as_object().into_iter().flatten() {
                        if rk.eq_ignore_ascii_case("path") {
                            b.local(dir, p, &format!("{k}[{i}].path"))?;
                        }
                    }
                }
            }
            continue;
        };
        let paths: Vec<Value> = match v {
            Value::Array(a) => a.clone(),
            v => vec![v.clone()],
        };
        for (i, p) in paths.iter().enumerate() {
            let p = match (c, p.as_str()) {
                ("files", Some(s)) => {
                    Value::String(s.split_once('=').map(|(_, p)| p).unwrap_or(s).into())
                }
                // An inline patch (a line break) reads no file.
                ("paths", Some(s)) if s.contains('\n') => continue,
                _ => p.clone(),
            };
            b.local(dir, &p, &format!("{c}[{i}]"))?;
        }
    }
    Ok(())
}

/// Checks a configuration file named by `generators`/`transformers`/`validators`:
/// built-in kinds only (`apiVersion: builtin`, not the Helm inflator), no KRM
/// function annotations, file inputs only from the bundle (relative to `dir`, the
/// kustomization's). Returns it as JSON documents.
fn plugin_config(b: &Bundle, path: &str, dir: &str) -> Result<Vec<u8>, RenderError> {
    let bytes = b
        .files
        .get(path)
        .ok_or_else(|| err(path, "not in the bundle".into()))?;
    let mut out = String::new();
    for (i, doc) in parse_docs(path, bytes)?.into_iter().enumerate() {
        let bad = |reason: String| err(path, format!("document {}: {reason}", i + 1));
        let Value::Object(m) = &doc else {
            return Err(bad("must be a mapping".into()));
        };
        let get = |key: &str| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        };
        let annotations = get("metadata")
            .and_then(|meta| meta.as_object())
            .and_then(|meta| {
                meta.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("annotations"))
                    .map(|(_, v)| v)
            });
        if let Some(Value::Object(a)) = annotations {
            for k in a.keys() {
                let k = k.to_ascii_lowercase();
                if FUNCTION_ANNOTATIONS.iter().any(|f| k.contains(f)) {
                    return Err(bad(format!(
                        "annotation {k}: KRM functions (containers, programs) do not run on the hub"
                    )));
                }
            }
        }
        if get("apiVersion").and_then(Value::as_str) != Some("builtin") {
            return Err(bad(
                "only kustomize's built-in generators and transformers (apiVersion: builtin) run on the hub; plugins do not".into(),
            ));
        }
        if get("kind")
            .and_then(Value::as_str)
            .is_some_and(|k| k.eq_ignore_ascii_case("HelmChartInflationGenerator"))
        {
            return Err(bad(
                "HelmChartInflationGenerator: kustomize would run helm and fetch the chart; use helm: in fleet.yaml".into(),
            ));
        }
        config_paths(b, dir, m).map_err(bad)?;
        out.push_str("---\n");
        out.push_str(&serde_json::to_string(&doc).unwrap_or_default());
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// A kustomization checked: its JSON, and the plugin configurations it names as
/// (file, the kustomization's directory).
type Checked = (Vec<u8>, Vec<(String, String)>);

/// Checks one kustomization file; returns its JSON and the plugin
/// configurations it names.
fn kustomization(b: &Bundle, path: &str) -> Result<Checked, RenderError> {
    let dir = parent(path);
    let docs = parse_docs(path, &b.files[path])?;
    let doc = match docs.as_slice() {
        [] => Value::Object(Map::new()),
        [d @ Value::Object(_)] => d.clone(),
        _ => return Err(err(path, "must hold one mapping".into())),
    };
    let Value::Object(m) = &doc else {
        return Err(err(path, "must hold one mapping".into()));
    };
    let known: Vec<&str> = PLAIN_FIELDS
        .iter()
        .chain(&PATH_LISTS)
        .chain(&PLUGIN_LISTS)
        .chain(&HELM_FIELDS)
        .chain(&OTHER_FIELDS)
        .copied()
        .collect();
    let m = canonical_map(m, &known, "").map_err(|e| err(path, e))?;
    let fail = |e: String| err(path, e);
    let mut out = Map::new();
    let mut configs = Vec::new();
    for (k, v) in m {
        let k = k.as_str();
        let checked = if HELM_FIELDS.contains(&k) {
            return Err(fail(format!(
                "{k}: kustomize would run helm and fetch the chart; the hub does not run Helm from a kustomization (use helm: in fleet.yaml)"
            )));
        } else if PATH_LISTS.contains(&k) {
            for (i, p) in list(&v, k).map_err(fail)?.iter().enumerate() {
                b.local(dir, p, &format!("{k}[{i}]")).map_err(fail)?;
            }
            v
        } else if PLUGIN_LISTS.contains(&k) {
            for (i, p) in list(&v, k).map_err(fail)?.iter().enumerate() {
                let field = format!("{k}[{i}]");
                let resolved = b.local(dir, p, &field).map_err(fail)?;
                if !b.files.contains_key(&resolved) {
                    return Err(fail(format!(
                        "{field}: {p} must be a configuration file of the bundle"
                    )));
                }
                configs.push((resolved, dir.to_string()));
            }
            v
        } else if k == "openapi" {
            let Value::Object(o) = &v else {
                return Err(fail("openapi must be a mapping".into()));
            };
            let o = canonical_map(o, &["path", "version"], "openapi.").map_err(fail)?;
            if let Some(p) = o.get("path") {
                b.local(dir, p, "openapi.path").map_err(fail)?;
            }
            Value::Object(o)
        } else if k == "patches" || k == "patchesJson6902" {
            let items = list(&v, k).map_err(fail)?;
            let mut checked = Vec::new();
            for (i, item) in items.iter().enumerate() {
                checked.push(patch_item(b, dir, item, &format!("{k}[{i}]")).map_err(fail)?);
            }
            Value::Array(checked)
        } else if k == "patchesStrategicMerge" {
            for (i, p) in list(&v, k).map_err(fail)?.iter().enumerate() {
                // A line break makes it an inline patch; else it is a file.
                if !p.as_str().is_some_and(|s| s.contains('\n')) {
                    b.local(dir, p, &format!("{k}[{i}]")).map_err(fail)?;
                }
            }
            v
        } else if k == "replacements" {
            let items = list(&v, k).map_err(fail)?;
            let mut checked = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let field = format!("{k}[{i}]");
                let Value::Object(r) = item else {
                    return Err(fail(format!("{field} must be a mapping")));
                };
                let r = canonical_map(r, &["path", "source", "targets"], &format!("{field}."))
                    .map_err(fail)?;
                if let Some(p) = r.get("path") {
                    b.local(dir, p, &format!("{field}.path")).map_err(fail)?;
                }
                checked.push(Value::Object(r));
            }
            Value::Array(checked)
        } else if k == "configMapGenerator" || k == "secretGenerator" {
            let items = list(&v, k).map_err(fail)?;
            let mut checked = Vec::new();
            for (i, item) in items.iter().enumerate() {
                checked.push(generator_item(b, dir, item, &format!("{k}[{i}]")).map_err(fail)?);
            }
            Value::Array(checked)
        } else {
            v
        };
        out.insert(k.to_string(), checked);
    }
    Ok((
        serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
        configs,
    ))
}

/// Checks every kustomization of a bundle (and the generator, transformer and
/// validator configurations they name) against the bundle's files, plus `also`:
/// files the hub adds before building (Helm's output). Returns what to write over
/// those files in the render's copy: the checked content, as JSON.
pub fn check_bundle(
    files: &BTreeMap<String, Vec<u8>>,
    also: &[String],
) -> Result<Vec<(String, Vec<u8>)>, RenderError> {
    let b = Bundle { files, also };
    let mut out = Vec::new();
    let mut configs = Vec::new();
    for path in files.keys() {
        let name = path.rsplit('/').next().unwrap_or(path);
        if !KUSTOMIZATION_FILES.contains(&name) {
            continue;
        }
        let (json, c) = kustomization(&b, path)?;
        out.push((path.clone(), json));
        configs.extend(c);
    }
    configs.sort();
    configs.dedup();
    for (c, dir) in configs {
        let json = plugin_config(&b, &c, &dir)?;
        if !out.iter().any(|(p, _)| *p == c) {
            out.push((c, json));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";

    fn refused(list: &[(&str, &str)], needle: &str) -> RenderError {
        let e = check_bundle(&files(list), &[]).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
        e
    }

    #[test]
    fn local_bundles_pass_and_are_rewritten_as_json() {
        let f = files(&[
            ("base/kustomization.yaml", "resources: [cm.yaml]\nconfigMapGenerator:\n- name: g\n  files: [k=data.txt]\n  envs: [e.env]\n"),
            ("base/cm.yaml", CM),
            ("base/data.txt", "x"),
            ("base/e.env", "A=1"),
            ("overlays/prod/kustomization.yaml", "Resources: [../../base]\nnamePrefix: p-\npatches:\n- path: patch.yaml\n- patch: |\n    - op: add\n      path: /x\n      value: 1\n  target: {kind: ConfigMap}\ntransformers: [labels.yaml]\n"),
            ("overlays/prod/patch.yaml", CM),
            ("overlays/prod/labels.yaml", "apiVersion: builtin\nkind: LabelTransformer\nmetadata: {name: l}\nlabels: {a: b}\nfieldSpecs: [{path: metadata/labels, create: true}]\n"),
        ]);
        // `fieldSpecs[].path` is a field path, not a file.
        let out = check_bundle(&f, &[]).unwrap();
        let prod = &out
            .iter()
            .find(|(p, _)| p == "overlays/prod/kustomization.yaml")
            .unwrap()
            .1;
        let v: Value = serde_json::from_slice(prod).unwrap();
        // Keys in kustomize's spelling.
        assert_eq!(v["resources"], serde_json::json!(["../../base"]));
        assert!(v.get("Resources").is_none());
        assert!(out.iter().any(|(p, _)| p == "overlays/prod/labels.yaml"));
        // Helm's output, added by the hub, counts as a bundle file.
        let h = files(&[("kustomization.yaml", "resources: [manifests.yaml]\n")]);
        assert!(check_bundle(&h, &[]).is_err());
        assert!(check_bundle(&h, &["manifests.yaml".into()]).is_ok());
    }

    #[test]
    fn remote_and_outside_paths_are_refused() {
        for (what, needle) in [
            ("resources: [http://127.0.0.1:9/x.yaml]", "is a URL"),
            (
                "resources: ['https://github.com/org/repo//base?ref=v1']",
                "is a URL",
            ),
            ("resources: [github.com/org/repo/base]", "not in the bundle"),
            (
                "resources: ['git@github.com:org/repo.git']",
                "remote repository",
            ),
            ("bases: ['file:///var/lib/flotilla/git/other']", "is a URL"),
            ("resources: [/etc/passwd]", "absolute path"),
            ("resources: [../secret]", "leaves the bundle"),
            ("components: [../../x]", "leaves the bundle"),
            ("crds: [http://h/crd.yaml]", "is a URL"),
            (
                "configMapGenerator: [{name: g, files: ['k=http://127.0.0.1:9/x']}]",
                "is a URL",
            ),
            (
                "secretGenerator: [{name: g, envs: [/etc/shadow]}]",
                "absolute path",
            ),
            (
                "configMapGenerator: [{name: g, env: ../x.env}]",
                "leaves the bundle",
            ),
            ("patches: [{path: 'https://h/p.yaml'}]", "is a URL"),
            (
                "patchesJson6902: [{path: /p.yaml, target: {kind: X}}]",
                "absolute path",
            ),
            ("patchesStrategicMerge: ['http://h/p.yaml']", "is a URL"),
            ("replacements: [{path: ../r.yaml}]", "leaves the bundle"),
            ("openapi: {path: 'http://h/schema.json'}", "is a URL"),
            ("configurations: [/etc/x]", "absolute path"),
        ] {
            let e = refused(&[("kustomization.yaml", what), ("cm.yaml", CM)], needle);
            assert_eq!(e.file, "kustomization.yaml");
        }
    }

    #[test]
    fn helm_plugins_functions_and_unknown_fields_are_refused() {
        refused(
            &[(
                "kustomization.yaml",
                "helmCharts: [{name: x, repo: 'https://h'}]",
            )],
            "helmCharts",
        );
        refused(
            &[("kustomization.yaml", "HelmGlobals: {chartHome: x}")],
            "helmGlobals",
        );
        refused(
            &[("kustomization.yaml", "reſources: [http://h/x]")],
            "not a field",
        );
        refused(
            &[
                (
                    "kustomization.yaml",
                    "resources: [a.yaml]\nRESOURCES: [b.yaml]",
                ),
                ("a.yaml", CM),
                ("b.yaml", CM),
            ],
            "twice",
        );
        refused(&[("Kustomization", "surprise: 1")], "not a field");
        let exec = "apiVersion: example.com/v1\nkind: Exec\nmetadata:\n  name: x\n  annotations:\n    config.kubernetes.io/function: |\n      exec: {path: /bin/sh}\n";
        refused(
            &[
                ("kustomization.yaml", "generators: [gen.yaml]"),
                ("gen.yaml", exec),
            ],
            "KRM functions",
        );
        refused(
            &[
                ("kustomization.yaml", "transformers: [t.yaml]"),
                (
                    "t.yaml",
                    "apiVersion: someteam.example.com/v1\nkind: Plugin\n",
                ),
            ],
            "plugins do not",
        );
        refused(
            &[
                ("kustomization.yaml", "generators: [h.yaml]"),
                (
                    "h.yaml",
                    "apiVersion: builtin\nkind: HelmChartInflationGenerator\nchartName: x\n",
                ),
            ],
            "HelmChartInflationGenerator",
        );
        refused(
            &[("kustomization.yaml", "generators: [g.yaml]"), ("g.yaml", "apiVersion: builtin\nkind: ConfigMapGenerator\nmetadata: {name: g}\nFiles: ['k=http://h/x']\n")],
            "is a URL",
        );
        refused(
            &[("kustomization.yaml", "transformers: [p.yaml]"), ("p.yaml", "apiVersion: builtin\nkind: PatchTransformer\nmetadata: {name: p}\npath: ../../../etc/x\n")],
            "leaves the bundle",
        );
        refused(
            &[
                ("kustomization.yaml", "generators: [dir]"),
                ("dir/x.yaml", CM),
            ],
            "configuration file",
        );
        refused(
            &[(
                "kustomization.yaml",
                "resources: [a]\n---\nresources: [b]\n",
            )],
            "one mapping",
        );
        refused(
            &[("sub/kustomization.yml", "resources: 3")],
            "must be a list",
        );
    }
}
