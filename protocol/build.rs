fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        tonic_prost_build::configure().compile_protos(&["proto/weir/v1/weir.proto"], &["proto"])?;
    }
    Ok(())
}
