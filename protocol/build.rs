//! Compiles `pipit.proto` with protox (pure Rust), so building needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=pipit.proto");
    let descriptors = protox::compile(["pipit.proto"], ["."])?;
    prost_build::Config::new()
        // Payloads and keys are handed on without copying where possible.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
