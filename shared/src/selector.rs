//! Kubernetes label selectors: the `matchLabels`/`matchExpressions` form used in
//! files, and the string form used on the command line (`env=prod,tier!=edge`,
//! `region in (eu,us)`, `!legacy`), with Kubernetes' matching semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::labels::{validate_key, validate_value, Labels};
use crate::Error;

/// A selector as written in YAML. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// A selector that matches every set of labels.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Checks keys, values and operator arity, as the API server would.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Error::Selector {
            selector: self.to_string(),
            reason,
        };
        for (k, v) in &self.match_labels {
            validate_key(k).map_err(|e| bad(e.to_string()))?;
            validate_value(v).map_err(|e| bad(e.to_string()))?;
        }
        for r in &self.match_expressions {
            validate_key(&r.key).map_err(|e| bad(e.to_string()))?;
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(bad(format!("{:?} on {} needs values", r.operator, r.key)))
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(bad(format!(
                        "{:?} on {} takes no values",
                        r.operator, r.key
                    )))
                }
                _ => {}
            }
            for v in &r.values {
                validate_value(v).map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Kubernetes semantics: every term must hold. `NotIn` and `DoesNotExist` hold
    /// when the key is absent.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Parses the command-line form. The empty string selects everything.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let err = |reason: &str| Error::Selector {
            selector: s.to_string(),
            reason: reason.to_string(),
        };
        let mut sel = LabelSelector::default();
        for term in split_terms(s).map_err(|r| err(&r))? {
            let term = term.trim();
            if term.is_empty() {
                return Err(err("empty term"));
            }
            if let Some(key) = term.strip_prefix('!') {
                sel.match_expressions.push(Requirement {
                    key: key.trim().to_string(),
                    operator: Operator::DoesNotExist,
                    values: vec![],
                });
            } else if let Some((k, v)) = term.split_once("!=") {
                sel.match_expressions.push(Requirement {
                    key: k.trim().to_string(),
                    operator: Operator::NotIn,
                    values: vec![v.trim().to_string()],
                });
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                sel.match_labels
                    .insert(k.trim().to_string(), v.trim().to_string());
            } else if let Some((k, op, rest)) = set_term(term) {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err("expected a parenthesised list of values"))?;
                let values: Vec<String> = inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                sel.match_expressions.push(Requirement {
                    key: k.to_string(),
                    operator: op,
                    values,
                });
            } else {
                if term.contains(char::is_whitespace) {
                    return Err(err("unexpected whitespace in a term"));
                }
                sel.match_expressions.push(Requirement {
                    key: term.to_string(),
                    operator: Operator::Exists,
                    values: vec![],
                });
            }
        }
        sel.validate().map_err(|e| match e {
            Error::Selector { reason, .. } => err(&reason),
            other => other,
        })?;
        Ok(sel)
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    if s.trim().is_empty() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    out.push(&s[start..]);
    Ok(out)
}

fn set_term(term: &str) -> Option<(&str, Operator, &str)> {
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next()?;
    let rest = words.next()?.trim_start();
    if let Some(r) = rest.strip_prefix("notin") {
        Some((key, Operator::NotIn, r))
    } else {
        rest.strip_prefix("in").map(|r| (key, Operator::In, r))
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for LabelSelector {
    /// The canonical string form, which `parse` reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut terms: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            let values: BTreeSet<&String> = r.values.iter().collect();
            let list = values.into_iter().cloned().collect::<Vec<_>>().join(",");
            terms.push(match r.operator {
                Operator::In => format!("{} in ({list})", r.key),
                Operator::NotIn if r.values.len() == 1 => format!("{}!={}", r.key, r.values[0]),
                Operator::NotIn => format!("{} notin ({list})", r.key),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::parse_labels;

    fn m(sel: &str, labels: &str) -> bool {
        LabelSelector::parse(sel)
            .unwrap()
            .matches(&parse_labels(labels).unwrap())
    }

    #[test]
    fn string_form_semantics() {
        // (selector, labels, matches) in Kubernetes' meaning.
        let cases = [
            ("", "", true),
            ("", "env=prod", true),
            ("env=prod", "env=prod", true),
            ("env==prod", "env=prod", true),
            ("env=prod", "env=dev", false),
            ("env=prod", "", false),
            ("env!=prod", "", true),
            ("env!=prod", "env=dev", true),
            ("env!=prod", "env=prod", false),
            ("region in (eu,us)", "region=eu", true),
            ("region in (eu, us)", "region=ap", false),
            ("region in (eu,us)", "", false),
            ("region notin (eu)", "", true),
            ("region notin (eu)", "region=eu", false),
            ("gpu", "gpu=", true),
            ("gpu", "", false),
            ("!gpu", "", true),
            ("!gpu", "gpu=yes", false),
            ("env=prod,tier!=edge", "env=prod,tier=core", true),
            ("env=prod,tier!=edge", "env=prod,tier=edge", false),
            (
                "env=prod,region in (eu,us),!legacy",
                "env=prod,region=us",
                true,
            ),
        ];
        for (sel, labels, want) in cases {
            assert_eq!(m(sel, labels), want, "{sel:?} on {labels:?}");
        }
    }

    #[test]
    fn rejects_bad_selectors() {
        for bad in [
            "env=prod,",
            "region in eu",
            "region in (eu",
            "a b",
            "-x=y",
            "x in ()",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["env=prod,tier!=edge", "region in (eu,us)", "!legacy", "gpu"] {
            let sel = LabelSelector::parse(s).unwrap();
            assert_eq!(LabelSelector::parse(&sel.to_string()).unwrap(), sel);
        }
    }

    #[test]
    fn yaml_form() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"env": "prod"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["edge"]}]
        }))
        .unwrap();
        assert!(sel.matches(&parse_labels("env=prod").unwrap()));
        assert!(!sel.matches(&parse_labels("env=prod,tier=edge").unwrap()));
    }
}
