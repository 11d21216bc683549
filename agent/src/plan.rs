//! Pure decisions of the reconciler: which bundles to apply or remove, how an
//! object is prepared for applying (namespace, ownership label), and whether a
//! status is worth reporting. No I/O here.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_shared::bundle::ObjectRef;
use flotilla_shared::state::BundleState;

use crate::store::{DesiredBundle, Status};

/// What the reconciler must do in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Apply (or re-apply) a bundle's content, then prune what left it.
    Apply(DesiredBundle),
    /// Delete everything a bundle that left the Desired set owns.
    Remove(String),
}

/// Decides a reconcile pass: apply every desired bundle whose (content, revision)
/// is not the one last applied successfully (so failed bundles are retried and,
/// with an empty `applied_ok` at start-up, everything is re-applied); remove every
/// bundle that has objects recorded but is no longer desired. Removals first, so a
/// bundle renamed in Git frees its objects before its successor claims them.
pub fn decide(
    desired: &[DesiredBundle],
    applied_ok: &BTreeMap<String, (String, String)>,
    with_inventory: &BTreeSet<String>,
) -> Vec<Action> {
    let wanted: BTreeSet<&str> = desired.iter().map(|b| b.name.as_str()).collect();
    let mut actions: Vec<Action> = with_inventory
        .iter()
        .filter(|b| !wanted.contains(b.as_str()))
        .map(|b| Action::Remove(b.clone()))
        .collect();
    actions.extend(
        desired
            .iter()
            .filter(|b| {
                applied_ok.get(&b.name) != Some(&(b.content_hash.clone(), b.revision.clone()))
            })
            .map(|b| Action::Apply(b.clone())),
    );
    actions
}

/// How an object is prepared for applying: shared with `flotilla render`.
pub use flotilla_shared::applied::prepare;

/// What to add to a bundle's inventory before applying `objects`: those it does not
/// hold (`None` when it holds them all); when the store holds no inventory for the
/// bundle yet (`recorded` is false, `inventory` was rebuilt from the cluster), all of
/// it with them.
pub fn intent(
    inventory: &BTreeSet<ObjectRef>,
    recorded: bool,
    objects: &BTreeSet<ObjectRef>,
) -> Option<BTreeSet<ObjectRef>> {
    if !recorded {
        return Some(inventory.union(objects).cloned().collect());
    }
    let new: BTreeSet<ObjectRef> = objects.difference(inventory).cloned().collect();
    (!new.is_empty()).then_some(new)
}

/// Content is applied only if it is what the Desired set declared: the hash the
/// agent computes from it must be the one the hub named. A mismatch (a hub bug, a
/// corrupted store, tampering) fails the bundle before anything is applied.
pub fn check_content_hash(declared: &str, computed: &str) -> Result<(), String> {
    if declared == computed {
        return Ok(());
    }
    Err(format!(
        "content hash mismatch: the Desired set declares {declared} but the content held \
         for it hashes to {computed}; nothing applied"
    ))
}

/// An object found in the cluster where a bundle is about to apply one of the same
/// kind, namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Its `flotilla.io/bundle` label, if any.
    pub bundle: Option<String>,
    /// The field managers of its `managedFields`, in order, without repeats.
    pub managers: Vec<String>,
}

/// Whether a bundle may apply over what exists: objects it is about to apply
/// (file, identity, what the cluster holds under that identity) that exist without
/// this bundle's label belong to someone else (a person, a controller, another
/// bundle), and server-side apply with force would silently take them over and a
/// later prune delete them. Unless the bundle says `takeOwnership: true`, they fail
/// it: the error names the first such object, its owner and its field managers.
pub fn refuse_adoption(
    bundle: &str,
    take_ownership: bool,
    objects: &[(&str, &ObjectRef, Option<&Found>)],
) -> Result<(), String> {
    if take_ownership {
        return Ok(());
    }
    let foreign: Vec<(&str, &ObjectRef, &Found)> = objects
        .iter()
        .filter_map(|(file, r, found)| {
            found
                .filter(|f| f.bundle.as_deref() != Some(bundle))
                .map(|f| (*file, *r, f))
        })
        .collect();
    let Some((file, r, found)) = foreign.first() else {
        return Ok(());
    };
    let owner = match &found.bundle {
        Some(other) => format!("it belongs to bundle {other}"),
        None => "it is not part of this bundle".to_string(),
    };
    let managers = if found.managers.is_empty() {
        "none".to_string()
    } else {
        found.managers.join(", ")
    };
    let more = match foreign.len() - 1 {
        0 => String::new(),
        1 => " (and 1 more object like it)".to_string(),
        n => format!(" (and {n} more objects like it)"),
    };
    Err(format!(
        "{}{more}",
        object_error(
            file,
            r,
            &format!(
                "already exists and {owner} (field managers: {managers}); not taking it over \
                 (set takeOwnership: true in fleet.yaml to adopt existing objects)"
            )
        )
    ))
}

/// An apply error as users read it: `file: Kind ns/name: reason`.
pub fn object_error(file: &str, object: &ObjectRef, reason: &str) -> String {
    format!("{file}: {object}: {reason}")
}

/// Whether a new status differs from the last one reported enough to send it.
pub fn worth_reporting(
    last: Option<&Status>,
    content_hash: &str,
    revision: &str,
    state: BundleState,
    message: &str,
) -> bool {
    match last {
        None => true,
        Some(l) => {
            l.content_hash != content_hash
                || l.revision != revision
                || l.state != state
                || l.message != message
        }
    }
}

/// Whether to announce `WaitApplied` before applying: only for content the hub has
/// not yet heard about from us, so re-applies at start-up and retries of a failed
/// bundle do not flap its state.
pub fn announce_wait(last: Option<&Status>, content_hash: &str, revision: &str) -> bool {
    match last {
        None => true,
        Some(l) => l.content_hash != content_hash || l.revision != revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, hash: &str) -> DesiredBundle {
        DesiredBundle {
            name: name.into(),
            content_hash: hash.into(),
            revision: "c1".into(),
        }
    }

    #[test]
    fn decides_applies_and_removals() {
        let desired = [b("a", "h1"), b("b", "h2"), b("c", "h3")];
        let applied = BTreeMap::from([
            ("a".to_string(), ("h1".to_string(), "c1".to_string())),
            ("b".to_string(), ("old".to_string(), "c1".to_string())),
        ]);
        let inv = BTreeSet::from(["a".to_string(), "gone".to_string()]);
        assert_eq!(
            decide(&desired, &applied, &inv),
            vec![
                Action::Remove("gone".into()),
                Action::Apply(b("b", "h2")),
                Action::Apply(b("c", "h3")),
            ]
        );
        // Start-up: nothing applied yet, everything is re-applied.
        assert_eq!(decide(&desired, &BTreeMap::new(), &inv).len(), 4);
        // A new revision with the same content is re-applied (and re-reported).
        let mut moved = b("a", "h1");
        moved.revision = "c2".into();
        assert_eq!(
            decide(&[moved.clone()], &applied, &BTreeSet::new()),
            vec![Action::Apply(moved)]
        );
    }

    #[test]
    fn error_names_file_object_reason() {
        let r = ObjectRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: Some("demo".into()),
            name: "web".into(),
        };
        assert_eq!(
            object_error("deploy.yaml", &r, "spec.replicas: Invalid value"),
            "deploy.yaml: Deployment demo/web: spec.replicas: Invalid value"
        );
    }

    #[test]
    fn intents_name_only_what_the_inventory_lacks() {
        let r = |name: &str| ObjectRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("demo".into()),
            name: name.into(),
        };
        let held = BTreeSet::from([r("a"), r("b")]);
        assert_eq!(intent(&held, true, &BTreeSet::from([r("a")])), None);
        assert_eq!(
            intent(&held, true, &BTreeSet::from([r("a"), r("c")])),
            Some(BTreeSet::from([r("c")]))
        );
        // Rebuilt from the cluster, not stored yet: everything is written.
        assert_eq!(
            intent(&held, false, &BTreeSet::from([r("c")])),
            Some(BTreeSet::from([r("a"), r("b"), r("c")]))
        );
        assert_eq!(
            intent(&BTreeSet::new(), false, &BTreeSet::new()),
            Some(BTreeSet::new())
        );
    }

    #[test]
    fn content_must_hash_to_what_was_declared() {
        assert_eq!(check_content_hash("abc", "abc"), Ok(()));
        let e = check_content_hash("abc", "def").unwrap_err();
        assert!(
            e.contains("hash mismatch") && e.contains("abc") && e.contains("def"),
            "{e}"
        );
    }

    #[test]
    fn existing_objects_of_others_are_not_taken_over() {
        let r = |ns: &str, name: &str| ObjectRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some(ns.into()),
            name: name.into(),
        };
        let (ours, theirs, other, absent) = (
            r("demo", "ours"),
            r("kube-system", "coredns"),
            r("demo", "shared"),
            r("demo", "new"),
        );
        let mine = Found {
            bundle: Some("web".into()),
            managers: vec!["flotilla".into()],
        };
        let unlabelled = Found {
            bundle: None,
            managers: vec!["kubectl-create".into(), "kube-controller-manager".into()],
        };
        let another = Found {
            bundle: Some("db".into()),
            managers: vec!["flotilla".into()],
        };
        // Absent or already ours: applied.
        assert_eq!(
            refuse_adoption(
                "web",
                false,
                &[("a.yaml", &ours, Some(&mine)), ("a.yaml", &absent, None)]
            ),
            Ok(())
        );
        // Unlabelled: refused, naming the object and its managers.
        let e = refuse_adoption(
            "web",
            false,
            &[
                ("a.yaml", &ours, Some(&mine)),
                ("cm.yaml", &theirs, Some(&unlabelled)),
                ("cm.yaml", &other, Some(&another)),
            ],
        )
        .unwrap_err();
        assert!(
            e.starts_with("cm.yaml: ConfigMap kube-system/coredns: already exists"),
            "{e}"
        );
        assert!(e.contains("kubectl-create, kube-controller-manager"), "{e}");
        assert!(e.contains("takeOwnership: true"), "{e}");
        assert!(e.ends_with("(and 1 more object like it)"), "{e}");
        // Another bundle's object is not taken either.
        let e = refuse_adoption("web", false, &[("cm.yaml", &other, Some(&another))]).unwrap_err();
        assert!(e.contains("belongs to bundle db"), "{e}");
        // Unless the bundle asks for it.
        assert_eq!(
            refuse_adoption("web", true, &[("cm.yaml", &theirs, Some(&unlabelled))]),
            Ok(())
        );
    }

    #[test]
    fn reporting_rules() {
        let last = Status {
            bundle: "a".into(),
            content_hash: "h".into(),
            revision: "r".into(),
            state: BundleState::ErrApplied,
            message: "boom".into(),
            seq: 1,
            observed_at_unix_ms: 0,
        };
        assert!(!worth_reporting(
            Some(&last),
            "h",
            "r",
            BundleState::ErrApplied,
            "boom"
        ));
        assert!(worth_reporting(
            Some(&last),
            "h",
            "r",
            BundleState::Ready,
            ""
        ));
        assert!(worth_reporting(None, "h", "r", BundleState::Ready, ""));
        assert!(!announce_wait(Some(&last), "h", "r"));
        assert!(announce_wait(Some(&last), "h2", "r"));
        assert!(announce_wait(None, "h", "r"));
    }
}
