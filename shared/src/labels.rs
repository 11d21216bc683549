//! Kubernetes-style labels: validation, `k=v,k2=v2` parsing and `kubectl label` edits.

use std::collections::BTreeMap;

use crate::Error;

/// A set of labels, sorted by key.
pub type Labels = BTreeMap<String, String>;

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters of alphanumerics, `-`, `_`, `.`, beginning and ending alphanumeric.
pub fn validate_key(key: &str) -> Result<(), Error> {
    let err = |reason: &str| Error::Label {
        label: key.to_string(),
        reason: reason.to_string(),
    };
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Err(err("prefix must be 1 to 253 characters"));
        }
        let ok = prefix.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
        if !ok {
            return Err(err("prefix must be a lowercase DNS subdomain"));
        }
    }
    if name.is_empty() {
        return Err(err("name part must not be empty"));
    }
    validate_name_part(name).map_err(|r| err(&r))
}

/// Checks a label value: empty, or at most 63 characters like a key's name part.
pub fn validate_value(value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Ok(());
    }
    validate_name_part(value).map_err(|reason| Error::Label {
        label: value.to_string(),
        reason,
    })
}

fn validate_name_part(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err("may contain only alphanumerics, '-', '_' and '.'".into());
    }
    let first = s.chars().next().unwrap_or('-');
    let last = s.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("must begin and end with an alphanumeric character".into());
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (empty string: no labels).
pub fn parse_labels(s: &str) -> Result<Labels, Error> {
    let mut labels = Labels::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| Error::Label {
            label: part.to_string(),
            reason: "expected key=value".into(),
        })?;
        validate_key(k)?;
        validate_value(v)?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// One `kubectl label` style edit: `k=v` sets, `k-` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelEdit {
    Set(String, String),
    Remove(String),
}

impl std::str::FromStr for LabelEdit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some((k, v)) = s.split_once('=') {
            validate_key(k)?;
            validate_value(v)?;
            Ok(LabelEdit::Set(k.to_string(), v.to_string()))
        } else if let Some(k) = s.strip_suffix('-') {
            validate_key(k)?;
            Ok(LabelEdit::Remove(k.to_string()))
        } else {
            Err(Error::Label {
                label: s.to_string(),
                reason: "expected key=value to set or key- to remove".into(),
            })
        }
    }
}

/// Applies edits in order and returns the new labels.
pub fn apply_edits(labels: &Labels, edits: &[LabelEdit]) -> Labels {
    let mut out = labels.clone();
    for edit in edits {
        match edit {
            LabelEdit::Set(k, v) => {
                out.insert(k.clone(), v.clone());
            }
            LabelEdit::Remove(k) => {
                out.remove(k);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let l = parse_labels("env=prod, tier=edge").unwrap();
        assert_eq!(l.get("env").unwrap(), "prod");
        assert_eq!(l.len(), 2);
        assert!(parse_labels("env").is_err());
        assert!(parse_labels("-bad=x").is_err());
        assert!(parse_labels("example.com/team=a").is_ok());
        assert!(parse_labels("Example.com/team=a").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn edits_set_and_remove() {
        let l = parse_labels("env=dev,region=eu").unwrap();
        let edits: Vec<LabelEdit> = ["env=prod", "region-"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let out = apply_edits(&l, &edits);
        assert_eq!(out, parse_labels("env=prod").unwrap());
        assert!("nothing".parse::<LabelEdit>().is_err());
    }
}
