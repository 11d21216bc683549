//! The files that carry desired state, statuses and enrolments by hand: gzip of
//! one [`v1::TransferFile`]. Reading one is bounded (a file is hostile input
//! until verified): at most [`MAX_FILE_BYTES`] decompressed.

use std::io::{Read, Write};

use prost::Message;

use crate::v1;

/// The format this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest decompressed file read: a gzip bomb stops here.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Gzip's magic, the first bytes of every file.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("not a Flotilla transfer file (no gzip header)")]
    NotGzip,
    #[error("the file is corrupt or truncated: {0}")]
    Gzip(String),
    #[error("the file decompresses to more than {0} bytes: refused")]
    TooLarge(u64),
    #[error("the file is corrupt: {0}")]
    Decode(String),
    #[error("file format version {0}; this build reads version {VERSION}")]
    Version(u32),
    #[error("the file holds {found}, not {wanted}")]
    Kind {
        found: &'static str,
        wanted: &'static str,
    },
}

/// What a file holds, for messages.
pub fn kind(body: Option<&v1::transfer_file::Body>) -> &'static str {
    use v1::transfer_file::Body;
    match body {
        Some(Body::Desired(_)) => "a desired state (flotilla bundle export)",
        Some(Body::Status(_)) => "a status report (flotilla-agent export-status)",
        Some(Body::EnrollRequest(_)) => "an enrolment request (flotilla-agent enroll-request)",
        Some(Body::EnrollResponse(_)) => "an enrolment response (flotilla cluster enroll)",
        None => "nothing",
    }
}

/// The error for a file that holds `found` where `wanted` was expected.
pub fn wrong_kind(found: &v1::transfer_file::Body, wanted: &'static str) -> FileError {
    FileError::Kind {
        found: kind(Some(found)),
        wanted,
    }
}

/// Encodes a file body, gzipped.
pub fn encode(body: v1::transfer_file::Body) -> Vec<u8> {
    let file = v1::TransferFile {
        version: VERSION,
        body: Some(body),
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(&file.encode_to_vec());
    gz.finish().unwrap_or_default()
}

/// Decodes a file, bounded by [`MAX_FILE_BYTES`].
pub fn decode(bytes: &[u8]) -> Result<v1::transfer_file::Body, FileError> {
    decode_bounded(bytes, MAX_FILE_BYTES)
}

/// Decodes a file that decompresses to at most `max` bytes.
pub fn decode_bounded(bytes: &[u8], max: u64) -> Result<v1::transfer_file::Body, FileError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Err(FileError::NotGzip);
    }
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(max + 1)
        .read_to_end(&mut raw)
        .map_err(|e| FileError::Gzip(e.to_string()))?;
    if raw.len() as u64 > max {
        return Err(FileError::TooLarge(max));
    }
    let file =
        v1::TransferFile::decode(raw.as_slice()).map_err(|e| FileError::Decode(e.to_string()))?;
    if file.version != VERSION {
        return Err(FileError::Version(file.version));
    }
    file.body.ok_or(FileError::Kind {
        found: "nothing",
        wanted: "a body",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::transfer_file::Body;

    #[test]
    fn files_round_trip_and_compress() {
        let body = Body::Desired(v1::DesiredFile {
            cluster: "edge-1".into(),
            signed: None,
            contents: vec![v1::BundleContent {
                content_hash: "h".into(),
                manifests: (0..200)
                    .map(|i| v1::Manifest {
                        file: "cm.yaml".into(),
                        json: format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"c{i}"}}}}"#),
                    })
                    .collect(),
                ..Default::default()
            }],
        });
        let bytes = encode(body.clone());
        let raw = v1::TransferFile {
            version: VERSION,
            body: Some(body.clone()),
        }
        .encoded_len();
        assert!(bytes.len() * 5 < raw, "{} gzipped of {raw}", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), body);
    }

    #[test]
    fn hostile_files_are_refused_with_the_reason() {
        assert!(matches!(decode(b"hello"), Err(FileError::NotGzip)));
        let mut bytes = encode(Body::Desired(v1::DesiredFile::default()));
        bytes.truncate(bytes.len() / 2);
        assert!(matches!(decode(&bytes), Err(FileError::Gzip(_))));
        // Gzip of garbage.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[0xff; 64]).unwrap();
        assert!(matches!(
            decode(&gz.finish().unwrap()),
            Err(FileError::Decode(_))
        ));
        // Another version.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(
            &v1::TransferFile {
                version: 9,
                body: None,
            }
            .encode_to_vec(),
        )
        .unwrap();
        assert!(matches!(
            decode(&gz.finish().unwrap()),
            Err(FileError::Version(9))
        ));
    }

    /// A small file that inflates past the cap is cut off, not read whole.
    #[test]
    fn a_gzip_bomb_stops_at_the_cap() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        assert!(matches!(
            decode_bounded(&bomb, 4 << 20),
            Err(FileError::TooLarge(_))
        ));
    }
}
