//! The declarative objects operators hand to `flotilla apply -f`: `GitSource`,
//! `ClusterGroup` and `Notification` (apiVersion `flotilla.io/v1alpha1`), and the names and durations in them.

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
    /// Name of a hub secret whose `webhookSecret` alone authenticates push hooks
    /// for this source (see `webhook::source_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_ref: Option<String>,
}

/// What Git reference a source follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
        validate_repo_url(&self.repo)?;
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
        if let Some(r) = &self.webhook_secret_ref {
            validate_name(r).map_err(|e| bad(format!("webhookSecretRef: {e}")))?;
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
    Notification {
        metadata: Metadata,
        spec: crate::notify::NotificationSpec,
    },
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::GitSource { .. } => "GitSource",
            Object::ClusterGroup { .. } => "ClusterGroup",
            Object::Notification { .. } => "Notification",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Object::GitSource { metadata, .. }
            | Object::ClusterGroup { metadata, .. }
            | Object::Notification { metadata, .. } => &metadata.name,
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
            Some("Notification") => {
                let spec: crate::notify::NotificationSpec = serde_json::from_value(spec)
                    .map_err(|e| err(format!("Notification {}: spec: {e}", metadata.name)))?;
                spec.validate(&metadata.name)
                    .map_err(|e| err(format!("Notification {}: {e}", metadata.name)))?;
                Object::Notification { metadata, spec }
            }
            other => return Err(err(format!("unknown kind {other:?}"))),
        };
        out.push(obj);
    }
    Ok(out)
}

/// What an operator is told to do instead of writing credentials into a URL.
pub const CREDENTIALS_HINT: &str = "keep them in a hub secret instead \
     (flotilla secret create NAME --username USER --password-file FILE) and name it \
     with --secret NAME (spec.secretRef)";

/// Where the credentials of a repository URL would be: the user-info part of
/// `scheme://userinfo@host/...` or of scp-like `userinfo@host:path`.
struct UserInfo<'a> {
    /// `None` for scp-like URLs.
    scheme: Option<&'a str>,
    /// Byte range of the user info in the URL (without the `@`).
    start: usize,
    end: usize,
    text: &'a str,
}

/// Finds the user info of a repository URL, if it has one. Pure string work, so
/// that what is refused here is exactly what is redacted for display.
fn user_info(url: &str) -> Option<UserInfo<'_>> {
    if let Some((scheme, rest)) = url.split_once("://") {
        let start = scheme.len() + 3;
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let end = match rest[..authority_end].rfind('@') {
            Some(at) => at,
            // `user:pa/ss@host/x`: a raw `/` in a password ends the authority early;
            // what precedes the last `@` is then user info too, whenever the
            // "authority" is not a plain `host[:port]`.
            None => {
                let at = rest.rfind('@')?;
                let authority = &rest[..authority_end];
                let port_ok = match authority.rsplit_once(':') {
                    Some((_, port)) => port.chars().all(|c| c.is_ascii_digit()),
                    None => true,
                };
                if port_ok || authority.ends_with(']') {
                    return None;
                }
                at
            }
        };
        return Some(UserInfo {
            scheme: Some(scheme),
            start,
            end: start + end,
            text: &rest[..end],
        });
    }
    // scp-like `[user@]host:path`; a local path has a `/` before any `:`.
    let colon = url.find(':')?;
    if url[..colon].contains('/') || url.starts_with('.') {
        return None;
    }
    let host_part = &url[..url.find('/').unwrap_or(url.len())];
    let end = host_part.rfind('@')?;
    Some(UserInfo {
        scheme: None,
        start: 0,
        end,
        text: &url[..end],
    })
}

/// Whether the user info is a secret: a password (`user:password`), or for HTTP(S)
/// anything at all (`https://TOKEN@host` authenticates with the token as user name).
fn is_secret(info: &UserInfo<'_>) -> bool {
    let http = info
        .scheme
        .is_some_and(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"));
    info.text.contains(':') || (http && !info.text.is_empty())
}

/// The repository URL as the API, logs and messages may show it: any password or
/// token replaced by `<redacted>` (an SSH user name stays).
pub fn redact_repo_url(url: &str) -> String {
    match user_info(url) {
        Some(info) if is_secret(&info) => {
            let shown = match info.text.split_once(':') {
                Some((user, _)) if !user.is_empty() => format!("{user}:<redacted>"),
                _ => "<redacted>".to_string(),
            };
            format!("{}{shown}{}", &url[..info.start], &url[info.end..])
        }
        _ => url.to_string(),
    }
}

/// Refuses a repository URL that carries credentials (`https://user:pass@host`,
/// `https://token@host`, `ssh://user:pass@host`): the URL is shown by the API and
/// kept in the store, credentials belong in a secret. An SSH user name alone
/// (`ssh://git@host/x`, `git@host:x`) is fine.
pub fn validate_repo_url(url: &str) -> Result<(), Error> {
    match user_info(url) {
        Some(info) if is_secret(&info) => Err(Error::RepoUrl {
            url: redact_repo_url(url),
            reason: format!(
                "it carries credentials, and the URL is stored and shown as written; {CREDENTIALS_HINT}"
            ),
        }),
        _ => Ok(()),
    }
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
    fn credentials_in_repo_urls_are_refused_and_never_shown() {
        let refused = [
            (
                "https://alice:zq9Tk@git.example.com/x.git",
                "https://alice:<redacted>@git.example.com/x.git",
            ),
            (
                "https://zq9Tk@git.example.com/x.git",
                "https://<redacted>@git.example.com/x.git",
            ),
            (
                "HTTP://zq9Tk@git.example.com/x.git",
                "HTTP://<redacted>@git.example.com/x.git",
            ),
            (
                "https://:zq9Tk@git.example.com/x.git",
                "https://<redacted>@git.example.com/x.git",
            ),
            (
                "https://alice:zq@9Tk@git.example.com/x",
                "https://alice:<redacted>@git.example.com/x",
            ),
            (
                "https://alice:zq/9Tk@git.example.com/x",
                "https://alice:<redacted>@git.example.com/x",
            ),
            (
                "https://alice:zq%409Tk@host:8443/x",
                "https://alice:<redacted>@host:8443/x",
            ),
            (
                "ssh://git:zq9Tk@git.example.com/x.git",
                "ssh://git:<redacted>@git.example.com/x.git",
            ),
            (
                "git://u:zq9Tk@127.0.0.1/x",
                "git://u:<redacted>@127.0.0.1/x",
            ),
            (
                "git:zq9Tk@git.example.com:org/x.git",
                "git:<redacted>@git.example.com:org/x.git",
            ),
        ];
        for (url, shown) in refused {
            let err = validate_repo_url(url).unwrap_err().to_string();
            assert!(!err.contains("zq") && !err.contains("9Tk"), "{url}: {err}");
            assert!(err.contains(shown), "{url}: {err}");
            assert!(
                err.contains("flotilla secret create") && err.contains("--secret"),
                "{err}"
            );
            assert_eq!(redact_repo_url(url), shown);
            let spec = GitSourceSpec {
                repo: url.into(),
                ..Default::default()
            };
            assert!(spec.validate("apps").is_err(), "{url}");
        }
        let fine = [
            "https://git.example.com/x.git",
            "https://git.example.com:8443/org/x.git",
            "https://[::1]:8443/x.git",
            "https://git.example.com/team@x/y.git",
            "ssh://git@git.example.com/x.git",
            "ssh://git@git.example.com:2222/x.git",
            "git@github.com:org/x.git",
            "git://127.0.0.1:9418/x",
            "file:///srv/git/x",
            "/srv/git/x",
            "./repo",
            "/tmp/a:b@c",
        ];
        for url in fine {
            assert!(validate_repo_url(url).is_ok(), "{url}");
            assert_eq!(redact_repo_url(url), url);
        }
        let text = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec: {repo: \"https://tok3n@g.example/x\"}\n";
        let err = parse_objects("f.yaml", text).unwrap_err().to_string();
        assert!(err.contains("f.yaml") && err.contains("apps"), "{err}");
        assert!(!err.contains("tok3n"), "{err}");
    }

    #[test]
    fn names() {
        assert!(validate_name("apps-prod").is_ok());
        for bad in ["", "Apps", "-a", "a_b", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
