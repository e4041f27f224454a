//! The project's uniffi-bindgen, built from the workspace so it always
//! matches the uniffi version in Cargo.lock (no global install).
//! `tools/dev bindings` runs it in library mode on pipit-ffi's `cdylib`;
//! `tests/bindings.rs` checks what it generates.

fn main() {
    uniffi::uniffi_bindgen_main()
}
