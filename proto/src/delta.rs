//! Contents as deltas of objects ("object-deltas", protocol v2): the hub sends
//! an agent the objects of a content it lacks, and runs of objects to copy from
//! contents it holds; the agent rebuilds the whole content and checks it
//! against its digest before anything else sees it.
//!
//! An object is one [`v1::Manifest`] (its file and its JSON); its digest is
//! SHA-256 of the Manifest's encoding ([`object_digest`]). [`diff`] is the
//! hub's side and [`resolve`] the agent's; both are pure.

use std::collections::HashMap;

use flotilla_shared::bundle::Rendered;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::v1;

/// An object's digest.
pub type Digest = [u8; 32];

/// The most objects one rebuilt content may have.
pub const MAX_OBJECTS: u64 = 1 << 20;

/// The digest of one object as it travels.
pub fn object_digest(m: &v1::Manifest) -> Digest {
    Sha256::digest(m.encode_to_vec()).into()
}

/// The wire form of a rendered manifest.
pub fn manifest(m: &flotilla_shared::bundle::Manifest) -> v1::Manifest {
    v1::Manifest {
        file: m.file.clone(),
        json: m.object.to_string(),
    }
}

/// The digests of a rendered content's objects, in order.
pub fn object_list(rendered: &Rendered) -> Vec<Digest> {
    rendered
        .manifests
        .iter()
        .map(|m| object_digest(&manifest(m)))
        .collect()
}

/// A content the agent holds, with its objects in order.
pub struct Base<'a> {
    pub hash: &'a str,
    pub objects: &'a [Digest],
}

/// `rendered` (whose objects are `objects`, from [`object_list`]) as a delta
/// against `bases`, in order of preference (a run is taken from the first base
/// that holds an object). `None` when no object of it is in any base: it is
/// then sent whole.
pub fn diff(
    content_hash: &str,
    rendered: &Rendered,
    objects: &[Digest],
    bases: &[Base<'_>],
) -> Option<v1::ContentDelta> {
    let mut at: HashMap<&Digest, (usize, u64)> = HashMap::new();
    for (i, b) in bases.iter().enumerate() {
        for (pos, d) in b.objects.iter().enumerate() {
            at.entry(d).or_insert((i, pos as u64));
        }
    }
    // Runs name bases by their index in `bases` until the end, then by their
    // index among the bases used.
    let mut ops: Vec<v1::DeltaOp> = Vec::new();
    let mut run: Option<(usize, u64, u64)> = None;
    let mut copied = false;
    let push_run = |ops: &mut Vec<v1::DeltaOp>, (base, start, count): (usize, u64, u64)| {
        ops.push(v1::DeltaOp {
            op: Some(v1::delta_op::Op::Copy(v1::CopyRun {
                base: base as u32,
                start,
                count,
            })),
        });
    };
    for (i, d) in objects.iter().enumerate() {
        if let Some((base, start, count)) = &mut run {
            if bases[*base].objects.get((*start + *count) as usize) == Some(d) {
                *count += 1;
                continue;
            }
        }
        if let Some(r) = run.take() {
            push_run(&mut ops, r);
        }
        match at.get(d) {
            Some(&(base, start)) => {
                run = Some((base, start, 1));
                copied = true;
            }
            None => ops.push(v1::DeltaOp {
                op: Some(v1::delta_op::Op::Object(manifest(&rendered.manifests[i]))),
            }),
        }
    }
    if let Some(r) = run.take() {
        push_run(&mut ops, r);
    }
    if !copied {
        return None;
    }
    let mut renumber: HashMap<u32, u32> = HashMap::new();
    let mut used = Vec::new();
    for op in &mut ops {
        if let Some(v1::delta_op::Op::Copy(c)) = &mut op.op {
            let next = renumber.len() as u32;
            let n = *renumber.entry(c.base).or_insert_with(|| {
                used.push(bases[c.base as usize].hash.to_string());
                next
            });
            c.base = n;
        }
    }
    Some(v1::ContentDelta {
        content_hash: content_hash.to_string(),
        bases: used,
        ops,
        options: Some(crate::bundle_content(
            "",
            &Rendered {
                manifests: Vec::new(),
                options: rendered.options.clone(),
            },
        )),
    })
}

/// Why a delta cannot be rebuilt into its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("content {hash}: the delta copies from {base}, a content the agent does not hold")]
    UnknownBase { hash: String, base: String },
    #[error("content {hash}: a run names base {index}, but the delta lists {bases}")]
    BaseIndex {
        hash: String,
        index: u32,
        bases: usize,
    },
    #[error("content {hash}: a run of {count} objects from {start} of {base}, which has {len}")]
    OutOfRange {
        hash: String,
        base: String,
        start: u64,
        count: u64,
        len: usize,
    },
    #[error("content {hash}: an object of {base} is missing from the agent's store")]
    MissingObject { hash: String, base: String },
    #[error("content {hash}: more than {max} objects, or {max_bytes} bytes, rebuilt")]
    TooLarge {
        hash: String,
        max: u64,
        max_bytes: u64,
    },
    #[error("content {hash}: an empty operation or an empty run")]
    Empty { hash: String },
    #[error("content {hash}: the rebuilt content is unreadable: {reason}")]
    Unreadable { hash: String, reason: String },
    #[error("content {hash}: the rebuilt content hashes to {actual}")]
    WrongHash { hash: String, actual: String },
}

/// Rebuilds the content a delta describes, with `objects_of` giving the object
/// digests of a content the agent holds (`None`: not held) and `object` an
/// object by digest (`None`: not held). The result hashes to the delta's
/// `content_hash`, or the error says why not.
pub fn resolve(
    delta: v1::ContentDelta,
    mut objects_of: impl FnMut(&str) -> Option<Vec<Digest>>,
    mut object: impl FnMut(&Digest) -> Option<v1::Manifest>,
) -> Result<v1::BundleContent, DeltaError> {
    let hash = delta.content_hash;
    let mut bases: Vec<Option<Vec<Digest>>> = vec![None; delta.bases.len()];
    let mut manifests = Vec::new();
    let mut bytes: u64 = 0;
    let too_large = |hash: &str| DeltaError::TooLarge {
        hash: hash.to_string(),
        max: MAX_OBJECTS,
        max_bytes: crate::chunks::MAX_CONTENT_BYTES,
    };
    for op in delta.ops {
        match op.op {
            None => return Err(DeltaError::Empty { hash }),
            Some(v1::delta_op::Op::Object(m)) => {
                bytes += m.encoded_len() as u64;
                manifests.push(m);
            }
            Some(v1::delta_op::Op::Copy(run)) => {
                let i = run.base as usize;
                let Some(name) = delta.bases.get(i) else {
                    return Err(DeltaError::BaseIndex {
                        hash,
                        index: run.base,
                        bases: delta.bases.len(),
                    });
                };
                if bases[i].is_none() {
                    bases[i] = Some(objects_of(name).ok_or_else(|| DeltaError::UnknownBase {
                        hash: hash.clone(),
                        base: name.clone(),
                    })?);
                }
                let list = bases[i].as_deref().unwrap_or_default();
                let end = run.start.checked_add(run.count);
                if run.count == 0 {
                    return Err(DeltaError::Empty { hash });
                }
                if end.is_none_or(|e| e > list.len() as u64) {
                    return Err(DeltaError::OutOfRange {
                        hash,
                        base: name.clone(),
                        start: run.start,
                        count: run.count,
                        len: list.len(),
                    });
                }
                if manifests.len() as u64 + run.count > MAX_OBJECTS {
                    return Err(too_large(&hash));
                }
                for d in &list[run.start as usize..(run.start + run.count) as usize] {
                    let m = object(d).ok_or_else(|| DeltaError::MissingObject {
                        hash: hash.clone(),
                        base: name.clone(),
                    })?;
                    bytes += m.encoded_len() as u64;
                    manifests.push(m);
                    if bytes > crate::chunks::MAX_CONTENT_BYTES {
                        return Err(too_large(&hash));
                    }
                }
            }
        }
        if manifests.len() as u64 > MAX_OBJECTS || bytes > crate::chunks::MAX_CONTENT_BYTES {
            return Err(too_large(&hash));
        }
    }
    let content = v1::BundleContent {
        content_hash: hash.clone(),
        manifests,
        ..delta.options.unwrap_or_default()
    };
    let actual = crate::content_digest(&content).map_err(|e| DeltaError::Unreadable {
        hash: hash.clone(),
        reason: e.to_string(),
    })?;
    if actual != hash {
        return Err(DeltaError::WrongHash { hash, actual });
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::bundle::{BundleOptions, Manifest};

    fn rendered(values: &[&str]) -> Rendered {
        Rendered {
            manifests: values
                .iter()
                .enumerate()
                .map(|(i, v)| Manifest {
                    file: format!("cm-{i}.yaml"),
                    object: serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": format!("cm-{i}")},
                        "data": {"v": v}
                    }),
                })
                .collect(),
            options: BundleOptions {
                default_namespace: Some("d".into()),
                ..Default::default()
            },
        }
    }

    /// An agent's store of whole contents, for `resolve`.
    struct Held(Vec<(String, Rendered)>);

    impl Held {
        fn resolve(&self, delta: v1::ContentDelta) -> Result<v1::BundleContent, DeltaError> {
            let objects: HashMap<Digest, v1::Manifest> = self
                .0
                .iter()
                .flat_map(|(_, r)| r.manifests.iter().map(manifest))
                .map(|m| (object_digest(&m), m))
                .collect();
            resolve(
                delta,
                |h| {
                    self.0
                        .iter()
                        .find(|(hash, _)| hash == h)
                        .map(|(_, r)| object_list(r))
                },
                |d| objects.get(d).cloned(),
            )
        }
    }

    fn delta_of(new: &Rendered, held: &Held) -> Option<v1::ContentDelta> {
        let lists: Vec<(String, Vec<Digest>)> = held
            .0
            .iter()
            .map(|(h, r)| (h.clone(), object_list(r)))
            .collect();
        let bases: Vec<Base<'_>> = lists
            .iter()
            .map(|(h, l)| Base {
                hash: h,
                objects: l,
            })
            .collect();
        diff(&new.content_hash(), new, &object_list(new), &bases)
    }

    #[test]
    fn a_one_object_change_sends_that_object_and_two_runs() {
        let values: Vec<String> = (0..500).map(|i| format!("v{i}")).collect();
        let old = rendered(&values.iter().map(String::as_str).collect::<Vec<_>>());
        let mut changed = values.clone();
        changed[250] = "changed".into();
        let new = rendered(&changed.iter().map(String::as_str).collect::<Vec<_>>());
        let held = Held(vec![(old.content_hash(), old.clone())]);
        let delta = delta_of(&new, &held).expect("a delta");
        let objects = delta
            .ops
            .iter()
            .filter(|o| matches!(o.op, Some(v1::delta_op::Op::Object(_))))
            .count();
        assert_eq!((delta.ops.len(), objects), (3, 1), "{delta:?}");
        assert_eq!(delta.bases, vec![old.content_hash()]);
        // Far smaller than the content: the object and a few bytes more.
        let whole = crate::content_len(&new.content_hash(), &new);
        let object = manifest(&new.manifests[250]).encoded_len();
        assert!(
            delta.encoded_len() < object + 300,
            "{} bytes for one object of {object} (whole: {whole})",
            delta.encoded_len()
        );
        let back = held.resolve(delta).unwrap();
        assert_eq!(back, crate::bundle_content(&new.content_hash(), &new));
    }

    #[test]
    fn objects_come_from_any_held_content_and_nothing_shared_sends_whole() {
        let a = rendered(&["a0", "a1", "a2"]);
        let b = rendered(&["b0", "b1"]);
        let held = Held(vec![
            (a.content_hash(), a.clone()),
            (b.content_hash(), b.clone()),
        ]);
        // Objects of both, reordered, and one new.
        let mut new = rendered(&["x", "x", "x", "x"]);
        new.manifests = vec![
            b.manifests[1].clone(),
            a.manifests[0].clone(),
            a.manifests[1].clone(),
            rendered(&["n"]).manifests[0].clone(),
        ];
        new.options.take_ownership = true;
        let delta = delta_of(&new, &held).unwrap();
        assert_eq!(delta.bases.len(), 2);
        let back = held.resolve(delta).unwrap();
        assert_eq!(back, crate::bundle_content(&new.content_hash(), &new));

        let unrelated = rendered(&["u0", "u1"]);
        assert!(delta_of(&unrelated, &held).is_none());
        assert!(delta_of(&unrelated, &Held(vec![])).is_none());
    }

    #[test]
    fn unsound_deltas_are_refused_with_the_reason() {
        let old = rendered(&["a", "b", "c"]);
        let new = rendered(&["a", "b", "z"]);
        let held = Held(vec![(old.content_hash(), old.clone())]);
        let good = delta_of(&new, &held).unwrap();
        let hash = new.content_hash();

        let mut d = good.clone();
        d.bases = vec!["f".repeat(64)];
        assert!(matches!(
            held.resolve(d),
            Err(DeltaError::UnknownBase { .. })
        ));

        let with_run = |run: v1::CopyRun| {
            let mut d = good.clone();
            d.ops[0].op = Some(v1::delta_op::Op::Copy(run));
            held.resolve(d)
        };
        let run = |base, start, count| v1::CopyRun { base, start, count };
        assert!(matches!(
            with_run(run(1, 0, 1)),
            Err(DeltaError::BaseIndex { .. })
        ));
        assert!(matches!(
            with_run(run(0, 2, 2)),
            Err(DeltaError::OutOfRange { .. })
        ));
        assert!(matches!(
            with_run(run(0, u64::MAX, 2)),
            Err(DeltaError::OutOfRange { .. })
        ));
        assert!(matches!(
            with_run(run(0, 0, 0)),
            Err(DeltaError::Empty { .. })
        ));
        // A run that copies other objects than the content has.
        assert!(matches!(
            with_run(run(0, 1, 2)),
            Err(DeltaError::WrongHash { .. })
        ));
        // A content named for other objects.
        let mut d = good.clone();
        d.content_hash = old.content_hash();
        assert!(matches!(held.resolve(d), Err(DeltaError::WrongHash { .. })));
        // Options changed in transit.
        let mut d = good.clone();
        d.options.as_mut().unwrap().take_ownership = true;
        assert!(matches!(held.resolve(d), Err(DeltaError::WrongHash { .. })));
        // An object the store lost.
        let lost = resolve(
            good.clone(),
            |_| Some(object_list(&old)),
            |_| None::<v1::Manifest>,
        );
        assert!(matches!(lost, Err(DeltaError::MissingObject { .. })));
        // A run repeated past the cap is refused before it is built.
        let mut d = good.clone();
        d.ops = (0..(MAX_OBJECTS / 3 + 2))
            .map(|_| v1::DeltaOp {
                op: Some(v1::delta_op::Op::Copy(run(0, 0, 3))),
            })
            .collect();
        assert!(matches!(held.resolve(d), Err(DeltaError::TooLarge { .. })));
        assert_eq!(held.resolve(good).unwrap().content_hash, hash);
    }
}
