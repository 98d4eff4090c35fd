"""What a waiting call and an app are told about a queue: the call's position, the
group's agents available and logged in, and the estimated wait. Read-only, cached per
replica so that many waiting calls do not each read the whole queue."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.routing import keys
from accessline_server.routing.queue import VOICE, Rules, estimate, order, waiting
from accessline_server.runtime.store import Store

if TYPE_CHECKING:
    from accessline.presence.v1.presence_pb2_grpc import PresenceServiceAsyncStub

QI = rt_store.QueuedInteraction


class Estimates:
    """Positions and waits of a group's queue, from etcd and Presence's availability."""

    def __init__(self, store: Store, presence: PresenceServiceAsyncStub, rules: Rules) -> None:
        self._store = store
        self._presence = presence
        self._rules = rules
        self._availability: dict[str, tuple[float, int, int]] = {}
        self._orders: dict[str, tuple[float, list[QI]]] = {}

    async def availability(self, group: str, channel: int = 0) -> tuple[int, int]:
        """(available, logged in) agents of the group on voice channels (or `channel`),
        cached for the queue update interval."""
        key = f"{group}/{channel}"
        cached = self._availability.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._rules.queue_update:
            return cached[1], cached[2]
        answer = await self._presence.GetGroupAvailability(
            pr_pb2.GetGroupAvailabilityRequest(resource_groups=[group])
        )
        available = staffed = 0
        for found in answer.groups:
            for ch in found.channels:
                if (channel and ch.channel == channel) or (not channel and ch.channel in VOICE):
                    available = max(available, ch.available_agents)
                    staffed = max(staffed, ch.logged_in_agents)
        self._availability[key] = (now, available, staffed)
        return available, staffed

    async def estimate_wait(self, group: str, channel: int) -> rt_pb2.EstimateWaitResponse:
        entries, _ = await self._store.get_prefix(keys.queue(group), QI)
        now = time.time()
        length = sum(1 for e in entries if waiting(e.value, now))
        available, staffed = await self.availability(group, channel)
        answer = rt_pb2.EstimateWaitResponse(queue_length=length, available_agents=available)
        answer.estimated_wait.FromNanoseconds(
            int(estimate(length + 1, available, staffed, self._rules) * 1e9)
        )
        return answer

    async def queue_order(self, group: str, now: float) -> list[QI]:
        """The group's waiting interactions in the order they are served. One read serves
        every stream of this replica in the group for half an update interval, so many
        waiting calls do not each read the whole queue."""
        cached = self._orders.get(group)
        if cached is not None and time.monotonic() - cached[0] < self._rules.queue_update / 2:
            return cached[1]
        entries, _ = await self._store.get_prefix(keys.queue(group), QI)
        ready = order([e.value for e in entries if waiting(e.value, now)], self._rules, now)
        self._orders[group] = (time.monotonic(), ready)
        if len(self._orders) > 1000:
            self._orders.pop(next(iter(self._orders)))
        return ready

    async def position(self, group: str, item: QI) -> tuple[int, int]:
        """The call's place in its group's queue (1 is next) and the estimated wait in
        whole seconds. A call newer than the group's read order takes its place in it
        (as fresh as the others' places, without a read of the queue of its own)."""
        now = time.time()
        ready = await self.queue_order(group, now)
        ids = [i.interaction_id for i in ready]
        if item.interaction_id not in ids:
            ready = order([*ready, item], self._rules, now)
            read_at = self._orders.get(group, (time.monotonic(), ready))[0]
            self._orders[group] = (read_at, ready)
            ids = [i.interaction_id for i in ready]
        position = ids.index(item.interaction_id) + 1
        available, staffed = await self.availability(group)
        return position, round(estimate(position, available, staffed, self._rules))
