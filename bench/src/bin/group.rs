//! `pipit-group`: one large group against a running server, over real TCP
//! with real handshakes. Registers `--members` accounts, keeps `--online`
//! of them connected (the rest offline), creates one group of all, then:
//!
//! 1. receipts: one message, read by the online members and received by
//!    everyone (the offline members log in for it); the bytes the
//!    sender's socket receives meanwhile (kernel counters), against what
//!    per-member receipts would have cost;
//! 2. latency: `--sends` group messages one at a time: time to "sent" and
//!    until the last online member device has it; the same for 1:1;
//! 3. storage: `--storage-sends` group messages to the (now offline)
//!    group, and as many 1:1 messages to an offline account, counted
//!    through the admin socket's `storage` command (`--data-dir`).
//!
//! Loopback only; bounded by `--seconds`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use pipit_bench::TcpCounters;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey, StaticKeypair};
use pipit_client::{ConnectOptions, Connection};
use tokio::sync::Notify;

#[derive(Parser, Debug, Clone)]
#[command(about = "Measure a large pipit group: latency, receipts, storage")]
struct Args {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Server public key (hex).
    #[arg(long)]
    server_key: PublicKey,
    /// The server's data directory, for its admin socket.
    #[arg(long)]
    data_dir: PathBuf,
    /// Group members (accounts), the sender included.
    #[arg(long, default_value_t = 1_024)]
    members: usize,
    /// Members connected throughout (besides the sender).
    #[arg(long, default_value_t = 100)]
    online: usize,
    /// Group (and 1:1) messages timed one by one.
    #[arg(long, default_value_t = 20)]
    sends: usize,
    /// Messages sent for the storage count.
    #[arg(long, default_value_t = 100)]
    storage_sends: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Pause before each timed send, so that the acks and receipts the
    /// previous one caused are not queued in front of it (0: none).
    #[arg(long, default_value_t = 0)]
    gap_ms: u64,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Give up after this long.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "pipit-group only targets loopback addresses");
    anyhow::ensure!(args.online + 2 <= args.members, "--online must leave offline members");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let seconds = args.seconds;
    rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(seconds), run(args)).await.context("--seconds elapsed")?
    })
}

fn source(i: usize, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(n)) as u8))
}

#[derive(Clone)]
struct Device {
    key: StaticKeypair,
    account: u64,
}

/// What the online readers saw: for each (group, seq) how many devices
/// have it and when the last one decoded it.
#[derive(Default)]
struct Arrivals {
    seen: Mutex<HashMap<(u64, u64), (usize, Instant)>>,
    changed: Notify,
    /// Send a READ receipt for each group message.
    read: AtomicBool,
}

impl Arrivals {
    fn record(&self, group: u64, seq: u64) {
        let mut seen = self.seen.lock().expect("not poisoned");
        let e = seen.entry((group, seq)).or_insert((0, Instant::now()));
        e.0 += 1;
        e.1 = Instant::now();
        drop(seen);
        self.changed.notify_waiters();
    }

    /// Waits until `n` devices have `(group, seq)`; returns when the last
    /// one did.
    async fn wait(&self, group: u64, seq: u64, n: usize) -> Instant {
        loop {
            let notified = self.changed.notified();
            if let Some((count, at)) = self.seen.lock().expect("not poisoned").get(&(group, seq)) {
                if *count >= n {
                    return *at;
                }
            }
            notified.await;
        }
    }
}

async fn reader(mut c: Connection, arrivals: Arc<Arrivals>) {
    while let Ok(m) = c.recv().await {
        let (inbox, group, seq, message) = match &m {
            Message::Deliver(d) => (d.inbox, d.group, d.seq, true),
            Message::GroupInfo(g) if g.inbox != 0 => (g.inbox, g.group, g.seq, false),
            Message::Receipt(r) if r.inbox != 0 => (r.inbox, 0, 0, false),
            _ => continue,
        };
        if message {
            // 1:1 messages are recorded as group 0.
            arrivals.record(group, seq);
        }
        let mut out: Vec<Message> = vec![pb::Ack { through: inbox, ids: vec![] }.into()];
        if message && group != 0 && arrivals.read.load(Ordering::Relaxed) {
            out.push(
                pb::Receipt { kind: pb::ReceiptKind::Read as i32, group, through: seq, ..Default::default() }.into(),
            );
        }
        if c.send(&out).await.is_err() {
            return;
        }
    }
}

/// Reads the sender's connection until `Sent` for `id`, acking inbox
/// entries and passing receipts to `on_receipt`.
async fn until_sent(
    c: &mut Connection,
    id: u64,
    on_receipt: &mut impl FnMut(&pb::Receipt),
) -> anyhow::Result<pb::Sent> {
    loop {
        match c.recv().await? {
            Message::Sent(s) if s.id == id => return Ok(s),
            Message::Error(e) if e.id == id => bail!("send {id} refused: {e:?}"),
            Message::Receipt(r) => {
                on_receipt(&r);
                c.send(&[pb::Ack { through: r.inbox, ids: vec![] }.into()]).await?;
            }
            Message::Deliver(d) => c.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into()]).await?,
            Message::GroupInfo(g) if g.inbox != 0 => {
                c.send(&[pb::Ack { through: g.inbox, ids: vec![] }.into()]).await?
            }
            _ => {}
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `table -> (keys, bytes of keys and values)` from the admin socket.
fn storage(data_dir: &std::path::Path) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let out = pipit_client::admin::request(data_dir, "storage")?;
    let mut t = HashMap::new();
    for line in out.lines().skip(1) {
        let w: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(w.len() == 5 && !w[1].ends_with('+'), "unexpected storage line {line:?}");
        t.insert(w[0].to_string(), (w[1].parse()?, w[2].parse::<u64>()? + w[3].parse::<u64>()?));
    }
    Ok(t)
}

fn growth(before: &HashMap<String, (u64, u64)>, after: &HashMap<String, (u64, u64)>, table: &str) -> (i64, i64) {
    let (k0, b0) = before.get(table).copied().unwrap_or_default();
    let (k1, b1) = after.get(table).copied().unwrap_or_default();
    (k1 as i64 - k0 as i64, b1 as i64 - b0 as i64)
}

async fn wait_fanned_out(data_dir: &std::path::Path, group: u64) -> anyhow::Result<()> {
    loop {
        let out = pipit_client::admin::request(data_dir, &format!("group {group}"))?;
        if out.contains("fanout 0 jobs") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let opts = |i: usize| ConnectOptions {
        server_key: Some(args.server_key),
        local_ip: Some(source(i, args.sources)),
        ..ConnectOptions::default()
    };
    // Register everyone, 64 handshakes at a time.
    let t = Instant::now();
    let mut all: Vec<(Device, Connection)> = Vec::with_capacity(args.members);
    {
        use futures_util::stream::{self, StreamExt};
        let mut s = stream::iter(0..args.members)
            .map(|i| {
                let opts = opts(i);
                async move {
                    let key = StaticKeypair::generate();
                    let c = Connection::connect(args.addr, &key, pipit_client::register("", "group"), &opts).await?;
                    Ok::<_, anyhow::Error>((Device { key, account: c.login().account }, c))
                }
            })
            .buffer_unordered(64);
        while let Some(r) = s.next().await {
            all.push(r?);
        }
    }
    all.sort_by_key(|(d, _)| d.account);
    eprintln!("registered {} accounts in {:.1} s", args.members, t.elapsed().as_secs_f64());
    let devices: Vec<Device> = all.iter().map(|(d, _)| d.clone()).collect();
    // The sender is the first account; the online members are spread over
    // the rest, so that the fan-out (which walks members in account order)
    // reaches the last of them near its end, as it would in a real group.
    let online: std::collections::HashSet<usize> =
        (1..=args.online).map(|k| k * (args.members - 1) / args.online).collect();
    anyhow::ensure!(online.len() == args.online, "--online too close to --members");
    let mut conns = Vec::with_capacity(args.online);
    let mut sender = None;
    for (i, (_, c)) in all.into_iter().enumerate() {
        if i == 0 {
            sender = Some(c);
        } else if online.contains(&i) {
            conns.push(c);
        }
    }
    let mut sender = sender.context("no sender")?;
    let offline: Vec<Device> =
        devices.iter().enumerate().filter(|(i, _)| *i > 0 && !online.contains(i)).map(|(_, d)| d.clone()).collect();
    let online: Vec<Device> =
        devices.iter().enumerate().filter(|(i, _)| online.contains(i)).map(|(_, d)| d.clone()).collect();
    let arrivals = Arc::new(Arrivals::default());
    let readers: Vec<_> = conns.into_iter().map(|c| tokio::spawn(reader(c, arrivals.clone()))).collect();
    let payload = Bytes::from(vec![0x42u8; args.payload]);
    let mut next_id = 0u64;
    let mut id = || {
        next_id += 1;
        next_id
    };

    let members: Vec<u64> = devices[1..].iter().map(|d| d.account).collect();
    let create = pb::GroupCreate { req: 1, name: Bytes::from_static(b"bench"), members, id: 0 };
    sender.send(&[create.into()]).await?;
    let group = loop {
        match sender.recv().await? {
            Message::GroupInfo(g) if g.req == 1 => break g.group,
            Message::Error(e) if e.req == 1 => bail!("create refused: {e:?}"),
            _ => {}
        }
    };
    wait_fanned_out(&args.data_dir, group).await?;
    eprintln!("group {group} of {} members created", args.members);

    // 1. Receipts for one message, everyone receiving, the online reading.
    arrivals.read.store(true, Ordering::Relaxed);
    let probe = id();
    sender.send(&[pb::Send { id: probe, group, payload: payload.clone(), ..Default::default() }.into()]).await?;
    let mut ignore = |_: &pb::Receipt| {};
    let probe_seq = until_sent(&mut sender, probe, &mut ignore).await?.seq;
    eprintln!("probe sent; logging in the offline members");
    let local = sender.local_addr()?;
    let before = TcpCounters::of(local)?;
    let t = Instant::now();
    {
        use futures_util::stream::{self, StreamExt};
        let mut s = stream::iter(offline.iter().cloned().enumerate())
            .map(|(i, d)| {
                let opts = opts(i);
                async move {
                    let mut c =
                        Connection::connect(args.addr, &d.key, pipit_client::login(d.account, 0, 0), &opts).await?;
                    // The notice, then the probe (which the fan-out may not
                    // have written yet: it arrives as soon as it has).
                    let last = loop {
                        match c.recv().await? {
                            Message::Deliver(m) if m.group == group && m.seq == probe_seq => break m.inbox,
                            _ => {}
                        }
                    };
                    c.send(&[pb::Ack { through: last, ids: vec![] }.into(), pb::Ping { id: 1 }.into()]).await?;
                    while !matches!(c.recv().await?, Message::Pong(_)) {}
                    Ok::<_, anyhow::Error>(())
                }
            })
            .buffer_unordered(64);
        while let Some(r) = s.next().await {
            r?;
        }
    }
    eprintln!("offline members have it; waiting for the counts");
    let (mut delivered, mut read, mut receipts, mut receipt_bytes) = (0, 0, 0usize, 0usize);
    while delivered < args.members as u32 - 1 || read < args.online as u32 {
        if let Message::Receipt(r) = sender.recv().await? {
            sender.send(&[pb::Ack { through: r.inbox, ids: vec![] }.into()]).await?;
            if std::env::var_os("PIPIT_GROUP_DEBUG").is_some() {
                eprintln!("receipt {r:?}");
            }
            if r.group == group && r.seq == probe_seq {
                receipts += 1;
                receipt_bytes += Message::from(r).encoded_len();
                if r.kind == pb::ReceiptKind::Delivered as i32 {
                    delivered = r.count;
                } else {
                    read = r.count;
                }
            }
        }
    }
    let got = TcpCounters::of(local)?.since(&before);
    arrivals.read.store(false, Ordering::Relaxed);
    // What per-member receipts (the 1:1 form, `by` naming the member)
    // would have cost: one frame each, as acks arrive one by one.
    let member_receipt = |kind: pb::ReceiptKind, by: u64, inbox: u64| {
        let r = pb::Receipt {
            kind: kind as i32,
            group,
            through: probe_seq,
            by,
            time: 1_800_000_000,
            inbox,
            ..Default::default()
        };
        2 + 16 + Message::from(r).encoded_len()
    };
    let mut per_member_bytes = 0;
    let mut inbox = 100;
    for d in &devices[1..] {
        inbox += 1;
        per_member_bytes += member_receipt(pb::ReceiptKind::Delivered, d.account, inbox);
    }
    for d in &online {
        inbox += 1;
        per_member_bytes += member_receipt(pb::ReceiptKind::Read, d.account, inbox);
    }
    eprintln!(
        "receipts for one message: {receipts} ({receipt_bytes} B of messages; socket: {} B payload, {} segments in {:.1} s) \
         instead of {} ({per_member_bytes} B)",
        got.bytes_received,
        got.segs_in,
        t.elapsed().as_secs_f64(),
        args.members - 1 + args.online
    );

    // 2. Latency, one message at a time.
    let (mut g_sent, mut g_all) = (Vec::new(), Vec::new());
    for _ in 0..args.sends {
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        let i = id();
        let t0 = Instant::now();
        sender.send(&[pb::Send { id: i, group, payload: payload.clone(), ..Default::default() }.into()]).await?;
        let s = until_sent(&mut sender, i, &mut ignore).await?;
        g_sent.push(t0.elapsed());
        let last = arrivals.wait(group, s.seq, args.online).await;
        g_all.push(last.duration_since(t0));
    }
    let peer = online.last().context("no online member")?.account;
    let (mut p_sent, mut p_all) = (Vec::new(), Vec::new());
    for _ in 0..args.sends {
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        let i = id();
        let t0 = Instant::now();
        sender.send(&[pb::Send { id: i, to: peer, payload: payload.clone(), ..Default::default() }.into()]).await?;
        let s = until_sent(&mut sender, i, &mut ignore).await?;
        p_sent.push(t0.elapsed());
        let last = arrivals.wait(0, s.seq, 1).await;
        p_all.push(last.duration_since(t0));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (gs, ga, ps, pa) = (median(g_sent), median(g_all), median(p_sent), median(p_all));
    eprintln!(
        "median of {}: group of {}: sent {:.2} ms, last of {} online devices {:.2} ms; 1:1: sent {:.2} ms, delivered {:.2} ms",
        args.sends,
        args.members,
        ms(gs),
        args.online,
        ms(ga),
        ms(ps),
        ms(pa)
    );

    // 3. Storage, everyone offline but the sender.
    for r in readers {
        r.abort();
    }
    // Let the last receipt counts reach the sender (flushed every second
    // by default) and ack them, so they do not land in the count below.
    loop {
        match tokio::time::timeout(Duration::from_millis(1_500), sender.recv()).await {
            Err(_) => break,
            Ok(m) => {
                if let Message::Receipt(r) = m? {
                    sender.send(&[pb::Ack { through: r.inbox, ids: vec![] }.into()]).await?;
                }
            }
        }
    }
    let n = args.storage_sends;
    let s0 = storage(&args.data_dir)?;
    let ids: Vec<u64> = (0..n).map(|_| id()).collect();
    for chunk in ids.chunks(50) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|&i| pb::Send { id: i, group, payload: payload.clone(), ..Default::default() }.into())
            .collect();
        sender.send(&msgs).await?;
        for &i in chunk {
            until_sent(&mut sender, i, &mut ignore).await?;
        }
    }
    wait_fanned_out(&args.data_dir, group).await?;
    let s1 = storage(&args.data_dir)?;
    let lone = offline[0].account;
    let ids: Vec<u64> = (0..n).map(|_| id()).collect();
    for chunk in ids.chunks(50) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|&i| pb::Send { id: i, to: lone, payload: payload.clone(), ..Default::default() }.into())
            .collect();
        sender.send(&msgs).await?;
        for &i in chunk {
            until_sent(&mut sender, i, &mut ignore).await?;
        }
    }
    let s2 = storage(&args.data_dir)?;
    let recipients = (args.members - 1) as f64;
    let tables = ["inbox", "group_bodies", "group_receipts", "dedup", "counters", "fanout"];
    let mut group_total = 0i64;
    let mut lines = Vec::new();
    for t in tables {
        let (k, b) = growth(&s0, &s1, t);
        group_total += b;
        lines.push(format!("\"{t}\":{{\"keys\":{k},\"bytes\":{b}}}"));
    }
    let (ik, ib) = growth(&s0, &s1, "inbox");
    let one_total: i64 = tables.iter().map(|t| growth(&s1, &s2, t).1).sum();
    let (ok, ob) = growth(&s1, &s2, "inbox");
    let per_member = group_total as f64 / (n as f64 * recipients);
    let one_per_message = one_total as f64 / n as f64;
    eprintln!(
        "storage, {n} messages of {} B: group: {ik} inbox entries ({:.1} B each), {:.1} B per message per member \
         in all tables; 1:1: {ok} inbox entries ({:.1} B each), {one_per_message:.1} B per message in all tables",
        args.payload,
        ib as f64 / ik.max(1) as f64,
        per_member,
        ob as f64 / ok.max(1) as f64,
    );
    let report = format!(
        concat!(
            "{{\"members\":{},\"online\":{},\"payload_bytes\":{},",
            "\"group_ms\":{{\"sent_median\":{:.3},\"last_online_median\":{:.3}}},",
            "\"one_to_one_ms\":{{\"sent_median\":{:.3},\"delivered_median\":{:.3}}},",
            "\"receipts_one_message\":{{\"coalesced\":{},\"message_bytes\":{},\"socket_payload_bytes\":{},\"segments\":{},",
            "\"per_member_receipts\":{},\"per_member_bytes\":{}}},",
            "\"storage\":{{\"messages\":{},\"group_growth\":{{{}}},\"group_bytes_per_message_per_member\":{:.1},",
            "\"one_to_one_inbox_entry_bytes\":{:.1},\"one_to_one_bytes_per_message\":{:.1}}}}}"
        ),
        args.members,
        args.online,
        args.payload,
        ms(gs),
        ms(ga),
        ms(ps),
        ms(pa),
        receipts,
        receipt_bytes,
        got.bytes_received,
        got.segs_in,
        args.members - 1 + args.online,
        per_member_bytes,
        n,
        lines.join(","),
        per_member,
        ob as f64 / ok.max(1) as f64,
        one_per_message,
    );
    println!("{report}");
    if let Some(path) = args.json {
        std::fs::write(path, format!("{report}\n"))?;
    }
    Ok(())
}
