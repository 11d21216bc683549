//! Property: for any content the agent holds and any new content, the delta the
//! hub makes rebuilds exactly the new content at the agent, and sends no object
//! the agent already holds.

use std::collections::HashMap;

use flotilla_proto::delta::{diff, manifest, object_digest, object_list, resolve, Base, Digest};
use flotilla_proto::v1;
use flotilla_shared::bundle::{BundleOptions, Manifest, Rendered};
use proptest::prelude::*;

fn rendered(values: &[u8], adopt: bool) -> Rendered {
    Rendered {
        manifests: values
            .iter()
            .enumerate()
            .map(|(i, v)| Manifest {
                // Names repeat across contents, so the same object recurs.
                file: format!("cm-{}.yaml", i % 7),
                object: serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("cm-{}", i % 7)},
                    "data": {"v": v % 9}
                }),
            })
            .collect(),
        options: BundleOptions {
            take_ownership: adopt,
            ..Default::default()
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_delta_rebuilds_the_content_and_sends_only_what_is_lacking(
        held in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..4),
        new in proptest::collection::vec(any::<u8>(), 0..40),
        adopt in any::<bool>(),
    ) {
        let held: Vec<Rendered> = held.iter().map(|v| rendered(v, false)).collect();
        let hashes: Vec<String> = held.iter().map(Rendered::content_hash).collect();
        let lists: Vec<Vec<Digest>> = held.iter().map(object_list).collect();
        let store: HashMap<Digest, v1::Manifest> = held
            .iter()
            .flat_map(|r| r.manifests.iter().map(manifest))
            .map(|m| (object_digest(&m), m))
            .collect();
        let new = rendered(&new, adopt);
        let hash = new.content_hash();
        let bases: Vec<Base<'_>> = hashes
            .iter()
            .zip(&lists)
            .map(|(hash, objects)| Base { hash, objects })
            .collect();
        match diff(&hash, &new, &object_list(&new), &bases) {
            None => {
                // Sent whole: only when it shares no object with what is held.
                prop_assert!(object_list(&new).iter().all(|d| !store.contains_key(d)));
            }
            Some(delta) => {
                for op in &delta.ops {
                    if let Some(v1::delta_op::Op::Object(m)) = &op.op {
                        prop_assert!(!store.contains_key(&object_digest(m)), "a held object was sent");
                    }
                }
                let back = resolve(
                    delta,
                    |h| hashes.iter().position(|x| x == h).map(|i| lists[i].clone()),
                    |d| store.get(d).cloned(),
                ).expect("the delta rebuilds");
                prop_assert_eq!(back, flotilla_proto::bundle_content(&hash, &new));
            }
        }
    }
}
