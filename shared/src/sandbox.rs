//! What repository content may hand the render tools. A bundle's files are written
//! by whoever can push to its repository, while the hub that runs `helm` and
//! `kustomize` holds the fleet CA key and every repository credential: each value
//! of `fleet.yaml` that reaches a command line is checked here (names, versions,
//! chart references, paths), and so is every URL a render may fetch from, against
//! the operator's allow list. The checks only look at strings; they do no I/O.

/// Helm's own limit on release names (it appends suffixes up to 63).
pub const MAX_RELEASE_NAME: usize = 53;
/// A namespace is a DNS-1123 label.
pub const MAX_NAMESPACE: usize = 63;
/// Longer than any real version constraint (`>=1.2.3-rc.1 <2.0.0 || 3.x`).
pub const MAX_VERSION: usize = 128;
/// Longer than any real chart URL or repository URL.
pub const MAX_URL: usize = 2048;

/// Whether `s` is a DNS-1123 label of at most `max` characters: lowercase
/// letters, digits and `-`, beginning and ending with a letter or digit.
fn dns_label(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("{s:?} must be 1 to {max} characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "{s:?} may contain only lowercase letters, digits and '-' (a DNS-1123 label)"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{s:?} must begin and end with a letter or digit"));
    }
    Ok(())
}

/// A Helm release name: a DNS-1123 name of at most 53 characters (letters,
/// digits, `-` and `.`), as Helm itself requires; never anything that reads as a flag.
pub fn check_release_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_RELEASE_NAME {
        return Err(format!("{s:?} must be 1 to {MAX_RELEASE_NAME} characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "{s:?} may contain only lowercase letters, digits, '-' and '.' (a DNS-1123 name)"
        ));
    }
    let first_last = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !first_last(s.as_bytes()[0]) || !first_last(s.as_bytes()[s.len() - 1]) {
        return Err(format!("{s:?} must begin and end with a letter or digit"));
    }
    Ok(())
}

/// A namespace: a DNS-1123 label.
pub fn check_namespace(s: &str) -> Result<(), String> {
    dns_label(s, MAX_NAMESPACE)
}

/// A chart version or version constraint as Helm reads them (`1.2.3`, `^1.2`,
/// `>=1.0.0 <2.0.0`, `1.x || 2.3.*`, `1.0.0-rc.1+build.5`): digits, letters, `.`,
/// `-`, `+`, `*`, the comparison operators, `,`, `|` and spaces, beginning with a
/// digit, a `v`, an operator or a wildcard — never with `-`.
pub fn check_version(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_VERSION {
        return Err(format!("{s:?} must be 1 to {MAX_VERSION} characters"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".-+*^~<>=!|, ".contains(c);
    if let Some(c) = s.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "{s:?} is not a version constraint ({c:?} is not allowed)"
        ));
    }
    let first = s.trim_start().chars().next().unwrap_or('-');
    if !(first.is_ascii_digit() || "vVxX*^~<>=!".contains(first)) {
        return Err(format!(
            "{s:?} is not a version constraint (it must begin with a digit, 'v', an operator or a wildcard)"
        ));
    }
    Ok(())
}

/// A chart's name in a chart repository (`helm.chart` with `helm.repo`):
/// letters, digits, `.`, `_` and `-`, beginning with a letter or digit.
pub fn check_chart_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must be 1 to 253 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        || !s.as_bytes()[0].is_ascii_alphanumeric()
    {
        return Err(format!(
            "{s:?} is not a chart name (letters, digits, '.', '_' and '-', beginning with a letter or digit)"
        ));
    }
    Ok(())
}

/// The URL schemes a chart may come from: a chart repository or chart archive
/// over HTTP(S), or an OCI registry.
const CHART_SCHEMES: [&str; 3] = ["https://", "http://", "oci://"];

/// A URL Helm may fetch a chart from (`helm.repo`, or `helm.chart` as an
/// `oci://` or archive URL): one of the chart schemes, a host, no credentials,
/// no whitespace, control characters or `..` segments.
pub fn check_chart_url(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_URL {
        return Err(format!("{s:?} must be 1 to {MAX_URL} characters"));
    }
    let Some(rest) = CHART_SCHEMES.iter().find_map(|p| s.strip_prefix(p)) else {
        return Err(format!(
            "{s:?} is not a chart URL (https://, http:// or oci://)"
        ));
    };
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} contains whitespace or control characters"));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{s:?} names no host"));
    }
    if host.contains('@') {
        return Err(format!(
            "{s:?} carries credentials; chart repositories the hub may use are set by the operator"
        ));
    }
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    if path.split('/').any(|p| p == ".." || p == ".") {
        return Err(format!("{s:?} has '.' or '..' segments"));
    }
    Ok(())
}

/// Whether `url` lies under one of the operator's allowed prefixes
/// (`--helm-repo-allow`). A prefix matches at a path boundary only: prefix
/// `https://charts.example.com` allows `https://charts.example.com/x`, not
/// `https://charts.example.com.evil.net/x` or `https://charts.example.com@evil.net`.
pub fn url_allowed(url: &str, allow: &[String]) -> bool {
    allow.iter().any(|prefix| {
        let prefix = prefix.trim();
        if prefix.is_empty() || check_chart_url(url).is_err() {
            return false;
        }
        match url.strip_prefix(prefix) {
            Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    })
}

/// Refuses a remote chart URL that is not under an allowed prefix, with the reason.
pub fn check_allowed(url: &str, allow: &[String]) -> Result<(), String> {
    check_chart_url(url)?;
    if url_allowed(url, allow) {
        return Ok(());
    }
    Err(if allow.is_empty() {
        format!(
            "{url} is outside the repository, and the hub fetches charts only from the prefixes the operator allows (flotilla-hub --helm-repo-allow URL-PREFIX); none are allowed"
        )
    } else {
        format!(
            "{url} is not under an allowed chart prefix ({}; flotilla-hub --helm-repo-allow)",
            allow.join(", ")
        )
    })
}

/// The host (and port) of a URL, for the proxy exemption of an allowed render.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = CHART_SCHEMES.iter().find_map(|p| url.strip_prefix(p))?;
    rest.split(['/', '?', '#'])
        .next()
        .filter(|h| !h.is_empty() && !h.contains('@'))
}

/// A Kubernetes version as the agent reports it for Helm's `--kube-version`
/// (`v1.34.1`, `1.30.0-gke.1+abc`).
pub fn check_kube_version(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        && (s.as_bytes()[0].is_ascii_digit() || s.starts_with('v'));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a Kubernetes version"))
    }
}

/// An API version for Helm's `--api-versions` (`apps/v1`, `v1`,
/// `monitoring.coreos.com/v1/ServiceMonitor`).
pub fn check_api_version(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not an API version"))
    }
}

/// Resolves `path`, written in bundle directory `dir` ("." or `a/b`), to a
/// bundle-relative path (`.` for the root). Refuses URLs and remote targets
/// (anything with `://`, `git@…`, `host:path`), absolute paths, and paths that
/// leave the bundle through `..`.
pub fn bundle_path(dir: &str, path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("an empty path".into());
    }
    if path.contains("://") {
        return Err(format!(
            "{path:?} is a URL: the hub renders from the repository only"
        ));
    }
    if path.starts_with("git@") || path.starts_with("ssh:") || path.starts_with("git::") {
        return Err(format!(
            "{path:?} is a remote repository: the hub renders from the repository only"
        ));
    }
    if path.starts_with('/') {
        return Err(format!("{path:?} is an absolute path"));
    }
    if path.starts_with('~') {
        return Err(format!("{path:?} names a home directory"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(format!("{path:?} contains control characters"));
    }
    let mut parts: Vec<&str> = if dir == "." || dir.is_empty() {
        Vec::new()
    } else {
        dir.split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect()
    };
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{path:?} leaves the bundle directory"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_names_and_namespaces_are_dns_names() {
        for ok in ["web", "web-1", "a.b", "x"] {
            assert!(check_release_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "--post-renderer=/usr/bin/tac",
            "-x",
            "Web",
            "a b",
            "a/b",
            "web-",
            ".web",
            &"a".repeat(54),
        ] {
            assert!(check_release_name(bad).is_err(), "{bad}");
        }
        assert!(check_namespace("kube-system").is_ok());
        for bad in ["--kubeconfig=/x", "a.b", "A", "", &"a".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_are_constraints_never_flags() {
        for ok in [
            "1.2.3",
            "v1.2.3",
            "^1.2",
            "~1.2.3",
            ">=1.0.0 <2.0.0",
            "1.x || 2.3.*",
            "1.0.0-rc.1+build.5",
            "*",
            "!=1.2.3",
        ] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "--post-renderer=/bin/sh",
            "-1",
            "1.2.3;rm",
            "1.2.3\n",
            "$(id)",
            "",
            " -x",
        ] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chart_names_and_urls() {
        assert!(check_chart_name("nginx").is_ok());
        assert!(check_chart_name("ingress-nginx_2.x").is_ok());
        for bad in ["-x", "--post-renderer=x", "a/b", "../x", ""] {
            assert!(check_chart_name(bad).is_err(), "{bad}");
        }
        for ok in [
            "https://charts.example.com",
            "oci://registry.example.com/charts/web",
            "http://127.0.0.1:8080/web-1.0.0.tgz",
        ] {
            assert!(check_chart_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "file:///etc/passwd",
            "https://user:pw@charts.example.com",
            "https://token@charts.example.com/x",
            "https://",
            "https://h/a b",
            "https://h/a/../b",
            "s3://bucket/x",
            "--repo=https://h",
        ] {
            assert!(check_chart_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_list_matches_at_boundaries() {
        let allow = vec![
            "https://charts.example.com".to_string(),
            "oci://reg.example.com/team/".to_string(),
        ];
        for ok in [
            "https://charts.example.com",
            "https://charts.example.com/stable",
            "oci://reg.example.com/team/web",
        ] {
            assert!(url_allowed(ok, &allow), "{ok}");
        }
        for bad in [
            "https://charts.example.com.evil.net/x",
            "https://charts.example.com@evil.net/x",
            "https://charts.example.comx",
            "http://charts.example.com/x",
            "oci://reg.example.com/other/web",
            "oci://reg.example.com/team/../other/web",
        ] {
            assert!(!url_allowed(bad, &allow), "{bad}");
        }
        let e = check_allowed("https://charts.evil.net", &[]).unwrap_err();
        assert!(e.contains("--helm-repo-allow"), "{e}");
        let e = check_allowed("https://charts.evil.net", &allow).unwrap_err();
        assert!(e.contains("https://charts.example.com"), "{e}");
        assert_eq!(
            url_host("oci://reg.example.com:5000/team/web"),
            Some("reg.example.com:5000")
        );
    }

    #[test]
    fn cluster_reported_versions() {
        assert!(check_kube_version("v1.34.1").is_ok());
        assert!(check_kube_version("1.30.0-gke.1+abc").is_ok());
        assert!(check_kube_version("--post-renderer=x").is_err());
        assert!(check_api_version("apps/v1").is_ok());
        assert!(check_api_version("monitoring.coreos.com/v1/ServiceMonitor").is_ok());
        assert!(check_api_version("-x").is_err());
        assert!(check_api_version("a b").is_err());
    }

    #[test]
    fn bundle_paths_stay_in_the_bundle() {
        assert_eq!(bundle_path(".", "base").unwrap(), "base");
        assert_eq!(bundle_path("overlays/prod", "../../base").unwrap(), "base");
        assert_eq!(bundle_path("a", "./b//c").unwrap(), "a/b/c");
        assert_eq!(bundle_path("a", "..").unwrap(), ".");
        for (dir, bad) in [
            (".", "http://127.0.0.1:1/x.yaml"),
            (".", "https://github.com/org/repo//base?ref=v1"),
            (".", "git@github.com:org/repo.git"),
            (".", "ssh://git@github.com/org/repo"),
            (".", "file:///var/lib/flotilla/git/x"),
            (".", "/etc/passwd"),
            (".", "../secret"),
            ("overlays/prod", "../../../secret"),
            (".", "~/x"),
            (".", ""),
        ] {
            assert!(bundle_path(dir, bad).is_err(), "{dir} {bad}");
        }
    }
}
