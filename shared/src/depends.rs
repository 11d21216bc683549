//! `dependsOn` (Fleet's meaning): a bundle is not sent to a cluster until every
//! bundle it depends on is `Ready` there. The hub holds the assignment back; the
//! agent knows nothing of dependencies.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::assign::{Assignment, BundleInfo};
use crate::labels::Labels;
use crate::selector::LabelSelector;
use crate::state::{BundleState, Reported};

/// One `dependsOn` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dependency {
    /// `{name: BUNDLE}`: that bundle (named as Flotilla names bundles,
    /// `<source>-<directory>`, which is how Fleet names them too).
    Name(String),
    /// `{selector: {matchLabels, matchExpressions}}`: every other bundle assigned to
    /// the cluster whose labels (fleet.yaml `labels`, plus `flotilla.io/source`) match.
    Selector(LabelSelector),
    /// An entry that is neither; the bundle waits and says why.
    Invalid(String),
}

/// Label every bundle carries for `dependsOn` selectors: the source it comes from.
pub const SOURCE_LABEL: &str = "flotilla.io/source";

/// Reads `dependsOn` entries as `fleet.yaml` gives them.
pub fn parse_depends_on(entries: &[Value]) -> Vec<Dependency> {
    entries
        .iter()
        .map(|e| {
            let name = e.get("name").and_then(Value::as_str);
            let selector = e.get("selector");
            match (name, selector) {
                (Some(n), None) if !n.is_empty() => Dependency::Name(n.to_string()),
                (None, Some(s)) => match serde_json::from_value::<LabelSelector>(s.clone()) {
                    Ok(sel) => match sel.validate() {
                        Ok(()) => Dependency::Selector(sel),
                        Err(err) => Dependency::Invalid(format!("dependsOn selector: {err}")),
                    },
                    Err(err) => Dependency::Invalid(format!("dependsOn selector: {err}")),
                },
                _ => Dependency::Invalid(format!(
                    "dependsOn entry {e}: expected one of name or selector"
                )),
            }
        })
        .collect()
}

/// The labels a bundle is selected by: its own, plus its source.
pub fn bundle_labels(source: &str, own: &BTreeMap<String, String>) -> Labels {
    let mut l: Labels = own.clone();
    l.insert(SOURCE_LABEL.to_string(), source.to_string());
    l
}

/// Marks, in one cluster's assignments, those whose dependencies are not `Ready`
/// there: their `waiting_for` names what they wait for. A dependency is ready when
/// the agent reported `Ready` for the very content assigned now (an older Ready
/// does not count: the new content may not be healthy). A dependency that is not
/// assigned to the cluster can never be ready there. Cycles wait forever, and say so
/// through their messages.
pub fn gate(
    assignments: &mut [Assignment],
    bundles: &[BundleInfo],
    reported: impl Fn(&str) -> Option<Reported>,
) {
    // Nothing waits where nothing depends: the common case, computed for every
    // cluster in every fleet-wide view, costs no lookups.
    if bundles.iter().all(|b| b.depends_on.is_empty()) {
        return;
    }
    let by_name: BTreeMap<&str, &BundleInfo> =
        bundles.iter().map(|b| (b.name.as_str(), b)).collect();
    let ready: BTreeMap<String, Result<(), String>> = assignments
        .iter()
        .map(|a| {
            let r = reported(&a.bundle);
            let state = match (&a.content_hash, &r) {
                (None, _) => Err("not rendered".to_string()),
                (Some(h), Some(r)) if &r.content_hash == h && r.state == BundleState::Ready => {
                    Ok(())
                }
                (Some(h), Some(r)) if &r.content_hash == h => Err(r.state.to_string()),
                _ => Err("not applied yet".to_string()),
            };
            (a.bundle.clone(), state)
        })
        .collect();
    for a in assignments.iter_mut() {
        let Some(info) = by_name.get(a.bundle.as_str()) else {
            continue;
        };
        let mut waiting = Vec::new();
        for dep in &info.depends_on {
            match dep {
                Dependency::Name(n) => match ready.get(n) {
                    Some(Ok(())) => {}
                    Some(Err(why)) => waiting.push(format!("bundle {n} ({why})")),
                    None => waiting.push(format!("bundle {n} (not deployed to this cluster)")),
                },
                Dependency::Selector(sel) => {
                    for (name, state) in &ready {
                        if *name == a.bundle {
                            continue;
                        }
                        let matches = by_name
                            .get(name.as_str())
                            .is_some_and(|b| sel.matches(&b.labels));
                        if let (true, Err(why)) = (matches, state) {
                            waiting.push(format!("bundle {name} ({why})"));
                        }
                    }
                }
                Dependency::Invalid(why) => waiting.push(why.clone()),
            }
        }
        a.waiting_for = waiting;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Target;
    use serde_json::json;

    fn bundle(name: &str, labels: &[(&str, &str)], deps: Vec<Dependency>) -> BundleInfo {
        BundleInfo {
            name: name.into(),
            source: "s".into(),
            path: name.into(),
            good: Some((format!("h-{name}"), "c1".into())),
            render_error: None,
            targets: Vec::<Target>::new(),
            customizations: vec![],
            depends_on: deps,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn assigned(names: &[&str]) -> Vec<Assignment> {
        names
            .iter()
            .map(|n| Assignment {
                bundle: n.to_string(),
                content_hash: Some(format!("h-{n}")),
                revision: "c1".into(),
                render_error: None,
                waiting_for: vec![],
                variant: String::new(),
                held_back: None,
            })
            .collect()
    }

    fn rep(hash: &str, state: BundleState) -> Reported {
        Reported {
            content_hash: hash.into(),
            revision: "c1".into(),
            state,
            message: String::new(),
        }
    }

    #[test]
    fn parses_entries() {
        let deps = parse_depends_on(&[
            json!({"name": "infra"}),
            json!({"selector": {"matchLabels": {"tier": "db"}}}),
            json!({"name": "x", "selector": {}}),
            json!({"selector": {"matchLabels": {"bad key!": "x"}}}),
            json!("infra"),
        ]);
        assert_eq!(deps[0], Dependency::Name("infra".into()));
        assert!(matches!(&deps[1], Dependency::Selector(s) if s.match_labels["tier"] == "db"));
        for d in &deps[2..] {
            assert!(matches!(d, Dependency::Invalid(_)), "{d:?}");
        }
    }

    #[test]
    fn waits_until_the_dependency_is_ready_with_its_current_content() {
        let bundles = vec![
            bundle("a", &[], vec![]),
            bundle("b", &[], vec![Dependency::Name("a".into())]),
        ];
        let run = |r: Option<Reported>| {
            let mut a = assigned(&["a", "b"]);
            gate(
                &mut a,
                &bundles,
                |n| if n == "a" { r.clone() } else { None },
            );
            a
        };
        let a = run(None);
        assert!(a[0].waiting_for.is_empty());
        assert_eq!(a[1].waiting_for, ["bundle a (not applied yet)"]);
        let a = run(Some(rep("h-a", BundleState::NotReady)));
        assert_eq!(a[1].waiting_for, ["bundle a (NotReady)"]);
        // Ready, but for older content: still waiting.
        let a = run(Some(rep("old", BundleState::Ready)));
        assert_eq!(a[1].waiting_for, ["bundle a (not applied yet)"]);
        let a = run(Some(rep("h-a", BundleState::Ready)));
        assert!(a[1].waiting_for.is_empty());
    }

    #[test]
    fn a_waiting_bundle_is_not_sent_or_keeps_what_the_agent_holds() {
        use crate::assign::{assignment_state, sendable};
        let bundles = vec![
            bundle("a", &[], vec![]),
            bundle("b", &[], vec![Dependency::Name("a".into())]),
        ];
        let mut a = assigned(&["a", "b"]);
        gate(&mut a, &bundles, |_| None);
        let names = |s: Vec<(String, String, String)>| -> Vec<String> {
            s.into_iter().map(|(n, h, _)| format!("{n}:{h}")).collect()
        };
        assert_eq!(names(sendable(&a, |_| None)), ["a:h-a"]);
        // The agent runs an older b: it stays at that content, not removed.
        let held = |n: &str| (n == "b").then(|| ("h-b-old".to_string(), "c0".to_string()));
        assert_eq!(names(sendable(&a, held)), ["a:h-a", "b:h-b-old"]);
        let (state, message) = assignment_state(&a[1], Some("h-b-old"), None);
        assert_eq!(state, BundleState::Pending);
        assert_eq!(message, "waiting for bundle a (not applied yet)");
    }

    #[test]
    fn missing_dependency_and_selectors() {
        let bundles = vec![
            bundle("db1", &[("tier", "db")], vec![]),
            bundle("db2", &[("tier", "db")], vec![]),
            bundle(
                "app",
                &[("tier", "db")],
                vec![Dependency::Selector(LabelSelector {
                    match_labels: [("tier".to_string(), "db".to_string())].into(),
                    ..Default::default()
                })],
            ),
            bundle("lonely", &[], vec![Dependency::Name("ghost".into())]),
        ];
        let mut a = assigned(&["app", "db1", "db2", "lonely"]);
        gate(&mut a, &bundles, |n| {
            (n == "db1").then(|| rep("h-db1", BundleState::Ready))
        });
        // Itself excluded though its labels match; db1 ready; db2 not.
        assert_eq!(a[0].waiting_for, ["bundle db2 (not applied yet)"]);
        assert_eq!(
            a[3].waiting_for,
            ["bundle ghost (not deployed to this cluster)"]
        );
    }
}
