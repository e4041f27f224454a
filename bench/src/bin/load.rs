//! `pipit-load`: sender/receiver pairs against a running server.
//!
//! Each pair registers two accounts (real XX handshakes, timed: that is the
//! handshakes/s figure), then the sender sends 1:1 messages to the
//! receiver, flat out (at most `--window` waiting for "sent") or at
//! `--rate` messages per second in total, while the receiver acks what it
//! gets. Durable sends per second are counted when "sent" arrives, which
//! the server sends only after its WAL sync. Latency is from the moment
//! the sender wrote the message to the moment the receiver decoded it.
//! Bounded by `--messages` per sender and by `--seconds`. Only loopback
//! targets are accepted; connections are spread over `--sources`
//! addresses 127.0.0.1, 127.0.0.2, ... so one address's ports do not run
//! out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey, StaticKeypair};
use pipit_client::{ConnectOptions, Connection};

#[derive(Parser, Debug, Clone)]
#[command(about = "Load a pipit server with 1:1 messages")]
struct Args {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Server public key (hex); XX when absent.
    #[arg(long)]
    server_key: Option<PublicKey>,
    /// Another node of the same cluster: receivers register there, so
    /// every message crosses a node link (store and forward). Default:
    /// receivers on `addr` too.
    #[arg(long)]
    peer_addr: Option<SocketAddr>,
    /// That node's public key (hex); XX when absent.
    #[arg(long)]
    peer_key: Option<PublicKey>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Target rate in messages per second over all senders; 0 = flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Payload bytes (at least 8: a timestamp rides in it).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Loopback source addresses to spread connections over.
    #[arg(long, default_value_t = 4)]
    sources: u8,
    /// Give up after this long.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write every latency sample (microseconds, one per line) here, for
    /// plotting the distribution.
    #[arg(long)]
    latencies: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "pipit-load only targets loopback addresses");
    anyhow::ensure!(args.payload >= 8, "--payload must be at least 8");
    anyhow::ensure!(args.sources >= 1, "--sources must be at least 1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
}

fn source(i: usize, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(n)) as u8))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut pairs = Vec::new();
    let setup = Instant::now();
    for i in 0..args.pairs {
        let mut conns = Vec::new();
        for j in 0..2 {
            // The receiver (j = 1) on the peer node when there is one.
            let (addr, server_key) = match (j, args.peer_addr) {
                (1, Some(peer)) => (peer, args.peer_key),
                _ => (args.addr, args.server_key),
            };
            let opts = ConnectOptions {
                server_key,
                local_ip: Some(source(2 * i + j, args.sources)),
                ..ConnectOptions::default()
            };
            let c = Connection::connect(addr, &StaticKeypair::generate(), pipit_client::register("", "load"), &opts)
                .await
                .context("registering a device")?;
            conns.push(c);
        }
        let b = conns.pop().expect("two");
        let a = conns.pop().expect("two");
        pairs.push((a, b));
    }
    let handshakes_per_sec = (2 * args.pairs) as f64 / setup.elapsed().as_secs_f64();

    let totals = Arc::new(Totals::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let per_sender_rate = if args.rate == 0 { 0.0 } else { args.rate as f64 / args.pairs as f64 };
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (a, b) in pairs {
        let to = b.login().account;
        let cfg = SenderCfg { to, n: args.messages, window: args.window, payload: args.payload, rate: per_sender_rate };
        senders.push(tokio::spawn(sender(a, cfg, start, deadline, totals.clone())));
        receivers.push(tokio::spawn(receiver(b, args.messages, start, deadline, totals.clone())));
    }
    let progress = {
        let totals = totals.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = totals.sent.load(Ordering::Relaxed);
                eprintln!(
                    "{:>6.1}s  sent {s} (+{}/s)  delivered {}  errors {}",
                    start.elapsed().as_secs_f64(),
                    s - last,
                    totals.delivered.load(Ordering::Relaxed),
                    totals.errors.load(Ordering::Relaxed)
                );
                last = s;
            }
        })
    };
    for t in senders {
        t.await??;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut samples = Vec::new();
    for t in receivers {
        let (h, s) = t.await??;
        hist.add(h)?;
        samples.extend(s);
    }
    progress.abort();
    let sent = totals.sent.load(Ordering::Relaxed);
    let report = format!(
        concat!(
            "{{\"pairs\":{},\"payload_bytes\":{},\"target_rate\":{},\"seconds\":{:.2},\"durable_sent\":{},",
            "\"sent_per_sec\":{:.0},\"delivered\":{},\"errors\":{},\"handshakes_per_sec\":{:.0},",
            "\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}"
        ),
        args.pairs,
        args.payload,
        args.rate,
        send_secs,
        sent,
        sent as f64 / send_secs,
        totals.delivered.load(Ordering::Relaxed),
        totals.errors.load(Ordering::Relaxed),
        handshakes_per_sec,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
    );
    println!("{report}");
    if let Some(path) = args.json {
        std::fs::write(path, format!("{report}\n"))?;
    }
    if let Some(path) = args.latencies {
        let text: String = samples.iter().map(|s| format!("{s}\n")).collect();
        std::fs::write(path, text)?;
    }
    Ok(())
}

struct SenderCfg {
    to: u64,
    n: u64,
    window: usize,
    payload: usize,
    /// Messages per second; 0 = as fast as the window allows.
    rate: f64,
}

async fn sender(
    mut c: Connection,
    cfg: SenderCfg,
    start: Instant,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<()> {
    let mut next = 1u64;
    let mut in_flight = 0usize;
    let mut done = 0u64;
    let began = Instant::now();
    while done < cfg.n && Instant::now() < deadline {
        // How many the schedule allows by now.
        let allowed = if cfg.rate > 0.0 { (began.elapsed().as_secs_f64() * cfg.rate) as u64 + 1 } else { u64::MAX };
        let mut batch = Vec::new();
        while in_flight < cfg.window && next <= cfg.n && next <= allowed {
            let mut p = BytesMut::with_capacity(cfg.payload);
            p.put_u64(start.elapsed().as_micros() as u64);
            p.resize(cfg.payload, 0x5A);
            batch.push(Message::from(pb::Send { id: next, to: cfg.to, payload: Bytes::from(p), ..Default::default() }));
            next += 1;
            in_flight += 1;
        }
        if !batch.is_empty() {
            c.send(&batch).await?;
        }
        let wait = if cfg.rate > 0.0 && in_flight == 0 { Duration::from_millis(1) } else { Duration::from_secs(5) };
        match tokio::time::timeout(wait, c.recv()).await {
            Err(_) => continue,
            Ok(Ok(Message::Sent(_))) => {
                in_flight -= 1;
                done += 1;
                totals.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(Message::Error(_))) => {
                in_flight -= 1;
                done += 1;
                totals.errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(Message::Receipt(r))) => c.send(&[pb::Ack { through: r.inbox, ids: vec![] }.into()]).await?,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn receiver(
    mut c: Connection,
    n: u64,
    start: Instant,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<(Histogram<u64>, Vec<u64>)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut samples = Vec::with_capacity(n as usize);
    let mut got = 0;
    while got < n {
        let m = match tokio::time::timeout_at(deadline.into(), c.recv()).await {
            Err(_) => break,
            Ok(m) => m?,
        };
        if let Message::Deliver(d) = m {
            let sent_at = u64::from_be_bytes(d.payload[..8].try_into()?);
            let latency = (start.elapsed().as_micros() as u64).saturating_sub(sent_at).max(1);
            hist.record(latency)?;
            samples.push(latency);
            got += 1;
            totals.delivered.fetch_add(1, Ordering::Relaxed);
            // One cumulative ack once everything already here is handled,
            // as the client library does.
            if !c.has_buffered() {
                c.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into()]).await?;
            }
        }
    }
    Ok((hist, samples))
}
