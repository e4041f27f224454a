//! `pipit-flood`: the hostile loads of issue 10, bounded in count and time,
//! against a server on loopback, to measure what they cost it while a
//! legitimate pair (`pipit-load`) runs beside them.
//!
//! Modes:
//! - `large-sends`: `--accounts` accounts each keep `--window` sends of
//!   `--payload` bytes in flight to one offline account, at most
//!   `--messages` each.
//! - `xx-handshakes`: `--connections` loops, each connecting, writing the
//!   preamble and an XX first message of 32 random bytes (no cryptography
//!   on this side), reading whatever comes back, and closing.
//! - `partial-frames`: `--connections` logged-in connections each send
//!   the length of a 65,535-byte frame and all but its last byte, then
//!   hold.
//!
//! Every mode stops after `--seconds`. With `--server-pid`, the server's
//! resident memory is sampled every 100 ms and its peak reported. Connections
//! are spread over `--sources` addresses from 127.0.0.2 on (127.0.0.1 is
//! left to the legitimate pair).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey, StaticKeypair};
use pipit_client::{ConnectOptions, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    LargeSends,
    XxHandshakes,
    PartialFrames,
}

#[derive(Parser, Debug)]
#[command(about = "Hostile loads against a pipit server on loopback")]
struct Args {
    /// What to send.
    #[arg(value_enum)]
    mode: Mode,
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Server public key (hex) to pin; XX learns it when absent.
    #[arg(long)]
    server_key: Option<PublicKey>,
    /// large-sends: flooding accounts.
    #[arg(long, default_value_t = 128)]
    accounts: usize,
    /// large-sends: payload bytes per send.
    #[arg(long, default_value_t = 60_000)]
    payload: usize,
    /// large-sends: sends in flight per account.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// large-sends: most sends per account.
    #[arg(long, default_value_t = 2_000)]
    messages: u64,
    /// xx-handshakes, partial-frames: concurrent connections.
    #[arg(long, default_value_t = 300)]
    connections: usize,
    /// Loopback source addresses, from 127.0.0.2.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Stop after this long.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// The server's pid, to sample its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn source(i: usize, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(n.max(1))) as u8))
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "pipit-flood only targets loopback addresses");
    anyhow::ensure!(args.sources >= 1 && args.sources <= 200, "--sources must be 1..=200");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

/// Peak and last resident memory of `pid`, sampled until `stop`.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut peak = 0;
        let mut last = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kb) = s
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    last = kb * 1024;
                    peak = peak.max(last);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (peak, last)
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rss = args.server_pid.map(|pid| sample_rss(pid, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    match args.mode {
        Mode::LargeSends => large_sends(&args, deadline, counts.clone()).await?,
        Mode::XxHandshakes => xx_handshakes(&args, deadline, counts.clone()).await,
        Mode::PartialFrames => partial_frames(&args, deadline, counts.clone()).await?,
    }
    stop.store(true, Ordering::Relaxed);
    let (peak, last) = match rss {
        Some(h) => h.join().unwrap_or((0, 0)),
        None => (0, 0),
    };
    println!(
        "{{\"mode\":\"{:?}\",\"seconds\":{:.1},\"ok\":{},\"refused\":{},\"errors\":{},\"server_rss_peak_mib\":{:.1},\"server_rss_end_mib\":{:.1}}}",
        args.mode,
        started.elapsed().as_secs_f64(),
        counts.ok.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
        peak as f64 / f64::from(1 << 20),
        last as f64 / f64::from(1 << 20),
    );
    Ok(())
}

async fn register(args: &Args, i: usize) -> anyhow::Result<Connection> {
    let opts =
        ConnectOptions { server_key: args.server_key, local_ip: Some(source(i, args.sources)), ..Default::default() };
    Connection::connect(args.addr, &StaticKeypair::generate(), pipit_client::register("", "flood"), &opts)
        .await
        .context("registering a flooding account")
}

async fn large_sends(args: &Args, deadline: Instant, counts: Arc<Counts>) -> anyhow::Result<()> {
    let sink = register(args, 0).await?.login().account;
    let mut conns = Vec::with_capacity(args.accounts);
    for i in 0..args.accounts {
        conns.push(register(args, i).await?);
    }
    eprintln!("{} accounts flooding {}-byte sends", conns.len(), args.payload);
    let payload = Bytes::from(vec![0xF1u8; args.payload]);
    let mut tasks = Vec::new();
    for mut c in conns {
        let (payload, counts, window, n) = (payload.clone(), counts.clone(), args.window, args.messages);
        tasks.push(tokio::spawn(async move {
            let (mut next, mut in_flight, mut done) = (1u64, 0usize, 0u64);
            while done < n && Instant::now() < deadline {
                let mut batch = Vec::new();
                while in_flight < window && next <= n {
                    batch.push(Message::from(pb::Send {
                        id: next,
                        to: sink,
                        payload: payload.clone(),
                        ..Default::default()
                    }));
                    next += 1;
                    in_flight += 1;
                }
                if !batch.is_empty() && c.send(&batch).await.is_err() {
                    break;
                }
                match tokio::time::timeout_at(deadline.into(), c.recv()).await {
                    Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(Message::Sent(_))) => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                        (in_flight, done) = (in_flight - 1, done + 1);
                    }
                    Ok(Ok(Message::Error(_))) => {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                        (in_flight, done) = (in_flight - 1, done + 1);
                    }
                    Ok(Ok(_)) => {}
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

fn random_bytes(n: usize, seed: &mut u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (*seed >> 56) as u8
        })
        .collect()
}

async fn xx_handshakes(args: &Args, deadline: Instant, counts: Arc<Counts>) {
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let (counts, addr, ip) = (counts.clone(), args.addr, source(i, args.sources));
        tasks.push(tokio::spawn(async move {
            let mut seed = i as u64 + 1;
            let mut buf = [0u8; 256];
            while Instant::now() < deadline {
                let Ok(sock) = tokio::net::TcpSocket::new_v4() else { break };
                if sock.bind(SocketAddr::new(ip, 0)).is_err() {
                    break;
                }
                let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr)).await else {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Preamble, then an XxInit frame: kind 3 and a 32-byte "key".
                let mut msg = b"pip\x01\x00\x21\x03".to_vec();
                msg.extend(random_bytes(32, &mut seed));
                if s.write_all(&msg).await.is_err() {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                    // An XxReply frame: the server did its cryptography.
                    Ok(Ok(n)) if n >= 3 && buf[2] == 4 => counts.ok.fetch_add(1, Ordering::Relaxed),
                    // Refused (a Refuse frame, or closed at once).
                    Ok(_) => counts.refused.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn partial_frames(args: &Args, deadline: Instant, counts: Arc<Counts>) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for i in 0..args.connections {
        if Instant::now() >= deadline {
            break;
        }
        let mut stream = register(args, i).await?.into_stream();
        // The length of a 65,535-byte frame and all of it but one byte.
        let mut frame = vec![0xFF, 0xFF];
        frame.extend(std::iter::repeat_n(0u8, 65_534));
        stream.write_all(&frame).await?;
        counts.ok.fetch_add(1, Ordering::Relaxed);
        held.push(stream);
    }
    eprintln!("{} connections hold a partial frame", held.len());
    let mut closed = 0;
    while Instant::now() < deadline && closed < held.len() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        closed = 0;
        for s in &held {
            let mut b = [0u8; 1];
            if let Ok(Ok(0)) | Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(1), s.peek(&mut b)).await {
                closed += 1;
            }
        }
    }
    // Connections the server closed while they held their frame.
    counts.refused.store(closed as u64, Ordering::Relaxed);
    Ok(())
}
