"""Which changes wake Routing's dispatch leader: a call's life written to a real etcd as
Routing writes it (transaction by transaction), watched as the leader watches `rt/`, and
an agent's presence as Presence writes it, watched as the leader's agent view does."""

from __future__ import annotations

import asyncio

from google.protobuf import wrappers_pb2

from accessline.common.v1 import common_pb2 as C
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing import keys
from accessline_server.routing.view import only_busier
from accessline_server.routing.wakes import Wakes
from accessline_server.runtime.store import Op, Store

QI = rt_store.QueuedInteraction


def entry(state: int) -> QI:
    return QI(interaction_id="i1", resource_group="g", state=state)


async def test_a_calls_own_progress_wakes_nobody_and_what_frees_or_adds_work_does(
    store: Store,
) -> None:
    call, claim, mark = f"{keys.QUEUE}g/i1", f"{keys.CLAIMS}a1/chat/0", keys.no_answer("a1")
    place, redirect = keys.place("g", 1), keys.redirect("i1")
    marker = wrappers_pb2.StringValue(value="x")
    queued, offered, connected = (
        entry(rt_store.INTERACTION_STATE_QUEUED),
        entry(rt_store.INTERACTION_STATE_OFFERED),
        entry(rt_store.INTERACTION_STATE_CONNECTED),
    )
    steps: list[tuple[str, list[Op], bool]] = [
        ("call queued", [Op.put(call, queued), Op.put(place, marker)], True),
        ("offer made", [Op.put(claim, marker), Op.put(call, offered)], False),
        ("offer declined", [Op.put(call, queued), Op.delete(claim)], True),
        ("offer made again", [Op.put(claim, marker), Op.put(call, offered)], False),
        ("an agent unanswered", [Op.put(mark, marker)], True),
        ("accepted", [Op.put(call, connected), Op.delete(claim), Op.delete(mark)], False),
        ("connected", [Op.delete(call), Op.delete(place), Op.put(redirect, marker)], False),
        ("a claim made", [Op.put(claim, marker)], False),
        ("the claim gone by itself", [Op.delete(claim)], True),
        ("another call waiting", [Op.put(call, queued)], True),
        ("its caller hung up", [Op.delete(call)], True),
        ("a request to be told", [Op.put(keys.notify("r1"), marker)], True),
    ]
    start = await store.revision() + 1
    names = {}
    for name, ops, _ in steps:
        names[(await store.txn([], ops)).revision] = name
    last = max(names)
    wakes: Wakes = Wakes()
    woken: dict[str, bool] = {}

    async def follow() -> None:
        async for event in store.watch_prefix(keys.ROOT, start):
            name = names[event.revision]
            woken[name] = wakes.work(event) or woken.get(name, False)
            if event.revision == last:
                return

    await asyncio.wait_for(follow(), 15)
    assert woken == {name: work for name, _, work in steps}


async def test_a_presence_change_that_only_takes_on_interactions_frees_nobody(
    store: Store,
) -> None:
    key = "pr/presence/a1"

    def presence(
        available: bool, interactions: dict[str, int], dnd: bool = False
    ) -> pr_store.StoredPresence:
        chat = pr_store.StoredChannel(
            channel=C.CHANNEL_CHAT,
            available=available,
            capacity=3,
            active_interactions=len(interactions),
        )
        return pr_store.StoredPresence(
            agent_id="a1",
            agent_session_id="s1",
            channels=[chat],
            interactions=interactions,
            do_not_disturb=dnd,
        )

    one, two = {"i1": C.CHANNEL_CHAT}, {"i1": C.CHANNEL_CHAT, "i2": C.CHANNEL_CHAT}
    steps = [
        ("logged in", presence(True, {}), False),
        ("accepted a call", presence(True, one), True),
        ("accepted another", presence(True, two), True),
        ("ended one", presence(True, one), False),
        ("not available", presence(False, one), False),
        ("available again", presence(True, one), False),
        ("do not disturb", presence(True, one, dnd=True), False),
    ]
    start = await store.revision() + 1
    for _, value, _ in steps:
        await store.put(key, value)
    seen = []
    async for event in store.watch_prefix(key, start):
        seen.append(only_busier(event))
        if len(seen) == len(steps):
            break
    assert seen == [busier for _, _, busier in steps]
