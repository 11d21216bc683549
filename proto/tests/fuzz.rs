//! Property-based fuzzing of the wire: arbitrary bytes decoded with prost into
//! every message the hub or the agent accepts, and every decoded message (and
//! structured ones with hostile fields) through the conversions at the edge. No
//! panic; a bad value fails with its `ConversionError`. Few cases in `make test`,
//! `FLOTILLA_FUZZ_CASES` in `make fuzz`.

use flotilla_proto::v1;
use flotilla_proto::{status_state, ConversionError};
use flotilla_shared::bundle::Rendered;
use flotilla_shared::drift::{DriftEvent, DriftPolicy};
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    let cases = std::env::var("FLOTILLA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Every conversion the edge makes from a decoded message.
fn convert_all(m: &v1::AgentMessage) {
    use v1::agent_message::Msg;
    match &m.msg {
        Some(Msg::Status(s)) => {
            let _ = status_state(s);
        }
        Some(Msg::Drift(d)) => {
            let _ = DriftEvent::try_from(d);
        }
        Some(Msg::Hello(_) | Msg::Ack(_) | Msg::Heartbeat(_)) | None => {}
    }
}

fn convert_hub(m: &v1::HubMessage) {
    if let Some(v1::hub_message::Msg::Desired(d)) = &m.msg {
        for c in &d.contents {
            check_content(c);
        }
    }
    // A lone chunk: taken or refused, and a set naming it never gets a content
    // that does not hash to its name.
    if let Some(v1::hub_message::Msg::ContentChunk(c)) = &m.msg {
        let mut a = flotilla_proto::chunks::Assembler::default();
        let _ = a.chunk(c.clone());
        if let Ok(got) = a.finish(std::slice::from_ref(&c.content_hash)) {
            for content in got {
                assert_eq!(
                    flotilla_proto::content_digest(&content).ok().as_ref(),
                    Some(&c.content_hash)
                );
            }
        }
    }
}

fn check_content(c: &v1::BundleContent) {
    match Rendered::try_from(c) {
        Ok(r) => {
            let _ = r.content_hash();
        }
        Err(ConversionError::Manifest { file, .. }) => {
            assert!(c.manifests.iter().any(|m| m.file == file));
        }
        Err(ConversionError::UnknownDriftMode(_)) => {}
        Err(e) => panic!("undocumented error for content: {e}"),
    }
}

/// Bytes that are either anything, or a valid encoding with random damage.
fn wire(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)).prop_map(move |edits| {
            let mut b = valid.clone();
            for (at, v) in edits {
                if b.is_empty() {
                    b.push(v);
                } else {
                    let i = at % b.len();
                    b[i] = v;
                }
            }
            b
        }),
    ]
}

fn sample_agent_messages() -> Vec<u8> {
    let m = v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Drift(v1::DriftEvent {
            id: 3,
            bundle: "b".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "n".into(),
            name: "c".into(),
            fields: vec![v1::FieldDiff {
                path: "/data/a".into(),
                desired_json: "\"x\"".into(),
                live_json: "null".into(),
            }],
            manager: "kubectl".into(),
            detected_at_unix_ms: 1,
            corrected: true,
            deleted: false,
        })),
    };
    m.encode_to_vec()
}

fn sample_hub_message() -> Vec<u8> {
    v1::HubMessage {
        msg: Some(v1::hub_message::Msg::Desired(v1::Desired {
            generation: 9,
            complete: true,
            signed: None,
            chunked: vec![],
            bundles: vec![v1::BundleRef {
                name: "a".into(),
                content_hash: "h".into(),
                revision: "c".into(),
                blob_digest: String::new(),
            }],
            contents: vec![v1::BundleContent {
                content_hash: "h".into(),
                manifests: vec![v1::Manifest {
                    file: "a.yaml".into(),
                    json: r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#
                        .into(),
                }],
                default_namespace: "d".into(),
                target_namespace: String::new(),
                drift: Some(v1::DriftPolicy {
                    mode: 1,
                    ignore: vec![v1::IgnoreRule::default()],
                }),
                take_ownership: true,
            }],
        })),
    }
    .encode_to_vec()
}

proptest! {
    #![proptest_config(config())]

    /// What the hub accepts: the agent's stream and the enrolment requests.
    #[test]
    fn hub_side_messages_never_panic(b in wire(sample_agent_messages())) {
        if let Ok(m) = v1::AgentMessage::decode(b.as_slice()) {
            convert_all(&m);
            // Re-encoding a decoded message decodes to the same message.
            let again = v1::AgentMessage::decode(m.encode_to_vec().as_slice());
            prop_assert_eq!(again.ok(), Some(m));
        }
        let _ = v1::Hello::decode(b.as_slice());
        if let Ok(s) = v1::BundleStatus::decode(b.as_slice()) {
            match status_state(&s) {
                Ok(_) | Err(ConversionError::UnknownState(_) | ConversionError::UnspecifiedState) => {}
                Err(e) => prop_assert!(false, "undocumented error: {e}"),
            }
        }
        if let Ok(d) = v1::DriftEvent::decode(b.as_slice()) {
            match DriftEvent::try_from(&d) {
                Ok(_) | Err(ConversionError::DriftField { .. }) => {}
                Err(e) => prop_assert!(false, "undocumented error: {e}"),
            }
        }
        let _ = v1::EnrollRequest::decode(b.as_slice());
        let _ = v1::GetCaRequest::decode(b.as_slice());
        let _ = v1::DesiredAck::decode(b.as_slice());
        let _ = v1::Heartbeat::decode(b.as_slice());
    }

    /// What the agent accepts: the hub's stream and the enrolment answers.
    #[test]
    fn agent_side_messages_never_panic(b in wire(sample_hub_message())) {
        if let Ok(m) = v1::HubMessage::decode(b.as_slice()) {
            convert_hub(&m);
        }
        if let Ok(d) = v1::Desired::decode(b.as_slice()) {
            for c in &d.contents {
                check_content(c);
            }
        }
        if let Ok(c) = v1::BundleContent::decode(b.as_slice()) {
            check_content(&c);
        }
        if let Ok(p) = v1::DriftPolicy::decode(b.as_slice()) {
            match DriftPolicy::try_from(&p) {
                Ok(_) | Err(ConversionError::UnknownDriftMode(_)) => {}
                Err(e) => prop_assert!(false, "undocumented error: {e}"),
            }
        }
        let _ = v1::EnrollResponse::decode(b.as_slice());
        let _ = v1::GetCaResponse::decode(b.as_slice());
        let _ = v1::StatusAck::decode(b.as_slice());
        let _ = v1::DriftAck::decode(b.as_slice());
    }

    /// Structured hostile fields: manifests that are not JSON, or JSON that is not
    /// an object; drift diffs with broken JSON; any state number.
    #[test]
    fn conversions_reject_bad_fields(
        files in prop::collection::vec(".{0,30}", 1..4),
        jsons in prop::collection::vec(prop_oneof![
            ".{0,60}",
            Just("{}".to_string()),
            Just("[]".to_string()),
            Just("null".to_string()),
            Just(r#"{"apiVersion":1,"kind":[],"metadata":{"name":{}}}"#.to_string()),
            Just("9".repeat(400)),
            Just("[".repeat(300)),
        ], 1..4),
        mode in any::<i32>(),
        state in any::<i32>(),
        desired_json in ".{0,30}",
        live_json in ".{0,30}",
    ) {
        let content = v1::BundleContent {
            content_hash: "h".into(),
            manifests: files.iter().zip(jsons.iter()).map(|(f, j)| v1::Manifest { file: f.clone(), json: j.clone() }).collect(),
            default_namespace: String::new(),
            target_namespace: String::new(),
            drift: Some(v1::DriftPolicy { mode, ignore: vec![] }),
            take_ownership: mode % 2 == 0,
        };
        check_content(&content);
        let status = v1::BundleStatus { state, ..Default::default() };
        match status_state(&status) {
            Ok(_) => prop_assert!((1..=7).contains(&state)),
            Err(ConversionError::UnknownState(s)) => prop_assert_eq!(s, state),
            Err(ConversionError::UnspecifiedState) => prop_assert_eq!(state, 0),
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
        let event = v1::DriftEvent {
            id: 1,
            fields: vec![v1::FieldDiff { path: "/a".into(), desired_json, live_json }],
            ..Default::default()
        };
        match DriftEvent::try_from(&event) {
            Ok(_) | Err(ConversionError::DriftField { .. }) => {}
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
    }
}

/// A real content of two chunks, its hash and its chunks (made once).
fn chunked_sample() -> &'static (String, v1::BundleContent, Vec<v1::ContentChunk>) {
    static SAMPLE: std::sync::OnceLock<(String, v1::BundleContent, Vec<v1::ContentChunk>)> =
        std::sync::OnceLock::new();
    SAMPLE.get_or_init(|| {
        let rendered = Rendered {
            manifests: (0..3)
                .map(|i| flotilla_shared::bundle::Manifest {
                    file: format!("cm-{i}.yaml"),
                    object: serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": format!("cm-{i}")},
                        "data": {"blob": "z".repeat(500_000)}
                    }),
                })
                .collect(),
            options: Default::default(),
        };
        let hash = rendered.content_hash();
        let encoded = flotilla_proto::chunks::encode_content(&hash, &rendered);
        let chunks: Vec<_> = flotilla_proto::chunks::split(&hash, encoded.into()).collect();
        assert_eq!(chunks.len(), 2);
        (
            hash.clone(),
            flotilla_proto::bundle_content(&hash, &rendered),
            chunks,
        )
    })
}

proptest! {
    #![proptest_config(config())]

    /// The agent's reassembly: the chunks of a real content dropped, repeated,
    /// reordered, moved, resized or renamed never panic, and the set that names
    /// the content gets it exactly, or an error: never anything else.
    #[test]
    fn damaged_chunk_streams_give_the_content_or_an_error(
        ops in prop::collection::vec((0u8..6, any::<usize>(), any::<u64>()), 0..8)
    ) {
        let (hash, content, chunks) = chunked_sample();
        let total = chunks[0].total_len;
        let mut seq = chunks.clone();
        for (op, at, v) in ops {
            if seq.is_empty() {
                break;
            }
            let i = at % seq.len();
            match op {
                0 => { seq.remove(i); }
                1 => { let c = seq[i].clone(); seq.insert(i, c); }
                2 => { let j = (at / 7) % seq.len(); seq.swap(i, j); }
                3 => seq[i].offset = v % (total + 2),
                4 => seq[i].total_len = v % (2 * total + 1),
                _ => seq[i].content_hash = "f".repeat(64),
            }
        }
        let mut a = flotilla_proto::chunks::Assembler::default();
        for c in seq {
            let _ = a.chunk(c);
        }
        if let Ok(got) = a.finish(std::slice::from_ref(hash)) {
            prop_assert_eq!(got, vec![content.clone()]);
        }
        prop_assert_eq!(a.buffered(), 0);
    }
}
