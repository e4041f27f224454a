//! `pipit-linkem`: run the link emulator as a standalone proxy, for
//! measuring a client or server by hand over an emulated 2G link.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use pipit_tools::linkem::{Link, Proxy};

#[derive(Parser)]
#[command(about = "A delaying, rate-limiting TCP proxy (loopback only)")]
struct Args {
    /// Where clients connect.
    #[arg(long, default_value = "127.0.0.1:5223")]
    listen: SocketAddr,
    /// The server behind it.
    #[arg(long, default_value = "127.0.0.1:5222")]
    upstream: SocketAddr,
    /// Round-trip time added, milliseconds (split evenly each way).
    #[arg(long, default_value_t = 500)]
    rtt_ms: u64,
    /// Bandwidth each way, kbit/s (0 = unlimited).
    #[arg(long, default_value_t = 200)]
    kbps: u64,
    /// Extra random one-way delay, milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Cut every connection this often, seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    cut_every_secs: u64,
    /// Stall (forward nothing, close nothing) this often, seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    stall_every_secs: u64,
    /// How long each stall lasts, seconds.
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut link = Link::mobile(Duration::from_millis(args.rtt_ms), args.kbps);
    link.jitter = Duration::from_millis(args.jitter_ms);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let proxy = Proxy::start(args.listen, args.upstream, link, link).await?;
        eprintln!("pipit-linkem: {} -> {} ({} ms RTT, {} kbit/s)", proxy.addr(), args.upstream, args.rtt_ms, args.kbps);
        let schedule = async {
            let every = |s: u64| (s > 0).then(|| tokio::time::interval(Duration::from_secs(s)));
            let (mut cuts, mut stalls) = (every(args.cut_every_secs), every(args.stall_every_secs));
            if let Some(c) = cuts.as_mut() {
                c.tick().await;
            }
            if let Some(s) = stalls.as_mut() {
                s.tick().await;
            }
            loop {
                tokio::select! {
                    _ = async { cuts.as_mut().unwrap().tick().await }, if cuts.is_some() => {
                        eprintln!("pipit-linkem: cut");
                        proxy.cut();
                    }
                    _ = async { stalls.as_mut().unwrap().tick().await }, if stalls.is_some() => {
                        eprintln!("pipit-linkem: stall for {} s", args.stall_secs);
                        proxy.stall(true);
                        tokio::time::sleep(Duration::from_secs(args.stall_secs)).await;
                        proxy.stall(false);
                    }
                    else => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = schedule => {}
        }
        let s = proxy.stats();
        eprintln!(
            "up {} bytes in {} writes, down {} bytes in {} writes, {} connections",
            s.up.bytes.load(std::sync::atomic::Ordering::Relaxed),
            s.up.writes.load(std::sync::atomic::Ordering::Relaxed),
            s.down.bytes.load(std::sync::atomic::Ordering::Relaxed),
            s.down.writes.load(std::sync::atomic::Ordering::Relaxed),
            s.connections.load(std::sync::atomic::Ordering::Relaxed)
        );
        Ok(())
    })
}
