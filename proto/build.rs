//! Generates the wire types from proto/flotilla.proto with protox: no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/flotilla.proto");
    let fds = protox::compile(["proto/flotilla.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // 1 KiB stream buffers, not 8 KiB (see `codec`).
        .codec_path("crate::codec::SmallCodec")
        // A content's chunks are slices of one encoded buffer, not copies.
        .bytes(".flotilla.v1.ContentChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
