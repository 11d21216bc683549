//! OCI registry addresses for bundle contents (`--oci-registry`), checked the
//! same way by the hub, which pushes, and the agent, which fetches.

/// Splits `http(s)://host[:port]/repository/path` into (`scheme://host[:port]`,
/// `repository/path`), refusing credentials, queries and fragments in the URL
/// and repository names outside the distribution spec's grammar.
pub fn parse_registry(url: &str) -> Result<(String, String), String> {
    let bad = |m: &str| Err(format!("--oci-registry {url:?}: {m}"));
    let (scheme, rest) = match url.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (s, rest),
        _ => return bad("must be http:// or https://"),
    };
    if rest.contains(['@', '?', '#', ' ']) {
        return bad("no credentials, query or fragment in the URL");
    }
    let Some((host, repository)) = rest.split_once('/') else {
        return bad("needs a repository path (e.g. /flotilla/contents)");
    };
    if host.is_empty() {
        return bad("no host");
    }
    let repository = repository.trim_end_matches('/');
    let ok = !repository.is_empty()
        && repository.split('/').all(|c| {
            let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
            // Each component starts and ends with a letter or digit: no `.` or `..`.
            c.starts_with(alnum)
                && c.ends_with(alnum)
                && c.chars().all(|ch| alnum(ch) || "._-".contains(ch))
        });
    if !ok {
        return bad(
            "needs a repository path of lowercase letters, digits, '.', '_', '-' (e.g. /flotilla/contents)",
        );
    }
    Ok((format!("{scheme}://{host}"), repository.to_string()))
}

/// Whether `digest` is a well-formed `sha256:<64 hex>`.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_are_checked() {
        assert_eq!(
            parse_registry("http://127.0.0.1:5000/flotilla/contents").unwrap(),
            ("http://127.0.0.1:5000".into(), "flotilla/contents".into())
        );
        assert_eq!(
            parse_registry("https://registry.example.com/f/").unwrap(),
            ("https://registry.example.com".into(), "f".into())
        );
        for bad in [
            "ftp://h/r",
            "http://h",
            "http://h/",
            "http:///r",
            "http://h/Upper",
            "http://u:p@h/r",
            "http://h/r?x=1",
            "http://h/a//b",
            "http://h/../x",
            "not a url",
        ] {
            assert!(parse_registry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_are_checked() {
        assert!(is_sha256_digest(&format!("sha256:{}", "a".repeat(64))));
        for bad in [
            "sha256:",
            "sha512:aa",
            "sha256:../../etc",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(!is_sha256_digest(bad), "{bad}");
        }
    }
}
