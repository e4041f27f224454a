//! `pipit-mqtt-load`: the same load shape as `pipit-load`, spoken in MQTT
//! (through `rumqttc`), for a side-by-side figure against an MQTT broker
//! such as Mosquitto (`bench/mosquitto.sh`).
//!
//! N sender/receiver pairs: receiver `i` subscribes to topic `pipit/i` at
//! QoS 1, then sender `i` publishes `--messages` QoS 1 messages to it with
//! at most `--window` unacknowledged (`rumqttc`'s in-flight limit), as
//! `pipit-load` keeps at most `--window` waiting for "sent". A message
//! counts when its PUBACK arrives: the broker's "sent". Latency is from the
//! publish to the receiver decoding it (a timestamp rides in the payload).
//! Bounded by `--messages` per sender and by `--seconds`. Only loopback
//! targets are accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{BufMut, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

#[derive(Parser, Debug, Clone)]
#[command(about = "Load an MQTT broker with QoS 1 publishes between sender/receiver pairs")]
struct Args {
    /// Broker address (loopback only).
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Publishes in flight (unacknowledged) per sender.
    #[arg(long, default_value_t = 10)]
    window: u16,
    /// Payload bytes (at least 8: a timestamp rides in it).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Give up after this long.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Totals {
    acked: AtomicU64,
    delivered: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "pipit-mqtt-load only targets loopback addresses");
    anyhow::ensure!(args.payload >= 8, "--payload must be at least 8");
    anyhow::ensure!(args.window >= 1, "--window must be at least 1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn options(id: String, args: &Args) -> MqttOptions {
    let mut o = MqttOptions::new(id, args.addr.ip().to_string(), args.addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_inflight(args.window);
    o
}

/// Polls until the broker has accepted the connection.
async fn connected(ev: &mut EventLoop) -> anyhow::Result<()> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = ev.poll().await.context("connecting to the broker")? {
            return Ok(());
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let totals = Arc::new(Totals::default());
    let start = Instant::now();
    // Receivers first, each subscribed before any sender starts.
    let mut receivers = Vec::new();
    for i in 0..args.pairs {
        let (client, mut ev) = AsyncClient::new(options(format!("r{i}"), &args), 16);
        connected(&mut ev).await?;
        client.subscribe(format!("pipit/{i}"), QoS::AtLeastOnce).await?;
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = ev.poll().await.context("subscribing")? {
                break;
            }
        }
        receivers.push(tokio::spawn(receiver(client, ev, args.messages, start, deadline, totals.clone())));
    }
    let mut senders = Vec::new();
    for i in 0..args.pairs {
        let (client, mut ev) = AsyncClient::new(options(format!("s{i}"), &args), usize::from(args.window));
        connected(&mut ev).await?;
        senders.push((i, client, ev));
    }
    let began = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|(i, client, ev)| tokio::spawn(sender(i, client, ev, args.clone(), start, deadline, totals.clone())))
        .collect();
    let progress = {
        let totals = totals.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let a = totals.acked.load(Ordering::Relaxed);
                eprintln!(
                    "{:>6.1}s  acked {a} (+{}/s)  delivered {}",
                    began.elapsed().as_secs_f64(),
                    a - last,
                    totals.delivered.load(Ordering::Relaxed)
                );
                last = a;
            }
        })
    };
    for t in tasks {
        t.await??;
    }
    let send_secs = began.elapsed().as_secs_f64();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in receivers {
        hist.add(t.await??)?;
    }
    progress.abort();
    let acked = totals.acked.load(Ordering::Relaxed);
    let report = format!(
        concat!(
            "{{\"pairs\":{},\"window\":{},\"payload_bytes\":{},\"seconds\":{:.2},\"acked\":{},",
            "\"acked_per_sec\":{:.0},\"delivered\":{},",
            "\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}}}}"
        ),
        args.pairs,
        args.window,
        args.payload,
        send_secs,
        acked,
        acked as f64 / send_secs,
        totals.delivered.load(Ordering::Relaxed),
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
    Ok(())
}

async fn sender(
    i: usize,
    client: AsyncClient,
    mut ev: EventLoop,
    args: Args,
    start: Instant,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<()> {
    let topic = format!("pipit/{i}");
    // Publishes queue in the client's channel (as deep as the window);
    // the event loop sends them while fewer than `window` await a PUBACK.
    let publisher = {
        let client = client.clone();
        let (n, size) = (args.messages, args.payload);
        tokio::spawn(async move {
            for _ in 0..n {
                let mut p = BytesMut::with_capacity(size);
                p.put_u64(start.elapsed().as_micros() as u64);
                p.resize(size, 0x5A);
                if client.publish_bytes(topic.clone(), QoS::AtLeastOnce, false, p.freeze()).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut acked = 0;
    while acked < args.messages {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ev.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked += 1;
                totals.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("sender connection"),
        }
    }
    publisher.abort();
    let _ = client.try_disconnect();
    Ok(())
}

async fn receiver(
    client: AsyncClient,
    mut ev: EventLoop,
    n: u64,
    start: Instant,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ev.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                // rumqttc answers the PUBACK itself.
                let sent_at = u64::from_be_bytes(p.payload[..8].try_into()?);
                hist.record((start.elapsed().as_micros() as u64).saturating_sub(sent_at).max(1))?;
                got += 1;
                totals.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("receiver connection"),
        }
    }
    let _ = client.try_disconnect();
    Ok(hist)
}
