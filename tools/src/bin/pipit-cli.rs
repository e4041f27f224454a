//! `pipit-cli`: pipit from a terminal, for developers and operators.
//!
//! A *profile* is a directory holding one device: its key, its ids, the
//! pinned server key, its outbox and end-to-end state (the client
//! library's `FileStore`) and the server address. Messages are end-to-end
//! encrypted unless the profile was registered with `--no-e2e`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{PublicKey, StaticKeypair};
use pipit_client::{Client, Config, Encryption, Event, Events, FileStore, Store as _};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(name = "pipit-cli", version, about = "pipit from a terminal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a device key pair; prints the public key.
    Keygen {
        /// Write the private key (hex) here, mode 0600.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Create an account for a new profile (a new device).
    Register {
        /// Profile directory to create.
        #[arg(long)]
        profile: PathBuf,
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:5222")]
        server: String,
        /// The server's public key (from `pipit key`); learned on first
        /// contact and pinned when omitted.
        #[arg(long)]
        server_key: Option<PublicKey>,
        /// Invite code, when the server requires one.
        #[arg(long, default_value = "")]
        invite: String,
        /// Device name.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Send and receive payloads as they are, without end-to-end
        /// encryption (for bots and tests; such a profile cannot read
        /// encrypted messages).
        #[arg(long)]
        no_e2e: bool,
    },
    /// Show a profile's account, device and keys.
    Whoami {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
    },
    /// Send one message and wait until the server has it.
    Send {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// Recipient account.
        #[arg(long)]
        to: u64,
        /// The text.
        text: String,
    },
    /// Print incoming messages, then exit.
    Recv {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// Stop after this many messages.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Accept the new end-to-end identity a device showed (after
    /// comparing it with its owner, ideally).
    Trust {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// The device's account.
        #[arg(long)]
        account: u64,
        /// The device.
        #[arg(long)]
        device: u32,
    },
    /// Remove a device of this profile's account (this one included).
    Unlink {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// The device to remove.
        #[arg(long)]
        device: u32,
    },
    /// Chat with one account: type lines to send; incoming messages and the
    /// state of yours (sent, delivered, read) are printed as they happen.
    /// `/trust ACCOUNT DEVICE` accepts a device's new identity.
    Chat {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// The other account.
        #[arg(long)]
        to: u64,
    },
    /// Administer a running server on this machine (its admin socket).
    Admin {
        /// The server's data directory.
        #[arg(long, default_value = "pipit-data")]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Issue a single-use invite code.
    Invite {
        /// Validity in seconds.
        #[arg(long, default_value_t = 7 * 86_400)]
        ttl_secs: u64,
    },
    /// Accounts and their devices.
    Accounts,
    /// A device's inbox depth and whether it is online.
    Inbox {
        /// Account.
        account: u64,
        /// Device.
        device: u32,
    },
    /// Server statistics.
    Stats,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli.command)));
    // One sentence and its causes, never Debug output or a backtrace: a
    // person reads this.
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipit-cli: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why a message to account `to` was not sent, in words.
fn send_failure(code: pb::ErrorCode, to: u64) -> String {
    match code {
        pb::ErrorCode::NotFound => format!("account {to} does not exist; check the account number"),
        pb::ErrorCode::TooLarge => "the message is larger than the server accepts; send a shorter one".into(),
        other => pipit_client::explain(other).into(),
    }
}

fn server_file(profile: &Path) -> PathBuf {
    profile.join("server")
}

/// Present in a profile registered with `--no-e2e`.
fn plaintext_file(profile: &Path) -> PathBuf {
    profile.join("no-e2e")
}

fn config(profile: &Path, server: &str) -> Config {
    let mut config = Config::new(server.trim());
    if plaintext_file(profile).exists() {
        config.encryption = Encryption::Off;
    }
    config
}

fn start(profile: &Path) -> anyhow::Result<(Client, Events)> {
    let server = std::fs::read_to_string(server_file(profile))
        .with_context(|| format!("{} is not a profile (run `pipit-cli register` first)", profile.display()))?;
    let store = FileStore::open(profile)?;
    Ok(Client::start(config(profile, &server), store)?)
}

/// Waits until the device's end-to-end keys are on the server (so others
/// can write to it), when it encrypts.
async fn keys_published(client: &Client) -> anyhow::Result<()> {
    if client.e2e_identity().is_none() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.stats().keys_published.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        if tokio::time::Instant::now() > deadline {
            bail!("the server did not take this device's end-to-end keys within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How an end-to-end event reads in a terminal; `None` for others.
fn e2e_line(e: &Event) -> Option<String> {
    match e {
        Event::Undecryptable { message, reason } => {
            Some(format!("* a message from {}/{} could not be read: {reason}", message.from, message.from_device))
        }
        Event::IdentityChanged { account, device, new, .. } => Some(format!(
            "* the identity of {account}/{device} changed to {new}; nothing goes to it until you accept it \
             (`/trust {account} {device}` in a chat, or `pipit-cli trust`) after checking it with its owner"
        )),
        _ => None,
    }
}

/// Waits for the login; a stop (refused device, changed key) is an error.
async fn connected(events: &mut Events) -> anyhow::Result<(u64, u32)> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
            Err(_) => bail!("could not reach the server within 30 s"),
            Ok(None) => bail!("client stopped"),
            Ok(Some(Event::Connected { account, device, .. })) => return Ok((account, device)),
            Ok(Some(Event::Stopped { reason })) => bail!("{reason}"),
            Ok(Some(Event::Disconnected { reason })) => eprintln!("(connection failed: {reason}; retrying)"),
            Ok(Some(_)) => {}
        }
    }
}

fn text(d: &pb::Deliver) -> String {
    String::from_utf8_lossy(&d.payload).into_owned()
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { out } => {
            let kp = StaticKeypair::generate();
            if let Some(path) = out {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
                writeln!(f, "{}", kp.to_hex())?;
            }
            println!("{}", kp.public());
        }
        Command::Register { profile, server, server_key, invite, name, no_e2e } => {
            if server_file(&profile).exists() {
                bail!("{} already holds a device", profile.display());
            }
            let mut store = FileStore::open(&profile)?;
            let mut state = pipit_client::State::new(StaticKeypair::generate());
            state.server_key = server_key;
            store.save_state(&state)?;
            std::fs::write(server_file(&profile), &server)?;
            if no_e2e {
                std::fs::write(plaintext_file(&profile), "")?;
            }
            let mut config = config(&profile, &server);
            config.invite = invite;
            config.device_name = name;
            let (client, mut events) = Client::start(config, store)?;
            let (account, device) = connected(&mut events).await?;
            keys_published(&client).await?;
            println!("account {account} device {device}");
            client.close().await;
        }
        Command::Whoami { profile } => {
            let state = FileStore::open(&profile)?.load_state()?.context("empty profile")?;
            println!("account {} device {}", state.account, state.device);
            println!("device key {}", state.identity.public());
            println!("server key {}", state.server_key.map(|k| k.to_string()).unwrap_or_else(|| "(not pinned)".into()));
            let (client, _events) = start(&profile)?;
            match client.e2e_identity() {
                Some(id) => println!("end-to-end identity {id}"),
                None => println!("end-to-end encryption off"),
            }
            client.close().await;
        }
        Command::Trust { profile, account, device } => {
            let (client, _events) = start(&profile)?;
            let accepted = client.trust_identity(account, device).await?;
            client.close().await;
            if !accepted {
                bail!("{account}/{device} showed no new identity to accept");
            }
            println!("accepted the new identity of {account}/{device}");
        }
        Command::Unlink { profile, device } => {
            let (client, mut events) = start(&profile)?;
            connected(&mut events).await?;
            client.request(vec![pb::UnlinkDevice { req: 1, device }.into()]).await?;
            loop {
                match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
                    Err(_) => bail!("no answer from the server"),
                    Ok(Some(Event::Other(pipit_client::pipit_protocol::Message::Done(d)))) if d.req == 1 => break,
                    Ok(Some(Event::Other(pipit_client::pipit_protocol::Message::Error(e)))) if e.req == 1 => {
                        let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                        bail!("device {device} not unlinked: {}", pipit_client::explain(code));
                    }
                    Ok(Some(Event::Stopped { reason })) => bail!("{reason}"),
                    Ok(None) => bail!("client stopped"),
                    Ok(Some(_)) => {}
                }
            }
            println!("device {device} unlinked");
            client.close().await;
        }
        Command::Send { profile, to, text } => {
            let (client, mut events) = start(&profile)?;
            connected(&mut events).await?;
            let id = client.send(to, text.into_bytes()).await?;
            loop {
                match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
                    Err(_) => bail!("no answer from the server; the message stays in the outbox"),
                    Ok(Some(Event::Sent(s))) if s.id == id => {
                        println!("sent seq {}", s.seq);
                        break;
                    }
                    Ok(Some(Event::SendFailed { id: f, code })) if f == id => {
                        bail!("message not sent: {}", send_failure(code, to))
                    }
                    Ok(Some(Event::Stopped { reason })) => bail!("{reason}"),
                    Ok(None) => bail!("client stopped"),
                    Ok(Some(_)) => {}
                }
            }
            client.close().await;
        }
        Command::Recv { profile, count, timeout } => {
            let (client, mut events) = start(&profile)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            let mut got = 0;
            while got < count {
                match tokio::time::timeout_at(deadline, events.next()).await {
                    Err(_) => bail!("received {got} of {count} messages"),
                    Ok(Some(Event::Message(d))) => {
                        println!("{}: {}", d.from, text(&d));
                        got += 1;
                    }
                    Ok(Some(e @ (Event::Undecryptable { .. } | Event::IdentityChanged { .. }))) => {
                        println!("{}", e2e_line(&e).unwrap_or_default());
                        got += usize::from(matches!(e, Event::Undecryptable { .. }));
                    }
                    Ok(Some(Event::Stopped { reason })) => bail!("{reason}"),
                    Ok(None) => bail!("client stopped"),
                    Ok(Some(_)) => {}
                }
            }
            client.close().await;
        }
        Command::Chat { profile, to } => chat(&profile, to).await?,
        Command::Admin { data_dir, command } => {
            let line = match command {
                AdminCommand::Invite { ttl_secs } => format!("invite {ttl_secs}"),
                AdminCommand::Accounts => "accounts".into(),
                AdminCommand::Inbox { account, device } => format!("inbox {account} {device}"),
                AdminCommand::Stats => "stats".into(),
            };
            let answer = tokio::task::spawn_blocking(move || pipit_client::admin::request(&data_dir, &line)).await??;
            print!("{answer}");
            if answer.starts_with("error:") {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// What happened to one of my messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Queued,
    Sent,
    Delivered,
    Read,
}

async fn chat(profile: &Path, to: u64) -> anyhow::Result<()> {
    let (client, mut events) = start(profile)?;
    let (me, _) = connected(&mut events).await?;
    println!("* chatting as {me} with {to}; type a line to send, Ctrl-D to quit");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    // My messages: client id -> (seq once sent, status).
    let mut mine: BTreeMap<u64, (u64, Status)> = BTreeMap::new();
    loop {
        // After Ctrl-D, stay until everything typed reached the server.
        if !stdin_open && mine.values().all(|(_, s)| *s >= Status::Sent) {
            break;
        }
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                None => stdin_open = false,
                Some(l) if l.trim().is_empty() => {}
                Some(l) if l.starts_with("/trust ") => {
                    let ids: Vec<&str> = l.split_whitespace().skip(1).collect();
                    match (ids.first().and_then(|a| a.parse().ok()), ids.get(1).and_then(|d| d.parse().ok())) {
                        (Some(a), Some(d)) if client.trust_identity(a, d).await? => {
                            println!("* accepted the new identity of {a}/{d}")
                        }
                        (Some(a), Some(d)) => println!("* {a}/{d} showed no new identity to accept"),
                        _ => println!("* usage: /trust ACCOUNT DEVICE"),
                    }
                }
                Some(l) => {
                    let id = client.send(to, l.into_bytes()).await?;
                    mine.insert(id, (0, Status::Queued));
                    println!("* [{id}] queued");
                }
            },
            e = events.next() => match e {
                None => bail!("client stopped"),
                Some(Event::Message(d)) if d.from == to => {
                    println!("{to}: {}", text(&d));
                    // The chat is open: what is shown is read.
                    client.mark_read(to, d.seq).await?;
                }
                Some(Event::Message(d)) if d.peer == to => println!("me (other device): {}", text(&d)),
                Some(Event::Message(d)) => println!("* message from {} (not this chat): {}", d.from, text(&d)),
                Some(Event::Sent(s)) => {
                    if let Some(m) = mine.get_mut(&s.id) {
                        *m = (s.seq, m.1.max(Status::Sent));
                    }
                    println!("* [{}] sent", s.id);
                }
                Some(Event::Receipt(r)) if r.peer == to => {
                    let status = if r.kind == pb::ReceiptKind::Read as i32 { Status::Read } else { Status::Delivered };
                    for (id, (seq, st)) in mine.iter_mut() {
                        if *seq != 0 && *seq <= r.through && *st < status {
                            *st = status;
                            println!("* [{id}] {}", if status == Status::Read { "read" } else { "delivered" });
                        }
                    }
                }
                Some(Event::SendFailed { id, code }) => {
                    mine.remove(&id);
                    println!("* [{id}] not sent: {}", send_failure(code, to));
                }
                Some(Event::Disconnected { reason }) => println!("* offline ({reason}); reconnecting"),
                Some(Event::Connected { .. }) => println!("* online"),
                Some(Event::Stopped { reason }) => bail!("{reason}"),
                Some(Event::Expired(e)) => println!("* message seq {} expired undelivered", e.seq),
                Some(e) => {
                    if let Some(line) = e2e_line(&e) {
                        println!("{line}");
                    }
                }
            },
        }
    }
    client.close().await;
    Ok(())
}
