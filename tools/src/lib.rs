//! pipit tools: the command-line client (`pipit-cli`) and the 2G link
//! emulator (`pipit-linkem`), with the emulator also usable as a library
//! by tests and benchmarks ([`linkem`]).

pub mod linkem;
