//! Git push webhooks (GitHub and GitLab): checking the signature or token against
//! each secret it may carry, the delivery id, reading the repository URLs and
//! branch out of the payload, which secret each source accepts, and deciding which
//! sources a push wakes. Pure: the hub's route only feeds it headers and the body.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::objects::{GitRef, GitSourceSpec};

/// What a push webhook says, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Every URL the payload gives for the repository, normalised.
    pub repos: Vec<String>,
    /// The pushed ref, e.g. `refs/heads/main` or `refs/tags/v1`.
    pub git_ref: String,
}

/// Which provider sent a hook, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// `X-GitHub-Event` (and Gitea/Forgejo, which send the same signature header).
    GitHub,
    /// `X-Gitlab-Event`.
    GitLab,
}

/// Why a hook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("missing or invalid signature")]
    BadSignature,
    #[error("not a push event ({0})")]
    NotPush(String),
    #[error("unknown webhook: expected X-GitHub-Event or X-Gitlab-Event")]
    UnknownProvider,
    #[error("invalid payload: {0}")]
    BadPayload(String),
}

/// SHA-256 block size, as HMAC (RFC 2104) needs it.
const BLOCK: usize = 64;

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a hook against each secret it may be signed with: GitHub's
/// `X-Hub-Signature-256: sha256=<hex HMAC of the body>`, GitLab's
/// `X-Gitlab-Token: <secret>`. `header` looks a header up by lower-case name.
/// Returns the provider and, per secret, whether the hook carries it. Every secret
/// is compared, in constant time, whatever the others gave; an empty secret never
/// matches. A hook matching none is `BadSignature`.
pub fn verify<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    body: &[u8],
    secrets: &[&[u8]],
) -> Result<(Provider, Vec<bool>), HookError> {
    let (provider, matched): (Provider, Vec<bool>) = if header("x-github-event").is_some() {
        let sig = header("x-hub-signature-256")
            .and_then(|s| s.trim().strip_prefix("sha256="))
            .and_then(|h| hex::decode(h).ok())
            .ok_or(HookError::BadSignature)?;
        let matched = secrets
            .iter()
            .map(|s| !s.is_empty() & constant_time_eq(&hmac_sha256(s, body), &sig))
            .collect();
        (Provider::GitHub, matched)
    } else if header("x-gitlab-event").is_some() {
        let token = header("x-gitlab-token").ok_or(HookError::BadSignature)?;
        let matched = secrets
            .iter()
            .map(|s| !s.is_empty() & constant_time_eq(s, token.as_bytes()))
            .collect();
        (Provider::GitLab, matched)
    } else {
        return Err(HookError::UnknownProvider);
    };
    if matched.iter().any(|m| *m) {
        Ok((provider, matched))
    } else {
        Err(HookError::BadSignature)
    }
}

/// The provider's id of a delivery, the same when the provider retries it:
/// GitHub's (and Gitea's, Forgejo's) `X-GitHub-Delivery`, GitLab's
/// `Idempotency-Key` (GitLab 17.4+), else its `X-Gitlab-Event-UUID`. Not covered
/// by the signature, so only ever compared among deliveries of one secret.
pub fn delivery_id<'a>(
    provider: Provider,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Option<&'a str> {
    let names: &[&str] = match provider {
        Provider::GitHub => &["x-github-delivery", "x-gitea-delivery"],
        Provider::GitLab => &["idempotency-key", "x-gitlab-event-uuid"],
    };
    names
        .iter()
        .find_map(|n| header(n))
        .map(str::trim)
        .filter(|id| !id.is_empty())
}

/// Which secret a source's push hooks must be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookKey {
    /// The hub-wide webhook secret (`--webhook-secret-file`).
    Hub,
    /// The `webhookSecret` of the hub secret of this name.
    Secret(String),
}

/// A source's own secret if it has one, else the hub-wide one: its
/// `webhookSecretRef`; else its `secretRef` when that secret holds a webhook
/// secret (`has_webhook_secret`); else `Hub`. A source with a secret of its own
/// never accepts the hub-wide one, nor another source's.
pub fn source_key(spec: &GitSourceSpec, has_webhook_secret: impl Fn(&str) -> bool) -> HookKey {
    if let Some(r) = &spec.webhook_secret_ref {
        return HookKey::Secret(r.clone());
    }
    match &spec.secret_ref {
        Some(r) if has_webhook_secret(r) => HookKey::Secret(r.clone()),
        _ => HookKey::Hub,
    }
}

/// Reads a push event. `event` is the value of `X-GitHub-Event` / `X-Gitlab-Event`.
pub fn parse_push(provider: Provider, event: &str, body: &[u8]) -> Result<Push, HookError> {
    let is_push = match provider {
        Provider::GitHub => event == "push",
        Provider::GitLab => event == "Push Hook" || event == "Tag Push Hook",
    };
    if !is_push {
        return Err(HookError::NotPush(event.to_string()));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| HookError::BadPayload(e.to_string()))?;
    let git_ref = v
        .get("ref")
        .and_then(Value::as_str)
        .ok_or_else(|| HookError::BadPayload("no \"ref\"".into()))?
        .to_string();
    let (object, keys): (&str, &[&str]) = match provider {
        Provider::GitHub => (
            "repository",
            &["clone_url", "html_url", "ssh_url", "git_url", "url"],
        ),
        Provider::GitLab => (
            "project",
            &[
                "git_http_url",
                "git_ssh_url",
                "web_url",
                "http_url",
                "ssh_url",
            ],
        ),
    };
    let mut repos: Vec<String> = keys
        .iter()
        .filter_map(|k| v.get(object)?.get(k)?.as_str())
        .map(normalize_repo_url)
        .collect();
    repos.sort();
    repos.dedup();
    if repos.is_empty() {
        return Err(HookError::BadPayload(format!("no {object} URL")));
    }
    Ok(Push { repos, git_ref })
}

/// A repository URL reduced to what identifies the repository: no scheme, no user
/// or password, lower-case host, default ports dropped, no trailing `.git` or `/`.
/// `https://github.com/o/r.git`, `git@github.com:o/r.git` and
/// `ssh://git@GitHub.com/o/r` are all `github.com/o/r`.
pub fn normalize_repo_url(url: &str) -> String {
    let url = url.trim();
    let (rest, scp) = match url.split_once("://") {
        Some((_, rest)) => (rest, false),
        // scp-like `user@host:path`
        None => (url, true),
    };
    let (authority, path) = if scp {
        match rest.split_once(':') {
            Some((a, p)) => (a, p),
            None => ("", rest),
        }
    } else {
        rest.split_once('/').unwrap_or((rest, ""))
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host.to_ascii_lowercase();
    let host = ["22", "80", "443", "9418"]
        .iter()
        .find_map(|p| host.strip_suffix(&format!(":{p}")))
        .map(str::to_string)
        .unwrap_or(host);
    let path = path.trim_matches('/');
    let path = path
        .strip_suffix(".git")
        .unwrap_or(path)
        .trim_end_matches('/');
    if host.is_empty() {
        path.to_string()
    } else {
        format!("{host}/{path}")
    }
}

/// Whether a push is for a source's repository (any ref).
pub fn same_repo(push: &Push, spec: &GitSourceSpec) -> bool {
    push.repos.contains(&normalize_repo_url(&spec.repo))
}

/// Whether a push concerns a source: same repository and the ref it follows. A
/// source on a fixed revision is never triggered (nothing can move it).
pub fn concerns(push: &Push, spec: &GitSourceSpec) -> bool {
    if !same_repo(push, spec) {
        return false;
    }
    match spec.git_ref() {
        GitRef::Branch(b) => push.git_ref == format!("refs/heads/{b}"),
        GitRef::Tag(t) => push.git_ref == format!("refs/tags/{t}"),
        GitRef::Revision(_) => false,
    }
}

/// The sources a verified push wakes: those it concerns whose own key (see
/// [`source_key`]) is among the keys the hook was signed with. `sources` are
/// (name, spec, key).
pub fn to_wake(
    push: &Push,
    sources: &[(String, GitSourceSpec, HookKey)],
    signed_with: &[HookKey],
) -> Vec<String> {
    sources
        .iter()
        .filter(|(_, spec, key)| signed_with.contains(key) && concerns(push, spec))
        .map(|(name, _, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn hmac_matches_rfc4231_and_github_example() {
        // RFC 4231 test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // GitHub's documented example ("Validating webhook deliveries").
        assert_eq!(
            hex::encode(hmac_sha256(b"It's a Secret to Everybody", b"Hello, World!")),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        // A key longer than a block is hashed first (RFC 4231 test case 6).
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn headers(list: &[(&'static str, String)]) -> BTreeMap<&'static str, String> {
        list.iter().cloned().collect()
    }

    #[test]
    fn verifies_github_and_gitlab_per_secret() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = format!("sha256={}", hex::encode(hmac_sha256(b"s3cret", body)));
        let h = headers(&[
            ("x-github-event", "push".into()),
            ("x-hub-signature-256", sig.clone()),
            ("x-github-delivery", "d-1".into()),
        ]);
        let get = |k: &str| h.get(k).map(String::as_str);
        assert_eq!(
            verify(get, body, &[b"other", b"s3cret", b"third"]),
            Ok((Provider::GitHub, vec![false, true, false])),
            "says which secret signed it"
        );
        assert_eq!(delivery_id(Provider::GitHub, get), Some("d-1"));
        assert_eq!(verify(get, body, &[b"other"]), Err(HookError::BadSignature));
        assert_eq!(
            verify(get, b"tampered", &[b"s3cret"]),
            Err(HookError::BadSignature)
        );
        // An empty secret never authenticates anything.
        let empty_sig = format!("sha256={}", hex::encode(hmac_sha256(b"", body)));
        let h2 = headers(&[
            ("x-github-event", "push".into()),
            ("x-hub-signature-256", empty_sig),
        ]);
        assert_eq!(
            verify(|k: &str| h2.get(k).map(String::as_str), body, &[b""]),
            Err(HookError::BadSignature)
        );
        let unsigned = headers(&[("x-github-event", "push".into())]);
        assert_eq!(
            verify(
                |k: &str| unsigned.get(k).map(String::as_str),
                body,
                &[b"s3cret"]
            ),
            Err(HookError::BadSignature)
        );

        let gl = headers(&[
            ("x-gitlab-event", "Push Hook".into()),
            ("x-gitlab-token", "s3cret".into()),
            ("x-gitlab-event-uuid", "ev-1".into()),
            ("idempotency-key", "idem-1".into()),
        ]);
        let get = |k: &str| gl.get(k).map(String::as_str);
        assert_eq!(
            verify(get, body, &[b"s3cret", b"s3cret-b"]),
            Ok((Provider::GitLab, vec![true, false]))
        );
        assert_eq!(delivery_id(Provider::GitLab, get), Some("idem-1"));
        assert_eq!(verify(get, body, &[b"s3cre"]), Err(HookError::BadSignature));
        let gl_old = headers(&[("x-gitlab-event-uuid", " ev-2 ".into())]);
        assert_eq!(
            delivery_id(Provider::GitLab, |k: &str| gl_old
                .get(k)
                .map(String::as_str)),
            Some("ev-2")
        );
        assert_eq!(delivery_id(Provider::GitHub, |_: &str| None), None);
        assert_eq!(
            verify(|_: &str| None, body, &[b"s3cret"]),
            Err(HookError::UnknownProvider)
        );
    }

    #[test]
    fn a_source_accepts_its_own_secret_or_else_the_hubs() {
        let spec = |secret: Option<&str>, hook: Option<&str>| GitSourceSpec {
            repo: "https://github.com/o/r".into(),
            secret_ref: secret.map(Into::into),
            webhook_secret_ref: hook.map(Into::into),
            ..Default::default()
        };
        let has = |n: &str| n == "creds-with-hook";
        assert_eq!(source_key(&spec(None, None), has), HookKey::Hub);
        assert_eq!(
            source_key(&spec(Some("plain-creds"), None), has),
            HookKey::Hub
        );
        assert_eq!(
            source_key(&spec(Some("creds-with-hook"), None), has),
            HookKey::Secret("creds-with-hook".into())
        );
        assert_eq!(
            source_key(&spec(Some("creds-with-hook"), Some("hook-a")), has),
            HookKey::Secret("hook-a".into()),
            "webhookSecretRef wins"
        );
        // Who gets woken: only the sources whose key signed the hook.
        let push = Push {
            repos: vec!["github.com/o/r".into()],
            git_ref: "refs/heads/main".into(),
        };
        let sources = vec![
            (
                "a".to_string(),
                spec(None, Some("hook-a")),
                HookKey::Secret("hook-a".into()),
            ),
            (
                "b".to_string(),
                spec(None, Some("hook-b")),
                HookKey::Secret("hook-b".into()),
            ),
            ("hub".to_string(), spec(None, None), HookKey::Hub),
        ];
        assert_eq!(
            to_wake(&push, &sources, &[HookKey::Secret("hook-b".into())]),
            ["b"]
        );
        assert_eq!(to_wake(&push, &sources, &[HookKey::Hub]), ["hub"]);
        assert!(to_wake(&push, &sources, &[]).is_empty());
    }

    #[test]
    fn reads_push_payloads() {
        let gh = br#"{"ref":"refs/heads/main","repository":{
            "clone_url":"https://github.com/Org/apps.git","html_url":"https://github.com/Org/apps",
            "ssh_url":"git@github.com:Org/apps.git","git_url":"git://github.com/Org/apps.git"}}"#;
        let p = parse_push(Provider::GitHub, "push", gh).unwrap();
        assert_eq!(p.repos, ["github.com/Org/apps"]);
        assert_eq!(p.git_ref, "refs/heads/main");
        assert!(matches!(
            parse_push(Provider::GitHub, "ping", gh),
            Err(HookError::NotPush(_))
        ));

        let gl = br#"{"object_kind":"push","ref":"refs/heads/dev","project":{
            "git_http_url":"http://gitlab.example.com/g/apps.git",
            "git_ssh_url":"ssh://git@gitlab.example.com:22/g/apps.git"}}"#;
        let p = parse_push(Provider::GitLab, "Push Hook", gl).unwrap();
        assert_eq!(p.repos, ["gitlab.example.com/g/apps"]);
        assert!(matches!(
            parse_push(Provider::GitLab, "Push Hook", b"{\"ref\":\"x\"}"),
            Err(HookError::BadPayload(_))
        ));
        assert!(matches!(
            parse_push(Provider::GitLab, "Push Hook", b"not json"),
            Err(HookError::BadPayload(_))
        ));
    }

    #[test]
    fn normalises_urls() {
        for (url, want) in [
            ("https://GitHub.com/o/r.git", "github.com/o/r"),
            ("https://user:pw@github.com/o/r/", "github.com/o/r"),
            ("git@github.com:o/r.git", "github.com/o/r"),
            ("ssh://git@github.com:22/o/r", "github.com/o/r"),
            ("http://127.0.0.1:8080/r.git", "127.0.0.1:8080/r"),
            ("git://127.0.0.1:9418/r", "127.0.0.1/r"),
            ("file:///tmp/x/repo", "tmp/x/repo"),
        ] {
            assert_eq!(normalize_repo_url(url), want, "{url}");
        }
    }

    #[test]
    fn a_push_concerns_sources_of_that_repo_and_ref() {
        let push = Push {
            repos: vec!["github.com/o/r".into()],
            git_ref: "refs/heads/main".into(),
        };
        let spec = |repo: &str, branch: Option<&str>, tag: Option<&str>| GitSourceSpec {
            repo: repo.into(),
            branch: branch.map(Into::into),
            tag: tag.map(Into::into),
            ..Default::default()
        };
        assert!(concerns(&push, &spec("https://github.com/o/r", None, None)));
        assert!(concerns(
            &push,
            &spec("git@github.com:o/r.git", Some("main"), None)
        ));
        assert!(!concerns(
            &push,
            &spec("https://github.com/o/r", Some("dev"), None)
        ));
        assert!(!concerns(
            &push,
            &spec("https://github.com/o/other", None, None)
        ));
        assert!(!concerns(
            &push,
            &spec("https://github.com/o/r", None, Some("v1"))
        ));
        let fixed = GitSourceSpec {
            revision: Some("abcd".into()),
            ..spec("https://github.com/o/r", None, None)
        };
        assert!(!concerns(&push, &fixed));
    }
}
