//! `pipit-cli` processes against a real server: register, send, receive,
//! an interactive chat between two "terminals", and admin commands.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Terminal, CLI};

struct Server {
    running: Option<pipit::Running>,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(2));
        }
    }
}

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let running = pipit::start(pipit::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        shards: 1,
        ..pipit::Config::default()
    })
    .unwrap();
    Server { running: Some(running), dir }
}

fn cli(args: &[&str]) -> String {
    common::cli(args).unwrap_or_else(|e| panic!("pipit-cli {args:?}: {e}"))
}

fn register(s: &Server, profile: &Path) -> u64 {
    let r = s.running.as_ref().unwrap();
    let out = cli(&[
        "register",
        "--profile",
        profile.to_str().unwrap(),
        "--server",
        &r.local_addr.to_string(),
        "--server-key",
        &r.public_key.to_string(),
    ]);
    // "account N device D"
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

impl Terminal {
    fn chat(profile: &Path, to: u64) -> Self {
        Self::spawn(&["chat", "--profile", profile.to_str().unwrap(), "--to", &to.to_string()])
    }

    fn group_chat(profile: &Path, group: u64) -> Self {
        Self::spawn(&["chat", "--profile", profile.to_str().unwrap(), "--group", &group.to_string()])
    }
}

#[test]
fn two_cli_processes_exchange_a_message() {
    let s = server();
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = register(&s, pa.path());
    let b = register(&s, pb.path());
    assert_ne!(a, b);
    let out = cli(&["send", "--profile", pa.path().to_str().unwrap(), "--to", &b.to_string(), "hello from the cli"]);
    assert!(out.starts_with("sent seq 1"), "{out}");
    let out = cli(&["recv", "--profile", pb.path().to_str().unwrap(), "--count", "1"]);
    assert_eq!(out.trim(), format!("{a}: hello from the cli"));
    let whoami = cli(&["whoami", "--profile", pb.path().to_str().unwrap()]);
    assert!(whoami.contains(&format!("account {b} device 0")), "{whoami}");
    assert!(whoami.contains(&s.running.as_ref().unwrap().public_key.to_string()), "the server key is pinned");
    assert!(whoami.contains("end-to-end identity "), "profiles encrypt by default: {whoami}");
    // The message went end to end: the server's data holds no plaintext
    // of it (the WAL would show it in the clear otherwise).
    let mut stack = vec![s.dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                assert!(!bytes.windows(18).any(|w| w == b"hello from the cli"), "plaintext in {}", p.display());
            }
        }
    }

    // Admin commands against the running server.
    let data = s.dir.path().to_str().unwrap();
    let accounts = cli(&["admin", "--data-dir", data, "accounts"]);
    assert_eq!(accounts.lines().count(), 2, "{accounts}");
    let inbox = cli(&["admin", "--data-dir", data, "inbox", &b.to_string(), "0"]);
    assert!(inbox.starts_with("0 waiting"), "{inbox}");
    let code = cli(&["admin", "--data-dir", data, "invite", "--ttl-secs", "60"]);
    assert_eq!(code.trim().len(), 9, "{code}");
}

#[test]
fn a_chat_between_two_terminals_shows_sent_delivered_and_read() {
    let s = server();
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = register(&s, pa.path());
    let b = register(&s, pb.path());
    let mut ta = Terminal::chat(pa.path(), b);
    let mut tb = Terminal::chat(pb.path(), a);
    ta.wait_for("chatting as");
    tb.wait_for("chatting as");
    ta.type_line("hi b, it's a");
    ta.wait_for("] sent");
    tb.wait_for(&format!("{a}: hi b, it's a"));
    ta.wait_for("] delivered");
    ta.wait_for("] read");
    tb.type_line("hello a");
    ta.wait_for(&format!("{b}: hello a"));
    tb.wait_for("] read");
    ta.quit();
    tb.quit();
}

/// Defect 13: a send to an account that does not exist printed
/// `Error: refused: NotFound` (and a backtrace with `RUST_BACKTRACE`). It
/// now says what happened and what to do, in words.
#[test]
fn a_send_to_a_missing_account_says_so_in_words() {
    let s = server();
    let pa = tempfile::tempdir().unwrap();
    let a = register(&s, pa.path());
    let missing = a + 1;
    let out = Command::new(CLI)
        .args(["send", "--profile", pa.path().to_str().unwrap(), "--to", &missing.to_string(), "hello?"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!("pipit-cli: message not sent: account {missing} does not exist; check the account number")
    );
    assert!(!stderr.contains("NotFound") && !stderr.contains("acktrace"), "{stderr}");
}

#[test]
fn groups_from_the_cli_create_send_list_chat_and_admin() {
    let s = server();
    let (pa, pb, pc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b, c) = (register(&s, pa.path()), register(&s, pb.path()), register(&s, pc.path()));
    let profile = |p: &tempfile::TempDir| p.path().to_str().unwrap().to_string();
    let (pa_s, pb_s, pc_s) = (profile(&pa), profile(&pb), profile(&pc));
    let out = cli(&["group", "--profile", &pa_s, "create", "--name", "club", &b.to_string(), &c.to_string()]);
    // "group G name "club" version 1 members a,b,c admins a"
    assert!(out.contains("version 1") && out.contains(&format!("admins {a}")), "{out}");
    let g: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let out = cli(&["send", "--profile", &pa_s, "--group", &g.to_string(), "hello club"]);
    assert!(out.starts_with("sent seq 2"), "{out}");
    let out = cli(&["recv", "--profile", &pb_s, "--count", "1"]);
    assert_eq!(out.trim(), format!("[group {g}] {a}: hello club"));
    let list = cli(&["group", "--profile", &pc_s, "list"]);
    assert!(list.starts_with(&format!("group {g} name \"club\" version 1")), "{list}");
    // Only admins add: b's attempt fails with the server's code.
    let refused = Command::new(CLI)
        .args(["group", "--profile", &pb_s, "add", "--group", &g.to_string(), &c.to_string()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(&format!("adding to group {g}: only the group's admins")), "{refused:?}");

    // A group chat: a's line reaches b, and a sees it delivered and read.
    let mut ta = Terminal::group_chat(pa.path(), g);
    let mut tb = Terminal::group_chat(pb.path(), g);
    ta.wait_for("chatting as");
    tb.wait_for("chatting as");
    ta.type_line("who is reading?");
    ta.wait_for("] sent");
    tb.wait_for(&format!("{a}: who is reading?"));
    ta.wait_for("] delivered to 1");
    ta.wait_for("] read by 1");
    ta.quit();
    tb.quit();
    assert_eq!(cli(&["group", "--profile", &pc_s, "leave", "--group", &g.to_string()]).trim(), "done");

    let data = s.dir.path().to_str().unwrap();
    // The leave's notice is fanned out after "done".
    let mut admin = cli(&["admin", "--data-dir", data, "group", &g.to_string()]);
    for _ in 0..100 {
        if admin.contains("fanout 0 jobs") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        admin = cli(&["admin", "--data-dir", data, "group", &g.to_string()]);
    }
    assert!(admin.contains("version 2") && admin.contains(&format!("{a}*")), "{admin}");
    assert!(admin.contains("members 2 ") && admin.contains("fanout 0 jobs"), "{admin}");
}
