//! A large bundle of ConfigMaps with random-looking data, shared by the
//! chunked-contents e2e test and the large-bundle benchmark.

use std::collections::BTreeMap;

/// Random-looking hex (xorshift): gzip cannot make it much smaller, so the
/// content really is as large on the wire as in Git.
pub fn hex_data(seed: u64, len: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for i in 0..16 {
            if out.len() == len {
                break;
            }
            out.push(HEX[((x >> (i * 4)) & 15) as usize]);
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The files of a bundle in directory `dir`: namespace `ns`, then `objects`
/// ConfigMaps `cm-NNNN` each carrying `bytes` of [`hex_data`] under `blob`,
/// `per_file` to a manifest file.
pub fn bundle(
    dir: &str,
    ns: &str,
    objects: usize,
    bytes: usize,
    per_file: usize,
) -> BTreeMap<String, String> {
    let mut files = BTreeMap::from([(
        format!("{dir}/0-ns.yaml"),
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"),
    )]);
    let per_file = per_file.max(1);
    for f in 0..objects.div_ceil(per_file) {
        let mut text = String::new();
        for i in f * per_file..((f + 1) * per_file).min(objects) {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:04}\n  namespace: {ns}\ndata:\n  blob: \"{}\"\n",
                hex_data(i as u64, bytes)
            ));
        }
        files.insert(format!("{dir}/cms-{f:02}.yaml"), text);
    }
    files
}
