//! pipit tools: the command-line client (`pipit-cli`), the 2G link
//! emulator (`pipit-linkem`, also a library for tests and benchmarks:
//! [`linkem`]) and the conformance checker (`pipit-conformance`:
//! [`conformance`]).

pub mod conformance;
pub mod linkem;
