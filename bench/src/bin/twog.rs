//! `pipit-2g`: what a phone on 2G pays, against a running server.
//!
//! 1. Reconnect to the first queued message through the link emulator
//!    (default 200 kbit/s each way, 500 ms RTT), for IK and for XX; median
//!    of `--runs`. A userspace proxy cannot delay TCP's own SYN/SYN-ACK
//!    (the client's `connect` completes against the local proxy), so one
//!    RTT is added for it; the raw figure is reported too.
//! 2. Bytes on the wire for one 100-byte message cycle (send, sent,
//!    deliver, ack) and with the delivered receipt and its ack, from the
//!    kernel's own per-socket counters: payload plus 52 bytes per segment,
//!    pure ACKs included.
//! 3. Idle keepalive cost per hour at the negotiated interval.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use pipit_bench::TcpCounters;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey, StaticKeypair};
use pipit_client::{ConnectOptions, Connection};
use pipit_tools::linkem::{Link, Proxy};

#[derive(Parser)]
#[command(about = "Round trips and bytes over an emulated 2G link")]
struct Args {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Server public key (from `pipit key`).
    #[arg(long)]
    server_key: PublicKey,
    /// Round-trip time, milliseconds.
    #[arg(long, default_value_t = 500)]
    rtt_ms: u64,
    /// Bandwidth each way, kbit/s.
    #[arg(long, default_value_t = 200)]
    kbps: u64,
    /// Reconnect runs per pattern.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "loopback targets only");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

struct Device {
    key: StaticKeypair,
    account: u64,
}

async fn register(addr: SocketAddr, server_key: PublicKey) -> anyhow::Result<(Device, Connection)> {
    let key = StaticKeypair::generate();
    let opts = ConnectOptions { server_key: Some(server_key), ..ConnectOptions::default() };
    let c = Connection::connect(addr, &key, pipit_client::register("", "2g"), &opts).await?;
    Ok((Device { key, account: c.login().account }, c))
}

async fn until<T>(c: &mut Connection, mut pick: impl FnMut(&Message) -> Option<T>) -> anyhow::Result<T> {
    loop {
        let m = c.recv_timeout(Duration::from_secs(30)).await?;
        if let Some(t) = pick(&m) {
            return Ok(t);
        }
    }
}

/// Waits for the inbox entry `pick` recognises, acks it, and lets the
/// ACKs settle.
async fn ack_next(c: &mut Connection, pick: impl FnMut(&Message) -> Option<u64>) -> anyhow::Result<()> {
    let inbox = until(c, pick).await?;
    c.send(&[pb::Ack { through: inbox, ids: vec![] }.into()]).await?;
    settle().await;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Lets delayed ACKs go out before reading counters.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn run(args: Args) -> anyhow::Result<()> {
    let rtt = Duration::from_millis(args.rtt_ms);
    let link = Link::mobile(rtt, args.kbps);
    let proxy = Proxy::start("127.0.0.1:0".parse()?, args.addr, link, link).await?;

    // 1. Reconnect to the first queued message.
    let (_sender, mut cs) = register(args.addr, args.server_key).await?;
    let (phone, c) = register(args.addr, args.server_key).await?;
    drop(c);
    let mut results = Vec::new();
    let mut next_id = 1;
    for (name, pinned) in [("ik", Some(args.server_key)), ("xx", None)] {
        let mut times = Vec::new();
        for _ in 0..args.runs {
            cs.send(&[pb::Send {
                id: next_id,
                to: phone.account,
                payload: Bytes::from(vec![0x42; 100]),
                ..Default::default()
            }
            .into()])
                .await?;
            until(&mut cs, |m| matches!(m, Message::Sent(s) if s.id == next_id).then_some(())).await?;
            next_id += 1;
            let opts = ConnectOptions { server_key: pinned, ..ConnectOptions::default() };
            let t = Instant::now();
            let mut c =
                Connection::connect(proxy.addr(), &phone.key, pipit_client::login(phone.account, 0, 0), &opts).await?;
            let inbox = until(&mut c, |m| match m {
                Message::Deliver(d) => Some(d.inbox),
                _ => None,
            })
            .await?;
            times.push(t.elapsed().as_secs_f64());
            c.send(&[pb::Ack { through: inbox, ids: vec![] }.into()]).await?;
            settle().await;
        }
        let raw = median(times);
        results.push((name, raw, raw + rtt.as_secs_f64()));
    }
    // Receipts for the phone's acks went to the sender; clear them.
    while let Ok(m) = cs.recv_timeout(Duration::from_millis(300)).await {
        if let Message::Receipt(r) = m {
            cs.send(&[pb::Ack { through: r.inbox, ids: vec![] }.into()]).await?;
        }
    }

    // 2. One message cycle, from both sockets' kernel counters.
    let mut cp = Connection::connect(
        args.addr,
        &phone.key,
        pipit_client::login(phone.account, 0, 0),
        &ConnectOptions { server_key: Some(args.server_key), ..ConnectOptions::default() },
    )
    .await?;
    settle().await;
    let (a_local, b_local) = (cs.local_addr()?, cp.local_addr()?);
    let (a0, b0) = (TcpCounters::of(a_local)?, TcpCounters::of(b_local)?);
    cs.send(&[pb::Send {
        id: next_id,
        to: phone.account,
        payload: Bytes::from(vec![0x42; 100]),
        ..Default::default()
    }
    .into()])
        .await?;
    until(&mut cs, |m| matches!(m, Message::Sent(_)).then_some(())).await?;
    settle().await;
    let a1 = TcpCounters::of(a_local)?;
    ack_next(&mut cp, |m| match m {
        Message::Deliver(d) => Some(d.inbox),
        _ => None,
    })
    .await?;
    let b1 = TcpCounters::of(b_local)?;
    ack_next(&mut cs, |m| match m {
        Message::Receipt(r) => Some(r.inbox),
        _ => None,
    })
    .await?;
    let a2 = TcpCounters::of(a_local)?;
    let cycle = a1.since(&a0).plus(&b1.since(&b0));
    let with_receipt = cycle.plus(&a2.since(&a1));

    // 3. Idle keepalive: one ping/pong exchange, and silence otherwise.
    let interval = cp.login().keepalive_secs;
    let k0 = TcpCounters::of(b_local)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = TcpCounters::of(b_local)?.since(&k0);
    let k1 = TcpCounters::of(b_local)?;
    cp.keepalive().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ping = TcpCounters::of(b_local)?.since(&k1);
    let per_hour = ping.wire_bytes() as f64 * 3600.0 / f64::from(interval);
    // More exchanges after idle gaps: whether the server's kernel ACKs the
    // ping on its own segment (4 segments) or in the pong (3) depends on
    // its delayed-ACK state, which the previous exchanges change.
    let mut later = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let k = TcpCounters::of(b_local)?;
        cp.keepalive().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = TcpCounters::of(b_local)?.since(&k);
        later.push(format!("[{},{}]", d.wire_bytes(), d.segments()));
    }

    let mut report = String::from("{");
    for (name, raw, total) in &results {
        report += &format!("\"{name}_first_message_s\":{total:.3},\"{name}_first_message_raw_s\":{raw:.3},");
    }
    report += &format!(
        concat!(
            "\"rtt_ms\":{},\"kbps\":{},\"runs\":{},",
            "\"cycle_wire_bytes\":{},\"cycle_payload_bytes\":{},\"cycle_segments\":{},",
            "\"cycle_with_receipt_wire_bytes\":{},\"cycle_with_receipt_segments\":{},",
            "\"keepalive_interval_s\":{},\"keepalive_exchange_wire_bytes\":{},\"keepalive_exchange_segments\":{},",
            "\"idle_bytes_in_2s_without_keepalive\":{},\"keepalive_bytes_per_hour\":{:.0},",
            "\"later_keepalive_exchanges_bytes_segments\":[{}]}}"
        ),
        args.rtt_ms,
        args.kbps,
        args.runs,
        cycle.wire_bytes(),
        cycle.bytes_sent + cycle.bytes_received,
        cycle.segments(),
        with_receipt.wire_bytes(),
        with_receipt.segments(),
        interval,
        ping.wire_bytes(),
        ping.segments(),
        idle.wire_bytes(),
        per_hour,
        later.join(",")
    );
    println!("{report}");
    if let Some(p) = args.json {
        std::fs::write(&p, format!("{report}\n")).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
