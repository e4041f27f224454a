//! The checks, in SPEC.md order. Each is one async function taking the
//! shared context and returning `Ok(None)` when the server did what the
//! spec says, `Err(what it did instead)` when not.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pipit_protocol::frame::preamble;
use pipit_protocol::handshake::Hello;
use pipit_protocol::message::pb;
use pipit_protocol::{Message, PublicKey, StaticKeypair, VERSION};
use tokio::io::AsyncWriteExt;

use super::wire::{self, dial, field, ld, packet, read_to_close, varint, Got, Refusal, Wire, ANSWER};
use super::{login_hello, Ctx, Device, Outcome};

pub(super) type Run = for<'a> fn(&'a Ctx) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

pub(super) struct Check {
    pub(super) section: &'static str,
    pub(super) id: &'static str,
    pub(super) title: &'static str,
    pub(super) run: Run,
}

macro_rules! checks {
    ($( $section:literal $id:literal $title:literal => $f:ident $( ( $($arg:expr),* ) )?; )*) => {
        pub(super) fn all() -> Vec<Check> {
            vec![ $( Check {
                section: $section,
                id: $id,
                title: $title,
                run: |cx| Box::pin($f(cx $(, $($arg),* )?)),
            }, )* ]
        }
    };
}

checks! {
    "1.1" "preamble-bad-first-byte" "a first byte other than \"p\" is closed at once, unanswered" => preamble_bad_first_byte;
    "1.1" "preamble-unsupported-version" "an unknown version gets Refuse UNSUPPORTED_VERSION, then close" => preamble_version;
    "1.2" "handshake-keepalive-frame" "a zero-length frame during the handshake closes" => handshake_keepalive;
    "3.7" "handshake-frame-too-long" "a handshake frame over 1,024 bytes closes from its length alone" => handshake_too_long;
    "3.1" "handshake-unknown-kind" "an unknown handshake frame kind closes" => handshake_unknown_kind;
    "3.1" "handshake-server-kind-from-client" "server handshake kinds sent by a client close" => handshake_server_kinds;
    "3.2" "hello-extra-message" "a hello holding Login and another message closes, unanswered" => hello_extra;
    "3.2" "hello-not-login" "a hello holding neither Login nor Register closes, unanswered" => hello_not_login;
    "3.3" "ik-register" "Register over IK: LoginOk in IkReply, one round trip" => ik_register;
    "3.3" "ik-login" "Login over IK: LoginOk with the device's ids in IkReply" => ik_login;
    "3.4" "xx-reply-payload-empty" "XxReply carries an empty payload" => xx_reply_empty;
    "3.4" "xx-register" "Register over XX: the key in XxReply is the server's; LoginOk first" => xx_register;
    "3.4" "xx-login" "Login over XX of a registered device" => xx_login;
    "3.4" "xx-init-payload" "an XxInit with a payload closes, unanswered" => xx_init_payload;
    "3.5" "retry-stale-key" "IK with a stale key gets Retry with the current key, then IK works" => retry_stale;
    "3.5" "retry-at-most-once" "a second undecryptable IkInit closes without another Retry" => retry_once;
    "3.5" "retry-same-key" "a damaged IkInit made with the right key gets Retry with that key, then IK works" => retry_same_key;
    "3.5" "retry-then-xx" "after a Retry an XxInit is answered XxReply with the current key" => retry_then_xx;
    "3.6" "retired-key-login" "IK with a retired key logs in at once and LoginOk names the current key" => retired_key;
    "3.7" "handshake-timeout-silent" "a connection that sends nothing is closed by the handshake timeout" => timeout_silent;
    "3.7" "handshake-timeout-partial" "a handshake frame cut short is closed by the handshake timeout" => timeout_partial;
    "2" "transport-tampered" "an altered transport frame closes" => transport_tampered;
    "2" "transport-replayed" "a replayed transport frame closes" => transport_replayed;
    "2" "transport-reordered" "transport frames out of order close" => transport_reordered;
    "2" "transport-truncated" "a transport frame shorter than its tag closes" => transport_truncated;
    "4" "packet-unknown-kind" "unknown Packet fields are skipped, any wire type" => packet_unknown_kind;
    "4" "message-unknown-field" "unknown fields inside a known message are ignored" => message_unknown_field;
    "4" "packet-known-kind-wrong-wire-type" "a known kind with a wire type other than 2 closes" => packet_wrong_wire_type;
    "4" "message-field-wrong-wire-type" "a known field of the wrong wire type inside a message closes" => message_wrong_wire_type;
    "4" "packet-group-wire-type" "wire type 3 (group) closes" => packet_group_wire_type;
    "4" "packet-length-past-end" "a length past the end of the packet closes" => packet_past_end;
    "4" "packet-too-many-messages" "a packet of 1,025 messages closes, none processed" => packet_too_many;
    "4" "packet-empty" "an empty packet is ignored" => packet_empty;
    "4" "answers-in-request-order" "answers come in the order of their requests" => answer_order;
    "4" "direction-sent" "a Sent from a client closes" => direction(pb::Sent::default().into());
    "4" "direction-deliver" "a Deliver from a client closes" => direction(pb::Deliver::default().into());
    "4" "direction-presence" "a Presence from a client closes" => direction(pb::Presence::default().into());
    "4" "direction-error" "an Error from a client closes" => direction(pb::Error::default().into());
    "4" "direction-login-ok" "a LoginOk from a client closes" => direction(pb::LoginOk::default().into());
    "4" "direction-expired" "an Expired from a client closes" => direction(pb::Expired::default().into());
    "4" "direction-group-info" "a GroupInfo from a client closes" => direction(pb::GroupInfo::default().into());
    "4" "direction-group-list" "a GroupList from a client closes" => direction(pb::GroupList::default().into());
    "4" "direction-keys-result" "a KeysResult from a client closes" => direction(pb::KeysResult::default().into());
    "4" "direction-keys-status" "a KeysStatus from a client closes" => direction(pb::KeysStatus::default().into());
    "4" "direction-redirect" "a Redirect from a client closes" => direction(pb::Redirect::default().into());
    "4" "direction-done" "a Done from a client closes" => direction(pb::Done::default().into());
    "4" "direction-linked" "a Linked from a client closes" => direction(pb::Linked::default().into());
    "4" "direction-device-list" "a DeviceList from a client closes" => direction(pb::DeviceList::default().into());
    "4" "direction-device-mismatch" "a DeviceMismatch from a client closes" => direction(pb::DeviceMismatch::default().into());
    "4" "direction-invite" "an Invite from a client closes" => direction(pb::Invite::default().into());
    "3.2" "direction-login-in-session" "a Login inside a session closes" => direction(pb::Login::default().into());
    "3.2" "direction-register-in-session" "a Register inside a session closes" => direction(pb::Register::default().into());
    "5.1" "send-sent" "a Send is answered Sent and delivered" => send_sent;
    "5.1" "send-retry" "a repeated Send gets the original Sent and is delivered once" => send_retry;
    "5.1" "send-id-reused" "the same id with other content is answered ID_REUSED, nothing stored" => send_id_reused;
    "5.1" "send-id-zero" "a Send with id 0 is a connection-level BAD_REQUEST and stores nothing" => send_id_zero;
    "5.1" "send-no-recipient" "a Send with neither to nor group is answered BAD_REQUEST" => send_no_recipient;
    "5.1" "send-two-recipients" "a Send with both to and group is answered BAD_REQUEST" => send_two_recipients;
    "5.1" "send-unknown-account" "a Send to an account that does not exist is answered NOT_FOUND" => send_unknown;
    "5.1" "send-to-self" "a Send to one's own account reaches the account's other devices" => send_to_self;
    "5.1" "send-payload-and-per-device" "a 1:1 Send with both payload and per_device is BAD_REQUEST, nothing stored" => send_payload_and_per_device;
    "5.1" "send-per-device-in-payload" "a 1:1 per-device ciphertext arrives as Deliver.payload, device_payload empty" => send_per_device_in_payload;
    "5.2" "deliver-window" "at most window entries unacked; pending is the inbox depth; order kept" => deliver_window;
    "5.3" "receipts" "the sender gets DELIVERED after the ack and READ after the reader's receipt" => receipts;
    "5.5" "login-unknown-key" "IK with an unregistered key is answered UNKNOWN_DEVICE" => login_unknown_key;
    "5.5" "login-other-account" "a Login naming another account's ids is answered UNKNOWN_DEVICE" => login_other_account;
    "5.5" "login-account-zero" "a Login with account 0 is found by its key" => login_account_zero;
    "5.5" "register-existing-key" "Register with a registered key logs that device in" => register_existing;
    "5.5" "login-replaces" "a second login gets the first connection REPLACED and closed" => login_replaces;
    "5.5" "link-device" "LinkDevice is answered Linked and the new device logs in" => link_device;
    "5.5" "link-same-key-twice" "linking a key the account has answers that device; nothing is added" => link_same_key;
    "5.5" "link-own-key" "linking the requesting device's own key is BAD_REQUEST" => link_own_key;
    "5.5" "link-other-accounts-key" "linking another account's device key is FORBIDDEN" => link_other_accounts_key;
    "5.5" "link-seventeenth-device" "a 17th device is TOO_LARGE" => link_seventeenth;
    "5.6" "group-notice-to-maker" "the device that makes a group change gets its notice as an inbox entry" => group_notice_to_maker;
    "5.8" "presence-states-before-done" "PresenceSubscribe: each account's state, then Done" => presence_states;
    "5.8" "presence-unknown-account" "a subscription naming an unknown account is answered NOT_FOUND" => presence_unknown;
    "5.8" "typing-relayed" "Typing reaches the peer's connected device as Typing{peer: sender}" => typing_relayed;
    "5.7" "keys-handed-out-once" "each one-time prekey is handed out once, then the signed prekey alone" => keys_once;
    "5.7" "keys-bad-signature" "an upload whose signed prekey's signature does not verify is BAD_REQUEST" => keys_bad_signature;
    "5.10" "feature-group-create" "GroupCreate: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::GroupCreate { req: 71, ..Default::default() }.into());
    "5.10" "feature-group-add" "GroupAdd: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::GroupAdd { req: 72, group: 1, ..Default::default() }.into());
    "5.10" "feature-group-remove" "GroupRemove: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::GroupRemove { req: 73, group: 1, ..Default::default() }.into());
    "5.10" "feature-group-leave" "GroupLeave: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::GroupLeave { req: 74, group: 1 }.into());
    "5.10" "feature-group-list" "GroupListRequest: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::GroupListRequest { req: 75, ..Default::default() }.into());
    "5.10" "feature-group-send" "a group Send: an answer with its id; NOT_SUPPORTED unless offered" => feature(pb::Send { id: 76, group: 1, payload: Bytes::from_static(b"g"), ..Default::default() }.into());
    "5.10" "feature-keys-upload" "KeysUpload: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::KeysUpload { req: 77, ..Default::default() }.into());
    "5.10" "feature-keys-fetch" "KeysFetch: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::KeysFetch { req: 78, account: 1, ..Default::default() }.into());
    "5.10" "feature-push-token" "PushToken: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::PushToken { req: 79, ..Default::default() }.into());
    "5.10" "feature-presence-subscribe" "PresenceSubscribe: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::PresenceSubscribe { req: 80, ..Default::default() }.into());
    "5.10" "feature-privacy-set" "PrivacySet: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::PrivacySet { req: 81, ..Default::default() }.into());
    "5.10" "feature-unlink-device" "UnlinkDevice: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::UnlinkDevice { req: 82, device: 9 }.into());
    "5.10" "feature-invite-create" "InviteCreate: an answer with its req; NOT_SUPPORTED unless offered" => feature(pb::InviteCreate { req: 83 }.into());
    "5.10" "feature-typing" "Typing is never answered" => typing_unanswered;
    "7.1" "request-req-zero" "a request with req 0 is a connection-level BAD_REQUEST, then close" => request_req_zero;
    "7.1" "request-errors-attributed" "a refused request is answered with its req; the connection stays" => request_errors;
    "6" "keepalive-answered" "a keepalive frame is answered with one" => keepalive_answered;
    "6" "keepalive-idle-close" "a silent session is closed after twice the keepalive interval, not before" => idle_close;
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn code_of(e: &pb::Error) -> String {
    pb::ErrorCode::try_from(e.code).map_or_else(|_| format!("code {}", e.code), |c| c.as_str_name().to_string())
}

fn is_error(m: &Message, code: pb::ErrorCode, req: u64, id: u64) -> bool {
    matches!(m, Message::Error(e) if e.code == code as i32 && e.req == req && e.id == id)
}

fn describe(m: &Message) -> String {
    match m {
        Message::Error(e) => format!("Error{{{}, req {}, id {}}}", code_of(e), e.req, e.id),
        other => other.kind().to_string(),
    }
}

fn describe_all(ms: &[Message]) -> String {
    ms.iter().map(describe).collect::<Vec<_>>().join(", ")
}

/// Opens a raw connection, writes `bytes`, and wants it closed within
/// `within`; returns what the server sent first.
async fn raw_closed(cx: &Ctx, bytes: &[u8], within: Duration) -> Result<Vec<u8>, String> {
    let mut s = dial(cx.target.addr).await?;
    s.write_all(bytes).await.map_err(|e| format!("write: {e}"))?;
    read_to_close(&mut s, within).await
}

fn with_preamble(rest: &[u8]) -> Vec<u8> {
    let mut v = preamble(VERSION).to_vec();
    v.extend_from_slice(rest);
    v
}

/// The frames (kinds) of a raw handshake answer.
fn handshake_kinds(mut bytes: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    while bytes.len() >= 3 {
        let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        kinds.push(bytes[2]);
        bytes = &bytes[(2 + len).min(bytes.len())..];
    }
    kinds
}

// ------------------------------------------------------------------ 1, 3: connection and handshake

async fn preamble_bad_first_byte(cx: &Ctx) -> Outcome {
    let got = raw_closed(cx, b"G", cx.prompt()).await?;
    check(got.is_empty(), || format!("answered {} bytes", got.len()))?;
    Ok(None)
}

async fn preamble_version(cx: &Ctx) -> Outcome {
    let got = raw_closed(cx, &[b'p', b'i', b'p', 0x09], cx.prompt()).await?;
    let want = [0, 2, 7, pb::ErrorCode::UnsupportedVersion as u8];
    check(got == want, || format!("answered {got:02x?}, expected {want:02x?}"))?;
    Ok(None)
}

async fn handshake_keepalive(cx: &Ctx) -> Outcome {
    raw_closed(cx, &with_preamble(&[0, 0]), cx.prompt()).await?;
    Ok(None)
}

async fn handshake_too_long(cx: &Ctx) -> Outcome {
    // Only the length: a server that waits for the body is still open.
    let got = raw_closed(cx, &with_preamble(&[0x04, 0x01]), cx.prompt()).await?;
    check(!handshake_kinds(&got).iter().any(|k| *k != 7), || format!("answered {got:02x?}"))?;
    Ok(None)
}

async fn handshake_unknown_kind(cx: &Ctx) -> Outcome {
    raw_closed(cx, &with_preamble(&wire::handshake_frame(0x09, &[0; 48])), cx.prompt()).await?;
    Ok(None)
}

async fn handshake_server_kinds(cx: &Ctx) -> Outcome {
    for kind in [2u8, 4, 6, 7] {
        raw_closed(cx, &with_preamble(&wire::handshake_frame(kind, &[0; 48])), cx.prompt())
            .await
            .map_err(|e| format!("kind {kind}: {e}"))?;
    }
    Ok(None)
}

/// An IK hello carrying `payload` from `key` must be refused unanswered.
async fn hello_refused(cx: &Ctx, key: &StaticKeypair, payload: &[u8]) -> Outcome {
    let got = raw_closed(cx, &wire::crafted_ik(key, &cx.target.key, payload, true), ANSWER).await?;
    check(!handshake_kinds(&got).contains(&2), || "the server answered with an IkReply".into())?;
    Ok(None)
}

async fn hello_extra(cx: &Ctx) -> Outcome {
    let (d, _) = cx.register().await?;
    let login: Message = pb::Login { account: d.account, device: d.device, ..Default::default() }.into();
    hello_refused(cx, &d.key, &packet(&[login, pb::Ping { id: 1 }.into()])).await
}

async fn hello_not_login(cx: &Ctx) -> Outcome {
    hello_refused(cx, &StaticKeypair::generate(), &packet(&[pb::Ping { id: 1 }.into()])).await
}

fn check_login_ok(ok: &pb::LoginOk) -> Result<(), String> {
    check(ok.window >= 1, || "LoginOk.window is 0".into())?;
    check(ok.keepalive_secs >= 1, || "LoginOk.keepalive_secs is 0".into())?;
    check(ok.server_time > 1_600_000_000, || format!("LoginOk.server_time {} is not a Unix time", ok.server_time))
}

async fn ik_register(cx: &Ctx) -> Outcome {
    let (_, w) = cx.register().await?;
    check_login_ok(&w.login)?;
    check(w.login.new_server_key.is_empty(), || "new_server_key set for the current key".into())?;
    Ok(None)
}

async fn ik_login(cx: &Ctx) -> Outcome {
    let (d, first) = cx.register().await?;
    drop(first);
    let (w, inits) = Wire::ik(cx.target.addr, &d.key, &cx.target.key, login_hello(d.account, d.device, 0), false)
        .await
        .map_err(|e| e.to_string())?;
    check(inits == 1, || "took a retry".into())?;
    check((w.login.account, w.login.device) == (d.account, d.device), || {
        format!("LoginOk names {}/{}, registered as {}/{}", w.login.account, w.login.device, d.account, d.device)
    })?;
    check_login_ok(&w.login)?;
    check(w.login.new_server_key.is_empty(), || "new_server_key set for the current key".into())?;
    Ok(None)
}

async fn xx_reply_empty(cx: &Ctx) -> Outcome {
    let mut s = dial(cx.target.addr).await?;
    let (payload, _) = wire::xx_reply(&mut s, &StaticKeypair::generate(), true).await?;
    check(payload.is_empty(), || format!("XxReply carried {} payload bytes", payload.len()))?;
    Ok(None)
}

fn register_hello(cx: &Ctx) -> Hello {
    Hello::Register(pb::Register { invite: wire::text(&cx.invite()), device_name: "xx".into(), ..Default::default() })
}

async fn xx_register(cx: &Ctx) -> Outcome {
    let w =
        Wire::xx(cx.target.addr, &StaticKeypair::generate(), register_hello(cx)).await.map_err(|e| e.to_string())?;
    check(w.server_key == cx.target.key, || format!("XxReply proved key {}, not {}", w.server_key, cx.target.key))?;
    check(w.login.account != 0, || "LoginOk.account is 0".into())?;
    check_login_ok(&w.login)?;
    Ok(None)
}

async fn xx_login(cx: &Ctx) -> Outcome {
    let (d, first) = cx.register().await?;
    drop(first);
    let w = Wire::xx(cx.target.addr, &d.key, login_hello(d.account, d.device, 0)).await.map_err(|e| e.to_string())?;
    check((w.login.account, w.login.device) == (d.account, d.device), || "LoginOk names other ids".into())?;
    Ok(None)
}

async fn xx_init_payload(cx: &Ctx) -> Outcome {
    let got = raw_closed(cx, &wire::crafted_xx_init(&StaticKeypair::generate(), b"hi"), cx.prompt()).await?;
    check(!handshake_kinds(&got).contains(&4), || "the server answered with an XxReply".into())?;
    Ok(None)
}

async fn retry_stale(cx: &Ctx) -> Outcome {
    let (d, first) = cx.register().await?;
    drop(first);
    let stale = *StaticKeypair::generate().public();
    match Wire::ik(cx.target.addr, &d.key, &stale, login_hello(d.account, d.device, 0), false).await {
        Err(Refusal::Retry(k)) => check(k == cx.target.key, || format!("Retry offered {k}, not {}", cx.target.key))?,
        Err(e) => return Err(format!("expected Retry: {e}")),
        Ok(_) => return Err("a stale key logged in".into()),
    }
    let (w, inits) = Wire::ik(cx.target.addr, &d.key, &stale, login_hello(d.account, d.device, 0), true)
        .await
        .map_err(|e| format!("after Retry: {e}"))?;
    check(inits == 2 && w.login.account == d.account, || "the retried IkInit did not log in".into())?;
    Ok(None)
}

async fn retry_once(cx: &Ctx) -> Outcome {
    let (d, first) = cx.register().await?;
    drop(first);
    let payload = packet(&[pb::Login { account: d.account, device: d.device, ..Default::default() }.into()]);
    let mut s = dial(cx.target.addr).await?;
    let stale = *StaticKeypair::generate().public();
    s.write_all(&wire::crafted_ik(&d.key, &stale, &payload, true)).await.map_err(|e| e.to_string())?;
    // The Retry: 2 length bytes, the kind, 32 key bytes.
    let mut retry = [0u8; 35];
    tokio::time::timeout(ANSWER, tokio::io::AsyncReadExt::read_exact(&mut s, &mut retry))
        .await
        .map_err(|_| "no Retry".to_string())?
        .map_err(|e| format!("reading Retry: {e}"))?;
    check(retry[..3] == [0, 33, 6], || format!("expected a Retry frame, got {:02x?}", &retry[..3]))?;
    let other = *StaticKeypair::generate().public();
    s.write_all(&wire::crafted_ik(&d.key, &other, &payload, false)).await.map_err(|e| e.to_string())?;
    let got = read_to_close(&mut s, ANSWER).await?;
    check(!handshake_kinds(&got).contains(&6), || "a second Retry".into())?;
    Ok(None)
}

async fn retry_same_key(cx: &Ctx) -> Outcome {
    let (d, first) = cx.register().await?;
    drop(first);
    let payload = packet(&[pb::Login { account: d.account, device: d.device, ..Default::default() }.into()]);
    let mut damaged = wire::crafted_ik(&d.key, &cx.target.key, &payload, true);
    // The last byte is the payload's tag: the frame is whole, the key the
    // right one, and it does not decrypt.
    *damaged.last_mut().ok_or("an empty IkInit")? ^= 0x01;
    let mut s = dial(cx.target.addr).await?;
    s.write_all(&damaged).await.map_err(|e| e.to_string())?;
    let offered = wire::read_retry(&mut s).await?;
    check(offered == cx.target.key, || format!("Retry offered {offered}, the IkInit used {}", cx.target.key))?;
    // Not a key change: IK again with the same key, on the same connection.
    let (w, _) = Wire::ik_on(s, &d.key, &offered, login_hello(d.account, d.device, 0), false, false)
        .await
        .map_err(|e| format!("IK again with the same key: {e}"))?;
    check(w.login.account == d.account, || "logged in as another account".into())?;
    Ok(None)
}

async fn retry_then_xx(cx: &Ctx) -> Outcome {
    let (d, first) = cx.register().await?;
    drop(first);
    let payload = packet(&[pb::Login { account: d.account, device: d.device, ..Default::default() }.into()]);
    let stale = *StaticKeypair::generate().public();
    let mut s = dial(cx.target.addr).await?;
    s.write_all(&wire::crafted_ik(&d.key, &stale, &payload, true)).await.map_err(|e| e.to_string())?;
    wire::read_retry(&mut s).await?;
    let (reply, key) = wire::xx_reply(&mut s, &d.key, false).await.map_err(|e| format!("XX after Retry: {e}"))?;
    check(key == cx.target.key, || format!("XxReply proved {key}, the server's key is {}", cx.target.key))?;
    check(reply.is_empty(), || format!("XxReply carried {} payload bytes", reply.len()))?;
    Ok(None)
}

async fn retired_key(cx: &Ctx) -> Outcome {
    let Some(retired) = cx.target.retired else {
        return Ok(Some("no --retired-key given".into()));
    };
    let (d, first) = cx.register().await?;
    drop(first);
    let (w, inits) = Wire::ik(cx.target.addr, &d.key, &retired, login_hello(d.account, d.device, 0), false)
        .await
        .map_err(|e| e.to_string())?;
    check(inits == 1, || "took a retry".into())?;
    let told = PublicKey::from_slice(&w.login.new_server_key);
    check(told == Some(cx.target.key), || format!("LoginOk.new_server_key is {told:?}, not {}", cx.target.key))?;
    Ok(None)
}

async fn timeout_silent(cx: &Ctx) -> Outcome {
    let within = cx.target.handshake_timeout + Duration::from_secs(5);
    raw_closed(cx, b"", within).await?;
    Ok(None)
}

async fn timeout_partial(cx: &Ctx) -> Outcome {
    let within = cx.target.handshake_timeout + Duration::from_secs(5);
    raw_closed(cx, &with_preamble(&[0x00, 0x80, 1, 2, 3]), within).await?;
    Ok(None)
}

// ------------------------------------------------------------------ 2: transport

/// Sends `bytes` on a fresh session and wants it closed without a Pong.
async fn session_closed_by(cx: &Ctx, make: impl FnOnce(&mut Wire) -> Result<Vec<u8>, String>) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let bytes = make(&mut w)?;
    w.send_bytes(&bytes).await?;
    let got = w.expect_close(ANSWER).await?;
    check(!got.iter().any(|m| matches!(m, Message::Pong(p) if p.id == 2)), || {
        format!("processed the bad frame: {}", describe_all(&got))
    })?;
    Ok(None)
}

async fn transport_tampered(cx: &Ctx) -> Outcome {
    session_closed_by(cx, |w| {
        let mut f = w.seal(&[pb::Ping { id: 2 }.into()])?;
        let last = f.len() - 1;
        f[last] ^= 0x01;
        Ok(f)
    })
    .await
}

async fn transport_replayed(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let f = w.seal(&[pb::Ping { id: 1 }.into()])?;
    w.send_bytes(&[f.clone(), f].concat()).await?;
    let got = w.expect_close(ANSWER).await?;
    let pongs = got.iter().filter(|m| matches!(m, Message::Pong(_))).count();
    check(pongs <= 1, || format!("answered the replayed frame: {}", describe_all(&got)))?;
    Ok(None)
}

async fn transport_reordered(cx: &Ctx) -> Outcome {
    session_closed_by(cx, |w| {
        let first = w.seal(&[pb::Ping { id: 1 }.into()])?;
        let second = w.seal(&[pb::Ping { id: 2 }.into()])?;
        Ok([second, first].concat())
    })
    .await
}

async fn transport_truncated(cx: &Ctx) -> Outcome {
    session_closed_by(cx, |_| Ok(vec![0, 5, 1, 2, 3, 4, 5])).await
}

// ------------------------------------------------------------------ 4: packets

/// Sends `plain` as a packet and wants the session closed.
async fn packet_closes(cx: &Ctx, plain: Vec<u8>) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send_raw_packet(&plain).await?;
    let got = w.expect_close(ANSWER).await?;
    check(!got.iter().any(|m| matches!(m, Message::Pong(_))), || {
        format!("processed part of the bad packet: {}", describe_all(&got))
    })?;
    Ok(None)
}

fn ping_bytes(id: u64) -> Vec<u8> {
    packet(&[pb::Ping { id }.into()])
}

async fn packet_unknown_kind(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let mut plain = ld(1000, &[1, 2]);
    plain.extend(field(1001, 0, &varint(5)));
    plain.extend(field(1002, 5, &[0; 4]));
    plain.extend(field(1003, 1, &[0; 8]));
    plain.extend(ping_bytes(7));
    w.send_raw_packet(&plain).await?;
    w.expect("Pong 7", |m| matches!(m, Message::Pong(p) if p.id == 7).then_some(())).await?;
    Ok(None)
}

async fn message_unknown_field(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    // Ping { id: 7, field 10 = 1, field 11 = "x" }.
    let body = [0x08, 7, 0x50, 1, 0x5a, 1, b'x'];
    w.send_raw_packet(&ld(8, &body)).await?;
    w.expect("Pong 7", |m| matches!(m, Message::Pong(p) if p.id == 7).then_some(())).await?;
    Ok(None)
}

async fn packet_wrong_wire_type(cx: &Ctx) -> Outcome {
    // Ping (field 8) as a varint, then a valid Ping that must not be answered.
    let mut plain = field(8, 0, &varint(1));
    plain.extend(ping_bytes(1));
    packet_closes(cx, plain).await
}

async fn message_wrong_wire_type(cx: &Ctx) -> Outcome {
    // Ping { id (a varint field) as length-delimited }.
    let mut plain = ld(8, &ld(1, &[7]));
    plain.extend(ping_bytes(1));
    packet_closes(cx, plain).await
}

async fn packet_group_wire_type(cx: &Ctx) -> Outcome {
    let mut plain = ping_bytes(1);
    plain.extend(field(1000, 3, &[]));
    packet_closes(cx, plain).await
}

async fn packet_past_end(cx: &Ctx) -> Outcome {
    let mut plain = ping_bytes(1);
    plain.extend([0x42, 0x0a, 0x08, 0x01]);
    packet_closes(cx, plain).await
}

async fn packet_too_many(cx: &Ctx) -> Outcome {
    let pings: Vec<Message> = (0..1_025).map(|_| pb::Ping { id: 1 }.into()).collect();
    packet_closes(cx, packet(&pings)).await
}

async fn packet_empty(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send_raw_packet(&[]).await?;
    let before = w.ping(9).await?;
    check(before.iter().all(|m| !matches!(m, Message::Error(_))), || format!("answered {}", describe_all(&before)))?;
    Ok(None)
}

/// The id an answer carries, to match it to its request.
fn answer_key(m: &Message) -> Option<String> {
    Some(match m {
        Message::Sent(s) => format!("send {}", s.id),
        Message::Error(e) if e.id != 0 => format!("send {}", e.id),
        Message::DeviceMismatch(d) => format!("send {}", d.id),
        Message::Pong(p) => format!("ping {}", p.id),
        Message::Error(e) if e.req != 0 => format!("req {}", e.req),
        Message::DeviceList(d) => format!("req {}", d.req),
        Message::Linked(l) => format!("req {}", l.req),
        Message::Done(d) => format!("req {}", d.req),
        Message::GroupInfo(g) if g.req != 0 => format!("req {}", g.req),
        Message::GroupList(g) => format!("req {}", g.req),
        Message::KeysResult(k) => format!("req {}", k.req),
        Message::Invite(i) => format!("req {}", i.req),
        _ => return None,
    })
}

async fn answer_order(cx: &Ctx) -> Outcome {
    let (a, mut w) = cx.register().await?;
    // Answers that need storage (Sent, DeviceList) between answers that
    // need none (Pong, a refused Send): one packet, so one read.
    let requests: Vec<Message> = vec![
        pb::Send { id: 1, to: a.account, payload: wire::text("note"), ..Default::default() }.into(),
        pb::Ping { id: 2 }.into(),
        pb::DeviceListRequest { req: 3, account: 0 }.into(),
        pb::Ping { id: 4 }.into(),
        pb::Send { id: 5, ..Default::default() }.into(),
        pb::Ping { id: 6 }.into(),
        pb::LinkDevice { req: 7, key: Bytes::from_static(b"short"), name: String::new() }.into(),
        pb::Ping { id: 8 }.into(),
    ];
    let want = ["send 1", "ping 2", "req 3", "ping 4", "send 5", "ping 6", "req 7", "ping 8"];
    w.send(&requests).await?;
    let mut got = Vec::new();
    while got.len() < want.len() {
        if let Some(k) = answer_key(&w.recv().await?) {
            got.push(k);
        }
    }
    check(got == want, || format!("answers came as {got:?}, requests were {want:?}"))?;
    Ok(None)
}

async fn direction(cx: &Ctx, m: Message) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send(&[m, pb::Ping { id: 2 }.into()]).await?;
    let got = w.expect_close(ANSWER).await?;
    check(!got.iter().any(|m| matches!(m, Message::Pong(_))), || {
        format!("processed what followed: {}", describe_all(&got))
    })?;
    Ok(None)
}

// ------------------------------------------------------------------ 5: messages

fn send(id: u64, to: u64, body: &str) -> Message {
    pb::Send { id, to, payload: wire::text(body), ..Default::default() }.into()
}

async fn expect_sent(w: &mut Wire, id: u64) -> Result<pb::Sent, String> {
    let m = w
        .expect(&format!("the answer to Send {id}"), |m| match m {
            Message::Sent(s) if s.id == id => Some(m.clone()),
            Message::Error(e) if e.id == id => Some(m.clone()),
            _ => None,
        })
        .await?;
    match m {
        Message::Sent(s) => Ok(s),
        other => Err(format!("Send {id} was answered {}", describe(&other))),
    }
}

async fn expect_send_error(w: &mut Wire, id: u64, code: pb::ErrorCode) -> Result<(), String> {
    let m = w
        .expect(&format!("the answer to Send {id}"), |m| match m {
            Message::Sent(s) if s.id == id => Some(m.clone()),
            Message::Error(e) if e.id == id => Some(m.clone()),
            _ => None,
        })
        .await?;
    check(is_error(&m, code, 0, id), || format!("Send {id} was answered {}, not {}", describe(&m), code.as_str_name()))
}

fn delivers(ms: &[Message]) -> Vec<&pb::Deliver> {
    ms.iter()
        .filter_map(|m| match m {
            Message::Deliver(d) => Some(d),
            _ => None,
        })
        .collect()
}

async fn send_sent(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (_, mut wb) = cx.register().await?;
    let b = wb.login.account;
    wa.send(&[send(1, b, "hello")]).await?;
    let sent = expect_sent(&mut wa, 1).await?;
    check(sent.seq >= 1 && sent.time > 1_600_000_000, || format!("Sent {sent:?}"))?;
    let d = wb.expect("the Deliver", |m| if let Message::Deliver(d) = m { Some(d.clone()) } else { None }).await?;
    check(d.from == a.account && d.seq == sent.seq && &d.payload[..] == b"hello" && d.inbox != 0, || {
        format!("delivered {d:?}")
    })?;
    Ok(None)
}

async fn send_retry(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (_, mut wb) = cx.register().await?;
    let b = wb.login.account;
    wa.send(&[send(1, b, "once")]).await?;
    let first = expect_sent(&mut wa, 1).await?;
    wa.send(&[send(1, b, "once")]).await?;
    let again = expect_sent(&mut wa, 1).await?;
    check(again == first, || format!("the retry got {again:?}, the original {first:?}"))?;
    drop(wa);
    let mut wa = cx.login(&a).await?;
    wa.send(&[send(1, b, "once")]).await?;
    let later = expect_sent(&mut wa, 1).await?;
    check(later == first, || format!("the retry on a new connection got {later:?}, the original {first:?}"))?;
    let got = wb.drain(Duration::from_secs(1)).await?;
    let n = delivers(&got).iter().filter(|d| d.from == a.account).count();
    check(n == 1, || format!("delivered {n} times"))?;
    Ok(None)
}

async fn send_id_reused(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (_, mut wb) = cx.register().await?;
    let b = wb.login.account;
    wa.send(&[send(1, b, "first")]).await?;
    expect_sent(&mut wa, 1).await?;
    wa.send(&[send(1, b, "second")]).await?;
    expect_send_error(&mut wa, 1, pb::ErrorCode::IdReused).await?;
    wa.ping(2).await?;
    let got = wb.drain(Duration::from_secs(1)).await?;
    let bodies: Vec<&[u8]> = delivers(&got).iter().filter(|d| d.from == a.account).map(|d| &d.payload[..]).collect();
    check(bodies == [&b"first"[..]], || format!("delivered {bodies:?}"))?;
    Ok(None)
}

async fn send_id_zero(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (_, mut wb) = cx.register().await?;
    let b = wb.login.account;
    for body in ["first", "second"] {
        wa.send(&[send(0, b, body)]).await?;
        let got = wa.expect_close(ANSWER).await?;
        check(got.last().is_some_and(|m| is_error(m, pb::ErrorCode::BadRequest, 0, 0)), || {
            format!("answered {}, expected Error{{BAD_REQUEST, req 0, id 0}} and a close", describe_all(&got))
        })?;
        check(!got.iter().any(|m| matches!(m, Message::Sent(_))), || "answered Sent".into())?;
        wa = cx.login(&a).await?;
    }
    let got = wb.drain(Duration::from_secs(1)).await?;
    check(delivers(&got).is_empty(), || "a Send with id 0 was delivered".into())?;
    Ok(None)
}

async fn send_no_recipient(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send(&[send(7, 0, "to nobody")]).await?;
    expect_send_error(&mut w, 7, pb::ErrorCode::BadRequest).await?;
    w.ping(2).await?;
    Ok(None)
}

async fn send_two_recipients(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let (_, wb) = cx.register().await?;
    let m = pb::Send { id: 8, to: wb.login.account, group: 1, payload: wire::text("both"), ..Default::default() };
    w.send(&[m.into()]).await?;
    expect_send_error(&mut w, 8, pb::ErrorCode::BadRequest).await?;
    w.ping(2).await?;
    Ok(None)
}

async fn send_unknown(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send(&[send(9, 1 << 62, "to no one")]).await?;
    expect_send_error(&mut w, 9, pb::ErrorCode::NotFound).await?;
    w.ping(2).await?;
    Ok(None)
}

/// Links a new device to `w`'s account; returns it.
async fn link(w: &mut Wire, req: u64) -> Result<Device, String> {
    let key = StaticKeypair::generate();
    let m = pb::LinkDevice { req, key: Bytes::copy_from_slice(key.public().as_bytes()), name: "second".into() };
    w.send(&[m.into()]).await?;
    let answer = w
        .expect("the answer to LinkDevice", |m| match m {
            Message::Linked(l) if l.req == req => Some(Ok(l.device)),
            Message::Error(e) if e.req == req => Some(Err(describe(m))),
            _ => None,
        })
        .await?;
    let device = answer.map_err(|e| format!("LinkDevice answered {e}"))?;
    Ok(Device { key, account: w.login.account, device })
}

async fn send_to_self(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let a2 = link(&mut wa, 1).await?;
    let mut w2 = cx.login(&Device { account: 0, ..a2.clone() }).await?;
    wa.send(&[send(1, a.account, "note to self")]).await?;
    let sent = expect_sent(&mut wa, 1).await?;
    let d = w2.expect("the note", |m| if let Message::Deliver(d) = m { Some(d.clone()) } else { None }).await?;
    check(d.from == a.account && d.seq == sent.seq && &d.payload[..] == b"note to self", || {
        format!("delivered {d:?}")
    })?;
    let own = wa.drain(Duration::from_millis(500)).await?;
    check(delivers(&own).is_empty(), || "the sending device got its own message".into())?;
    Ok(None)
}

async fn send_payload_and_per_device(cx: &Ctx) -> Outcome {
    let (_, mut wa) = cx.register().await?;
    let (b, mut wb) = cx.register().await?;
    let m = pb::Send {
        id: 3,
        to: b.account,
        payload: wire::text("for every device"),
        per_device: vec![pb::DeviceCiphertext { account: b.account, device: b.device, payload: wire::text("for b") }],
        ..Default::default()
    };
    wa.send(&[m.into()]).await?;
    expect_send_error(&mut wa, 3, pb::ErrorCode::BadRequest).await?;
    wa.ping(4).await?;
    let got = wb.drain(Duration::from_millis(500)).await?;
    check(delivers(&got).is_empty(), || format!("delivered {}", describe_all(&got)))?;
    Ok(None)
}

async fn send_per_device_in_payload(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (b, mut wb) = cx.register().await?;
    let b2 = link(&mut wb, 1).await?;
    let mut w2 = cx.login(&Device { account: 0, ..b2.clone() }).await?;
    let cipher =
        |device: u32, text: &str| pb::DeviceCiphertext { account: b.account, device, payload: wire::text(text) };
    let m = pb::Send {
        id: 1,
        to: b.account,
        per_device: vec![cipher(b.device, "for the first"), cipher(b2.device, "for the second")],
        ..Default::default()
    };
    wa.send(&[m.into()]).await?;
    let sent = expect_sent(&mut wa, 1).await?;
    for (w, want) in [(&mut wb, "for the first"), (&mut w2, "for the second")] {
        let d = w.expect("the Deliver", |m| if let Message::Deliver(d) = m { Some(d.clone()) } else { None }).await?;
        check(d.from == a.account && d.seq == sent.seq && &d.payload[..] == want.as_bytes(), || {
            format!("delivered {d:?}, expected payload {want:?}")
        })?;
        check(d.device_payload.is_empty(), || format!("device_payload set in 1:1: {d:?}"))?;
    }
    Ok(None)
}

async fn deliver_window(cx: &Ctx) -> Outcome {
    let (_, mut wa) = cx.register().await?;
    let (b, wb) = cx.register().await?;
    let window = wb.login.window as usize;
    drop(wb);
    if window > 1_000 {
        return Ok(Some(format!("the window ({window}) is too large to fill here")));
    }
    let n = window + 3;
    let msgs: Vec<Message> = (1..=n as u64).map(|i| send(i, b.account, &format!("m{i}"))).collect();
    wa.send(&msgs).await?;
    for i in 1..=n as u64 {
        expect_sent(&mut wa, i).await?;
    }
    let mut wb = cx.login(&b).await?;
    check(wb.login.pending as usize == n, || format!("LoginOk.pending is {}, the inbox holds {n}", wb.login.pending))?;
    let first = wb.drain(Duration::from_millis(1_500)).await?;
    let first = delivers(&first).into_iter().cloned().collect::<Vec<_>>();
    check(first.len() == window, || format!("{} deliveries before any ack, the window is {window}", first.len()))?;
    check(first.windows(2).all(|p| p[0].inbox < p[1].inbox && p[0].seq < p[1].seq), || "out of order".into())?;
    let last = first.last().map_or(0, |d| d.inbox);
    wb.send(&[pb::Ack { through: last, ids: vec![] }.into()]).await?;
    let rest = wb.drain(Duration::from_millis(1_500)).await?;
    let rest = delivers(&rest).into_iter().cloned().collect::<Vec<_>>();
    check(rest.len() == 3, || format!("{} deliveries after the ack, 3 were left", rest.len()))?;
    check(rest.first().is_some_and(|d| d.inbox > last), || "redelivered an acked entry".into())?;
    // Unacked entries come again on the next connection, the acked never.
    drop(wb);
    let mut wb = cx.login(&b).await?;
    check(wb.login.pending == 3, || format!("pending {} after a reconnect, 3 unacked", wb.login.pending))?;
    let again = wb.drain(Duration::from_millis(1_000)).await?;
    let ids: Vec<u64> = delivers(&again).iter().map(|d| d.inbox).collect();
    let want: Vec<u64> = rest.iter().map(|d| d.inbox).collect();
    check(ids == want, || format!("redelivered {ids:?}, unacked were {want:?}"))?;
    // An ack carried by the login itself.
    drop(wb);
    let mut wb = cx.login_acked(&b, *want.last().unwrap_or(&0)).await?;
    check(wb.login.pending == 0, || format!("pending {} after Login.acked_through covered all", wb.login.pending))?;
    let after = wb.drain(Duration::from_millis(500)).await?;
    check(delivers(&after).is_empty(), || "redelivered what the login acked".into())?;
    Ok(None)
}

async fn receipts(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (b, mut wb) = cx.register().await?;
    wa.send(&[send(1, b.account, "read me")]).await?;
    let sent = expect_sent(&mut wa, 1).await?;
    let d = wb.expect("the Deliver", |m| if let Message::Deliver(d) = m { Some(d.clone()) } else { None }).await?;
    wb.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into()]).await?;
    let kind = |k: pb::ReceiptKind| {
        move |m: &Message| match m {
            Message::Receipt(r) if r.kind == k as i32 => Some(*r),
            _ => None,
        }
    };
    let delivered = wa.expect("the DELIVERED receipt", kind(pb::ReceiptKind::Delivered)).await?;
    check(delivered.peer == b.account && delivered.through >= sent.seq && delivered.inbox != 0, || {
        format!("DELIVERED receipt {delivered:?}")
    })?;
    let read =
        pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer: a.account, through: d.seq, ..Default::default() };
    wb.send(&[read.into()]).await?;
    let r = wa.expect("the READ receipt", kind(pb::ReceiptKind::Read)).await?;
    check(r.peer == b.account && r.through == sent.seq && r.inbox > delivered.inbox, || format!("READ receipt {r:?}"))?;
    Ok(None)
}

async fn expect_refused(cx: &Ctx, key: &StaticKeypair, hello: Hello, code: pb::ErrorCode) -> Outcome {
    match Wire::ik(cx.target.addr, key, &cx.target.key, hello, false).await {
        Err(Refusal::Code(c)) if c == code => Ok(None),
        Err(e) => Err(format!("expected {}: {e}", code.as_str_name())),
        Ok((w, _)) => Err(format!("logged in as account {} device {}", w.login.account, w.login.device)),
    }
}

async fn login_unknown_key(cx: &Ctx) -> Outcome {
    expect_refused(cx, &StaticKeypair::generate(), login_hello(1, 0, 0), pb::ErrorCode::UnknownDevice).await
}

async fn login_other_account(cx: &Ctx) -> Outcome {
    let (a, _) = cx.register().await?;
    let (b, _) = cx.register().await?;
    expect_refused(cx, &b.key, login_hello(a.account, a.device, 0), pb::ErrorCode::UnknownDevice).await?;
    expect_refused(cx, &b.key, login_hello(b.account, b.device + 1, 0), pb::ErrorCode::UnknownDevice).await
}

async fn login_account_zero(cx: &Ctx) -> Outcome {
    let (a, first) = cx.register().await?;
    drop(first);
    let w = cx.login(&Device { account: 0, device: 0, ..a.clone() }).await?;
    check((w.login.account, w.login.device) == (a.account, a.device), || "LoginOk names other ids".into())?;
    Ok(None)
}

async fn register_existing(cx: &Ctx) -> Outcome {
    let (a, first) = cx.register().await?;
    drop(first);
    let (w, _) =
        Wire::ik(cx.target.addr, &a.key, &cx.target.key, register_hello(cx), false).await.map_err(|e| e.to_string())?;
    check((w.login.account, w.login.device) == (a.account, a.device), || {
        format!("registered again as {}/{}, the key is {}/{}", w.login.account, w.login.device, a.account, a.device)
    })?;
    Ok(None)
}

async fn login_replaces(cx: &Ctx) -> Outcome {
    let (a, mut first) = cx.register().await?;
    let mut second = cx.login(&a).await?;
    let got = first.expect_close(ANSWER).await?;
    check(got.last().is_some_and(|m| is_error(m, pb::ErrorCode::Replaced, 0, 0)), || {
        format!("the first connection got {} before closing", describe_all(&got))
    })?;
    second.ping(1).await?;
    Ok(None)
}

async fn link_device(cx: &Ctx) -> Outcome {
    let (a, mut w) = cx.register().await?;
    let d = link(&mut w, 5).await?;
    check(d.device != a.device, || "the new device got the first device's number".into())?;
    let w2 = cx.login(&Device { account: 0, device: 0, ..d.clone() }).await?;
    check((w2.login.account, w2.login.device) == (a.account, d.device), || "LoginOk names other ids".into())?;
    Ok(None)
}

/// The answer to `LinkDevice{req, key}`: the device, or the error code.
async fn link_key(w: &mut Wire, req: u64, key: &PublicKey) -> Result<Result<u32, pb::ErrorCode>, String> {
    let m = pb::LinkDevice { req, key: Bytes::copy_from_slice(key.as_bytes()), name: "edge".into() };
    w.send(&[m.into()]).await?;
    match answer_to(w, req).await? {
        Message::Linked(l) => Ok(Ok(l.device)),
        Message::Error(e) => Ok(Err(pb::ErrorCode::try_from(e.code).unwrap_or_default())),
        other => Err(format!("LinkDevice answered {}", describe(&other))),
    }
}

async fn link_same_key(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let key = *StaticKeypair::generate().public();
    let first = link_key(&mut w, 1, &key).await?.map_err(|c| format!("the first LinkDevice: {}", c.as_str_name()))?;
    let again = link_key(&mut w, 2, &key).await?;
    check(again == Ok(first), || format!("the same key again: {again:?}, the first answer was device {first}"))?;
    w.send(&[pb::DeviceListRequest { req: 3, account: 0 }.into()]).await?;
    match answer_to(&mut w, 3).await? {
        Message::DeviceList(l) => check(l.devices.len() == 2, || format!("{} devices, 2 expected", l.devices.len()))?,
        other => return Err(format!("DeviceListRequest answered {}", describe(&other))),
    }
    Ok(None)
}

async fn link_own_key(cx: &Ctx) -> Outcome {
    let (d, mut w) = cx.register().await?;
    let got = link_key(&mut w, 1, d.key.public()).await?;
    check(got == Err(pb::ErrorCode::BadRequest), || format!("answered {got:?}"))?;
    w.ping(2).await?;
    Ok(None)
}

async fn link_other_accounts_key(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let (other, _) = cx.register().await?;
    let got = link_key(&mut w, 1, other.key.public()).await?;
    check(got == Err(pb::ErrorCode::Forbidden), || format!("answered {got:?}"))?;
    w.ping(2).await?;
    Ok(None)
}

async fn link_seventeenth(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    for req in 1..=15u64 {
        let got = link_key(&mut w, req, StaticKeypair::generate().public()).await?;
        check(got.is_ok(), || format!("device {} of 16 answered {got:?}", req + 1))?;
    }
    let got = link_key(&mut w, 16, StaticKeypair::generate().public()).await?;
    check(got == Err(pb::ErrorCode::TooLarge), || format!("a 17th device answered {got:?}"))?;
    Ok(None)
}

async fn group_notice_to_maker(cx: &Ctx) -> Outcome {
    let (a, mut w) = cx.register().await?;
    if let Some(skip) = unless_offered(&w, pb::Feature::Groups) {
        return Ok(Some(skip));
    }
    w.send(&[pb::GroupCreate { req: 1, name: wire::text("notice"), ..Default::default() }.into()]).await?;
    // The answer and the notice, in either order (the account is new: its
    // only group is this one).
    let (mut created, mut notice) = (None, None);
    while created.is_none() || notice.is_none() {
        match w.recv().await.map_err(|e| format!("waiting for the answer and the notice: {e}"))? {
            Message::GroupInfo(g) if g.req == 1 => created = Some(g),
            Message::GroupInfo(g) if g.req == 0 => notice = Some(g),
            m @ Message::Error(_) => return Err(format!("GroupCreate answered {}", describe(&m))),
            _ => {}
        }
    }
    let (created, notice) = (created.unwrap_or_default(), notice.unwrap_or_default());
    check(notice.inbox != 0 && notice.by == a.account && notice.group == created.group, || {
        format!("the maker's notice {notice:?}, the answer {created:?}")
    })?;
    Ok(None)
}

/// A key upload with a valid signed prekey and one-time prekeys `ids`.
fn key_upload(req: u64, ids: std::ops::RangeInclusive<u32>) -> pb::KeysUpload {
    use ed25519_dalek::Signer as _;
    let sk = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let mut identity = sk.verifying_key().to_bytes().to_vec();
    identity.extend_from_slice(&rand::random::<[u8; 32]>());
    let key = rand::random::<[u8; 32]>().to_vec();
    let signature = sk.sign(&pipit_protocol::e2e::signed_prekey_message(&identity, 1, &key)).to_bytes();
    pb::KeysUpload {
        req,
        identity: Bytes::from(identity),
        signed: Some(pb::SignedPreKey { id: 1, key: Bytes::from(key), signature: Bytes::copy_from_slice(&signature) }),
        one_time: ids.map(|id| pb::PreKey { id, key: Bytes::copy_from_slice(&rand::random::<[u8; 32]>()) }).collect(),
    }
}

async fn answer_to(w: &mut Wire, req: u64) -> Result<Message, String> {
    let key = format!("req {req}");
    w.expect(&format!("the answer to request {req}"), |m| (answer_key(m)? == key).then(|| m.clone())).await
}

async fn keys_once(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    if !wa.login.features.contains(&(pb::Feature::KeyDirectory as i32)) {
        return Ok(Some("the key directory is not offered".into()));
    }
    wa.send(&[key_upload(1, 1..=2).into()]).await?;
    let up = answer_to(&mut wa, 1).await?;
    check(matches!(up, Message::Done(_)), || format!("the upload was answered {}", describe(&up)))?;
    let (_, mut wb) = cx.register().await?;
    let mut handed = Vec::new();
    for req in 1..=3 {
        wb.send(&[pb::KeysFetch { req, account: a.account, devices: vec![] }.into()]).await?;
        match answer_to(&mut wb, req).await? {
            Message::KeysResult(r) if r.bundles.len() == 1 => handed.push(r.bundles[0].one_time.as_ref().map(|k| k.id)),
            other => return Err(format!("fetch {req} answered {}", describe(&other))),
        }
    }
    check(handed[0].is_some() && handed[1].is_some() && handed[0] != handed[1] && handed[2].is_none(), || {
        format!("one-time prekeys handed out: {handed:?}; want two distinct, then none")
    })?;
    Ok(None)
}

async fn keys_bad_signature(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    if !w.login.features.contains(&(pb::Feature::KeyDirectory as i32)) {
        return Ok(Some("the key directory is not offered".into()));
    }
    let mut u = key_upload(1, 1..=1);
    if let Some(s) = &mut u.signed {
        s.id = 2;
    }
    w.send(&[u.into()]).await?;
    let answer = answer_to(&mut w, 1).await?;
    check(is_error(&answer, pb::ErrorCode::BadRequest, 1, 0), || format!("answered {}", describe(&answer)))?;
    Ok(None)
}

async fn feature(cx: &Ctx, m: Message) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let offered = m.feature().is_some_and(|f| w.login.features.contains(&(f as i32)));
    let (key, is_req) = match (m.request_id(), m.send_id()) {
        (Some(r), _) => (r, true),
        (_, Some(id)) => (id, false),
        _ => return Err("not a request".into()),
    };
    let kind = m.kind();
    w.send(&[m]).await?;
    let answer = w
        .expect(&format!("the answer to {kind}"), |m| {
            let k = answer_key(m)?;
            (k == format!("{} {key}", if is_req { "req" } else { "send" })).then(|| m.clone())
        })
        .await?;
    if offered {
        check(!matches!(&answer, Message::Error(e) if e.code == pb::ErrorCode::NotSupported as i32), || {
            "offered in LoginOk.features, yet answered NOT_SUPPORTED".into()
        })?;
    } else {
        let (req, id) = if is_req { (key, 0) } else { (0, key) };
        check(is_error(&answer, pb::ErrorCode::NotSupported, req, id), || {
            format!("not offered, answered {} instead of NOT_SUPPORTED", describe(&answer))
        })?;
    }
    w.ping(1).await?;
    Ok(None)
}

/// Skips a check of a feature the server does not offer.
fn unless_offered(w: &Wire, f: pb::Feature) -> Option<String> {
    (!w.login.features.contains(&(f as i32))).then(|| format!("{} not offered", f.as_str_name()))
}

async fn presence_states(cx: &Ctx) -> Outcome {
    let (a, _wa) = cx.register().await?;
    let (_, mut w) = cx.register().await?;
    if let Some(skip) = unless_offered(&w, pb::Feature::Presence) {
        return Ok(Some(skip));
    }
    w.send(&[pb::PresenceSubscribe { accounts: vec![a.account], req: 90 }.into()]).await?;
    let mut state = None;
    let answer = w
        .expect("the answer to PresenceSubscribe", |m| match m {
            Message::Presence(p) if p.account == a.account => {
                state = Some(*p);
                None
            }
            Message::Done(d) if d.req == 90 => Some(m.clone()),
            Message::Error(e) if e.req == 90 => Some(m.clone()),
            _ => None,
        })
        .await?;
    check(matches!(answer, Message::Done(_)), || format!("answered {}", describe(&answer)))?;
    let state = state.ok_or("Done came without the account's state before it")?;
    check(state.online && state.last_seen == 0, || format!("a connected account shown as {state:?}"))?;
    Ok(None)
}

async fn presence_unknown(cx: &Ctx) -> Outcome {
    let (a, _wa) = cx.register().await?;
    let (_, mut w) = cx.register().await?;
    if let Some(skip) = unless_offered(&w, pb::Feature::Presence) {
        return Ok(Some(skip));
    }
    w.send(&[pb::PresenceSubscribe { accounts: vec![a.account, 1 << 62], req: 92 }.into()]).await?;
    let answer =
        w.expect("the answer to PresenceSubscribe", |m| (answer_key(m)? == "req 92").then(|| m.clone())).await?;
    check(is_error(&answer, pb::ErrorCode::NotFound, 92, 0), || format!("answered {}", describe(&answer)))?;
    w.ping(1).await?;
    Ok(None)
}

async fn typing_relayed(cx: &Ctx) -> Outcome {
    let (a, mut wa) = cx.register().await?;
    let (b, mut wb) = cx.register().await?;
    if let Some(skip) = unless_offered(&wa, pb::Feature::Typing) {
        return Ok(Some(skip));
    }
    wa.send(&[pb::Typing { peer: b.account, typing: true, ..Default::default() }.into()]).await?;
    let t = wb
        .expect("the relayed Typing", |m| match m {
            Message::Typing(t) => Some(*t),
            _ => None,
        })
        .await?;
    check(t.peer == a.account && t.typing && t.group == 0, || format!("relayed as {t:?}"))?;
    Ok(None)
}

async fn typing_unanswered(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    let (b, _) = cx.register().await?;
    w.send(&[pb::Typing { peer: b.account, typing: true, ..Default::default() }.into()]).await?;
    let before = w.ping(1).await?;
    check(!before.iter().any(|m| matches!(m, Message::Error(_))), || format!("answered {}", describe_all(&before)))?;
    Ok(None)
}

// ------------------------------------------------------------------ 7: errors

async fn request_req_zero(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send(&[pb::DeviceListRequest { req: 0, account: 0 }.into(), pb::Ping { id: 2 }.into()]).await?;
    let got = w.expect_close(ANSWER).await?;
    check(got.last().is_some_and(|m| is_error(m, pb::ErrorCode::BadRequest, 0, 0)), || {
        format!("answered {}, expected Error{{BAD_REQUEST, req 0, id 0}} and a close", describe_all(&got))
    })?;
    check(!got.iter().any(|m| matches!(m, Message::Pong(_))), || "processed what followed".into())?;
    Ok(None)
}

async fn request_errors(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send(&[pb::LinkDevice { req: 11, key: Bytes::from_static(b"not a key"), name: String::new() }.into()]).await?;
    let m = w.expect("the answer to LinkDevice", |m| (answer_key(m)? == "req 11").then(|| m.clone())).await?;
    check(is_error(&m, pb::ErrorCode::BadRequest, 11, 0), || format!("LinkDevice with a bad key: {}", describe(&m)))?;
    w.send(&[pb::DeviceListRequest { req: 12, account: 1 << 62 }.into()]).await?;
    let m = w.expect("the answer to DeviceListRequest", |m| (answer_key(m)? == "req 12").then(|| m.clone())).await?;
    check(is_error(&m, pb::ErrorCode::NotFound, 12, 0), || format!("an unknown account's devices: {}", describe(&m)))?;
    w.ping(13).await?;
    Ok(None)
}

// ------------------------------------------------------------------ 6: keepalive

async fn keepalive_answered(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register().await?;
    w.send_bytes(&[0, 0]).await?;
    loop {
        match w.next(ANSWER).await? {
            Got::Keepalive => return Ok(None),
            Got::Message(_) => {}
            Got::Closed => return Err("closed instead".into()),
        }
    }
}

async fn idle_close(cx: &Ctx) -> Outcome {
    let (_, mut w) = cx.register_with(1).await?;
    let interval = Duration::from_secs(u64::from(w.login.keepalive_secs));
    let limit = interval * 2;
    if limit + Duration::from_secs(5) > cx.target.max_idle_wait {
        return Ok(Some(format!("the granted interval is {interval:?}; raise --max-idle-wait above {limit:?}")));
    }
    let started = Instant::now();
    loop {
        match w.next(limit + Duration::from_secs(5)).await {
            Ok(Got::Closed) => break,
            Ok(Got::Keepalive) => return Err("the server sent a keepalive of its own".into()),
            Ok(Got::Message(m)) if is_error(&m, pb::ErrorCode::Timeout, 0, 0) => {}
            Ok(Got::Message(m)) => return Err(format!("sent {} to an idle session", describe(&m))),
            Err(e) => return Err(format!("not closed after twice the interval ({limit:?}): {e}")),
        }
    }
    let took = started.elapsed();
    // A little slack for the clocks of two processes.
    check(took + Duration::from_millis(500) >= limit, || format!("closed after {took:?}, before {limit:?}"))?;
    Ok(None)
}
