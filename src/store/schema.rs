//! The column families: one per kind of durable state.

/// A column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Table {
    /// Account id to its device list.
    Accounts,
    /// Device static key to the device's address.
    DeviceKeys,
    /// Per-device inbox entries.
    Inbox,
    /// Per-sending-device client message ids already stored.
    Dedup,
    /// Counters: next ids, sequence numbers, receipt high-water marks.
    Counters,
    /// Invite codes.
    Invites,
    /// Groups: name, version, members with the seq they joined (and left).
    Groups,
    /// Which groups an account is in (for listing them).
    GroupMembers,
    /// Group messages and change notices, stored once for every member;
    /// and per-device ciphertexts waiting for their fan-out.
    GroupBodies,
    /// Durable fan-out jobs: which group entry still has members to reach.
    Fanout,
    /// Per group message: delivered and read counts for its sender.
    GroupReceipts,
    /// When each account was last online.
    LastSeen,
    /// Each account's privacy settings.
    Privacy,
    /// Each device's push token.
    PushTokens,
    /// Per-device end-to-end keys: identity, signed prekey, stock bounds.
    E2eKeys,
    /// Per-device one-time prekeys, by slot.
    OneTimeKeys,
    /// A cluster node's outbound queues: what waits to be forwarded to
    /// each other node, until that node acknowledges it.
    Outbound,
    /// `GroupCreate` ids already answered, by creating device.
    GroupCreates,
    /// Per device, conversation and receipt kind: the latest receipt
    /// queued in the inbox.
    QueuedReceipts,
}

impl Table {
    /// Every family, created at open.
    pub const ALL: [Table; 19] = [
        Table::Accounts,
        Table::DeviceKeys,
        Table::Inbox,
        Table::Dedup,
        Table::Counters,
        Table::Invites,
        Table::Groups,
        Table::GroupMembers,
        Table::GroupBodies,
        Table::Fanout,
        Table::GroupReceipts,
        Table::LastSeen,
        Table::Privacy,
        Table::PushTokens,
        Table::E2eKeys,
        Table::OneTimeKeys,
        Table::Outbound,
        Table::GroupCreates,
        Table::QueuedReceipts,
    ];

    /// The family's name in RocksDB (never change one: it names data on
    /// disk).
    pub fn name(self) -> &'static str {
        match self {
            Table::Accounts => "accounts",
            Table::DeviceKeys => "keys",
            Table::Inbox => "inbox",
            Table::Dedup => "dedup",
            Table::Counters => "counters",
            Table::Invites => "invites",
            Table::Groups => "groups",
            Table::GroupMembers => "group_members",
            Table::GroupBodies => "group_bodies",
            Table::Fanout => "fanout",
            Table::GroupReceipts => "group_receipts",
            Table::LastSeen => "last_seen",
            Table::Privacy => "privacy",
            Table::PushTokens => "push_tokens",
            Table::E2eKeys => "e2e_keys",
            Table::OneTimeKeys => "one_time_keys",
            Table::Outbound => "outbound",
            Table::GroupCreates => "group_creates",
            Table::QueuedReceipts => "queued_receipts",
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<Table> {
        Table::ALL.get(usize::from(b)).copied()
    }

    pub(crate) fn as_u8(self) -> u8 {
        Table::ALL.iter().position(|t| *t == self).expect("every table is in ALL") as u8
    }
}
