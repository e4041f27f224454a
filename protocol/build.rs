//! Compiles `pipit.proto` (devices) and `node.proto` (node links) with protox (pure Rust), so building needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=pipit.proto");
    println!("cargo:rerun-if-changed=node.proto");
    let descriptors = protox::compile(["pipit.proto", "node.proto"], ["."])?;
    prost_build::Config::new()
        // Payloads and keys are handed on without copying where possible.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
