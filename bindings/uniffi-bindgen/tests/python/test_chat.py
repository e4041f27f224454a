"""Two devices chat through the generated Python binding against a real
pipit server (the `pipit` binary, RocksDB in a temporary directory): sent,
delivered and read; a server restart with messages in flight and more
queued while it is down; an app restart; no message seen twice.

Run by ../bindings.rs, which generates the `pipit` module and
sets PIPIT_BIN. Every wait is bounded by WAIT seconds.
"""

import asyncio
import os
import select
import signal
import subprocess

import pytest

import pipit

WAIT = 20.0
PIPIT_BIN = os.environ.get("PIPIT_BIN", "")


class Server:
    """The real server binary on 127.0.0.1."""

    def __init__(self, data_dir, listen="127.0.0.1:0"):
        env = dict(os.environ, PIPIT_LOG="warn")
        self.proc = subprocess.Popen(
            [PIPIT_BIN, "serve", "--listen", listen, "--shards", "1", "--data-dir", data_dir],
            stdout=subprocess.PIPE,
            env=env,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        assert ready, "the server did not announce itself in time"
        # "pipit listening on ADDR server key KEY"
        words = self.proc.stdout.readline().decode().split()
        assert words[:3] == ["pipit", "listening", "on"], words
        self.addr, self.key = words[3], words[6]

    def stop(self):
        """SIGTERM: the server drains and makes everything queued durable."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=WAIT) == 0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)


def describe(event):
    """An event for a failure message: its kind, and why for the unreadable."""
    if isinstance(event, pipit.Event.UNDECRYPTABLE):
        return f"UNDECRYPTABLE({event.reason})"
    if isinstance(event, pipit.Event.OTHER):
        return repr(event)
    return type(event).__name__


class Device:
    """A client and everything it has reported, filled by a pump task."""

    def __init__(self, client):
        self.client = client
        self.events = []
        self.changed = asyncio.Event()
        self.pump = asyncio.create_task(self._pump())

    @classmethod
    async def start(cls, addr, storage_dir, name):
        config = pipit.default_config(addr)
        config.device_name = name
        # Reconnect quickly: the test restarts the server.
        config.backoff_initial_ms = 50
        config.backoff_max_ms = 300
        config.connect_timeout_ms = 5000
        return cls(await pipit.start_client(config, storage_dir))

    async def _pump(self):
        while True:
            event = await self.client.next_event()
            if event is None:
                return
            self.events.append(event)
            self.changed.set()

    async def until(self, what, predicate):
        """Waits until predicate(self) holds, at most WAIT seconds."""

        async def wait():
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(wait(), WAIT)
        except asyncio.TimeoutError:
            kinds = [describe(e) for e in self.events]
            pytest.fail(f"timed out waiting for {what}; events so far: {kinds}")

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def connects(self):
        return len(self.of(pipit.Event.CONNECTED))

    def account(self):
        return self.of(pipit.Event.CONNECTED)[0].account

    def sent_ids(self):
        return [e.id for e in self.of(pipit.Event.SENT)]

    def payloads(self):
        return [bytes(e.payload) for e in self.of(pipit.Event.MESSAGE)]

    def receipts(self, kind):
        return [e for e in self.of(pipit.Event.RECEIPT) if e.kind == kind]

    async def stop(self):
        await self.client.close()
        await asyncio.wait_for(self.pump, WAIT)


async def chat(tmp):
    data = os.path.join(tmp, "server")
    server = Server(data)
    alice = bob = None
    try:
        alice = await Device.start(server.addr, os.path.join(tmp, "alice"), "alice phone")
        bob = await Device.start(server.addr, os.path.join(tmp, "bob"), "bob phone")
        await alice.until("alice registered", lambda d: d.connects() == 1)
        await bob.until("bob registered", lambda d: d.connects() == 1)
        a, b = alice.account(), bob.account()
        assert 0 < a != b > 0
        assert len(alice.client.identity()) == 64

        # Sent, delivered, read.
        first = await alice.client.send(b, b"hello bob")
        await alice.until("sent", lambda d: first in d.sent_ids())
        seq = next(e.seq for e in alice.of(pipit.Event.SENT) if e.id == first)
        await bob.until("the message", lambda d: b"hello bob" in d.payloads())
        got = bob.of(pipit.Event.MESSAGE)[0]
        assert (got.from_account, got.seq, got.peer) == (a, seq, 0)
        delivered = pipit.ReceiptKind.DELIVERED
        read = pipit.ReceiptKind.READ
        await alice.until("delivered", lambda d: any(r.through >= seq for r in d.receipts(delivered)))
        await bob.client.mark_read(a, got.seq)
        await alice.until("read", lambda d: any(r.through >= seq and r.peer == b for r in d.receipts(read)))

        # A group: one send reaches the other member, after the change that
        # made bob a member; bob watches alice's presence.
        group = await alice.client.create_group("pals", [b])
        assert sorted(group.members) == sorted([a, b]) and group.admins == [a]
        assert [g.group for g in await bob.client.list_groups()] == [group.group]
        group_id = await alice.client.send_group(group.group, b"hello group")
        await alice.until("group sent", lambda d: group_id in d.sent_ids())
        await bob.until("the group message", lambda d: b"hello group" in d.payloads())
        gm = next(e for e in bob.of(pipit.Event.MESSAGE) if bytes(e.payload) == b"hello group")
        assert (gm.group, gm.from_account) == (group.group, a)
        assert any(e.info.group == group.group for e in bob.of(pipit.Event.GROUP))
        await bob.client.watch_presence([a])
        await bob.until("alice online", lambda d: any(p.account == a and p.online for p in d.of(pipit.Event.PRESENCE)))
        with pytest.raises(pipit.PipitError.Refused) as refused:
            await bob.client.add_members(group.group, [a + b + 1000])
        assert "FORBIDDEN" in str(refused.value)

        # A request the server answers, and typed errors.
        await alice.client.request_device_list(7, 0)
        await alice.until("device list", lambda d: d.of(pipit.Event.DEVICE_LIST))
        listed = alice.of(pipit.Event.DEVICE_LIST)[0]
        assert (listed.req, listed.account) == (7, a)
        assert [(x.device, x.name, x.key) for x in listed.devices] == [(0, "alice phone", alice.client.identity())]
        with pytest.raises(pipit.PipitError.TooLarge) as too_large:
            await alice.client.send(b, b"x" * 70_000)
        assert "exceeds" in str(too_large.value)
        with pytest.raises(pipit.PipitError.InvalidArgument):
            await alice.client.link_device(8, "not a key", "tablet")

        # A server restart: a burst in flight when it stops, more queued
        # while it is down, in both directions.
        burst = [f"burst {i}".encode() for i in range(20)]
        burst_ids = [await alice.client.send(b, p) for p in burst]
        server.stop()
        await alice.until("alice offline", lambda d: d.of(pipit.Event.DISCONNECTED))
        await bob.until("bob offline", lambda d: d.of(pipit.Event.DISCONNECTED))
        down = [f"while down {i}".encode() for i in range(5)]
        down_ids = [await alice.client.send(b, p) for p in down]
        reply_id = await bob.client.send(a, b"bob while down")
        server = Server(data, listen=server.addr)
        await alice.until("alice back", lambda d: d.connects() >= 2)
        await bob.until("bob back", lambda d: d.connects() >= 2)

        expected = [b"hello bob", b"hello group"] + burst + down
        all_ids = [first, group_id] + burst_ids + down_ids
        await alice.until("every send confirmed", lambda d: set(all_ids) <= set(d.sent_ids()))
        await bob.until("every message", lambda d: set(expected) <= set(d.payloads()))
        await bob.until("bob's reply confirmed", lambda d: reply_id in d.sent_ids())
        await alice.until("bob's reply", lambda d: b"bob while down" in d.payloads())

        last = max(e.seq for e in bob.of(pipit.Event.MESSAGE))
        await bob.client.mark_read(a, last)
        await alice.until("all read", lambda d: any(r.through >= last for r in d.receipts(read)))

        # An app restart over the same storage: same account, nothing again.
        await bob.stop()
        with pytest.raises(pipit.PipitError.Stopped):
            await bob.client.send(a, b"after close")
        seen_by_bob = bob.payloads()
        bob = await Device.start(server.addr, os.path.join(tmp, "bob"), "ignored")
        await bob.until("bob logged in again", lambda d: d.connects() == 1)
        assert bob.account() == b
        ping = await alice.client.send(b, b"after app restart")
        await bob.until("the new message", lambda d: b"after app restart" in d.payloads())
        await alice.until("sent", lambda d: ping in d.sent_ids())

        # No duplicates anywhere.
        assert sorted(seen_by_bob) == sorted(expected), "bob saw a message twice or missed one"
        assert bob.payloads() == [b"after app restart"], "redelivered after the app restart"
        assert alice.payloads() == [b"bob while down"]
        assert sorted(alice.sent_ids()) == sorted(all_ids + [ping]), "a send confirmed twice"
        stats = await alice.client.stats()
        assert stats.sent == len(all_ids) + 1
        assert not alice.of(pipit.Event.STOPPED) and not bob.of(pipit.Event.STOPPED)
        # Encrypted end to end by default, and every message was readable.
        assert alice.client.e2e_identity() and bob.client.e2e_identity()
        assert not alice.of(pipit.Event.UNDECRYPTABLE) and not bob.of(pipit.Event.UNDECRYPTABLE)
        print(
            f"alice={a} bob={b}: {len(seen_by_bob) + 1} messages to bob, 1 to alice, "
            f"{stats.reconnects} reconnect, {stats.resent} resent, no duplicates"
        )
    finally:
        for d in (alice, bob):
            if d is not None:
                await d.stop()
        server.kill()


def test_chat_through_the_python_binding(tmp_path):
    assert PIPIT_BIN, "PIPIT_BIN must name the pipit server binary"
    asyncio.run(chat(str(tmp_path)))
