fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        // The descriptor set feeds the control plane's gRPC reflection service.
        let descriptor =
            std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("weir_descriptor.bin");
        tonic_prost_build::configure()
            .file_descriptor_set_path(descriptor)
            .compile_protos(&["proto/weir/v1/weir.proto"], &["proto"])?;
    }
    Ok(())
}
