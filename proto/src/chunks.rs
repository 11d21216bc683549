//! Contents in bounded pieces ("chunked-contents", protocol v2): how the hub
//! encodes a content once and cuts it into [`v1::ContentChunk`]s, and how the
//! agent puts them back together, bounding what it buffers.
//!
//! The hub sends the chunks of each content in order, contiguous from offset 0,
//! one content after another, before the `Desired` that lists them in
//! `chunked`. [`Assembler`] accepts exactly that and refuses anything else with
//! an error naming the content: a `total_len` over its cap, a piece that does
//! not start where the last ended (a gap, an overlap, a replay), a piece past
//! `total_len`, a total that changes, and a whole that does not decode or does
//! not hash to its name. A set whose chunked contents did not all arrive whole
//! and sound is refused ([`Assembler::finish`]); nothing partial is ever handed
//! on.

use std::collections::BTreeMap;

use flotilla_shared::bundle::Rendered;
use prost::bytes::Bytes;
use prost::Message;

use crate::v1;

/// The most data one chunk carries (1 MiB): a content of any size travels in
/// messages far below [`crate::MAX_MESSAGE_BYTES`].
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// The agent's cap on what it buffers of chunked contents awaiting their
/// `Desired`, together (1 GiB): a content announced larger is refused before
/// any of it is buffered.
pub const MAX_CONTENT_BYTES: u64 = 1 << 30;

/// Encodes a content as it travels (the bytes of a [`v1::BundleContent`]),
/// building one manifest's wire form at a time: the only full copy is the
/// returned buffer. Decodes to exactly `crate::bundle_content(hash, rendered)`.
pub fn encode_content(content_hash: &str, rendered: &Rendered) -> Vec<u8> {
    // Fields 3 and up (the options) from the message itself, field 1 and the
    // manifests (field 2) by hand around them: the same bytes, in prost's field
    // order, as encoding the whole message.
    let options = v1::BundleContent {
        content_hash: String::new(),
        manifests: Vec::new(),
        ..crate::bundle_content(
            content_hash,
            &Rendered {
                manifests: Vec::new(),
                options: rendered.options.clone(),
            },
        )
    };
    let mut buf = Vec::new();
    if !content_hash.is_empty() {
        prost::encoding::string::encode(1, &content_hash.to_string(), &mut buf);
    }
    for m in &rendered.manifests {
        let wire = v1::Manifest {
            file: m.file.clone(),
            json: m.object.to_string(),
        };
        prost::encoding::message::encode(2, &wire, &mut buf);
    }
    options.encode(&mut buf).expect("a Vec grows");
    buf
}

/// The chunks of one encoded content: slices of `encoded`, never copies.
pub fn split(content_hash: &str, encoded: Bytes) -> impl Iterator<Item = v1::ContentChunk> + '_ {
    split_as(content_hash, encoded, false)
}

/// The chunks of an encoded content (`delta` false) or of an encoded
/// [`v1::ContentDelta`] for it (`delta` true, "object-deltas").
pub fn split_as(
    content_hash: &str,
    encoded: Bytes,
    delta: bool,
) -> impl Iterator<Item = v1::ContentChunk> + '_ {
    let total = encoded.len();
    (0..total.div_ceil(MAX_CHUNK_BYTES)).map(move |i| {
        let start = i * MAX_CHUNK_BYTES;
        let end = (start + MAX_CHUNK_BYTES).min(total);
        v1::ContentChunk {
            content_hash: content_hash.to_string(),
            offset: start as u64,
            total_len: total as u64,
            data: encoded.slice(start..end),
            delta,
        }
    })
}

/// Why chunks or a set that refers to them were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("content {hash}: announced as {total_len} bytes, over the agent's cap of {cap} bytes for chunked contents")]
    OverCap {
        hash: String,
        total_len: u64,
        cap: u64,
    },
    #[error("content {hash}: a chunk of {len} bytes, over the {max} bytes a chunk may carry")]
    ChunkTooLarge {
        hash: String,
        len: usize,
        max: usize,
    },
    #[error("content {hash}: an empty chunk, or a total length of 0")]
    Empty { hash: String },
    #[error("content {hash}: a chunk at offset {offset}, but {expected} bytes were received (chunks must be contiguous, in order, without overlap)")]
    Offset {
        hash: String,
        offset: u64,
        expected: u64,
    },
    #[error("content {hash}: a chunk ends at {end}, past the content's {total_len} bytes")]
    OutOfRange {
        hash: String,
        end: u64,
        total_len: u64,
    },
    #[error("content {hash}: the total length changed from {was} to {now} between chunks")]
    TotalChanged { hash: String, was: u64, now: u64 },
    #[error("content {hash}: chunks began before content {previous} was complete ({received} of {total_len} bytes)")]
    Interleaved {
        hash: String,
        previous: String,
        received: u64,
        total_len: u64,
    },
    #[error("content {hash}: sent again before the desired set that refers to it")]
    Duplicate { hash: String },
    #[error("content {hash}: the reassembled bytes are not a content: {reason}")]
    Decode { hash: String, reason: String },
    #[error("content {hash}: the reassembled content hashes to {actual}")]
    WrongHash { hash: String, actual: String },
    #[error("content {hash}: the desired set refers to it as chunked, but it never arrived whole ({received} of {total_len} bytes)")]
    Incomplete {
        hash: String,
        received: u64,
        total_len: u64,
    },
    #[error("content {hash}: the desired set refers to it as chunked, but no chunk of it arrived")]
    Missing { hash: String },
}

impl ChunkError {
    /// The content the error is about.
    pub fn hash(&self) -> &str {
        match self {
            ChunkError::OverCap { hash, .. }
            | ChunkError::ChunkTooLarge { hash, .. }
            | ChunkError::Empty { hash }
            | ChunkError::Offset { hash, .. }
            | ChunkError::OutOfRange { hash, .. }
            | ChunkError::TotalChanged { hash, .. }
            | ChunkError::Interleaved { hash, .. }
            | ChunkError::Duplicate { hash }
            | ChunkError::Decode { hash, .. }
            | ChunkError::WrongHash { hash, .. }
            | ChunkError::Incomplete { hash, .. }
            | ChunkError::Missing { hash } => hash,
        }
    }
}

/// What a content's first chunk reserves, at most.
const RESERVE_FIRST: u64 = 16 << 20;

struct Partial {
    hash: String,
    total_len: u64,
    delta: bool,
    buf: Vec<u8>,
}

/// A content reassembled from its chunks: whole (decoded and hashed to its
/// name), or a delta to rebuild it from ([`crate::delta::resolve`], which
/// checks the hash).
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    Whole(v1::BundleContent),
    Delta(v1::ContentDelta),
}

impl Assembled {
    pub fn content_hash(&self) -> &str {
        match self {
            Assembled::Whole(c) => &c.content_hash,
            Assembled::Delta(d) => &d.content_hash,
        }
    }
}

/// Reassembles the chunked contents of the next desired set (agent side).
///
/// At most one content is in progress, and what is buffered (the one in
/// progress, announced length, plus those complete and awaiting their set) never
/// exceeds `cap`. The first error is kept, and what it concerns dropped, until
/// [`Assembler::finish`] reports it with the set; a chunk after an error for
/// the same content is ignored.
pub struct Assembler {
    cap: u64,
    partial: Option<Partial>,
    done: BTreeMap<String, Assembled>,
    /// Encoded bytes of `done`.
    done_bytes: u64,
    error: Option<ChunkError>,
}

impl Default for Assembler {
    fn default() -> Self {
        Assembler::new(MAX_CONTENT_BYTES)
    }
}

impl Assembler {
    pub fn new(cap: u64) -> Assembler {
        Assembler {
            cap,
            partial: None,
            done: BTreeMap::new(),
            done_bytes: 0,
            error: None,
        }
    }

    /// Bytes buffered or reserved now.
    pub fn buffered(&self) -> u64 {
        self.done_bytes + self.partial.as_ref().map_or(0, |p| p.total_len)
    }

    /// Takes one chunk. `Ok(Some(hash))` when it completed a content (decoded
    /// and hashed to its name). An error is also kept for [`Assembler::finish`].
    pub fn chunk(&mut self, c: v1::ContentChunk) -> Result<Option<String>, ChunkError> {
        if self
            .error
            .as_ref()
            .is_some_and(|e| e.hash() == c.content_hash)
        {
            return Ok(None);
        }
        let r = self.take(c);
        if let Err(e) = &r {
            // What the error concerns is dropped; the first error is the one reported.
            if self.partial.as_ref().is_some_and(|p| p.hash == e.hash()) {
                self.partial = None;
            }
            if self.error.is_none() {
                self.error = Some(e.clone());
            }
        }
        r
    }

    fn take(&mut self, c: v1::ContentChunk) -> Result<Option<String>, ChunkError> {
        let hash = c.content_hash;
        if c.data.len() > MAX_CHUNK_BYTES {
            return Err(ChunkError::ChunkTooLarge {
                hash,
                len: c.data.len(),
                max: MAX_CHUNK_BYTES,
            });
        }
        if c.data.is_empty() || c.total_len == 0 {
            return Err(ChunkError::Empty { hash });
        }
        let end = c.offset.saturating_add(c.data.len() as u64);
        if end > c.total_len {
            return Err(ChunkError::OutOfRange {
                hash,
                end,
                total_len: c.total_len,
            });
        }
        match &mut self.partial {
            Some(p) if p.hash == hash => {
                if p.total_len != c.total_len || p.delta != c.delta {
                    return Err(ChunkError::TotalChanged {
                        hash,
                        was: p.total_len,
                        now: c.total_len,
                    });
                }
                if c.offset != p.buf.len() as u64 {
                    return Err(ChunkError::Offset {
                        hash,
                        offset: c.offset,
                        expected: p.buf.len() as u64,
                    });
                }
                if p.buf.len() + c.data.len() > p.buf.capacity() {
                    p.buf
                        .reserve_exact((p.total_len - p.buf.len() as u64) as usize);
                }
                p.buf.extend_from_slice(&c.data);
            }
            Some(p) => {
                return Err(ChunkError::Interleaved {
                    hash,
                    previous: p.hash.clone(),
                    received: p.buf.len() as u64,
                    total_len: p.total_len,
                })
            }
            None => {
                if self.done.contains_key(&hash) {
                    return Err(ChunkError::Duplicate { hash });
                }
                if c.offset != 0 {
                    return Err(ChunkError::Offset {
                        hash,
                        offset: c.offset,
                        expected: 0,
                    });
                }
                let room = self.cap.saturating_sub(self.done_bytes);
                if c.total_len > room {
                    return Err(ChunkError::OverCap {
                        hash,
                        total_len: c.total_len,
                        cap: if self.done_bytes == 0 { self.cap } else { room },
                    });
                }
                // Up to 16 MiB reserved on the sender's word; the rest once
                // that much data has come (one copy at most, not one per doubling).
                let mut buf = Vec::with_capacity(c.total_len.min(RESERVE_FIRST) as usize);
                buf.extend_from_slice(&c.data);
                self.partial = Some(Partial {
                    hash,
                    total_len: c.total_len,
                    delta: c.delta,
                    buf,
                });
            }
        }
        let complete = self
            .partial
            .as_ref()
            .is_some_and(|p| p.buf.len() as u64 == p.total_len);
        if !complete {
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        if p.delta {
            let delta =
                v1::ContentDelta::decode(p.buf.as_slice()).map_err(|e| ChunkError::Decode {
                    hash: p.hash.clone(),
                    reason: e.to_string(),
                })?;
            if delta.content_hash != p.hash {
                return Err(ChunkError::WrongHash {
                    hash: p.hash,
                    actual: format!("a delta named {}", delta.content_hash),
                });
            }
            self.done_bytes += p.total_len;
            self.done.insert(p.hash.clone(), Assembled::Delta(delta));
            return Ok(Some(p.hash));
        }
        let content =
            v1::BundleContent::decode(p.buf.as_slice()).map_err(|e| ChunkError::Decode {
                hash: p.hash.clone(),
                reason: e.to_string(),
            })?;
        drop(p.buf);
        if content.content_hash != p.hash {
            return Err(ChunkError::WrongHash {
                hash: p.hash,
                actual: format!("a content named {}", content.content_hash),
            });
        }
        let actual = crate::content_digest(&content).map_err(|e| ChunkError::Decode {
            hash: p.hash.clone(),
            reason: e.to_string(),
        })?;
        if actual != p.hash {
            return Err(ChunkError::WrongHash {
                hash: p.hash,
                actual,
            });
        }
        self.done_bytes += p.total_len;
        self.done.insert(p.hash.clone(), Assembled::Whole(content));
        Ok(Some(p.hash))
    }

    /// The contents a desired set lists in `chunked`, each whole and sound, or
    /// the first error (a refused chunk before, or one of them incomplete or
    /// missing). Everything buffered is dropped either way: the next set starts
    /// afresh. Complete contents the set does not list are dropped too.
    pub fn finish(&mut self, chunked: &[String]) -> Result<Vec<v1::BundleContent>, ChunkError> {
        self.finish_all(chunked)?
            .into_iter()
            .map(|a| match a {
                Assembled::Whole(c) => Ok(c),
                Assembled::Delta(d) => Err(ChunkError::Decode {
                    hash: d.content_hash,
                    reason: "a delta, where a whole content was expected".into(),
                }),
            })
            .collect()
    }

    /// As [`Assembler::finish`], with deltas ("object-deltas") as they came.
    pub fn finish_all(&mut self, chunked: &[String]) -> Result<Vec<Assembled>, ChunkError> {
        let partial = self.partial.take();
        let mut done = std::mem::take(&mut self.done);
        self.done_bytes = 0;
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut out = Vec::with_capacity(chunked.len());
        for hash in chunked {
            if let Some(c) = done.remove(hash) {
                out.push(c);
                continue;
            }
            if out.iter().any(|c: &Assembled| c.content_hash() == hash) {
                continue;
            }
            return Err(match &partial {
                Some(p) if &p.hash == hash => ChunkError::Incomplete {
                    hash: hash.clone(),
                    received: p.buf.len() as u64,
                    total_len: p.total_len,
                },
                _ => ChunkError::Missing { hash: hash.clone() },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_shared::bundle::Manifest;

    fn rendered(n: usize, size: usize) -> Rendered {
        Rendered {
            manifests: (0..n)
                .map(|i| Manifest {
                    file: format!("cm-{i}.yaml"),
                    object: serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": format!("cm-{i}")},
                        "data": {"blob": "x".repeat(size)}
                    }),
                })
                .collect(),
            options: flotilla_shared::bundle::BundleOptions {
                default_namespace: Some("d".into()),
                ..Default::default()
            },
        }
    }

    fn chunks_of(r: &Rendered) -> (String, Vec<v1::ContentChunk>) {
        let hash = r.content_hash();
        let encoded = Bytes::from(encode_content(&hash, r));
        let chunks = split(&hash, encoded).collect();
        (hash, chunks)
    }

    #[test]
    fn encoding_is_the_inline_content() {
        let r = rendered(3, 10);
        let hash = r.content_hash();
        let streamed = encode_content(&hash, &r);
        let inline = crate::bundle_content(&hash, &r);
        assert_eq!(
            v1::BundleContent::decode(streamed.as_slice()).unwrap(),
            inline
        );
        assert_eq!(streamed, inline.encode_to_vec(), "byte for byte");
        assert_eq!(crate::content_len(&hash, &r), streamed.len());
        let mut r = r;
        r.options.drift.mode = flotilla_shared::drift::DriftMode::Report;
        r.options.take_ownership = true;
        r.options.target_namespace = Some("t".into());
        let inline = crate::bundle_content(&hash, &r);
        assert_eq!(encode_content(&hash, &r), inline.encode_to_vec());
    }

    #[test]
    fn chunks_reassemble_into_the_content() {
        let r = rendered(40, 60_000);
        let (hash, chunks) = chunks_of(&r);
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.data.len() <= MAX_CHUNK_BYTES));
        let mut a = Assembler::default();
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let done = a.chunk(c).unwrap();
            assert_eq!(done.is_some(), i == n - 1);
        }
        let got = a.finish(std::slice::from_ref(&hash)).unwrap();
        assert_eq!(got, vec![crate::bundle_content(&hash, &r)]);
        assert_eq!(a.buffered(), 0);
        // Nothing listed, nothing sent: an empty, valid result.
        assert!(a.finish(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_wrong_hash_is_refused() {
        let r = rendered(5, 300_000);
        let hash = r.content_hash();
        let other = "f".repeat(64);
        // Named `other` throughout, but the bytes are `r`'s content.
        let encoded = Bytes::from(encode_content(&other, &r));
        let mut a = Assembler::default();
        let mut last = Ok(None);
        for c in split(&other, encoded) {
            last = a.chunk(c);
        }
        let e = last.unwrap_err();
        assert!(
            matches!(&e, ChunkError::WrongHash { hash: h, actual } if *h == other && *actual == hash),
            "{e}"
        );
        assert!(e.to_string().contains(&other), "{e}");
        let e = a.finish(std::slice::from_ref(&other)).unwrap_err();
        assert!(matches!(e, ChunkError::WrongHash { .. }), "{e}");

        // Bytes named one content inside, another outside.
        let encoded = Bytes::from(encode_content(&hash, &r));
        let mut a = Assembler::default();
        let mut last = Ok(None);
        for c in split(&other, encoded) {
            last = a.chunk(c);
        }
        assert!(
            matches!(last, Err(ChunkError::WrongHash { .. })),
            "{last:?}"
        );

        // Garbage does not decode.
        let mut a = Assembler::default();
        let e = a
            .chunk(v1::ContentChunk {
                content_hash: hash.clone(),
                offset: 0,
                total_len: 3,
                data: Bytes::from_static(&[0xff, 0xff, 0xff]),
                delta: false,
            })
            .unwrap_err();
        assert!(matches!(e, ChunkError::Decode { .. }), "{e}");
    }

    #[test]
    fn offsets_must_be_contiguous_and_in_range() {
        let r = rendered(5, 600_000);
        let (hash, chunks) = chunks_of(&r);
        assert!(chunks.len() >= 3);

        // Overlap: the first chunk again.
        let mut a = Assembler::default();
        a.chunk(chunks[0].clone()).unwrap();
        let e = a.chunk(chunks[0].clone()).unwrap_err();
        assert!(
            matches!(e, ChunkError::Offset { offset: 0, expected, .. } if expected == MAX_CHUNK_BYTES as u64),
            "{e}"
        );
        // Later chunks of it are ignored; the set is refused with the first error.
        for c in chunks.iter().skip(1).cloned() {
            assert_eq!(a.chunk(c).unwrap(), None);
        }
        let e2 = a.finish(std::slice::from_ref(&hash)).unwrap_err();
        assert_eq!(e2, e);

        // A gap.
        let mut a = Assembler::default();
        a.chunk(chunks[0].clone()).unwrap();
        let e = a.chunk(chunks[2].clone()).unwrap_err();
        assert!(matches!(e, ChunkError::Offset { .. }), "{e}");

        // Not starting at 0.
        let mut a = Assembler::default();
        let e = a.chunk(chunks[1].clone()).unwrap_err();
        assert!(matches!(e, ChunkError::Offset { expected: 0, .. }), "{e}");

        // Past the total.
        let mut a = Assembler::default();
        let mut c = chunks[0].clone();
        c.offset = c.total_len - 10;
        let e = a.chunk(c).unwrap_err();
        assert!(matches!(e, ChunkError::OutOfRange { .. }), "{e}");
        let mut c = chunks[0].clone();
        c.offset = u64::MAX - 1;
        assert!(matches!(
            Assembler::default().chunk(c),
            Err(ChunkError::OutOfRange { .. })
        ));

        // The total changes midway.
        let mut a = Assembler::default();
        a.chunk(chunks[0].clone()).unwrap();
        let mut c = chunks[1].clone();
        c.total_len += 1;
        assert!(matches!(a.chunk(c), Err(ChunkError::TotalChanged { .. })));

        // Another content begins before this one is whole.
        let (other, others) = chunks_of(&rendered(1, 10));
        let mut a = Assembler::default();
        a.chunk(chunks[0].clone()).unwrap();
        let e = a.chunk(others[0].clone()).unwrap_err();
        assert!(
            matches!(&e, ChunkError::Interleaved { hash: h, .. } if *h == other),
            "{e}"
        );

        // A chunk too large, an empty one.
        let mut c = chunks[0].clone();
        c.data = Bytes::from(vec![0u8; MAX_CHUNK_BYTES + 1]);
        c.total_len = c.data.len() as u64 * 2;
        assert!(matches!(
            Assembler::default().chunk(c),
            Err(ChunkError::ChunkTooLarge { .. })
        ));
        let mut c = chunks[0].clone();
        c.data = Bytes::new();
        assert!(matches!(
            Assembler::default().chunk(c),
            Err(ChunkError::Empty { .. })
        ));
    }

    #[test]
    fn a_total_over_the_cap_is_refused_before_buffering() {
        let hash = "a".repeat(64);
        let mut a = Assembler::default();
        let e = a
            .chunk(v1::ContentChunk {
                content_hash: hash.clone(),
                offset: 0,
                total_len: MAX_CONTENT_BYTES + 1,
                data: Bytes::from_static(b"x"),
                delta: false,
            })
            .unwrap_err();
        assert!(matches!(e, ChunkError::OverCap { .. }), "{e}");
        assert!(
            e.to_string().contains(&hash) && e.to_string().contains("1073741824"),
            "{e}"
        );
        assert_eq!(a.buffered(), 0);

        // The cap holds for all contents awaiting their set together.
        let r1 = rendered(2, 1000);
        let r2 = rendered(3, 1000);
        let (h1, c1) = chunks_of(&r1);
        let (_, c2) = chunks_of(&r2);
        let mut a = Assembler::new(c1[0].total_len + c2[0].total_len - 1);
        assert_eq!(a.chunk(c1[0].clone()).unwrap(), Some(h1.clone()));
        let e = a.chunk(c2[0].clone()).unwrap_err();
        assert!(matches!(e, ChunkError::OverCap { .. }), "{e}");
        // Sending a completed content again is refused too.
        let mut a = Assembler::default();
        a.chunk(c1[0].clone()).unwrap();
        assert!(matches!(
            a.chunk(c1[0].clone()),
            Err(ChunkError::Duplicate { .. })
        ));
    }

    #[test]
    fn a_set_naming_a_content_never_sent_whole_is_refused() {
        let r = rendered(5, 300_000);
        let (hash, chunks) = chunks_of(&r);
        let mut a = Assembler::default();
        for c in chunks.iter().take(chunks.len() - 1).cloned() {
            assert_eq!(a.chunk(c).unwrap(), None);
        }
        let e = a.finish(std::slice::from_ref(&hash)).unwrap_err();
        assert!(matches!(e, ChunkError::Incomplete { .. }), "{e}");
        assert!(e.to_string().contains(&hash), "{e}");
        assert_eq!(a.buffered(), 0, "the partial content is dropped");

        let e = a.finish(&["b".repeat(64)]).unwrap_err();
        assert!(matches!(e, ChunkError::Missing { .. }), "{e}");

        // After a refused set, the next starts afresh.
        for c in chunks.iter().cloned() {
            a.chunk(c).unwrap();
        }
        assert_eq!(a.finish(std::slice::from_ref(&hash)).unwrap().len(), 1);
    }
}
