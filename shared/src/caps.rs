//! Caps on what an agent may make the hub keep. Every field an agent supplies
//! (statuses, drift events, its Hello) has a size limit; a longer value is cut
//! with a marker saying how much was cut, never refused whole: a long status
//! message or a large drifted value still tells the operator something, and an
//! agent cannot grow the hub's store or memory by sending more.

use serde_json::Value;

use crate::drift::{DriftEvent, FieldDiff};

/// Names, kinds, API versions, field managers, versions, hashes and revisions: a
/// Kubernetes name is at most 253 bytes, the rest are shorter.
pub const SHORT: usize = 256;
/// A status message: an apply error names file, object and the API server's
/// reason, a `NotReady` message a few objects; 8 KiB holds dozens of them.
pub const MESSAGE: usize = 8 * 1024;
/// A JSON pointer into an object.
pub const PATH: usize = 1024;
/// One drifted value (desired or live), as JSON: enough for a container spec.
pub const VALUE: usize = 4 * 1024;
/// Drifted fields kept per event; the operator sees the first ones and the count
/// of the rest.
pub const FIELDS: usize = 64;
/// API versions kept from a Hello: a cluster with many CRDs serves a few
/// thousand `group/version[/Kind]` strings.
pub const API_VERSIONS: usize = 20_000;
/// Held content hashes kept from a Hello: far more than bundles per cluster.
pub const HELD_HASHES: usize = 100_000;

/// The marker that replaces what was cut.
pub fn marker(cut: usize, what: &str) -> String {
    format!("…[truncated {cut} {what}]")
}

/// Room left for the marker: `…[truncated ` + 20 digits + ` bytes]`.
const MARKER_ROOM: usize = 40;

/// Cuts `s` to at most `max` bytes: its start (on a character boundary) followed
/// by the marker. Returns the number of bytes cut (0: left alone).
pub fn cut(s: &mut String, max: usize) -> usize {
    if s.len() <= max {
        return 0;
    }
    let mut keep = max.saturating_sub(MARKER_ROOM);
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    let cut = s.len() - keep;
    s.truncate(keep);
    s.push_str(&marker(cut, "bytes"));
    cut
}

/// A JSON value longer than `max` bytes (serialised) becomes a string: the start
/// of its JSON text and the marker. Returns the number of bytes cut.
pub fn cut_value(v: &mut Value, max: usize) -> usize {
    let text = v.to_string();
    if text.len() <= max {
        return 0;
    }
    let mut text = text;
    let n = cut(&mut text, max);
    *v = Value::String(text);
    n
}

/// Keeps at most `max_items` strings, each cut to `max_len`; returns how many
/// strings were dropped or cut.
pub fn cap_list(list: &mut Vec<String>, max_items: usize, max_len: usize) -> usize {
    let dropped = list.len().saturating_sub(max_items);
    list.truncate(max_items);
    dropped
        + list
            .iter_mut()
            .map(|s| cut(s, max_len))
            .filter(|n| *n > 0)
            .count()
}

/// Caps every field of an agent's drift event; returns whether anything was cut.
/// Fields beyond [`FIELDS`] are dropped and counted in a last, marker field.
pub fn cap_drift(e: &mut DriftEvent) -> bool {
    let mut cut_any = false;
    for s in [
        &mut e.bundle,
        &mut e.object.api_version,
        &mut e.object.kind,
        &mut e.object.name,
        &mut e.manager,
    ] {
        cut_any |= cut(s, SHORT) > 0;
    }
    if let Some(ns) = &mut e.object.namespace {
        cut_any |= cut(ns, SHORT) > 0;
    }
    if e.fields.len() > FIELDS {
        let more = e.fields.len() - FIELDS;
        e.fields.truncate(FIELDS);
        e.fields.push(FieldDiff {
            path: marker(more, "fields"),
            desired: Value::Null,
            live: Value::Null,
            manager: String::new(),
        });
        cut_any = true;
    }
    for f in &mut e.fields {
        cut_any |= cut(&mut f.path, PATH) > 0;
        cut_any |= cut(&mut f.manager, SHORT) > 0;
        cut_any |= cut_value(&mut f.desired, VALUE) > 0;
        cut_any |= cut_value(&mut f.live, VALUE) > 0;
    }
    cut_any
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::ObjectRef;
    use serde_json::json;

    #[test]
    fn long_strings_are_cut_with_a_marker() {
        let mut s = "x".repeat(10);
        assert_eq!(cut(&mut s, 10), 0);
        assert_eq!(s, "x".repeat(10));
        let mut s = "x".repeat(1_000_000);
        assert_eq!(cut(&mut s, 100), 999_940);
        assert_eq!(s, format!("{}…[truncated 999940 bytes]", "x".repeat(60)));
        assert!(s.len() <= 100);
        assert_eq!(cut(&mut s, 100), 0, "a cut string is within the cap");
        // Never inside a character.
        let mut s = "é".repeat(30);
        assert_eq!(cut(&mut s, 45), 56);
        assert_eq!(s, "éé…[truncated 56 bytes]");
    }

    #[test]
    fn large_values_become_a_marked_prefix() {
        let mut v = json!({"big": "y".repeat(10_000)});
        assert!(cut_value(&mut v, 64) > 0);
        let s = v.as_str().unwrap();
        assert!(s.starts_with("{\"big\":\"yyy"), "{s}");
        assert!(s.ends_with(" bytes]"), "{s}");
        let mut small = json!([1, 2]);
        assert_eq!(cut_value(&mut small, 64), 0);
        assert_eq!(small, json!([1, 2]));
    }

    #[test]
    fn lists_keep_their_first_items() {
        let mut l: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        l.push("z".repeat(100));
        assert_eq!(cap_list(&mut l, 20, 48), 1);
        assert!(l[10].starts_with("zzzzzzzz…"), "{}", l[10]);
        assert_eq!(cap_list(&mut l, 3, 48), 8);
        assert_eq!(l, ["0", "1", "2"]);
    }

    #[test]
    fn a_flooding_drift_event_is_cut_to_size() {
        let huge = "a".repeat(1 << 20);
        let mut e = DriftEvent {
            id: 1,
            bundle: huge.clone(),
            object: ObjectRef {
                api_version: huge.clone(),
                kind: huge.clone(),
                namespace: Some(huge.clone()),
                name: huge.clone(),
            },
            // The first fields huge, then many small ones.
            fields: (0..10_000)
                .map(|i| {
                    let big = if i < 3 { huge.as_str() } else { "v" };
                    FieldDiff {
                        path: format!("/{i}/{big}"),
                        desired: json!(big),
                        live: json!({ "x": big }),
                        manager: big.to_string(),
                    }
                })
                .collect(),
            manager: huge.clone(),
            detected_at_unix_ms: 1,
            corrected: false,
            deleted: false,
        };
        assert!(cap_drift(&mut e));
        let size = serde_json::to_string(&e).unwrap().len();
        assert!(size < 1 << 20, "{size} bytes after capping");
        assert_eq!(e.fields.len(), FIELDS + 1);
        assert_eq!(e.fields[FIELDS].path, "…[truncated 9936 fields]");
        assert!(e.object.name.ends_with(" bytes]") && e.object.name.len() <= SHORT);
        // An event within the caps is left alone.
        let mut small = e.clone();
        small.object.name = "web".into();
        small.fields = vec![FieldDiff {
            path: "/spec/replicas".into(),
            desired: json!(3),
            live: json!(5),
            manager: "kubectl-scale".into(),
        }];
        let before = small.clone();
        assert!(!cap_drift(&mut small));
        assert_eq!(small, before);
    }
}
