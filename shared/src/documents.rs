//! How a manifest file becomes objects, as `kubectl apply -f` reads it: a YAML
//! stream of documents (empty ones skipped), or a JSON stream of objects (a file
//! whose first non-blank character is `{`, objects one after another, YAML after
//! at most one of them); every document with an `items` field and a kind ending
//! in `List` (`List`, `ConfigMapList`, `RoleBindingList`, ...) is a list whose
//! items are expanded (a list inside a list is refused, as kubectl refuses it).
//!
//! Reading is bounded by two budgets, both named in the error when hit:
//! - bytes: [`MAX_FILE_BYTES`] per file, [`MAX_BUNDLE_BYTES`] per bundle;
//! - structure: [`MAX_NODES`] nodes per file (aliases expanded, so a billion
//!   laughs is refused), [`MAX_ALIASES`] aliases and [`MAX_DEPTH`] levels of
//!   nesting.
//!
//! The number of documents is not limited: generators write thousands into one
//! file, and bytes and nodes bound the cost of reading them.

use serde_json::Value;

use crate::bundle::RenderError;

/// The largest manifest file read: the hub's Git snapshot refuses larger files
/// before they are read (`--git-max-file-bytes` defaults to this), and a
/// Kubernetes object is at most ~1.5 MiB (etcd's request limit).
pub const MAX_FILE_BYTES: usize = 32 << 20;
/// The most manifest bytes one bundle may hold (its files, or a tool's output):
/// agents that speak protocol v2 take any such bundle in chunks; a v1 agent only
/// one whose content is at most 16 MiB on the wire (`flotilla_proto::MAX_INLINE_BYTES`).
pub const MAX_BUNDLE_BYTES: usize = 64 << 20;
/// The most nodes (mappings, sequences and scalars, each alias counted as what it
/// expands to) one file may hold: a CRD collection of 32 MiB has about 1.5 million.
pub const MAX_NODES: usize = 2_000_000;
/// The most aliases (`*name`) one file may use. Kubernetes manifests rarely use
/// any; tool output never does.
pub const MAX_ALIASES: usize = 10_000;
/// The deepest nesting of mappings and sequences (the deepest CRD schemas need
/// about 40; the agent's JSON reader stops at 128).
pub const MAX_DEPTH: usize = 100;

fn error(file: &str, line: Option<u64>, reason: String) -> RenderError {
    RenderError {
        file: file.to_string(),
        line,
        object: None,
        reason,
    }
}

/// Refuses a file over [`MAX_FILE_BYTES`], naming the budget.
pub fn check_file_size(file: &str, len: u64) -> Result<(), RenderError> {
    if len > MAX_FILE_BYTES as u64 {
        return Err(error(
            file,
            None,
            format!(
                "the file is {len} bytes, over the byte budget of {MAX_FILE_BYTES} bytes ({} MiB) per manifest file",
                MAX_FILE_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

/// Refuses a bundle whose manifests total over [`MAX_BUNDLE_BYTES`].
pub fn check_bundle_size(what: &str, total: u64) -> Result<(), RenderError> {
    if total > MAX_BUNDLE_BYTES as u64 {
        return Err(error(
            what,
            None,
            format!(
                "the bundle's manifests are {total} bytes, over the byte budget of {MAX_BUNDLE_BYTES} bytes ({} MiB) per bundle: split it into several bundles",
                MAX_BUNDLE_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

/// The documents of a manifest file, YAML or JSON, empty ones left out, lists not
/// yet expanded.
pub fn documents(file: &str, bytes: &[u8]) -> Result<Vec<Value>, RenderError> {
    check_file_size(file, bytes.len() as u64)?;
    let text = std::str::from_utf8(bytes).map_err(|_| error(file, None, "not UTF-8".into()))?;
    if text.trim_start().starts_with('{') {
        json_documents(file, text)
    } else {
        yaml_documents(file, text)
    }
}

/// The objects of a manifest file: its documents with every list expanded, as
/// kubectl does.
pub fn objects(file: &str, bytes: &[u8]) -> Result<Vec<Value>, RenderError> {
    let mut out = Vec::new();
    for doc in documents(file, bytes)? {
        expand(file, doc, &mut out)?;
    }
    Ok(out)
}

/// Whether a document is a list: kubectl decodes every object with an `items`
/// field as one, and maps its kind as `List` or `<Kind>List` of a served kind;
/// without a cluster, a kind ending in `List` (a `Bag` with items is neither
/// for kubectl nor here, where it is an object without a name).
pub fn is_list(doc: &Value) -> bool {
    doc.get("items").is_some_and(|i| !i.is_null())
        && doc["kind"].as_str().is_some_and(|k| k.ends_with("List"))
}

/// Appends `doc`, or the items of a list. A list among the items is refused, as
/// kubectl refuses it (its items are decoded as plain objects, not lists).
pub fn expand(file: &str, doc: Value, out: &mut Vec<Value>) -> Result<(), RenderError> {
    if !is_list(&doc) {
        out.push(doc);
        return Ok(());
    }
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let refuse = |reason: &str| RenderError {
        file: file.to_string(),
        line: None,
        object: Some(kind.clone()),
        reason: reason.to_string(),
    };
    let Value::Object(mut m) = doc else {
        return Ok(());
    };
    let Some(Value::Array(items)) = m.remove("items") else {
        return Err(refuse("items must be a list of objects"));
    };
    for item in items {
        if is_list(&item) {
            return Err(refuse(
                "a list inside a list: kubectl refuses it too; put its items in the outer list",
            ));
        }
        out.push(item);
    }
    Ok(())
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(MAX_FILE_BYTES),
            max_events: 2 * MAX_NODES + 16,
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ALIASES,
            max_depth: MAX_DEPTH,
            // Bytes bound the documents: there is no budget on their number.
            max_documents: usize::MAX,
            max_nodes: MAX_NODES,
            max_total_scalar_bytes: 2 * MAX_FILE_BYTES,
            max_recorded_anchor_events: 2 * MAX_NODES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 2 * MAX_NODES,
            max_replay_stack_depth: MAX_DEPTH,
        },
    }
}

fn yaml_documents(file: &str, text: &str) -> Result<Vec<Value>, RenderError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| yaml_error(file, &e))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// A YAML error in words: which budget and its limit, a duplicate key, or the
/// parser's first line.
fn yaml_error(file: &str, e: &serde_saphyr::Error) -> RenderError {
    use serde_saphyr::budget::BudgetBreach;
    let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
    let mut inner = e;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    let reason = match inner {
        serde_saphyr::Error::Budget { breach, .. } => match breach {
            BudgetBreach::Nodes { .. }
            | BudgetBreach::Events { .. }
            | BudgetBreach::Documents { .. }
            | BudgetBreach::RecordedAnchorEvents { .. }
            | BudgetBreach::RecordedAnchorBytes { .. } => format!(
                "over the node budget of {MAX_NODES} nodes per file (aliases count as what they expand to)"
            ),
            BudgetBreach::Aliases { .. } | BudgetBreach::Anchors { .. } => {
                format!("over the alias budget of {MAX_ALIASES} aliases or anchors per file")
            }
            BudgetBreach::Depth { .. } => {
                format!("over the nesting budget of {MAX_DEPTH} levels")
            }
            BudgetBreach::ScalarBytes { .. } => format!(
                "over the byte budget of {} bytes of values per file (aliases count as what they expand to)",
                2 * MAX_FILE_BYTES
            ),
            other => format!(
                "over a YAML budget ({other:?}); a file may hold {MAX_NODES} nodes and {MAX_ALIASES} aliases"
            ),
        },
        serde_saphyr::Error::AliasReplayLimitExceeded { .. }
        | serde_saphyr::Error::AliasReplayCounterOverflow { .. } => format!(
            "over the node budget of {MAX_NODES} nodes per file (aliases count as what they expand to)"
        ),
        serde_saphyr::Error::AliasReplayStackDepthExceeded { .. } => {
            format!("over the nesting budget of {MAX_DEPTH} levels")
        }
        serde_saphyr::Error::DuplicateMappingKey { key, .. } => format!(
            "duplicate key {} in a mapping; Kubernetes would keep the last value, Flotilla refuses the file",
            key.as_deref().map(|k| format!("{k:?}")).unwrap_or_else(|| "(not a string)".into())
        ),
        _ => format!(
            "invalid YAML: {}",
            e.to_string().lines().next().unwrap_or_default()
        ),
    };
    error(file, line, reason)
}

/// An upper bound of the nodes of a JSON text, without parsing it: one per
/// opening bracket, comma and colon outside strings, plus one.
fn json_nodes(text: &str) -> usize {
    let (mut n, mut in_string, mut escaped) = (1usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' | b',' | b':' => n += 1,
            _ => {}
        }
    }
    n
}

/// A JSON stream, as kubectl's decoder reads one: objects one after another; if
/// the text stops being JSON after at most one object, the rest (from the next
/// line) is YAML — `{a: b}` is a YAML flow mapping, and a JSON object may head a
/// YAML stream.
fn json_documents(file: &str, text: &str) -> Result<Vec<Value>, RenderError> {
    if json_nodes(text) > 2 * MAX_NODES {
        return Err(error(
            file,
            None,
            format!("over the node budget of {MAX_NODES} nodes per file"),
        ));
    }
    let mut out = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut count = 0;
    loop {
        let before = stream.byte_offset();
        match stream.next() {
            None => break,
            Some(Ok(doc)) => {
                count += 1;
                if depth(&doc) > MAX_DEPTH {
                    return Err(error(
                        file,
                        None,
                        format!("over the nesting budget of {MAX_DEPTH} levels"),
                    ));
                }
                if !doc.is_null() {
                    out.push(doc);
                }
            }
            Some(Err(e)) if count > 1 => {
                let reason = if e.to_string().contains("recursion limit") {
                    format!("over the nesting budget of {MAX_DEPTH} levels")
                } else {
                    format!("invalid JSON: {e}")
                };
                return Err(error(file, Some(e.line() as u64), reason));
            }
            Some(Err(_)) => {
                // Not (or no longer) JSON: the rest is YAML, from the line after
                // the object read.
                let mut rest = &text[before..];
                let ws = rest.len() - rest.trim_start_matches([' ', '\t', '\r']).len();
                rest = &rest[ws..];
                if let Some(r) = rest.strip_prefix('\n') {
                    rest = r;
                }
                let offset = text.len() - rest.len();
                let lines = text[..offset].matches('\n').count() as u64;
                let docs = yaml_documents(file, rest).map_err(|mut e| {
                    e.line = e.line.map(|l| l + lines);
                    e
                })?;
                out.extend(docs);
                break;
            }
        }
    }
    Ok(out)
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(file: &str, text: &str) -> Vec<String> {
        objects(file, text.as_bytes())
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    #[test]
    fn typed_lists_are_expanded_like_kind_list() {
        let typed = "apiVersion: v1\nkind: ConfigMapList\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n";
        assert_eq!(names("l.yaml", typed), ["ConfigMap/a", "ConfigMap/b"]);
        let rbac = "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBindingList\nitems:\n- {apiVersion: rbac.authorization.k8s.io/v1, kind: RoleBinding, metadata: {name: r}}\n";
        assert_eq!(names("r.yaml", rbac), ["RoleBinding/r"]);
        // Nested lists are refused, as kubectl refuses them.
        let nested = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items:\n  - {apiVersion: v1, kind: Secret, metadata: {name: s}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n";
        let e = objects("n.yaml", nested.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("a list inside a list"), "{e}");
        let empty = "apiVersion: v1\nkind: List\nitems: []\n";
        assert!(names("e.yaml", empty).is_empty());
        // A kind not ending in List is an object, as kubectl maps it.
        let bag = "apiVersion: example.com/v1\nkind: Bag\nitems: [{apiVersion: v1, kind: ConfigMap, metadata: {name: a}}]\n";
        assert_eq!(names("bag.yaml", bag), ["Bag/"]);
        let bad = "apiVersion: v1\nkind: List\nitems: {a: b}\n";
        let e = objects("b.yaml", bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("items must be a list"), "{e}");
    }

    #[test]
    fn json_streams_are_read() {
        let one = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#;
        assert_eq!(names("a.json", one), ["ConfigMap/a"]);
        let stream = format!(
            "{one}\n{}\n",
            r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"}}]}"#
        );
        assert_eq!(names("s.json", &stream), ["ConfigMap/a", "Secret/s"]);
        // Not JSON: YAML (a flow mapping), as kubectl falls back.
        let flow = "{apiVersion: v1, kind: ConfigMap, metadata: {name: f}}\n";
        assert_eq!(names("f.yaml", flow), ["ConfigMap/f"]);
        // One JSON object, then YAML.
        let mixed = format!("{one}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: web}}\n");
        assert_eq!(names("m.yaml", &mixed), ["ConfigMap/a", "Secret/web"]);
        let e = objects("bad.yaml", format!("{one}\n---\na: [\n").as_bytes()).unwrap_err();
        assert!(e.to_string().starts_with("bad.yaml:3:"), "{e}");
        // Two JSON objects, then garbage: a JSON stream with an error.
        let e = objects("bad.json", format!("{one}{one}{{\"a\": }}").as_bytes()).unwrap_err();
        assert!(e.to_string().starts_with("bad.json:1: invalid JSON"), "{e}");
    }

    #[test]
    fn five_thousand_documents_are_read() {
        let mut text = String::new();
        for i in 0..5_000 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\ndata:\n  key: value-{i}\n"
            ));
        }
        assert_eq!(objects("all.yaml", text.as_bytes()).unwrap().len(), 5_000);
    }

    #[test]
    fn a_billion_laughs_is_refused_naming_the_budget() {
        let mut text = String::from(
            "a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"
            ));
        }
        let e = objects("lol.yaml", text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("lol.yaml"), "{e}");
        assert!(e.contains("node budget of 2000000 nodes"), "{e}");
    }

    #[test]
    fn too_many_aliases_and_too_deep_are_refused_naming_the_budget() {
        let mut text = String::from("a: &x 1\nb: [");
        for _ in 0..=MAX_ALIASES {
            text.push_str("*x,");
        }
        text.push_str("]\n");
        let e = objects("aliases.yaml", text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("alias budget of 10000"), "{e}");
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 5),
            "]".repeat(MAX_DEPTH + 5)
        );
        let e = objects("deep.yaml", deep.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nesting budget of 100 levels"), "{e}");
        let deep = format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(MAX_DEPTH + 5),
            "]".repeat(MAX_DEPTH + 5)
        );
        let e = objects("deep.json", deep.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nesting budget of 100 levels"), "{e}");
    }

    #[test]
    fn oversized_files_and_bundles_are_refused_naming_the_budget() {
        let e = check_file_size("big.yaml", 200 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "big.yaml: the file is 209715200 bytes, over the byte budget of 33554432 bytes (32 MiB) per manifest file"
        );
        let big = vec![b'#'; MAX_FILE_BYTES + 1];
        let e = objects("big.yaml", &big).unwrap_err().to_string();
        assert!(e.contains("byte budget of 33554432 bytes"), "{e}");
        let e = check_bundle_size(".", (MAX_BUNDLE_BYTES + 1) as u64)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("byte budget of 67108864 bytes (64 MiB) per bundle"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_keys_are_refused_saying_why() {
        let text =
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: one\n  k: two\n";
        let e = objects("dup.yaml", text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dup.yaml:7: duplicate key \"k\" in a mapping; Kubernetes would keep the last value"),
            "{e}"
        );
    }
}
