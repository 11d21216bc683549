//! Property-based fuzzing of what the agent takes from the hub: arbitrary bytes
//! decoded as a `Desired` message go through `session::desired_set` (what the store
//! keeps) and every content through the conversion the reconciler makes before
//! applying. No panic; bad content fails with its conversion error. Few cases in
//! `make test`, `FLOTILLA_FUZZ_CASES` in `make fuzz`.

use flotilla_agent::session::desired_set;
use flotilla_proto::v1;
use flotilla_shared::bundle::Rendered;
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

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_desired_bytes(b in prop::collection::vec(any::<u8>(), 0..600)) {
        let Ok(d) = v1::Desired::decode(b.as_slice()) else {
            return Ok(());
        };
        let (set, contents) = desired_set(&d);
        prop_assert_eq!(set.generation, d.generation);
        prop_assert_eq!(set.bundles.len(), d.bundles.len());
        prop_assert_eq!(contents.len(), d.contents.len());
        for (hash, bytes) in &contents {
            // What the store keeps decodes back to what was sent.
            let c = v1::BundleContent::decode(bytes.as_slice());
            prop_assert!(c.is_ok());
            let c = c.unwrap_or_default();
            prop_assert_eq!(&c.content_hash, hash);
            let _ = Rendered::try_from(&c);
        }
    }
}
