"""The etcd store against a real etcd: compare-and-swap, leases, fencing, watches."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2

from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from accessline_server.runtime.store import (
    Compare,
    EventKind,
    Op,
    Store,
    StoreTimeout,
    StoreUnavailable,
    WatchCompacted,
    WatchEvent,
)
from tests.conftest import EtcdCluster, eventually


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


async def test_create_refuses_a_second_create_of_the_same_key(store: Store) -> None:
    first = await store.create("numbers/+33478000001", text("first"))
    second = await store.create("numbers/+33478000001", text("second"))

    assert first is not None
    assert second is None
    entry = await store.get("numbers/+33478000001", wrappers_pb2.StringValue)
    assert entry is not None
    assert entry.value.value == "first"
    assert entry.meta.create_revision == first


async def test_keys_are_namespaced_under_the_prefix(etcd: EmbeddedEtcd, store: Store) -> None:
    await store.put("pools/lyon", text("mine"))
    async with Store(etcd.endpoint, "/someone-else") as other:
        assert await other.get("pools/lyon", wrappers_pb2.StringValue) is None
        await other.put("pools/paris", text("theirs"))
    entries, revision = await store.get_prefix("pools/", wrappers_pb2.StringValue)
    assert [(e.key, e.value.value) for e in entries] == [("pools/lyon", "mine")]
    assert revision >= entries[0].meta.mod_revision


async def test_get_prefix_pages_in_key_order(store: Store) -> None:
    for i in range(7):
        await store.put(f"items/{i:02d}", text(str(i)))
    seen: list[str] = []
    after: str | None = None
    while True:
        page, _ = await store.get_prefix(
            "items/", wrappers_pb2.StringValue, limit=3, start_after=after
        )
        if not page:
            break
        seen += [e.value.value for e in page]
        after = page[-1].key
    assert seen == [str(i) for i in range(7)]
    assert await store.count_prefix("items/") == 7


async def test_key_under_a_lease_disappears_after_the_lease_expires(store: Store) -> None:
    lease = await store.grant_lease(2)
    assert await store.create("reservations/r1", text("held"), lease=lease) is not None

    async def gone() -> bool:
        return await store.get("reservations/r1", wrappers_pb2.StringValue) is None

    # etcd may round a small TTL up and extend leases across elections: wait with a deadline.
    await eventually(gone, timeout=20, what="leased key expired")
    assert await store.lease_ttl(lease) == -1


async def test_keep_alive_keeps_a_key_while_an_unkept_one_expires(store: Store) -> None:
    kept_id = await store.grant_lease(2)
    unkept_id = await store.grant_lease(2)
    await store.put("agents/kept", text("online"), lease=kept_id)
    await store.put("agents/unkept", text("online"), lease=unkept_id)
    kept = await store.keep_alive(kept_id, 2)

    async def unkept_gone() -> bool:
        return await store.get("agents/unkept", wrappers_pb2.StringValue) is None

    await eventually(unkept_gone, timeout=20, what="unkept lease expired")
    # Same TTL, granted at the same time: only the keep-alive explains the survivor.
    assert await store.get("agents/kept", wrappers_pb2.StringValue) is not None
    assert kept.refresh_count >= 1
    assert not kept.lost.is_set()

    store.stop_keep_alive(kept)
    await store.revoke_lease(kept_id)
    assert await store.get("agents/kept", wrappers_pb2.StringValue) is None


async def test_keep_alive_notices_a_lease_revoked_elsewhere(
    etcd: EmbeddedEtcd, store: Store, prefix: str
) -> None:
    lease_id = await store.grant_lease(5)
    kept = await store.keep_alive(lease_id, 5)
    async with Store(etcd.endpoint, prefix) as other:
        await other.revoke_lease(lease_id)
    await asyncio.wait_for(kept.lost.wait(), timeout=15)


async def test_callers_asking_for_a_shared_lease_at_once_share_one_grant(store: Store) -> None:
    """Eight handoffs reaching the end of a shared lease's window together wait for one
    grant rather than each granting a lease of its own."""
    leases = await asyncio.gather(*(store.shared_lease(30) for _ in range(8)))
    assert len(set(leases)) == 1
    assert 30 <= await store.lease_ttl(leases[0]) <= 32
    # Asked again within the window: the same lease, no grant.
    assert await store.shared_lease(30) == leases[0]


async def test_a_fencing_compare_fails_once_the_key_was_recreated(store: Store) -> None:
    created = await store.create("claims/agent-7", text("replica-a"))
    assert created is not None
    ok = await store.txn(
        [Compare.created_at("claims/agent-7", created)], [Op.put("offers/1", text("x"))]
    )
    assert ok.succeeded

    await store.delete("claims/agent-7")
    assert await store.create("claims/agent-7", text("replica-b")) is not None
    stale = await store.txn(
        [Compare.created_at("claims/agent-7", created)],
        [Op.put("offers/2", text("from stale holder"))],
        [Op.get("claims/agent-7")],
    )
    assert not stale.succeeded
    assert await store.get("offers/2", wrappers_pb2.StringValue) is None
    assert stale.gets[0][0][0] == "claims/agent-7"


async def test_a_transaction_applies_all_of_its_operations_or_none(store: Store) -> None:
    await store.put("sessions/s1", text("context"))
    await store.put("reservations/r1", text("reservation"))
    entry = await store.get("sessions/s1", wrappers_pb2.StringValue)
    assert entry is not None

    result = await store.txn(
        [
            Compare.modified_at("sessions/s1", entry.meta.mod_revision),
            Compare.absent("quarantine/n1"),
        ],
        [
            Op.delete("sessions/s1"),
            Op.delete("reservations/r1"),
            Op.put("quarantine/n1", text("q")),
        ],
    )
    assert result.succeeded
    assert result.deleted == [1, 1]
    again = await store.txn(
        [Compare.exists("sessions/s1")],
        [Op.put("matched/s1", text("second winner"))],
    )
    assert not again.succeeded
    assert await store.get("matched/s1", wrappers_pb2.StringValue) is None


async def next_events(
    events: asyncio.Queue[WatchEvent | BaseException], count: int
) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    for _ in range(count):
        item = await asyncio.wait_for(events.get(), timeout=30)
        if isinstance(item, BaseException):
            raise item
        out.append(item)
    return out


async def pump(
    store: Store, prefix: str, start: int, sink: asyncio.Queue[WatchEvent | BaseException]
) -> None:
    try:
        async for event in store.watch_prefix(prefix, start):
            await sink.put(event)
    except Exception as exc:  # handed to the test, which re-raises it
        await sink.put(exc)


async def test_a_watch_sees_every_event_across_an_etcd_restart(private_etcd: EmbeddedEtcd) -> None:
    async with Store(private_etcd.endpoint, "/watch", timeout=2.0) as store:
        start = await store.revision() + 1
        events: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        watcher = asyncio.create_task(pump(store, "presence/", start, events))
        try:
            await store.put("presence/a1", text("ready"))
            await store.put("presence/a2", text("ready"))
            before = await next_events(events, 2)

            private_etcd.stop()
            with pytest.raises(StoreUnavailable):
                await store.put("presence/a3", text("lost?"))
            private_etcd.start()
            await private_etcd.wait_ready()

            # Written before the watch has necessarily reconnected: it must resume from
            # the last revision it saw, not from "now".
            await store.put("presence/a3", text("not ready"))
            await store.delete("presence/a1")
            after = await next_events(events, 2)
        finally:
            watcher.cancel()

    keys = [(e.kind, e.key) for e in before + after]
    assert keys == [
        (EventKind.PUT, "presence/a1"),
        (EventKind.PUT, "presence/a2"),
        (EventKind.PUT, "presence/a3"),
        (EventKind.DELETE, "presence/a1"),
    ]
    revisions = [e.revision for e in before + after]
    assert revisions == sorted(set(revisions))
    assert after[1].decode_prev(wrappers_pb2.StringValue) == text("ready")


async def test_a_watch_reports_compaction_instead_of_losing_events(
    private_etcd: EmbeddedEtcd,
) -> None:
    async with Store(private_etcd.endpoint, "/compact") as store:
        first = await store.put("pools/p/1", text("a"))
        for i in range(5):
            await store.put("pools/p/1", text(str(i)))
        latest = await store.revision()
        await store.compact(latest)

        with pytest.raises(WatchCompacted) as caught:
            async for _ in store.watch_prefix("pools/", first):
                pass
        assert caught.value.compact_revision >= latest


async def test_store_calls_fail_as_unavailable_with_retry_info_when_etcd_is_down(
    tmp_path: Path,
) -> None:
    async with Store(f"127.0.0.1:{free_port()}", "/down", timeout=1.0) as store:
        with pytest.raises(StoreUnavailable) as caught:
            await store.get("anything", wrappers_pb2.StringValue)
    assert caught.value.retry_after is not None
    assert caught.value.reason == "ETCD_UNAVAILABLE"


async def test_a_lease_granted_after_an_etcd_restart_keeps_being_refreshed(
    private_etcd: EmbeddedEtcd,
) -> None:
    async with Store(private_etcd.endpoint, "/restart", timeout=2.0) as store:
        before_id = await store.grant_lease(3)
        before = await store.keep_alive(before_id, 3)
        await before.wait_refreshes(1)

        private_etcd.kill()
        private_etcd.start()
        await private_etcd.wait_ready()

        # Granted once etcd is back, by the same store whose keep-alive stream broke.
        lease_id = await store.grant_lease(3)
        await store.put("queue/call-1", text("waiting"), lease=lease_id)
        kept = await store.keep_alive(lease_id, 3)
        # A refresh every TTL/3: eight of them span well over two TTLs.
        await asyncio.wait_for(kept.wait_refreshes(8), timeout=30)
        assert not kept.lost.is_set()
        assert await store.lease_ttl(lease_id) > 0
        assert await store.get("queue/call-1", wrappers_pb2.StringValue) is not None


async def test_the_store_fails_over_when_the_member_it_uses_is_killed(
    etcd_cluster: EtcdCluster,
) -> None:
    async with Store(etcd_cluster.endpoints, "/failover", timeout=2.0) as store:
        start = await store.revision() + 1
        events: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        watcher = asyncio.create_task(pump(store, "agents/", start, events))
        lease_id = await store.grant_lease(4)
        await store.put("agents/kept", text("online"), lease=lease_id)
        kept = await store.keep_alive(lease_id, 4)
        try:
            await store.put("agents/a1", text("before"))
            in_use = store.current_endpoint
            etcd_cluster.member(in_use).kill()

            async def written() -> bool:
                try:
                    await store.put("agents/a2", text("after"))
                except (StoreUnavailable, StoreTimeout):
                    return False  # refused, or timed out while the cluster elected a leader
                return True

            await eventually(written, timeout=10, what="a write once the member died")
            assert store.current_endpoint != in_use
            seen = await next_events(events, 3)
            assert [e.key for e in seen] == ["agents/kept", "agents/a1", "agents/a2"]
            # The kept lease lives on through the other members.
            refreshed = kept.refresh_count
            await asyncio.wait_for(kept.wait_refreshes(refreshed + 4), timeout=20)
            assert not kept.lost.is_set()
            assert await store.get("agents/kept", wrappers_pb2.StringValue) is not None
        finally:
            watcher.cancel()


async def test_a_member_without_quorum_refuses_rather_than_serving_stale_data(
    etcd_cluster: EtcdCluster,
) -> None:
    async with Store(etcd_cluster.endpoints, "/quorum", timeout=2.0) as store:
        await store.put("pools/lyon", text("v1"))
        in_use = etcd_cluster.member(store.current_endpoint)
        others = [m for m in etcd_cluster.members if m is not in_use]
        # Only the member in use is left: it has no quorum and so no leader.
        for member in others:
            member.kill()
        with pytest.raises(StoreUnavailable):
            await store.get("pools/lyon", wrappers_pb2.StringValue)
        for member in others:
            member.start()

        async def read() -> bool:
            try:
                return await store.get("pools/lyon", wrappers_pb2.StringValue) is not None
            except (StoreUnavailable, StoreTimeout):
                return False

        await eventually(read, timeout=20, what="a read once the quorum is back")


async def test_requests_move_off_a_frozen_member(etcd_cluster: EtcdCluster) -> None:
    # A frozen follower: the others keep their leader (losing the leader is an election,
    # which tests/chaos covers).
    leader = await etcd_cluster.leader()
    followers = [m for m in etcd_cluster.members if m is not leader]
    endpoints = [m.endpoint for m in (*followers, leader)]
    async with Store(endpoints, "/frozen", timeout=1.0) as store:
        await store.put("pools/lyon", text("v1"))
        frozen = etcd_cluster.member(store.current_endpoint)
        assert frozen is followers[0]
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            # The first read waits out its deadline on the frozen member, the same read
            # is then sent to the next one.
            entry = await store.get("pools/lyon", wrappers_pb2.StringValue)
            assert entry is not None
            assert entry.value.value == "v1"
            assert store.current_endpoint != frozen.endpoint
            await store.put("pools/lyon", text("v2"))
        finally:
            frozen.process.send_signal(signal.SIGCONT)


async def test_a_cancelled_watch_ends_quietly_and_a_live_one_still_sees_its_key(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Routing cancels a watch for every call and offer that ends: the cancel must not
    go through the gRPC library's error path (a traceback formatted each time), and a
    watch still open keeps seeing its key."""
    revision = await store.revision()
    seen: list[str] = []

    async def follow(key: str) -> None:
        async for event in store.watch_key(key, revision + 1):
            seen.append(event.key)

    live = asyncio.ensure_future(follow("kept"))
    caplog.set_level("DEBUG", logger="grpc")
    for i in range(20):
        task = asyncio.ensure_future(follow(f"gone-{i}"))
        await store.put(f"gone-{i}", wrappers_pb2.StringValue(value="x"))
        await eventually(lambda i=i: f"gone-{i}" in seen, what="the watch open")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await store.put("kept", wrappers_pb2.StringValue(value="x"))
    await eventually(lambda: seen[-1:] == ["kept"], what="the live watch's event")
    live.cancel()
    with pytest.raises(asyncio.CancelledError):
        await live
    noisy = [r.getMessage() for r in caplog.records if "raised exception" in r.getMessage()]
    assert noisy == []
