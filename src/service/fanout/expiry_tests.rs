//! Tests of expiry for group entries: bodies and senders.

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::model::unix_now;
use crate::service::settings::Registration;
use crate::service::testing::setup;

#[test]
fn an_expired_group_entry_releases_its_body_and_tells_the_sender_once() {
    let s = setup(Registration::Open);
    let a = s.register(1, "").unwrap();
    let b = s.register(2, "").unwrap();
    let b2 = s.link(b.account, 3);
    let c = s.register(4, "").unwrap();
    let g = s.create_group(a, &[b.account, c.account]).unwrap().group;
    let sent = s.group_send(a, 1, g).unwrap();
    s.fan_out(128);
    let round = s.expire(unix_now() + 101);
    assert!(round.finished && round.expired > 0, "{round:?}");
    for d in [b, b2, c] {
        assert!(s.store.inbox_after(d, 0, 10).unwrap().is_empty());
    }
    let stats = s.store.group_body_stats(Some(g)).unwrap();
    assert_eq!((stats.messages, stats.notices), (0, 0), "every body went with its last reference");
    assert!(s.store.group_counts(g, sent.seq).unwrap().is_none(), "and the counts with the TTL");
    let notices: Vec<pb::Expired> = s
        .store
        .inbox_after(a, 0, 10)
        .unwrap()
        .into_iter()
        .filter_map(|(_, m)| if let Message::Expired(e) = m { Some(e) } else { None })
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!((notices[0].group, notices[0].seq, notices[0].devices, notices[0].peer), (g, sent.seq, 3, 0));
}
