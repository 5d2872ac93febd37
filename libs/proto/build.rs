//! Compiles `proto/` with protox (pure Rust, no system protoc) and generates prost messages
//! plus tonic clients and servers. The file descriptor set is written to `OUT_DIR` so the
//! services can serve gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "tessera/common/v1/common.proto",
        "tessera/catalog/v1/catalog.proto",
        "tessera/eligibility/v1/eligibility.proto",
        "tessera/wallet/v1/wallet.proto",
        "tessera/scheduler/v1/scheduler.proto",
        "tessera/notification/v1/notification.proto",
        "tessera/ops/v1/ops.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tessera_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Deterministic encoding (idempotency fingerprints hash encoded requests).
        .btree_map(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
