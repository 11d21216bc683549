//! Property-based fuzzing of the checks the gateway makes on what an agent sends:
//! any decoded `BundleStatus` or `DriftEvent` (from arbitrary bytes, or with
//! hostile fields) goes through `status_record` / `drift_event` without a panic,
//! and what they accept is well-formed. Few cases in `make test`,
//! `FLOTILLA_FUZZ_CASES` in `make fuzz`.

use flotilla_proto::v1;
use proptest::prelude::*;
use prost::Message;

use super::{drift_event, status_record};

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

fn name() -> impl Strategy<Value = String> {
    prop_oneof![".{0,80}", "[a-z0-9-]{0,70}", Just("a".repeat(300))]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_status_bytes(b in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(s) = v1::BundleStatus::decode(b.as_slice()) {
            if let Ok(rec) = status_record("c1", s.clone()) {
                prop_assert_eq!(rec.cluster, "c1");
                prop_assert!(flotilla_shared::objects::validate_name(&rec.bundle).is_ok());
            }
        }
        if let Ok(d) = v1::DriftEvent::decode(b.as_slice()) {
            if let Ok(e) = drift_event(&d) {
                prop_assert!(!e.object.kind.is_empty() && !e.object.name.is_empty());
            }
        }
    }

    #[test]
    fn hostile_status_fields(bundle in name(), hash in ".{0,100}", message in ".{0,200}", state in any::<i32>(), seq in any::<u64>(), at in any::<i64>()) {
        let s = v1::BundleStatus {
            bundle: bundle.clone(),
            content_hash: hash,
            revision: String::new(),
            state,
            message,
            seq,
            observed_at_unix_ms: at,
        };
        match status_record("c1", s) {
            Ok(rec) => {
                prop_assert_eq!(rec.bundle, bundle);
                prop_assert!((1..=7).contains(&state));
            }
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn hostile_drift_fields(bundle in name(), kind in ".{0,20}", obj in name(), path in ".{0,40}", desired in ".{0,40}", live in ".{0,40}") {
        let d = v1::DriftEvent {
            id: 1,
            bundle,
            api_version: "v1".into(),
            kind,
            namespace: String::new(),
            name: obj,
            fields: vec![v1::FieldDiff { path, desired_json: desired, live_json: live }],
            ..Default::default()
        };
        if let Err(reason) = drift_event(&d) {
            prop_assert!(!reason.is_empty());
        }
    }
}
