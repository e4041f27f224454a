//! `pipit-scale`: many idle authenticated connections, then a reconnect
//! storm.
//!
//! Ramp: `--connections` devices register, or log in when `--devices`
//! names a file of known devices (IK, one round trip each), at
//! most `--concurrency` handshakes in flight, spread over `--sources`
//! loopback addresses; each then stays connected and idle. Reports
//! handshakes/s during the ramp, the server's resident memory per
//! connection (from `/proc/<--server-pid>/status`) and the kernel's TCP
//! memory (`/proc/net/sockstat`). Storm: every connection closes at once,
//! `--probe` of the devices get a message while offline, and all devices
//! reconnect at once; reports the time until all are back and checks every
//! probe message arrived. With `--subscribe N`, each held connection
//! then watches the presence of N other devices' accounts, and the
//! server's resident memory per subscription is reported. Raise
//! `ulimit -n` for large runs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey, StaticKeypair};
use pipit_client::{ConnectOptions, Connection};
use tokio::net::TcpStream;

/// A held connection: the bare socket (least client memory), or the
/// whole connection when it still has requests to send.
enum Held {
    Stream {
        /// Held only to keep the connection open.
        _socket: TcpStream,
    },
    Conn(Box<Connection>),
}
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Parser, Clone)]
#[command(about = "Idle connection scale and reconnect storm")]
struct Args {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Server public key.
    #[arg(long)]
    server_key: PublicKey,
    /// Connections to hold.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Loopback source addresses (127.0.0.1 ..).
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// The server's pid, for its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Devices that get a message during the storm.
    #[arg(long, default_value_t = 1_000)]
    probe: usize,
    /// Seconds to hold the idle connections before the storm.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the ramp (seconds, connections) here as CSV, for plotting.
    #[arg(long)]
    ramp_csv: Option<std::path::PathBuf>,
    /// Accounts each held connection watches for presence (0: none), to
    /// measure the server's memory per subscription.
    #[arg(long, default_value_t = 0)]
    subscribe: usize,
    /// Devices file: when it exists, its devices log in (IK) instead of
    /// registering, so a freshly started server's memory growth is the
    /// connections' alone; when it does not, registered devices are saved
    /// to it. One line per device: private key hex, account.
    #[arg(long)]
    devices: Option<std::path::PathBuf>,
}

fn load_devices(path: &std::path::Path) -> anyhow::Result<Option<Vec<Device>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let (key, account) = line.split_once(' ').context("devices file: key account")?;
        out.push(Device { key: StaticKeypair::from_hex(key)?, account: account.trim().parse()? });
    }
    Ok(Some(out))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.addr.ip().is_loopback(), "loopback targets only");
    anyhow::ensure!(args.probe <= args.connections, "--probe exceeds --connections");
    anyhow::ensure!(args.subscribe < args.connections, "--subscribe must be below --connections");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Kernel TCP memory in bytes (pages in use by all TCP sockets).
fn tcp_mem_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse::<u64>().ok().map(|p| p * 4096);
        }
    }
    None
}

struct Device {
    key: StaticKeypair,
    account: u64,
}

fn source(i: usize, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(n)) as u8))
}

/// Runs `total` connects with at most `concurrency` in flight; returns
/// the results in index order and the ramp samples.
async fn ramp<F, Fut, T>(total: usize, concurrency: usize, f: F) -> anyhow::Result<(Vec<T>, Vec<(f64, usize)>)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + 'static,
    T: 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let start = Instant::now();
    let mut out: Vec<Option<T>> = (0..total).map(|_| None).collect();
    let mut samples = vec![(0.0, 0)];
    let mut done = 0;
    let mut next_sample = 0.25;
    for i in 0..total {
        let permit = sem.clone().acquire_owned().await?;
        let fut = f(i);
        set.spawn_local(async move {
            let r = fut.await;
            drop(permit);
            (i, r)
        });
        while let Some(r) = set.try_join_next() {
            let (i, r) = r?;
            out[i] = Some(r?);
            done += 1;
        }
        let t = start.elapsed().as_secs_f64();
        if t >= next_sample {
            samples.push((t, done));
            next_sample += 0.25;
        }
    }
    while let Some(r) = set.join_next().await {
        let (i, r) = r?;
        out[i] = Some(r?);
        done += 1;
    }
    samples.push((start.elapsed().as_secs_f64(), done));
    Ok((out.into_iter().map(|o| o.expect("every task reported")).collect(), samples))
}

/// Each held connection watches the accounts of the `n` devices after
/// it (wrapping); returns the subscriptions made.
async fn watch_all(devices: &[Device], held: &mut [Held], n: usize) -> anyhow::Result<usize> {
    let t = Instant::now();
    let mut total = 0;
    for (i, h) in held.iter_mut().enumerate() {
        let Held::Conn(c) = h else { continue };
        let accounts: Vec<u64> = (1..=n).map(|k| devices[(i + k) % devices.len()].account).collect();
        c.send(&[pb::PresenceSubscribe { accounts, req: 1 }.into()]).await?;
        loop {
            match c.recv_timeout(Duration::from_secs(30)).await? {
                Message::Done(d) if d.req == 1 => break,
                Message::Error(e) => anyhow::bail!("subscription refused: code {}", e.code),
                _ => {}
            }
        }
        total += n;
    }
    eprintln!("subscribed: {total} subscriptions in {:.1} s", t.elapsed().as_secs_f64());
    Ok(total)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let local = tokio::task::LocalSet::new();
    local.run_until(run_local(args)).await
}

async fn run_local(args: Args) -> anyhow::Result<()> {
    let rss0 = args.server_pid.and_then(rss_kib);
    let mem0 = tcp_mem_bytes();
    let opts = |i: usize| ConnectOptions {
        server_key: Some(args.server_key),
        local_ip: Some(source(i, args.sources)),
        timeout: Duration::from_secs(60),
        ..ConnectOptions::default()
    };

    // Ramp: log in (known devices) or register, and stay connected.
    let known = match &args.devices {
        Some(p) => load_devices(p)?.map(Arc::new),
        None => None,
    };
    if let Some(k) = &known {
        anyhow::ensure!(k.len() >= args.connections, "the devices file has only {} devices", k.len());
    }
    let t = Instant::now();
    let subscribe = args.subscribe;
    let (held, ramp_samples) = ramp(args.connections, args.concurrency, |i| {
        let o = opts(i);
        let addr = args.addr;
        let known = known.clone();
        async move {
            let (key, hello) = match &known {
                Some(k) => (k[i].key.clone(), pipit_client::login(k[i].account, 0, 0)),
                None => (StaticKeypair::generate(), pipit_client::register("", "")),
            };
            let c = Connection::connect(addr, &key, hello, &o).await.context("connect")?;
            let account = c.login().account;
            let held = if subscribe > 0 { Held::Conn(Box::new(c)) } else { Held::Stream { _socket: c.into_stream() } };
            Ok((Device { key, account }, held))
        }
    })
    .await?;
    if let (None, Some(p)) = (&known, &args.devices) {
        let text: String = held.iter().map(|(d, _)| format!("{} {}\n", d.key.to_hex(), d.account)).collect();
        std::fs::write(p, text)?;
    }
    let ramp_secs = t.elapsed().as_secs_f64();
    eprintln!("ramp: {} connections in {ramp_secs:.1} s", held.len());
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let rss1 = args.server_pid.and_then(rss_kib);
    let mem1 = tcp_mem_bytes();
    let (devices, mut held): (Vec<Device>, Vec<Held>) = held.into_iter().unzip();
    let (subscriptions, rss_subscribed) = if subscribe > 0 {
        let n = watch_all(&devices, &mut held, subscribe).await?;
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
        (n, args.server_pid.and_then(rss_kib))
    } else {
        (0, None)
    };
    let streams: Vec<Held> = held;

    // Storm: everyone drops; probe devices get a message while offline.
    drop(streams);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sender_key = StaticKeypair::generate();
    let mut sender = Connection::connect(args.addr, &sender_key, pipit_client::register("", ""), &opts(0)).await?;
    let probes: Vec<Message> = (0..args.probe)
        .map(|i| {
            pb::Send {
                id: i as u64 + 1,
                to: devices[i].account,
                payload: Bytes::from_static(b"while you were away"),
                ..Default::default()
            }
            .into()
        })
        .collect();
    for chunk in probes.chunks(256) {
        sender.send(chunk).await?;
    }
    let mut sent = 0;
    while sent < args.probe {
        if let Message::Sent(_) = sender.recv_timeout(Duration::from_secs(30)).await? {
            sent += 1;
        }
    }
    let devices = Arc::new(devices);
    let t = Instant::now();
    let (back, storm_samples) = ramp(devices.len(), args.concurrency, |i| {
        let o = opts(i);
        let addr = args.addr;
        let devices = devices.clone();
        let probe = i < args.probe;
        async move {
            let d = &devices[i];
            let mut c = Connection::connect(addr, &d.key, pipit_client::login(d.account, 0, 0), &o).await.context("reconnect")?;
            // A probe device must find its message in the login reply.
            let got = if probe {
                matches!(c.recv_timeout(Duration::from_secs(30)).await?, Message::Deliver(ref m) if &m.payload[..] == b"while you were away")
            } else {
                false
            };
            Ok((got, c.into_stream()))
        }
    })
    .await?;
    let storm_secs = t.elapsed().as_secs_f64();
    let delivered = back.iter().filter(|(g, _)| *g).count();
    anyhow::ensure!(delivered == args.probe, "only {delivered} of {} probe messages arrived", args.probe);

    let per_conn = match (rss0, rss1) {
        (Some(a), Some(b)) => format!("{:.0}", (b.saturating_sub(a) * 1024) as f64 / args.connections as f64),
        _ => "null".into(),
    };
    let per_subscription = match (rss1, rss_subscribed) {
        (Some(a), Some(b)) if subscriptions > 0 => {
            format!("{:.1}", (b.saturating_sub(a) * 1024) as f64 / subscriptions as f64)
        }
        _ => "null".into(),
    };
    let kernel = match (mem0, mem1) {
        // Both ends of each connection are on this machine.
        (Some(a), Some(b)) => format!("{:.0}", b.saturating_sub(a) as f64 / (2 * args.connections) as f64),
        _ => "null".into(),
    };
    let report = format!(
        concat!(
            "{{\"connections\":{},\"ramp_s\":{:.2},\"handshakes_per_sec\":{:.0},",
            "\"server_rss_kib_before\":{},\"server_rss_kib_after\":{},\"server_rss_bytes_per_connection\":{},",
            "\"kernel_tcp_bytes_per_socket\":{},\"storm_reconnect_s\":{:.2},\"storm_handshakes_per_sec\":{:.0},",
            "\"probe_messages\":{},\"probe_delivered\":{},\"presence_subscriptions\":{},",
            "\"server_rss_kib_subscribed\":{},\"server_rss_bytes_per_subscription\":{}}}"
        ),
        args.connections,
        ramp_secs,
        args.connections as f64 / ramp_secs,
        rss0.map_or("null".into(), |v| v.to_string()),
        rss1.map_or("null".into(), |v| v.to_string()),
        per_conn,
        kernel,
        storm_secs,
        args.connections as f64 / storm_secs,
        args.probe,
        delivered,
        subscriptions,
        rss_subscribed.map_or("null".into(), |v| v.to_string()),
        per_subscription
    );
    println!("{report}");
    if let Some(p) = args.json {
        std::fs::write(p, format!("{report}\n"))?;
    }
    if let Some(p) = args.ramp_csv {
        let mut csv = String::from("phase,seconds,connections\n");
        for (t, n) in &ramp_samples {
            csv += &format!("ramp,{t:.2},{n}\n");
        }
        for (t, n) in &storm_samples {
            csv += &format!("storm,{t:.2},{n}\n");
        }
        std::fs::write(p, csv)?;
    }
    drop(back);
    Ok(())
}
