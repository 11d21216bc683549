//! Rendering bundles with the external tools: each variant of a bundle (the
//! default and one per target customisation) is planned by
//! `flotilla_shared::fleetyaml`, then rendered here — plain YAML in process, Helm
//! and Kustomize by running `helm template` / `kustomize build` on a temporary copy
//! of the bundle, with a timeout and an output limit. Repository content is data:
//! what reaches a tool's command line or a kustomization is checked first
//! (`flotilla_shared::sandbox`, `flotilla_shared::kustomization`), and the tools
//! run confined (`crate::sandbox`). Used by the hub's source pollers (which add the
//! protocol's size cap and a cache between commits) and by the offline
//! `flotilla render`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use flotilla_shared::applied;
use flotilla_shared::assign::CustomizationInfo;
use flotilla_shared::bundle::{parse_manifests, RenderError, Rendered};
use flotilla_shared::capabilities;
use flotilla_shared::fleetyaml::{self, RenderPlan, Renderer, Variant};
use flotilla_shared::kustomization;
use flotilla_shared::objects::Target;
use tokio::io::AsyncReadExt;

use crate::sandbox::{self, Network};

/// A render that takes longer is stuck (a chart pulling from an unreachable repo,
/// a runaway template); a minute is far more than any real chart needs.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(60);
/// Larger output is a mistake (a loop in a template), and would be too large to
/// send to agents anyway.
pub const MAX_OUTPUT: usize = flotilla_shared::documents::MAX_BUNDLE_BYTES;
/// What a tool's error message may take in a bundle's status.
const MAX_MESSAGE: usize = 2000;

/// The programs the hub renders with, and the limits it runs them under.
#[derive(Debug, Clone)]
pub struct Tools {
    pub helm: PathBuf,
    pub kustomize: PathBuf,
    pub timeout: Duration,
    pub max_output: usize,
    /// URL prefixes of the chart repositories and OCI registries Helm bundles may
    /// fetch charts from (`--helm-repo-allow`); none by default.
    pub helm_repo_allow: Vec<String>,
}

impl Default for Tools {
    /// `helm` and `kustomize` from PATH.
    fn default() -> Tools {
        Tools {
            helm: "helm".into(),
            kustomize: "kustomize".into(),
            timeout: RENDER_TIMEOUT,
            max_output: MAX_OUTPUT,
            helm_repo_allow: Vec::new(),
        }
    }
}

impl Tools {
    /// The given paths, else the programs on PATH. Relative paths are made
    /// absolute: the tools run in a temporary directory.
    pub fn new(helm: Option<PathBuf>, kustomize: Option<PathBuf>) -> Tools {
        let d = Tools::default();
        let abs = |p: PathBuf| {
            if p.components().count() > 1 {
                std::path::absolute(&p).unwrap_or(p)
            } else {
                p
            }
        };
        Tools {
            helm: helm.map(abs).unwrap_or(d.helm),
            kustomize: kustomize.map(abs).unwrap_or(d.kustomize),
            ..d
        }
    }

    /// These tools, allowed to fetch charts from URLs under `prefixes`.
    pub fn with_helm_repo_allow(self, prefixes: Vec<String>) -> Tools {
        Tools {
            helm_repo_allow: prefixes,
            ..self
        }
    }
}

/// A bundle rendered for every cluster it can go to: the default content and one
/// per target customisation.
#[derive(Debug, Clone)]
pub struct BundleRender {
    pub default: Result<Rendered, RenderError>,
    pub customizations: Vec<(CustomizationInfo, Result<Rendered, RenderError>)>,
}

impl BundleRender {
    /// Whether every variant rendered.
    pub fn all_ok(&self) -> bool {
        self.default.is_ok() && self.customizations.iter().all(|(_, r)| r.is_ok())
    }

    /// Every variant's render passed through `check` (the hub's refusal of a
    /// content the protocol cannot carry).
    pub fn and_then(
        self,
        check: impl Fn(Rendered) -> Result<Rendered, RenderError>,
    ) -> BundleRender {
        BundleRender {
            default: self.default.and_then(&check),
            customizations: self
                .customizations
                .into_iter()
                .map(|(c, r)| (c, r.and_then(&check)))
                .collect(),
        }
    }
}

/// Renders every variant of a bundle (its files, bundle-relative). Variants with
/// the same plan are rendered once.
pub async fn render_bundle(
    tools: &Tools,
    bundle_name: &str,
    files: &BTreeMap<String, Vec<u8>>,
    profiles: &[capabilities::Profile],
) -> BundleRender {
    let spec = match fleetyaml::parse_spec(files) {
        Ok(s) => s,
        Err(e) => {
            return BundleRender {
                default: Err(e),
                customizations: vec![],
            }
        }
    };
    let mut done: HashMap<String, Result<Rendered, RenderError>> = HashMap::new();
    // Per variant: its render, and for Helm its render per capability profile
    // (Kubernetes version and API-version set).
    type Twins = Vec<(capabilities::Profile, Result<Rendered, RenderError>)>;
    let mut results: Vec<(Variant, Result<Rendered, RenderError>, Twins)> = Vec::new();
    for variant in fleetyaml::variants(&spec) {
        if !variant.deploys() {
            let empty = Ok(Rendered {
                manifests: vec![],
                options: Default::default(),
            });
            results.push((variant, empty, vec![]));
            continue;
        }
        let plan = match fleetyaml::plan(&spec, &variant, files, bundle_name) {
            Ok(p) => p,
            Err(e) => {
                results.push((variant, Err(e), vec![]));
                continue;
            }
        };
        let mut plans = vec![(None, plan.clone())];
        if let Renderer::Helm(h) = &plan.renderer {
            for p in profiles {
                let mut h = h.clone();
                h.kube_version = Some(p.kube_version.clone());
                h.api_versions = p.api_versions.clone();
                plans.push((
                    Some(p.clone()),
                    RenderPlan {
                        renderer: Renderer::Helm(h),
                        ..plan.clone()
                    },
                ));
            }
        }
        let mut base = None;
        let mut twins = Vec::new();
        for (version, plan) in plans {
            let key = plan.key();
            let r = match done.get(&key) {
                Some(r) => r.clone(),
                None => {
                    let r = render_plan(tools, &plan, files).await;
                    done.insert(key, r.clone());
                    r
                }
            };
            match version {
                None => base = Some(r),
                Some(v) => twins.push((v, r)),
            }
        }
        let base = base.unwrap_or_else(|| Err(tool_error(".", "no render".into())));
        results.push((variant, base, twins));
    }
    let mut it = results.into_iter();
    let (default, default_twins) = it
        .next()
        .map(|(_, r, t)| (r, t))
        .unwrap_or_else(|| (Err(tool_error(".", "no variant to render".into())), vec![]));
    let mut customizations = Vec::new();
    for (v, r, twins) in it {
        let c = v.customization.unwrap_or_default();
        let info = CustomizationInfo {
            name: v.name,
            target: c.target(),
            do_not_deploy: c.do_not_deploy,
            good: None,
            render_error: None,
        };
        let t = &info.target;
        // A customisation that names no cluster matches none; so do its twins.
        let matches_some = t.cluster_name.is_some()
            || t.cluster_selector.is_some()
            || t.cluster_group.is_some()
            || t.cluster_group_selector.is_some();
        // The profile-pinned twins come first: a cluster of that profile gets them.
        for (profile, tr) in twins.into_iter().filter(|_| matches_some) {
            if let Some(target) = capabilities::versioned_target(&info.target, &profile) {
                let twin = CustomizationInfo {
                    name: format!("{}@{}", info.name, profile.name()),
                    target,
                    ..info.clone()
                };
                customizations.push((twin, tr));
            }
        }
        customizations.push((info, r));
    }
    // Clusters that match no customisation: the default for their profile, else the
    // profile-less default (helm's defaults).
    for (profile, tr) in default_twins {
        if let Some(target) = capabilities::versioned_target(&Target::default(), &profile) {
            let twin = CustomizationInfo {
                name: format!("@{}", profile.name()),
                target,
                do_not_deploy: false,
                good: None,
                render_error: None,
            };
            customizations.push((twin, tr));
        }
    }
    BundleRender {
        default,
        customizations,
    }
}

/// A render error of the bundle as a whole (`file` is `.`) or of one of its files.
pub fn tool_error(file: &str, reason: String) -> RenderError {
    RenderError {
        file: file.to_string(),
        line: None,
        object: None,
        reason,
    }
}

/// Renders one plan.
pub async fn render_plan(
    tools: &Tools,
    plan: &RenderPlan,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<Rendered, RenderError> {
    let manifests = match &plan.renderer {
        Renderer::Plain { overlays } => {
            parse_manifests(&fleetyaml::apply_overlays(files, overlays)?)?
        }
        Renderer::Kustomize { dir } => {
            // Kustomize sees only the bundle: every kustomization checked, and
            // written back as checked.
            let checked = kustomization::check_bundle(files, &[])?;
            let tmp = write_bundle(files, dir)?;
            write_files(&tmp.path().join("bundle"), &checked, dir)?;
            let out = kustomize(tools, tmp.path(), dir).await?;
            fleetyaml::parse_tool_output(&format!("kustomize build {dir}"), &out)?
        }
        Renderer::Helm(h) => {
            // A kustomization over Helm's output is checked before helm runs.
            let checked = match &h.kustomize_dir {
                Some(dir) => {
                    let output = if dir == "." {
                        fleetyaml::HELM_OUTPUT_FILE.to_string()
                    } else {
                        format!("{dir}/{}", fleetyaml::HELM_OUTPUT_FILE)
                    };
                    Some(kustomization::check_bundle(files, &[output])?)
                }
                None => None,
            };
            let tmp = write_bundle(files, &h.chart)?;
            let root = tmp.path().join("bundle");
            let values = tmp.path().join("values.json");
            std::fs::write(&values, serde_json::to_vec(&h.values).unwrap_or_default())
                .map_err(|e| tool_error(&h.chart, format!("writing values: {e}")))?;
            let utf8 = |p: &Path| {
                p.to_str()
                    .map(str::to_string)
                    .ok_or_else(|| tool_error(&h.chart, format!("{} is not UTF-8", p.display())))
            };
            let args: Vec<OsString> = h
                .template_args(&utf8(&root)?, &utf8(&values)?, &tools.helm_repo_allow)?
                .into_iter()
                .map(OsString::from)
                .collect();
            // Only a chart from an allowed repository may use the network.
            let network = match h.remote() {
                Some(_) => Network::Hosts(&tools.helm_repo_allow),
                None => Network::None,
            };
            let out = run(
                tools,
                &tools.helm,
                "helm",
                &args,
                &root,
                tmp.path(),
                network,
            )
            .await
            .map_err(|e| tool_error(&h.chart, e))?;
            match (&h.kustomize_dir, checked) {
                (Some(dir), Some(checked)) => {
                    write_files(&root, &checked, dir)?;
                    // Helm's output added to the kustomization as checked.
                    let view: BTreeMap<String, Vec<u8>> = checked.into_iter().collect();
                    let (path, content) = fleetyaml::kustomization_with_helm_output(&view, dir)?;
                    write_files(
                        &root,
                        &[
                            (path, content),
                            (
                                if dir == "." {
                                    fleetyaml::HELM_OUTPUT_FILE.to_string()
                                } else {
                                    format!("{dir}/{}", fleetyaml::HELM_OUTPUT_FILE)
                                },
                                out.into_bytes(),
                            ),
                        ],
                        dir,
                    )?;
                    let out = kustomize(tools, tmp.path(), dir).await?;
                    fleetyaml::parse_tool_output(&format!("kustomize build {dir}"), &out)?
                }
                _ => fleetyaml::parse_tool_output(&format!("helm template {}", h.chart), &out)?,
            }
        }
    };
    fleetyaml::finish(manifests, plan)
}

/// `kustomize build` of `dir` in the copy at `tmp/bundle`: files only from under
/// the kustomization's root (`LoadRestrictionsRootOnly`; its bases were checked to
/// be in the bundle), no Helm, no exec or container functions, no plugins, no
/// network.
async fn kustomize(tools: &Tools, tmp: &Path, dir: &str) -> Result<String, RenderError> {
    let root = tmp.join("bundle");
    let args: Vec<OsString> = vec![
        "build".into(),
        "--load-restrictor=LoadRestrictionsRootOnly".into(),
        root.join(dir).into_os_string(),
    ];
    run(
        tools,
        &tools.kustomize,
        "kustomize",
        &args,
        &root,
        tmp,
        Network::None,
    )
    .await
    .map_err(|e| tool_error(dir, e))
}

/// Writes checked files over the copy at `root`.
fn write_files(root: &Path, files: &[(String, Vec<u8>)], what: &str) -> Result<(), RenderError> {
    for (rel, bytes) in files {
        let path = root.join(rel);
        std::fs::write(&path, bytes)
            .map_err(|e| tool_error(what, format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Copies the bundle's files into a fresh temporary directory (`<tmp>/bundle`).
fn write_bundle(
    files: &BTreeMap<String, Vec<u8>>,
    what: &str,
) -> Result<tempfile::TempDir, RenderError> {
    let io = |e: std::io::Error| tool_error(what, format!("preparing the render: {e}"));
    let tmp = tempfile::Builder::new()
        .prefix("flotilla-render-")
        .tempdir()
        .map_err(io)?;
    let root = tmp.path().join("bundle");
    std::fs::create_dir_all(&root).map_err(io)?;
    for (rel, bytes) in files {
        // Paths come from a Git tree: relative, no `..` (gix refuses those), but be sure.
        if rel.split('/').any(|p| p == ".." || p.is_empty()) || rel.starts_with('/') {
            continue;
        }
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, bytes).map_err(io)?;
    }
    Ok(tmp)
}

/// Runs a tool and returns its standard output; on failure, a message with the
/// end of its standard error.
/// The tool runs confined (see `crate::sandbox`), its home and caches in `tmp`.
async fn run(
    tools: &Tools,
    program: &Path,
    label: &str,
    args: &[OsString],
    cwd: &Path,
    tmp: &Path,
    network: Network<'_>,
) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(sandbox::resolve(program));
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    sandbox::confine(&mut cmd, tmp, network)
        .map_err(|e| format!("preparing {label}'s sandbox: {e}"))?;
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{label} not found ({}): install it on the hub's PATH or pass --{label} PATH",
                program.display()
            )
        } else {
            format!("cannot run {label}: {e}")
        }
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("cannot run {label}: no pipes"));
    };
    let limit = tools.max_output as u64;
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async { stdout.take(limit + 1).read_to_end(&mut out).await };
        let read_err = async { stderr.take(1 << 20).read_to_end(&mut err).await };
        let (a, b) = tokio::join!(read_out, read_err);
        a.and(b)
            .map_err(|e| format!("reading {label}'s output: {e}"))?;
        if out.len() as u64 > limit {
            return Err(format!(
                "{label} output is over the byte budget of {limit} bytes ({} MiB) per bundle",
                limit >> 20
            ));
        }
        let status = child
            .wait()
            .await
            .map_err(|e| format!("waiting for {label}: {e}"))?;
        Ok((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(tools.timeout, work)
        .await
        .map_err(|_| {
            format!(
                "{label} did not finish within {}",
                humantime::format_duration(tools.timeout)
            )
        })??;
    if !status.success() {
        let text = String::from_utf8_lossy(&err);
        let text = text.trim();
        let tail = if text.len() > MAX_MESSAGE {
            let mut start = text.len() - MAX_MESSAGE;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            &text[start..]
        } else {
            text
        };
        return Err(format!(
            "{label} failed ({status}): {}",
            if tail.is_empty() { "no message" } else { tail }
        ));
    }
    String::from_utf8(out).map_err(|_| format!("{label} output is not UTF-8"))
}

/// Renders a bundle for one cluster: the variant of its first matching target
/// customisation, else the default, for a cluster of Kubernetes `kube_version`
/// serving `api_versions` (Helm's `.Capabilities.KubeVersion` and
/// `.Capabilities.APIVersions`; no version: helm's defaults for both). `Ok(None)`
/// when that customisation says `doNotDeploy`. Used by `flotilla render` and the
/// render tests.
pub async fn render_for_cluster(
    tools: &Tools,
    bundle_name: &str,
    files: &BTreeMap<String, Vec<u8>>,
    cluster: &flotilla_shared::targeting::ClusterInfo,
    groups: &[flotilla_shared::targeting::GroupInfo],
    kube_version: Option<&str>,
    api_versions: &[String],
) -> Result<Option<Rendered>, RenderError> {
    // As the hub does: the cluster's profile is a render input and labels.
    let profile = kube_version
        .map(|v| capabilities::Profile::new(v, api_versions.iter().map(String::as_str)));
    let profiles = capabilities::profiles(profile.as_ref());
    let mut cluster = cluster.clone();
    if let Some(p) = &profile {
        cluster.labels.extend(p.labels());
    }
    let cluster = &cluster;
    let r = render_bundle(tools, bundle_name, files, &profiles).await;
    let info = flotilla_shared::assign::BundleInfo {
        name: bundle_name.to_string(),
        source: String::new(),
        path: String::new(),
        good: None,
        render_error: None,
        targets: vec![],
        customizations: r.customizations.iter().map(|(c, _)| c.clone()).collect(),
        depends_on: vec![],
        labels: Default::default(),
    };
    let Some(pick) = info.pick(cluster, groups) else {
        return Ok(None);
    };
    let result = match pick.customization {
        None => r.default,
        Some(name) => r
            .customizations
            .into_iter()
            .find(|(c, _)| c.name == name)
            .map(|(_, r)| r)
            .unwrap_or_else(|| Err(tool_error(".", format!("no customisation {name}")))),
    };
    result.map(Some)
}

/// Reads a bundle directory from disk (as the hub sees it in Git): every file,
/// relative `/`-separated paths, without dotfiles and directories (`.git`),
/// without symlinks (as the hub's Git path skips them), and without nested
/// bundles (directories with their own `flotilla.yaml`/`fleet.yaml`).
pub fn read_bundle_dir(dir: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            // As the Git path does: symlinks are skipped, never followed (one
            // could point anywhere on the machine).
            let ty = e.file_type()?;
            if ty.is_symlink() {
                continue;
            }
            if ty.is_dir() {
                walk(root, &path, out)?;
            } else if ty.is_file() {
                // As the Git path does: a file over the byte budget is refused
                // before it is read.
                let len = e.metadata()?.len();
                if let Err(err) = flotilla_shared::documents::check_file_size(&path, len) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        err.to_string(),
                    ));
                }
                out.insert(path, std::fs::read(e.path())?);
            }
        }
        Ok(())
    }
    let mut all = BTreeMap::new();
    walk(dir, "", &mut all)?;
    let paths: Vec<String> = all.keys().cloned().collect();
    let mut dirs = flotilla_shared::bundle::bundle_dirs(&paths, &[]).unwrap_or_default();
    if !dirs.iter().any(|d| d.is_empty()) {
        dirs.insert(0, String::new());
    }
    let keep: Vec<String> = flotilla_shared::bundle::bundle_files(&paths, "", &dirs)
        .into_iter()
        .map(|(full, _)| full.to_string())
        .collect();
    all.retain(|p, _| keep.contains(p));
    Ok(all)
}

/// A rendered bundle as the agent applies it (`flotilla_shared::applied`): a
/// multi-document YAML stream in apply order, each object with its namespace
/// placed and the bundle label, after a `# Source:` comment. Kinds are known to
/// be cluster-scoped from Kubernetes' own and the bundle's CRDs (see
/// `applied::Scopes`). A leading comment names the namespace the agent creates.
pub fn to_yaml_stream(bundle: &str, r: &Rendered) -> String {
    let scopes = applied::Scopes::from_objects(r.manifests.iter().map(|m| &m.object));
    applied_yaml_stream(r, &applied::applied(bundle, r, &scopes))
}

/// Applied objects as a YAML stream (see [`to_yaml_stream`]).
pub fn applied_yaml_stream(r: &Rendered, objects: &[applied::Applied]) -> String {
    let mut out = String::new();
    if let Some(ns) = r.options.namespace_to_create() {
        out.push_str(&format!(
            "# The agent first creates Namespace {ns} if it does not exist (unlabelled, never pruned).\n"
        ));
    }
    for a in objects {
        out.push_str("---\n");
        out.push_str(&format!("# Source: {}\n", a.file));
        let text =
            serde_saphyr::to_string(&a.object).unwrap_or_else(|e| format!("# cannot print: {e}\n"));
        out.push_str(&text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}
