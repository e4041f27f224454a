//! The two wake-up contracts pipit speaks, both plain HTTP POSTs with no
//! message content (SPEC.md 5.9):
//!
//! - **Matrix Push Gateway API** (`POST /_matrix/push/v1/notify`, what
//!   sygnal implements for APNs and FCM): the operator runs the gateway
//!   and configures its URL and the app ids it knows the app by. A
//!   pushkey the gateway lists in `rejected` (or a 410) is gone.
//! - **UnifiedPush**: the device registers the endpoint URL its
//!   distributor gave it and the server POSTs there. 404 and 410 mean the
//!   registration is gone. Endpoints are client-chosen URLs, so by default
//!   they may not point at loopback, private or link-local addresses
//!   (checked for literal addresses when registered, and on every
//!   connection by the resolver), or the server could be made to call its
//!   own network.
//!
//! Redirects are not followed; bodies read back are capped; every request
//! has a timeout.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use pipit_protocol::limits::MAX_PUSH_TOKEN_LEN;
use pipit_protocol::message::pb;
use reqwest::Url;

use super::PushConfig;
use crate::model::DeviceAddr;
use crate::store::push_tokens::PushRecord;

/// Most bytes of a gateway's answer read back; the rest is ignored.
const MAX_RESPONSE: usize = 64 * 1024;

/// Why the push client cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushSetupError {
    /// `push_gateway_url` is not an http(s) URL.
    #[error("push_gateway_url {0:?} is not an http or https URL")]
    BadUrl(String),
    /// The HTTP client could not be built (TLS roots, ...).
    #[error("push client: {0}")]
    Client(#[from] reqwest::Error),
    /// The worker thread could not be started.
    #[error("push worker thread: {0}")]
    Thread(String),
}

/// One wake-up to send.
#[derive(Debug)]
pub(super) struct WakeUp<'a> {
    pub(super) addr: DeviceAddr,
    pub(super) record: &'a PushRecord,
    /// Entries waiting in the device's inbox (capped).
    pub(super) unread: usize,
}

/// What became of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The gateway took it.
    Sent,
    /// Worth another try later (5xx, 429, a connection error, a timeout):
    /// the reason, for the metric.
    Retry(&'static str),
    /// The token is no longer valid: forget it.
    TokenGone,
    /// Refused for good (another 4xx, a redirect): the reason.
    Rejected(&'static str),
}

struct Matrix {
    client: reqwest::Client,
    url: Url,
    apns_app_id: String,
    fcm_app_id: String,
}

/// The HTTP side of push.
pub(super) struct Gateway {
    matrix: Option<Matrix>,
    unified: Option<reqwest::Client>,
    allow_private: bool,
}

fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(8)
        .user_agent(concat!("pipit/", env!("CARGO_PKG_VERSION")))
}

impl Gateway {
    pub(super) fn new(cfg: &PushConfig) -> Result<Self, PushSetupError> {
        let matrix = if cfg.gateway_url.is_empty() {
            None
        } else {
            let url =
                parse_http_url(&cfg.gateway_url).ok_or_else(|| PushSetupError::BadUrl(cfg.gateway_url.clone()))?;
            Some(Matrix {
                client: builder(cfg.timeout).build()?,
                url,
                apns_app_id: cfg.apns_app_id.clone(),
                fcm_app_id: cfg.fcm_app_id.clone(),
            })
        };
        let unified = if cfg.unifiedpush {
            let mut b = builder(cfg.timeout);
            if !cfg.allow_private_endpoints {
                b = b.dns_resolver(Arc::new(PublicOnly));
            }
            Some(b.build()?)
        } else {
            None
        };
        Ok(Self { matrix, unified, allow_private: cfg.allow_private_endpoints })
    }

    /// The Matrix app id for `platform`, when this server can reach it.
    fn app_id(&self, platform: i32) -> Option<&str> {
        let m = self.matrix.as_ref()?;
        let id = match pb::PushPlatform::try_from(platform).ok()? {
            pb::PushPlatform::Apns => &m.apns_app_id,
            pb::PushPlatform::Fcm => &m.fcm_app_id,
            _ => return None,
        };
        (!id.is_empty()).then_some(id.as_str())
    }

    /// Whether a token of `platform` can ever be used here.
    pub(super) fn accepts(&self, platform: i32) -> bool {
        if platform == pb::PushPlatform::UnifiedPush as i32 {
            return self.unified.is_some();
        }
        self.app_id(platform).is_some()
    }

    /// Checks a token a device registers: `Err` is the answer it gets.
    pub(super) fn check_token(&self, platform: i32, token: &[u8]) -> Result<(), pb::ErrorCode> {
        if token.len() > MAX_PUSH_TOKEN_LEN {
            return Err(pb::ErrorCode::TooLarge);
        }
        if pb::PushPlatform::try_from(platform).is_err() || platform == pb::PushPlatform::Unspecified as i32 {
            return Err(pb::ErrorCode::BadRequest);
        }
        if !self.accepts(platform) {
            return Err(pb::ErrorCode::NotSupported);
        }
        // Both contracts carry the token as text (a JSON string, a URL).
        let Ok(text) = std::str::from_utf8(token) else {
            return Err(pb::ErrorCode::BadRequest);
        };
        if text.chars().any(char::is_control) {
            return Err(pb::ErrorCode::BadRequest);
        }
        if platform == pb::PushPlatform::UnifiedPush as i32 {
            let url = parse_http_url(text).ok_or(pb::ErrorCode::BadRequest)?;
            if !self.allow_private && literal_ip(&url).is_some_and(|ip| !is_public(ip)) {
                return Err(pb::ErrorCode::Forbidden);
            }
            if !self.allow_private && url.host_str().is_some_and(|h| h.eq_ignore_ascii_case("localhost")) {
                return Err(pb::ErrorCode::Forbidden);
            }
        }
        Ok(())
    }

    /// Sends one wake-up.
    pub(super) async fn send(&self, w: &WakeUp<'_>) -> Verdict {
        let token = String::from_utf8_lossy(&w.record.token);
        if w.record.platform == pb::PushPlatform::UnifiedPush as i32 {
            let Some(client) = &self.unified else { return Verdict::Rejected("not_configured") };
            let Some(url) = parse_http_url(&token) else { return Verdict::TokenGone };
            if !self.allow_private && literal_ip(&url).is_some_and(|ip| !is_public(ip)) {
                return Verdict::TokenGone;
            }
            let req = client
                .post(url)
                .header("content-type", "application/json")
                // Web Push headers, which UnifiedPush servers honour: keep
                // it a day, deliver it now.
                .header("ttl", "86400")
                .header("urgency", "high")
                .body(unified_body(w.unread));
            return classify(req.send().await, Contract::UnifiedPush, &token).await;
        }
        let (Some(m), Some(app_id)) = (&self.matrix, self.app_id(w.record.platform)) else {
            return Verdict::Rejected("not_configured");
        };
        let req = m.client.post(m.url.clone()).header("content-type", "application/json").body(matrix_body(
            app_id,
            &token,
            w.record.registered,
            w.addr,
            w.unread,
        ));
        classify(req.send().await, Contract::Matrix, &token).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contract {
    Matrix,
    UnifiedPush,
}

/// The Matrix notify request: the device's pushkey, a count, and which
/// pipit device it is (an app may hold several accounts); no content.
pub(super) fn matrix_body(app_id: &str, pushkey: &str, pushkey_ts: u64, addr: DeviceAddr, unread: usize) -> Vec<u8> {
    serde_json::json!({
        "notification": {
            "devices": [{
                "app_id": app_id,
                "pushkey": pushkey,
                "pushkey_ts": pushkey_ts,
                "data": { "account": addr.account, "device": addr.device },
            }],
            "counts": { "unread": unread },
            "prio": "high",
        }
    })
    .to_string()
    .into_bytes()
}

/// The UnifiedPush message: a count only. The endpoint already names the
/// app instance, and the distributor in between need learn no more.
pub(super) fn unified_body(unread: usize) -> Vec<u8> {
    serde_json::json!({ "unread": unread }).to_string().into_bytes()
}

async fn classify(sent: Result<reqwest::Response, reqwest::Error>, contract: Contract, pushkey: &str) -> Verdict {
    let mut response = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Verdict::Retry("timeout"),
        Err(_) => return Verdict::Retry("connection"),
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    if (200..300).contains(&status) && contract == Contract::Matrix {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_RESPONSE => body.extend_from_slice(&chunk),
                // Too long, or cut off: judge by what arrived.
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => break,
            }
        }
    }
    verdict(status, &body, contract, pushkey)
}

/// The verdict on an answer: its status and (Matrix, 2xx) its body.
fn verdict(status: u16, body: &[u8], contract: Contract, pushkey: &str) -> Verdict {
    match status {
        200..=299 if contract == Contract::Matrix => {
            if matrix_rejected(body, pushkey) {
                Verdict::TokenGone
            } else {
                Verdict::Sent
            }
        }
        200..=299 => Verdict::Sent,
        410 => Verdict::TokenGone,
        // A UnifiedPush endpoint that no longer exists; from a Matrix
        // gateway a 404 means a wrong URL, which must not cost every
        // device its token.
        404 if contract == Contract::UnifiedPush => Verdict::TokenGone,
        408 | 429 => Verdict::Retry("busy"),
        500..=599 => Verdict::Retry("server_error"),
        300..=399 => Verdict::Rejected("redirect"),
        _ => Verdict::Rejected("refused"),
    }
}

/// Whether a Matrix gateway's answer lists `pushkey` as rejected. Anything
/// that is not the documented shape rejects nothing: the status said the
/// gateway took the request.
pub(super) fn matrix_rejected(body: &[u8], pushkey: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        rejected: Vec<String>,
    }
    serde_json::from_slice::<Answer>(body).is_ok_and(|a| a.rejected.iter().any(|k| k == pushkey))
}

fn parse_http_url(s: &str) -> Option<Url> {
    let url = Url::parse(s).ok()?;
    (matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty())).then_some(url)
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    url.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Whether `ip` is an address on the public internet (not loopback,
/// private, link-local, shared, documentation, multicast or unspecified).
pub(super) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// A resolver that hands out public addresses only, so a UnifiedPush
/// endpoint's name cannot lead the server into its own network.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| is_public(a.ip())).collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_by_status_and_the_matrix_rejected_list() {
        use Contract::*;
        assert_eq!(verdict(200, br#"{"rejected":[]}"#, Matrix, "k"), Verdict::Sent);
        assert_eq!(verdict(200, br#"{"rejected":["k"]}"#, Matrix, "k"), Verdict::TokenGone);
        assert_eq!(verdict(200, br#"{"rejected":["other"]}"#, Matrix, "k"), Verdict::Sent);
        for garbage in [&b"\x00\xff not json"[..], b"", b"[1,2]", br#"{"rejected":"k"}"#, br#"{"rejected":[1]}"#] {
            assert_eq!(verdict(200, garbage, Matrix, "k"), Verdict::Sent, "{garbage:?}");
        }
        assert_eq!(verdict(410, b"", Matrix, "k"), Verdict::TokenGone);
        assert_eq!(verdict(404, b"", Matrix, "k"), Verdict::Rejected("refused"), "a wrong gateway URL keeps tokens");
        assert_eq!(verdict(404, b"", UnifiedPush, "k"), Verdict::TokenGone);
        assert_eq!(verdict(503, b"", Matrix, "k"), Verdict::Retry("server_error"));
        assert_eq!(verdict(429, b"", UnifiedPush, "k"), Verdict::Retry("busy"));
        assert_eq!(verdict(400, b"", UnifiedPush, "k"), Verdict::Rejected("refused"));
        assert_eq!(verdict(302, b"", UnifiedPush, "k"), Verdict::Rejected("redirect"));
        assert_eq!(verdict(201, b"", UnifiedPush, "k"), Verdict::Sent);
    }

    #[test]
    fn private_addresses_are_told_apart() {
        for private in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.64.0.1", "0.0.0.0"] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for private in ["::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::"] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "2606:2800:220:1::1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn tokens_are_checked_before_they_are_stored() {
        let cfg = PushConfig {
            gateway_url: "http://gw.example/_matrix/push/v1/notify".into(),
            fcm_app_id: "org.example.app".into(),
            unifiedpush: true,
            ..PushConfig::default()
        };
        let g = Gateway::new(&cfg).unwrap();
        let fcm = pb::PushPlatform::Fcm as i32;
        let up = pb::PushPlatform::UnifiedPush as i32;
        assert_eq!(g.check_token(fcm, b"abc"), Ok(()));
        assert_eq!(g.check_token(pb::PushPlatform::Apns as i32, b"abc"), Err(pb::ErrorCode::NotSupported), "no app id");
        assert_eq!(g.check_token(0, b"abc"), Err(pb::ErrorCode::BadRequest));
        assert_eq!(g.check_token(99, b"abc"), Err(pb::ErrorCode::BadRequest));
        assert_eq!(g.check_token(fcm, &[b'a'; 513]), Err(pb::ErrorCode::TooLarge));
        assert_eq!(g.check_token(fcm, b"\xff\xfe"), Err(pb::ErrorCode::BadRequest));
        assert_eq!(g.check_token(fcm, b"a\nb"), Err(pb::ErrorCode::BadRequest));
        assert_eq!(g.check_token(up, b"https://push.example/up/abc"), Ok(()));
        assert_eq!(g.check_token(up, b"ftp://push.example/x"), Err(pb::ErrorCode::BadRequest));
        assert_eq!(g.check_token(up, b"http://127.0.0.1:9/x"), Err(pb::ErrorCode::Forbidden));
        assert_eq!(g.check_token(up, b"http://[::1]:9/x"), Err(pb::ErrorCode::Forbidden));
        assert_eq!(g.check_token(up, b"http://localhost/x"), Err(pb::ErrorCode::Forbidden));
    }

    #[test]
    fn the_requests_carry_a_count_and_ids_only() {
        let body = matrix_body("app", "key", 5, DeviceAddr::new(3, 1), 7);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["notification"]["devices"][0]["pushkey"], "key");
        assert_eq!(v["notification"]["counts"]["unread"], 7);
        assert_eq!(v["notification"]["devices"][0]["data"]["account"], 3);
        assert_eq!(unified_body(2), br#"{"unread":2}"#);
    }
}
