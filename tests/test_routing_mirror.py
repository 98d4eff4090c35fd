"""The dispatch leader's copy of what a pass plans from (routing/mirror.py), against a
real etcd: after concurrent transactions over the queues, claims, requests, dials and
the agents' presence (several prefixes in one transaction, deletes among them), the copy
is what one read of etcd gives at the revision it reached; the agents follow too; and a
pass waits for the copy to reach a revision, or is told it did not in time."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.presence import roster as pr_roster
from accessline_server.routing import keys
from accessline_server.routing.mirror import DispatchMirror, Snapshot, read_snapshot
from accessline_server.routing.view import AgentView
from accessline_server.runtime.store import Op, Store, WatchEvent

SEALING = pr_roster.Sealing(b"mirror test secret, 32 bytes or more")


def shape(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot as comparable values (keys, values, revisions)."""
    return {
        "queued": sorted(
            (e.key, e.value.SerializeToString(), e.meta.mod_revision) for e in snapshot.queued
        ),
        "requests": sorted((e.key, e.meta.mod_revision) for e in snapshot.requests),
        "presence": {k: v.SerializeToString() for k, v in snapshot.presence.items()},
        "claimed": snapshot.claimed,
        "dials": sorted((e.key, e.meta.mod_revision) for e in snapshot.dials),
    }


def random_ops(rng: random.Random, n: int) -> list[Op]:
    """A transaction's writes over the keys a pass reads (a few of each, so that puts
    and deletes meet the same keys)."""
    ops: dict[str, Op] = {}
    for _ in range(n):
        kind = rng.choice(["queue", "claim", "presence", "notify", "dial"])
        i = rng.randrange(4)
        if kind == "queue":
            key = keys.queued("g1", f"i{i}")
            value: Any = rt_store.QueuedInteraction(
                interaction_id=f"i{i}", resource_group="g1", call_id=str(rng.random())
            )
        elif kind == "claim":
            key, value = keys.claim(f"a{i}", 1, 0), rt_store.AgentClaim(interaction_id=f"i{i}")
        elif kind == "presence":
            key = pr_roster.PRESENCE + f"a{i}"
            value = pr_store.StoredPresence(agent_session_id=str(rng.random()))
        elif kind == "notify":
            key, value = keys.NOTIFY + f"r{i}", rt_store.NotifyRequest()
        else:
            key, value = keys.DIALS + f"d{i}", rt_store.PendingDial()
        ops[key] = Op.delete(key) if rng.random() < 0.3 else Op.put(key, value)
    return list(ops.values())


async def test_the_copy_is_what_one_read_gives_after_concurrent_transactions(
    store: Store,
) -> None:
    events: list[WatchEvent] = []
    changed: list[int] = []
    agents = AgentView(SEALING, lambda: changed.append(1))
    mirror = DispatchMirror(store, agents, events.append)
    task = asyncio.ensure_future(mirror.run())
    try:
        await asyncio.wait_for(mirror.loaded.wait(), 10)
        rng = random.Random(7)

        async def writer(w: int) -> int:
            last = 0
            for _ in range(25):
                last = (await store.txn([], random_ops(rng, rng.randint(1, 6)))).revision
            return last

        written = max(await asyncio.gather(*(writer(w) for w in range(4))))
        # An agent registered meanwhile reaches the agent view through the same watch.
        agent = pr_pb2.Agent(agent_id="a9", resource_groups=["g1"])
        registered = await store.put(pr_roster.AGENTS + "a9", SEALING.stored_agent(agent))
        assert await mirror.wait_for(max(written, registered), 10)
        assert mirror.revision >= registered
        assert shape(mirror.snapshot()) == shape(await read_snapshot(store))
        assert [a.agent_id for a in agents.group("g1", {})[0]] == ["a9"]
        assert changed
        # Every change was told, in revision order.
        revisions = [e.revision for e in events]
        assert revisions == sorted(revisions)
        assert revisions[-1] == registered
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_pass_waits_for_the_copy_to_reach_a_revision(store: Store) -> None:
    mirror = DispatchMirror(store, AgentView(SEALING, lambda: None), lambda _: None)
    # Not loaded: no revision is reached.
    assert not await mirror.wait_for(0, 0.05)
    task = asyncio.ensure_future(mirror.run())
    try:
        assert await mirror.wait_for(0, 10)
        ahead = mirror.revision + 1000
        assert not await mirror.wait_for(ahead, 0.2)
        waiting = asyncio.ensure_future(mirror.wait_for(await store.revision() + 1, 10))
        revision = await store.put(keys.queued("g2", "i1"), rt_store.QueuedInteraction())
        assert await waiting
        assert mirror.revision == revision
        assert [e.key for e in mirror.snapshot().queued] == [keys.queued("g2", "i1")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_copy_tells_when_a_claim_is_released_after_a_revision(store: Store) -> None:
    """The leader learns that the stream's replica connected an accepted call (its claim
    deleted) from the copy: a delete after the offer's revision, even if a newer offer
    took the slot again since; not the claim's earlier life, nor one still held."""
    mirror = DispatchMirror(store, AgentView(SEALING, lambda: None), lambda _: None)
    task = asyncio.ensure_future(mirror.run())
    try:
        assert await mirror.wait_for(0, 10)
        claim = keys.claim("a-released", 1, 0)
        record = rt_store.AgentClaim(interaction_id="i1")
        await store.put(claim, record)
        await store.delete(claim)  # an earlier offer's claim, released before
        offered = await store.put(claim, record)
        assert not await mirror.released(claim, offered, 0.2)  # still held
        waiting = asyncio.ensure_future(mirror.released(claim, offered, 10))
        await store.txn([], [Op.delete(claim)])
        await store.put(claim, rt_store.AgentClaim(interaction_id="i2"))  # the next offer
        assert await waiting
        assert await mirror.released(claim, offered, 0)
        other = keys.claim("a-held", 1, 0)
        held = await store.put(other, record)
        assert not await mirror.released(other, held, 0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
