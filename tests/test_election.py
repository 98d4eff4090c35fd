"""Leadership of one key among replicas (runtime/election.py), in-process against a real
etcd: one leader at a time, a fence that stops a deposed leader's writes, resignation
that hands over at once, and a lost lease that ends the term."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import wrappers_pb2

from accessline_server.runtime.election import Election, NotLeader
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import Compare, EventKind, Op, Store

KEY = "app/leader"


def named(name: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=name)


async def test_replicas_racing_for_the_key_lead_one_at_a_time(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    """Four replicas (a store each) campaign three times each; every leader writes the
    log under its fence. The log in etcd shows every term whole, never interleaved, and
    the fencing tokens only grow."""
    stopping = asyncio.Event()
    terms: list[tuple[str, int]] = []

    async def replica(name: str) -> None:
        async with Store(etcd.endpoint, prefix, timeout=5.0) as store:
            election = Election(store, KEY, lease_seconds=5)
            for round_ in range(3):
                term = await election.campaign(lambda: named(name), stopping)
                assert term is not None
                terms.append((name, term.revision))
                try:
                    for step in ("begin", "end"):
                        # Each step is its own etcd round trip: the other replicas run
                        # meanwhile and would write into this term if the fence let them.
                        result = await store.txn(
                            [term.fence()],
                            [Op.put(f"log/{term.revision:012d}/{step}", named(name))],
                            [term.read()],
                        )
                        term.check(result)
                        assert result.succeeded, (name, round_, step)
                finally:
                    await term.resign()

    await asyncio.gather(*(replica(f"r{i}") for i in range(4)))

    async with Store(etcd.endpoint, prefix, timeout=5.0) as store:
        log, _ = await store.get_prefix("log/", wrappers_pb2.StringValue)
        assert await store.get(KEY, wrappers_pb2.StringValue) is None  # all resigned
    revisions = [revision for _, revision in terms]
    assert len(set(revisions)) == 12
    # Per term, begin and end by the term's own holder, and nothing else in between.
    by_term: dict[str, list[tuple[str, str]]] = {}
    for entry in log:
        _, revision, step = entry.key.split("/")
        by_term.setdefault(revision, []).append((step, entry.value.value))
    assert len(by_term) == 12
    holders = dict((f"{revision:012d}", name) for name, revision in terms)
    for revision, steps in by_term.items():
        assert sorted(steps) == [("begin", holders[revision]), ("end", holders[revision])]
    # Writes in etcd's order: a term's begin and end are adjacent.
    ordered = sorted(log, key=lambda e: e.meta.mod_revision)
    for begin, end in zip(ordered[::2], ordered[1::2], strict=True):
        assert begin.key.rsplit("/", 1)[0] == end.key.rsplit("/", 1)[0]


async def test_a_deposed_leader_writes_nothing_and_is_told_so(
    etcd: EmbeddedEtcd, store: Store, prefix: str
) -> None:
    stopping = asyncio.Event()
    term = await Election(store, KEY, lease_seconds=5).campaign(lambda: named("a"), stopping)
    assert term is not None
    # Its lease is revoked elsewhere (as when it expired while this replica was paused).
    async with Store(etcd.endpoint, prefix, timeout=5.0) as other:
        await other.revoke_lease(term.lease_id)
        successor = await Election(other, KEY, lease_seconds=5).campaign(
            lambda: named("b"), stopping
        )
        assert successor is not None
        await asyncio.wait_for(term.lost.wait(), timeout=15)
        stale = await store.txn([term.fence()], [Op.put("work/1", named("from a"))], [term.read()])
        with pytest.raises(NotLeader):
            term.check(stale)
        assert await store.get("work/1", wrappers_pb2.StringValue) is None
        # The deposed leader's resignation leaves the successor's key alone.
        await term.resign()
        holder = await other.get(KEY, wrappers_pb2.StringValue)
        assert holder is not None
        assert holder.value.value == "b"
        await successor.resign()


async def test_a_failed_compare_other_than_the_fence_is_not_a_lost_leadership(
    store: Store,
) -> None:
    term = await Election(store, KEY, lease_seconds=5).campaign(lambda: named("a"), asyncio.Event())
    assert term is not None
    await store.put("work/2", named("taken"))

    result = await store.txn(
        [term.fence(), Compare.absent("work/2")], [Op.put("work/2", named("mine"))], [term.read()]
    )
    assert not result.succeeded
    term.check(result)  # no NotLeader: the fence held
    await term.resign()


async def test_a_waiting_campaign_takes_over_as_soon_as_the_leader_resigns(store: Store) -> None:
    stopping = asyncio.Event()
    election = Election(store, KEY, lease_seconds=30)
    first = await election.campaign(lambda: named("a"), stopping)
    assert first is not None
    second = asyncio.ensure_future(election.campaign(lambda: named("b"), stopping))
    done, _ = await asyncio.wait({second}, timeout=0.5)
    assert not done  # the key is held: the second campaign waits
    await first.resign()
    # Well within the 30 s lease: the resignation deleted the key.
    term = await asyncio.wait_for(second, timeout=10)
    assert term is not None
    assert term.revision > first.revision
    await term.resign()


async def test_a_campaign_that_is_stopped_while_waiting_returns_nothing(store: Store) -> None:
    election = Election(store, KEY, lease_seconds=5)
    held = await election.campaign(lambda: named("a"), asyncio.Event())
    assert held is not None
    stopping = asyncio.Event()
    waiting = asyncio.ensure_future(election.campaign(lambda: named("b"), stopping))
    stopping.set()
    assert await asyncio.wait_for(waiting, timeout=10) is None
    await held.resign()


async def test_watch_key_sees_the_key_and_not_the_keys_that_start_with_it(store: Store) -> None:
    revision = await store.revision()
    await store.put(KEY + "-elsewhere", named("x"))
    await store.put(KEY, named("y"))
    await store.delete(KEY + "-elsewhere")
    await store.delete(KEY)
    seen = []
    async for event in store.watch_key(KEY, revision + 1):
        seen.append((event.key, event.kind))
        if event.kind == EventKind.DELETE:
            break
    assert seen == [(KEY, EventKind.PUT), (KEY, EventKind.DELETE)]
