//! `pipit-load`: sender/receiver pairs against a running server.
//!
//! Each pair registers two accounts (real XX handshakes), then the sender
//! pipelines 1:1 messages to the receiver, at most `--window` waiting for
//! "sent" at a time, while the receiver acks what it gets. Reports durable
//! sends per second (counted when "sent" arrives, which the server sends
//! only after its WAL sync) and end-to-end delivery latency. Bounded by
//! `--messages` per sender and by `--seconds`.

use std::net::SocketAddr;
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

#[derive(Parser, Debug)]
#[command(about = "Load a pipit server with 1:1 messages")]
struct Args {
    /// Server address (loopback or a namespace of your own only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Server public key (hex); XX when absent.
    #[arg(long)]
    server_key: Option<PublicKey>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Payload bytes (at least 8: a timestamp rides in it).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Give up after this long.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "pipit-load only targets loopback addresses");
    anyhow::ensure!(args.payload >= 8, "--payload must be at least 8");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

struct Totals {
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let opts = ConnectOptions { server_key: args.server_key, ..ConnectOptions::default() };
    let mut pairs = Vec::new();
    for _ in 0..args.pairs {
        let a = Connection::connect(args.addr, &StaticKeypair::generate(), pipit_client::register("", "load"), &opts)
            .await
            .context("register sender")?;
        let b = Connection::connect(args.addr, &StaticKeypair::generate(), pipit_client::register("", "load"), &opts)
            .await
            .context("register receiver")?;
        pairs.push((a, b));
    }
    let totals = Arc::new(Totals { sent: AtomicU64::new(0), delivered: AtomicU64::new(0), errors: AtomicU64::new(0) });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for (a, b) in pairs {
        let to = b.login().account;
        tasks.push(tokio::spawn(sender(
            a,
            to,
            args.messages,
            args.window,
            args.payload,
            start,
            deadline,
            totals.clone(),
        )));
        tasks.push(tokio::spawn(receiver(b, args.messages, start, deadline, totals.clone())));
    }
    let progress = {
        let totals = totals.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let s = totals.sent.load(Ordering::Relaxed);
                eprintln!(
                    "{:>6.1}s sent {s} (+{}/s) delivered {}",
                    start.elapsed().as_secs_f64(),
                    s - last,
                    totals.delivered.load(Ordering::Relaxed)
                );
                last = s;
            }
        })
    };
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        if let Some(h) = t.await?? {
            hist.add(h)?;
        }
    }
    progress.abort();
    let secs = start.elapsed().as_secs_f64();
    let sent = totals.sent.load(Ordering::Relaxed);
    let delivered = totals.delivered.load(Ordering::Relaxed);
    println!(
        "{{\"pairs\":{},\"payload\":{},\"seconds\":{secs:.2},\"durable_sent\":{sent},\"sent_per_sec\":{:.0},\"delivered\":{delivered},\"errors\":{},\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}",
        args.pairs,
        args.payload,
        sent as f64 / secs,
        totals.errors.load(Ordering::Relaxed),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    mut c: Connection,
    to: u64,
    n: u64,
    window: usize,
    payload: usize,
    start: Instant,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<Option<Histogram<u64>>> {
    let mut next = 1u64;
    let mut in_flight = 0usize;
    let mut done = 0u64;
    while done < n && Instant::now() < deadline {
        let mut batch = Vec::new();
        while in_flight < window && next <= n {
            let mut p = BytesMut::with_capacity(payload);
            p.put_u64(start.elapsed().as_micros() as u64);
            p.resize(payload, 0x5A);
            batch.push(Message::from(pb::Send { id: next, to, payload: Bytes::from(p), ..Default::default() }));
            next += 1;
            in_flight += 1;
        }
        if !batch.is_empty() {
            c.send(&batch).await?;
        }
        match tokio::time::timeout_at(deadline.into(), c.recv()).await {
            Err(_) => break,
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
    Ok(None)
}

async fn receiver(
    mut c: Connection,
    n: u64,
    start: Instant,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<Option<Histogram<u64>>> {
    let mut hist = Histogram::<u64>::new(3)?;
    let mut got = 0;
    while got < n {
        let m = match tokio::time::timeout_at(deadline.into(), c.recv()).await {
            Err(_) => break,
            Ok(m) => m?,
        };
        if let Message::Deliver(d) = m {
            let sent_at = u64::from_be_bytes(d.payload[..8].try_into()?);
            let _ = hist.record(start.elapsed().as_micros() as u64 - sent_at.min(start.elapsed().as_micros() as u64));
            got += 1;
            totals.delivered.fetch_add(1, Ordering::Relaxed);
            // Ack every delivery at once; the client coalesces nothing here,
            // which is the pessimistic case for the server.
            c.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into()]).await?;
        }
    }
    Ok(Some(hist))
}
