#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pipit_protocol::fuzz::node_link(data));
