//! pipit benchmarks and load tools. Binaries: `pipit-load` (throughput and
//! latency), `pipit-2g` (round trips and bytes over an emulated 2G link),
//! `pipit-scale` (idle connections and reconnect storms). Criterion
//! micro-benchmarks live in `benches/`. `bench/README.md` has the figures.

use std::net::SocketAddr;

/// TCP counters of one socket, from the kernel (`ss -ti`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Segments sent, pure ACKs included.
    pub segs_out: u64,
    /// Segments received.
    pub segs_in: u64,
}

/// Bytes an IPv4 TCP segment with the timestamp option adds on the wire:
/// 20 (IP) + 20 (TCP) + 12 (timestamps).
pub const HEADER_BYTES: u64 = 52;

impl TcpCounters {
    /// Reads the counters of the socket whose local address is `local`.
    pub fn of(local: SocketAddr) -> std::io::Result<Self> {
        let out = std::process::Command::new("ss")
            .args(["-tinH", "state", "established", "src", &local.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> u64 {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix(':')).and_then(|v| v.parse().ok()))
                .unwrap_or(0)
        };
        if !text.contains(&format!("{local}")) {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no socket {local} in ss output")));
        }
        Ok(Self {
            bytes_sent: field("bytes_sent"),
            bytes_received: field("bytes_received"),
            segs_out: field("segs_out"),
            segs_in: field("segs_in"),
        })
    }

    /// Counter growth from `before` to `self`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            bytes_sent: self.bytes_sent - before.bytes_sent,
            bytes_received: self.bytes_received - before.bytes_received,
            segs_out: self.segs_out - before.segs_out,
            segs_in: self.segs_in - before.segs_in,
        }
    }

    /// Everything on the wire both ways: payload plus a header per segment.
    pub fn wire_bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received + HEADER_BYTES * (self.segs_out + self.segs_in)
    }

    /// Segments both ways.
    pub fn segments(&self) -> u64 {
        self.segs_out + self.segs_in
    }

    /// Adds another socket's counters.
    pub fn plus(&self, o: &Self) -> Self {
        Self {
            bytes_sent: self.bytes_sent + o.bytes_sent,
            bytes_received: self.bytes_received + o.bytes_received,
            segs_out: self.segs_out + o.segs_out,
            segs_in: self.segs_in + o.segs_in,
        }
    }
}
