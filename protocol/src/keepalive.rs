//! Keepalive and idle timing, as a clock-free state machine.
//!
//! The client keeps the path warm: when it has sent nothing for the
//! negotiated interval it sends a zero-length frame, and if nothing at all
//! comes back within the response timeout it declares the connection dead.
//! The server never pings (that would wake radios for nothing); it closes a
//! connection from which it has heard nothing for twice the interval.
//! Callers pass `now` in and sleep until [`Keepalive::next_deadline`].

use std::time::{Duration, Instant};

/// What the caller should do at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveAction {
    /// Nothing yet.
    Wait,
    /// Client: send a keepalive frame now.
    SendPing,
    /// The peer is gone: close the connection.
    Dead,
}

/// Keepalive state of one connection.
#[derive(Debug, Clone)]
pub struct Keepalive {
    /// `Some` on the client: how often to ping when idle.
    ping_interval: Option<Duration>,
    /// Client: how long to wait for any byte after a ping. Server: how long
    /// a connection may stay silent.
    silence_limit: Duration,
    last_sent: Instant,
    last_received: Instant,
    /// Client: when the unanswered ping went out.
    ping_outstanding: Option<Instant>,
}

impl Keepalive {
    /// Client side: ping after `interval` without sending; give up when a
    /// ping gets no bytes back within `response_timeout`.
    pub fn client(interval: Duration, response_timeout: Duration, now: Instant) -> Self {
        Self {
            ping_interval: Some(interval),
            silence_limit: response_timeout,
            last_sent: now,
            last_received: now,
            ping_outstanding: None,
        }
    }

    /// Server side: a connection silent for twice `interval` is dead.
    pub fn server(interval: Duration, now: Instant) -> Self {
        Self {
            ping_interval: None,
            silence_limit: interval * 2,
            last_sent: now,
            last_received: now,
            ping_outstanding: None,
        }
    }

    /// Record that a frame was sent.
    pub fn on_send(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// Record that bytes arrived.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_received = now;
        self.ping_outstanding = None;
    }

    /// The next instant at which [`Keepalive::poll`] may return something
    /// other than [`KeepaliveAction::Wait`].
    pub fn next_deadline(&self) -> Instant {
        match (self.ping_interval, self.ping_outstanding) {
            (Some(_), Some(sent)) => sent + self.silence_limit,
            (Some(interval), None) => self.last_sent + interval,
            (None, _) => self.last_received + self.silence_limit,
        }
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> KeepaliveAction {
        if now < self.next_deadline() {
            return KeepaliveAction::Wait;
        }
        match (self.ping_interval, self.ping_outstanding) {
            (Some(_), Some(_)) | (None, _) => KeepaliveAction::Dead,
            (Some(_), None) => {
                self.ping_outstanding = Some(now);
                self.last_sent = now;
                KeepaliveAction::SendPing
            }
        }
    }
}

/// Clamps a proposed interval (seconds; 0 = default) into the server's
/// bounds. Both sides use this to agree on the interval.
pub fn negotiate_interval(proposed_secs: u32, min_secs: u32, max_secs: u32, default_secs: u32) -> u32 {
    if proposed_secs == 0 {
        default_secs.clamp(min_secs, max_secs)
    } else {
        proposed_secs.clamp(min_secs, max_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_pings_when_idle_and_dies_without_answer() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut k = Keepalive::client(s(60), s(20), t0);
        assert_eq!(k.next_deadline(), t0 + s(60));
        assert_eq!(k.poll(t0 + s(59)), KeepaliveAction::Wait);
        k.on_send(t0 + s(30)); // traffic postpones the ping
        assert_eq!(k.poll(t0 + s(60)), KeepaliveAction::Wait);
        assert_eq!(k.poll(t0 + s(90)), KeepaliveAction::SendPing);
        assert_eq!(k.next_deadline(), t0 + s(110));
        k.on_receive(t0 + s(91)); // pong
        assert_eq!(k.poll(t0 + s(111)), KeepaliveAction::Wait);
        assert_eq!(k.poll(t0 + s(150)), KeepaliveAction::SendPing);
        assert_eq!(k.poll(t0 + s(170)), KeepaliveAction::Dead);
    }

    #[test]
    fn server_closes_after_twice_the_interval_of_silence() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut k = Keepalive::server(s(60), t0);
        assert_eq!(k.poll(t0 + s(119)), KeepaliveAction::Wait);
        k.on_receive(t0 + s(100));
        assert_eq!(k.poll(t0 + s(219)), KeepaliveAction::Wait);
        assert_eq!(k.poll(t0 + s(220)), KeepaliveAction::Dead);
    }

    #[test]
    fn negotiation_clamps() {
        assert_eq!(negotiate_interval(0, 15, 1800, 420), 420);
        assert_eq!(negotiate_interval(5, 15, 1800, 420), 15);
        assert_eq!(negotiate_interval(99_999, 15, 1800, 420), 1800);
        assert_eq!(negotiate_interval(300, 15, 1800, 420), 300);
    }
}
