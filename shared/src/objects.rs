//! The declarative objects operators hand to `flotilla apply -f`: `GitSource` and
//! `ClusterGroup` (apiVersion `flotilla.io/v1alpha1`), and the names and durations in them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;
use crate::Error;

pub const API_VERSION: &str = "flotilla.io/v1alpha1";

/// Default interval between fetches of a source: frequent enough that a push shows
/// within seconds without a webhook, rare enough that hundreds of sources cost little.
pub const DEFAULT_POLL: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A Git repository the hub tracks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitSourceSpec {
    pub repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Bundle directories (globs). Empty: each directory with a flotilla.yaml or
    /// fleet.yaml, else the root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// As written (`15s`, `1m`); `poll_interval()` parses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// Which clusters get the bundles. Empty: every cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Target>,
    /// Name of a hub secret with the repository's credentials (and, optionally,
    /// this source's webhook secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
}

/// What Git reference a source follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitRef {
    Branch(String),
    Tag(String),
    Revision(String),
}

impl GitSourceSpec {
    /// The reference to follow; a source that names none follows `main`.
    pub fn git_ref(&self) -> GitRef {
        if let Some(r) = &self.revision {
            GitRef::Revision(r.clone())
        } else if let Some(t) = &self.tag {
            GitRef::Tag(t.clone())
        } else {
            GitRef::Branch(self.branch.clone().unwrap_or_else(|| "main".into()))
        }
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(DEFAULT_POLL)
    }

    /// Checks what a user could have got wrong, naming the source.
    pub fn validate(&self, name: &str) -> Result<(), Error> {
        validate_name(name)?;
        let bad = |reason: String| Error::Name {
            name: name.to_string(),
            reason,
        };
        if self.repo.trim().is_empty() {
            return Err(bad("spec.repo is required".into()));
        }
        let refs = [&self.branch, &self.tag, &self.revision]
            .iter()
            .filter(|r| r.is_some())
            .count();
        if refs > 1 {
            return Err(bad("give at most one of branch, tag and revision".into()));
        }
        if let Some(p) = &self.poll_interval {
            parse_duration(p)?;
        }
        for p in &self.paths {
            globset::Glob::new(p).map_err(|e| bad(format!("path glob {p:?}: {e}")))?;
        }
        for t in &self.targets {
            t.validate().map_err(|e| bad(format!("target: {e}")))?;
        }
        Ok(())
    }
}

/// One way of choosing clusters. A target with several fields set requires all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_group_selector: Option<LabelSelector>,
}

impl Target {
    pub fn selector(sel: LabelSelector) -> Self {
        Target {
            cluster_selector: Some(sel),
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        for s in [&self.cluster_selector, &self.cluster_group_selector]
            .into_iter()
            .flatten()
        {
            s.validate()?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterGroupSpec {
    #[serde(default)]
    pub selector: LabelSelector,
}

/// A parsed declarative object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    GitSource {
        metadata: Metadata,
        spec: GitSourceSpec,
    },
    ClusterGroup {
        metadata: Metadata,
        spec: ClusterGroupSpec,
    },
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::GitSource { .. } => "GitSource",
            Object::ClusterGroup { .. } => "ClusterGroup",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Object::GitSource { metadata, .. } | Object::ClusterGroup { metadata, .. } => {
                &metadata.name
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Metadata>,
    #[serde(default)]
    spec: serde_json::Value,
}

/// Parses a multi-document YAML stream of declarative objects. Errors name the
/// file, the document (1-based), and the reason.
pub fn parse_objects(file: &str, text: &str) -> Result<Vec<Object>, Error> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| Error::Object {
            file: file.to_string(),
            document: 0,
            reason: format!("invalid YAML: {e}"),
        })?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let err = |reason: String| Error::Object {
            file: file.to_string(),
            document: i + 1,
            reason,
        };
        let env: Envelope = serde_json::from_value(doc).map_err(|e| err(e.to_string()))?;
        match env.api_version.as_deref() {
            Some(API_VERSION) => {}
            other => {
                return Err(err(format!(
                    "apiVersion must be {API_VERSION}, not {other:?}"
                )))
            }
        }
        let metadata = env
            .metadata
            .ok_or_else(|| err("metadata.name is required".into()))?;
        validate_name(&metadata.name).map_err(|e| err(e.to_string()))?;
        let spec = if env.spec.is_null() {
            serde_json::json!({})
        } else {
            env.spec
        };
        let obj = match env.kind.as_deref() {
            Some("GitSource") => {
                let spec: GitSourceSpec = serde_json::from_value(spec)
                    .map_err(|e| err(format!("GitSource {}: spec: {e}", metadata.name)))?;
                spec.validate(&metadata.name)
                    .map_err(|e| err(format!("GitSource {}: {e}", metadata.name)))?;
                Object::GitSource { metadata, spec }
            }
            Some("ClusterGroup") => {
                let spec: ClusterGroupSpec = serde_json::from_value(spec)
                    .map_err(|e| err(format!("ClusterGroup {}: spec: {e}", metadata.name)))?;
                spec.selector
                    .validate()
                    .map_err(|e| err(format!("ClusterGroup {}: {e}", metadata.name)))?;
                Object::ClusterGroup { metadata, spec }
            }
            other => return Err(err(format!("unknown kind {other:?}"))),
        };
        out.push(obj);
    }
    Ok(out)
}

/// Names of sources, groups, clusters and bundles: DNS labels (lowercase
/// alphanumerics and `-`, at most 63), so they fit in a Kubernetes label value.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::Name {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("must be 1 to 63 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(bad("may contain only lowercase letters, digits and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("must begin and end with a letter or digit"));
    }
    Ok(())
}

/// Parses `90s`, `15m`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, Error> {
    let bad = |reason: &str| Error::Duration {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| bad("missing unit (ms, s, m, h)"))?;
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        // Checked: a huge number must fail as too large, not overflow (a panic in
        // debug builds, a wrapped duration in release).
        let secs = |per: u64| {
            n.checked_mul(per)
                .map(Duration::from_secs)
                .ok_or_else(|| bad("number too large"))
        };
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86400)?,
            _ => return Err(bad("unknown unit (use ms, s, m, h, d)")),
        };
        total = total
            .checked_add(unit)
            .ok_or_else(|| bad("number too large"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_contract_example() {
        let text = r#"
apiVersion: flotilla.io/v1alpha1
kind: GitSource
metadata: {name: apps}
spec:
  repo: https://git.example.com/platform/apps.git
  branch: main
  paths: ["apps/*"]
  pollInterval: 15s
  targets:
  - clusterSelector: {matchLabels: {env: prod}}
  - clusterGroup: edge
---
apiVersion: flotilla.io/v1alpha1
kind: ClusterGroup
metadata: {name: edge}
spec:
  selector: {matchLabels: {tier: edge}}
"#;
        let objs = parse_objects("f.yaml", text).unwrap();
        assert_eq!(objs.len(), 2);
        let Object::GitSource { spec, .. } = &objs[0] else {
            panic!()
        };
        assert_eq!(spec.git_ref(), GitRef::Branch("main".into()));
        assert_eq!(spec.poll_interval(), Duration::from_secs(15));
        assert_eq!(spec.targets.len(), 2);
        assert_eq!(objs[1].kind(), "ClusterGroup");
    }

    #[test]
    fn errors_name_file_document_and_reason() {
        let text = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: ok}\nspec: {repo: x}\n---\napiVersion: flotilla.io/v1alpha1\nkind: Bogus\nmetadata: {name: b}\n";
        let err = parse_objects("fleet.yaml", text).unwrap_err().to_string();
        assert!(err.contains("fleet.yaml"), "{err}");
        assert!(err.contains("document 2"), "{err}");
        assert!(err.contains("Bogus"), "{err}");
        let err = parse_objects("f.yaml", "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: a}\nspec: {repo: x, branch: a, tag: b}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most one"), "{err}");
        assert!(parse_objects("f.yaml", "a: [").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "15", "s", "1x", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("apps-prod").is_ok());
        for bad in ["", "Apps", "-a", "a_b", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
