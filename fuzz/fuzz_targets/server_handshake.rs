#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pipit_protocol::fuzz::server_handshake(data, std::time::Instant::now()));
