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
    /// Send one message (to an account or a group) and wait until the
    /// server has it.
    Send {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// Recipient account.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        to: Option<u64>,
        /// Or a group.
        #[arg(long)]
        group: Option<u64>,
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
    /// Chat with one account or in a group: type lines to send; incoming
    /// messages and the state of yours (sent, delivered, read; in a group,
    /// to how many members) are printed as they happen. With one account,
    /// whether it is online (or when it was last seen) and typing are shown
    /// too, `/typing` tells it you are typing, and `/trust ACCOUNT DEVICE`
    /// accepts a device's new end-to-end identity.
    Chat {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// The other account.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        to: Option<u64>,
        /// Or a group.
        #[arg(long)]
        group: Option<u64>,
    },
    /// Create, change, leave and list groups.
    Group {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Print whether accounts are online, or when they were last seen.
    Presence {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// Keep printing changes until interrupted.
        #[arg(long)]
        follow: bool,
        /// The accounts (at most 256).
        #[arg(required = true)]
        accounts: Vec<u64>,
    },
    /// Show or hide this account's last seen.
    Privacy {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// Who sees when this account was last online.
        #[arg(long, value_enum)]
        last_seen: LastSeen,
    },
    /// Register this device's push token, so the server wakes it when a
    /// message arrives while it is offline.
    PushToken {
        /// Profile directory.
        #[arg(long)]
        profile: PathBuf,
        /// Where the token comes from.
        #[arg(long, value_enum)]
        platform: Platform,
        /// The token (for unifiedpush: the endpoint URL); omit with
        /// --remove.
        #[arg(required_unless_present = "remove")]
        token: Option<String>,
        /// Remove the token instead.
        #[arg(long, conflicts_with = "token")]
        remove: bool,
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum LastSeen {
    /// Everyone who watches this account.
    Everyone,
    /// Nobody: watchers see 0.
    Nobody,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Platform {
    /// Apple Push Notification service (through the server's gateway).
    Apns,
    /// Firebase Cloud Messaging (through the server's gateway).
    Fcm,
    /// A UnifiedPush endpoint URL.
    Unifiedpush,
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group of this account (its first admin) and MEMBERS.
    Create {
        /// The group's name.
        #[arg(long, default_value = "")]
        name: String,
        /// Member accounts.
        members: Vec<u64>,
    },
    /// Add members (admins only).
    Add {
        /// The group.
        #[arg(long)]
        group: u64,
        /// Accounts to add.
        #[arg(required = true)]
        members: Vec<u64>,
    },
    /// Remove members (admins only).
    Remove {
        /// The group.
        #[arg(long)]
        group: u64,
        /// Accounts to remove.
        #[arg(required = true)]
        members: Vec<u64>,
    },
    /// Leave a group.
    Leave {
        /// The group.
        #[arg(long)]
        group: u64,
    },
    /// The groups this account is in.
    List,
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
    /// A group: members, version, fan-out backlog, stored bodies.
    Group {
        /// Group id.
        id: u64,
    },
    /// Keys and bytes per table (a full scan: a diagnostic).
    Storage,
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
/// Why a send failed, in words, for the conversation it went to.
fn send_failure(code: pb::ErrorCode, to: Option<u64>, group: Option<u64>) -> String {
    match (code, to, group) {
        (pb::ErrorCode::NotFound, Some(to), _) => format!("account {to} does not exist; check the account number"),
        (pb::ErrorCode::NotFound, None, Some(g)) => format!("group {g} does not exist; check the group number"),
        (pb::ErrorCode::Forbidden, None, Some(g)) => format!("you are not a member of group {g}"),
        (code, ..) => match code {
            pb::ErrorCode::TooLarge => "the message is larger than the server accepts; send a shorter one".into(),
            other => pipit_client::explain(other).into(),
        },
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

/// "online", "last seen 5 min ago", or "offline" (hidden or never seen).
fn presence_text(p: &pb::Presence) -> String {
    if p.online {
        return "online".into();
    }
    if p.last_seen == 0 {
        return "offline".into();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let ago = now.saturating_sub(p.last_seen);
    let when = match ago {
        0..=59 => "just now".to_string(),
        60..=3_599 => format!("{} min ago", ago / 60),
        3_600..=86_399 => format!("{} h ago", ago / 3_600),
        _ => format!("{} days ago", ago / 86_400),
    };
    format!("last seen {when}")
}

/// A call the server refused, in words.
fn refused(what: &str, e: pipit_client::ClientError) -> anyhow::Error {
    anyhow::anyhow!("{what}: {e}")
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
        Command::Send { profile, to, group, text } => {
            let (client, mut events) = start(&profile)?;
            connected(&mut events).await?;
            let id = match (to, group) {
                (Some(to), _) => client.send(to, text.into_bytes()).await?,
                (None, Some(group)) => client.send_group(group, text.into_bytes()).await?,
                (None, None) => bail!("--to or --group"),
            };
            loop {
                match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
                    Err(_) => bail!("no answer from the server; the message stays in the outbox"),
                    Ok(Some(Event::Sent(s))) if s.id == id => {
                        println!("sent seq {}", s.seq);
                        break;
                    }
                    Ok(Some(Event::SendFailed { id: f, code })) if f == id => {
                        bail!("message not sent: {}", send_failure(code, to, group))
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
                        if d.group != 0 {
                            println!("[group {}] {}: {}", d.group, d.from, text(&d));
                        } else {
                            println!("{}: {}", d.from, text(&d));
                        }
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
        Command::Chat { profile, to: Some(to), .. } => chat(&profile, to).await?,
        Command::Chat { profile, group: Some(group), .. } => group_chat(&profile, group).await?,
        Command::Chat { .. } => bail!("--to or --group"),
        Command::Group { profile, command } => group_command(&profile, command).await?,
        Command::Presence { profile, follow, accounts } => {
            let (client, mut events) = start(&profile)?;
            connected(&mut events).await?;
            let mut watch = Box::pin(client.watch_presence(accounts.clone()));
            let mut answered = false;
            loop {
                tokio::select! {
                    r = &mut watch, if !answered => {
                        r.map_err(|e| refused("watching presence", e))?;
                        answered = true;
                        if !follow {
                            // Every state arrived before the answer.
                            while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), events.next()).await {
                                if let Event::Presence(p) = e {
                                    println!("{}: {}", p.account, presence_text(&p));
                                }
                            }
                            break;
                        }
                    }
                    e = events.next() => match e {
                        None => bail!("client stopped"),
                        Some(Event::Presence(p)) => println!("{}: {}", p.account, presence_text(&p)),
                        Some(Event::Stopped { reason }) => bail!("{reason}"),
                        Some(_) => {}
                    },
                }
            }
            drop(watch);
            client.close().await;
        }
        Command::Privacy { profile, last_seen } => {
            let (client, mut events) = start(&profile)?;
            connected(&mut events).await?;
            let visible = matches!(last_seen, LastSeen::Everyone);
            call_while_draining(&mut events, client.set_last_seen_visible(visible))
                .await
                .map_err(|e| refused("setting privacy", e))?;
            println!("last seen visible to {}", if visible { "everyone" } else { "nobody" });
            client.close().await;
        }
        Command::PushToken { profile, platform, token, remove } => {
            let (client, mut events) = start(&profile)?;
            connected(&mut events).await?;
            let platform = match platform {
                Platform::Apns => pb::PushPlatform::Apns,
                Platform::Fcm => pb::PushPlatform::Fcm,
                Platform::Unifiedpush => pb::PushPlatform::UnifiedPush,
            };
            let token = if remove { String::new() } else { token.unwrap_or_default() };
            call_while_draining(&mut events, client.set_push_token(platform, token.into_bytes()))
                .await
                .map_err(|e| refused("registering the push token", e))?;
            println!("{}", if remove { "push token removed" } else { "push token registered" });
            client.close().await;
        }
        Command::Admin { data_dir, command } => {
            let line = match command {
                AdminCommand::Invite { ttl_secs } => format!("invite {ttl_secs}"),
                AdminCommand::Accounts => "accounts".into(),
                AdminCommand::Inbox { account, device } => format!("inbox {account} {device}"),
                AdminCommand::Group { id } => format!("group {id}"),
                AdminCommand::Storage => "storage".into(),
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

/// Waits for `call` while taking events, so a full event buffer cannot
/// hold up the answer.
async fn call_while_draining<T>(
    events: &mut Events,
    call: impl std::future::Future<Output = Result<T, pipit_client::ClientError>>,
) -> Result<T, pipit_client::ClientError> {
    tokio::pin!(call);
    loop {
        tokio::select! {
            r = &mut call => return r,
            e = events.next() => if e.is_none() { return Err(pipit_client::ClientError::Stopped) },
        }
    }
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
    println!("* chatting as {me} with {to}; type a line to send, /typing to show you are typing, Ctrl-D to quit");
    // Whether the other side is online, and typing; the library watches
    // again after every reconnect.
    let mut watch = Box::pin(client.watch_presence(vec![to]));
    let mut watching = true;
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
            r = &mut watch, if watching => {
                watching = false;
                if let Err(e) = r {
                    println!("* presence of {to} unavailable: {e}");
                }
            }
            line = stdin.next_line(), if stdin_open => match line? {
                None => stdin_open = false,
                Some(l) if l.trim().is_empty() => {}
                Some(l) if l.trim() == "/typing" => client.typing(to, true).await?,
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
                    println!("* [{id}] not sent: {}", send_failure(code, Some(to), None));
                }
                Some(Event::Presence(p)) if p.account == to => println!("* {to} {}", presence_text(&p)),
                Some(Event::Typing(t)) if t.peer == to && t.group == 0 => {
                    println!("* {to} {}", if t.typing { "typing..." } else { "stopped typing" });
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
    drop(watch);
    client.close().await;
    Ok(())
}

fn accounts(list: &[u64]) -> String {
    list.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn describe(g: &pb::GroupInfo) -> String {
    format!(
        "group {} name {:?} version {} members {} admins {}",
        g.group,
        String::from_utf8_lossy(&g.name),
        g.version,
        accounts(&g.members),
        accounts(&g.admins)
    )
}

async fn group_command(profile: &Path, command: GroupCommand) -> anyhow::Result<()> {
    let (client, mut events) = start(profile)?;
    connected(&mut events).await?;
    // Keep reading events so the client is never blocked on a full buffer.
    let drain = tokio::spawn(async move { while events.next().await.is_some() {} });
    let what = match &command {
        GroupCommand::Create { .. } => "creating the group".to_string(),
        GroupCommand::Add { group, .. } => format!("adding to group {group}"),
        GroupCommand::Remove { group, .. } => format!("removing from group {group}"),
        GroupCommand::Leave { group } => format!("leaving group {group}"),
        GroupCommand::List => "listing groups".to_string(),
    };
    let result = match command {
        GroupCommand::Create { name, members } => {
            client.create_group(&name, &members).await.map(|g| println!("{}", describe(&g)))
        }
        GroupCommand::Add { group, members } => client.add_members(group, &members).await.map(|()| println!("done")),
        GroupCommand::Remove { group, members } => {
            client.remove_members(group, &members).await.map(|()| println!("done"))
        }
        GroupCommand::Leave { group } => client.leave_group(group).await.map(|()| println!("done")),
        GroupCommand::List => client.groups().await.map(|list| {
            for g in list {
                println!("{}", describe(&g));
            }
        }),
    };
    client.close().await;
    drain.abort();
    result.map_err(|e| match e {
        pipit_client::ClientError::Refused(pb::ErrorCode::Forbidden) => {
            anyhow::anyhow!("{what}: only the group's admins may add or remove members, and only members may leave")
        }
        pipit_client::ClientError::Refused(pb::ErrorCode::NotFound) => {
            anyhow::anyhow!("{what}: no such group, or an account that does not exist")
        }
        e => refused(&what, e),
    })
}

/// A chat in a group: like [`chat`], with receipts as member counts.
async fn group_chat(profile: &Path, group: u64) -> anyhow::Result<()> {
    let (client, mut events) = start(profile)?;
    let (me, _) = connected(&mut events).await?;
    println!("* chatting as {me} in group {group}; type a line to send, Ctrl-D to quit");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    // My messages: client id -> seq once sent.
    let mut mine: BTreeMap<u64, u64> = BTreeMap::new();
    loop {
        if !stdin_open && mine.values().all(|seq| *seq != 0) {
            break;
        }
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                None => stdin_open = false,
                Some(l) if l.trim().is_empty() => {}
                Some(l) => {
                    let id = client.send_group(group, l.into_bytes()).await?;
                    mine.insert(id, 0);
                    println!("* [{id}] queued");
                }
            },
            e = events.next() => match e {
                None => bail!("client stopped"),
                Some(Event::Message(d)) if d.group == group && d.from == me => {
                    println!("me (other device): {}", text(&d));
                }
                Some(Event::Message(d)) if d.group == group => {
                    println!("{}: {}", d.from, text(&d));
                    client.mark_group_read(group, d.seq).await?;
                }
                Some(Event::Message(d)) => println!("* message from {} (not this chat): {}", d.from, text(&d)),
                Some(Event::Group(g)) if g.group == group => println!("* {} (changed by {})", describe(&g), g.by),
                Some(Event::Sent(s)) => {
                    if let Some(seq) = mine.get_mut(&s.id) {
                        *seq = s.seq;
                    }
                    println!("* [{}] sent", s.id);
                }
                Some(Event::Receipt(r)) if r.group == group => {
                    if let Some((id, _)) = mine.iter().find(|(_, seq)| **seq == r.seq && r.seq != 0) {
                        let what = if r.kind == pb::ReceiptKind::Read as i32 { "read by" } else { "delivered to" };
                        println!("* [{id}] {what} {}", r.count);
                    }
                }
                Some(Event::SendFailed { id, code }) => {
                    mine.remove(&id);
                    println!("* [{id}] failed: {code:?}");
                }
                Some(Event::Disconnected { reason }) => println!("* offline ({reason}); reconnecting"),
                Some(Event::Connected { .. }) => println!("* online"),
                Some(Event::Stopped { reason }) => bail!("{reason}"),
                Some(Event::Expired(e)) if e.group == group => {
                    println!("* message seq {} expired on {} devices", e.seq, e.devices);
                }
                Some(_) => {}
            },
        }
    }
    client.close().await;
    Ok(())
}
