//! CI runs the conformance checker against the real server: an in-process
//! server on 127.0.0.1 with RocksDB in a temporary directory, a rotated
//! key (so the retired-key path is checked too), and the
//! `pipit-conformance` binary as a third party would run it. Every check
//! must pass; none may be skipped.

use std::process::Command;
use std::time::Duration;

#[test]
fn the_server_passes_every_conformance_check() {
    let dir = tempfile::tempdir().unwrap();
    // A rotation before start: the old key stays accepted as retired.
    let old = pipit::keys::load_or_create(dir.path()).unwrap().current;
    pipit::keys::rotate(dir.path(), 1_800_000_000).unwrap();
    let running = pipit::start(pipit::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        shards: 2,
        // Short enough that the timeout checks take seconds, long enough
        // for a loaded machine to finish a handshake.
        net: pipit::config::NetSettings {
            handshake_timeout_secs: 3,
            keepalive_min_secs: 1,
            delivery_window: 8,
            ..pipit::config::NetSettings::default()
        },
        ..pipit::Config::default()
    })
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pipit-conformance"))
        .args(["--server", &running.local_addr.to_string()])
        .args(["--server-key", &running.public_key.to_string()])
        .args(["--retired-key", &old.public().to_string()])
        .args(["--handshake-timeout", "3", "--max-idle-wait", "30"])
        .output()
        .unwrap();
    running.shutdown(Duration::from_secs(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("PASS") || l.starts_with("FAIL") || l.starts_with("SKIP")).collect();
    assert!(lines.len() >= 80, "every check reported: {} lines", lines.len());
    let not_passed: Vec<&&str> = lines.iter().filter(|l| !l.starts_with("PASS")).collect();
    assert!(not_passed.is_empty(), "checks not passed:\n{stdout}");
    assert!(out.status.success(), "{:?}", out.status);
}
