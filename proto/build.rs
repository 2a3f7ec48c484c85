//! Compiles `mekong/v1/*.proto` with protox (a protobuf compiler in pure Rust, so no `protoc`
//! has to be installed anywhere) and generates prost messages plus tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["mekong/v1/federation.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
