//! Compiles `proto/` with protox (pure Rust, no `protoc` needed), generates the
//! prost types and their proto3 canonical JSON mapping (pbjson), and writes the
//! descriptor set that `graphdelta schema` ships.

use std::{env, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/graphdelta/v1/change_event.proto",
        "proto/graphdelta/v1/checkpoint.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile(protos, ["proto"])?;
    let descriptor_path = out.join("graphdelta_v1_descriptor.binpb");
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    prost_build::Config::new()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        // Event properties: a Struct that keeps the JSON Graph sent (see
        // src/proto/json_struct.rs).
        .extern_path(".google.protobuf.Struct", "crate::proto::JsonStruct")
        .compile_fds(descriptors)?;

    let descriptor_bytes = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".graphdelta.v1"])?;
    Ok(())
}
