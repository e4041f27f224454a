//! pipit benchmarks and load tools: `pipit-load` drives a running server
//! over real TCP with real handshakes. Criterion micro-benchmarks live in
//! `benches/`.
