"""The one watch of a Presence replica on agents, presence and offers, routed to the
agent sessions it holds and kept as the feed its WatchPresence streams share; it also
cancels the open offers of agents whose session ended anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import keys, offers
from accessline_server.presence.feed import Feed, read_snapshot
from accessline_server.presence.roster import channel_presence
from accessline_server.runtime.errors import (
    AccesslineError,
)
from accessline_server.runtime.store import (
    EventKind,
    Store,
    WatchCompacted,
    WatchEvent,
)

if TYPE_CHECKING:
    from accessline_server.presence.session import AgentSession

log = logging.getLogger("accessline.presence")
tracer = trace.get_tracer("accessline.presence")

C = common_pb2
_EVERY_CHANNEL_PRESENCE = [
    (channel, presence)
    for channel in C.Channel.keys()  # noqa: SIM118 - an enum wrapper, not a dict
    if channel != "CHANNEL_UNSPECIFIED"
    for presence in C.ChannelPresence.keys()  # noqa: SIM118
    if presence != "CHANNEL_PRESENCE_UNSPECIFIED"
]


class Hub:
    """One watch of this replica on presence and offers, routed to the agent sessions it
    holds; it also cancels the open offers of agents whose session ended anywhere."""

    def __init__(
        self, store: Store, meter: metrics.Meter | None = None, feed: Feed | None = None
    ) -> None:
        self._store = store
        # The view of agents and presence this watch keeps for WatchPresence streams.
        self.feed = feed or Feed()
        self.sessions: dict[str, AgentSession] = {}
        (meter or metrics.get_meter("accessline.presence")).create_observable_gauge(
            "accessline.presence.channels",
            callbacks=[self._observe],
            unit="{agent}",
            description="Agents with a session on this replica, per channel and channel presence",
        )
        self._task: asyncio.Task[None] | None = None
        self._janitors: set[asyncio.Task[None]] = set()

    def _observe(self, _: object) -> list[metrics.Observation]:
        # Every channel and presence, zero when no agent is in it: "no agent available"
        # is a 0 on the dashboard and in alerts, not a missing series.
        counts: dict[tuple[str, str], int] = dict.fromkeys(_EVERY_CHANNEL_PRESENCE, 0)
        for session in list(self.sessions.values()):
            for channel in session.state.channels:
                state = channel_presence(channel, session.state.do_not_disturb)
                key = (C.Channel.Name(channel.channel), C.ChannelPresence.Name(state))  # type: ignore[arg-type]
                counts[key] = counts.get(key, 0) + 1
        return [
            metrics.Observation(n, {"accessline.channel": ch, "accessline.presence": pr})
            for (ch, pr), n in counts.items()
        ]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence-hub")

    async def ready(self, timeout: float) -> None:
        """Until the hub's view is loaded (UNAVAILABLE `HUB_STARTING` after `timeout`)."""
        await self.feed.ready(timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                agents, live, revision = await read_snapshot(self._store)
                self.feed.load(agents, live, revision)
                async for event in self._store.watch_prefix(keys.ROOT, revision + 1):
                    self.feed.apply(event)
                    await self._dispatch(event)
            except WatchCompacted:
                log.warning("presence hub fell behind a compaction; sessions resync")
                for session in list(self.sessions.values()):
                    session.resync_needed.set()
            except AccesslineError as exc:
                log.warning(
                    "presence hub cannot reach etcd", extra={"fields": {"error": exc.message}}
                )
                await asyncio.sleep(1.0)

    async def _dispatch(self, event: WatchEvent) -> None:
        key = event.key
        if key.startswith(keys.PRESENCE):
            agent_id = key[len(keys.PRESENCE) :]
            session = self.sessions.get(agent_id)
            if session is not None:
                session.on_presence(event)
            if event.kind == EventKind.DELETE:
                task = asyncio.create_task(self._cancel_orphaned_offers(agent_id))
                self._janitors.add(task)
                task.add_done_callback(self._janitors.discard)
        elif key.startswith(keys.OFFERS):
            agent_id = key[len(keys.OFFERS) :].split("/", 1)[0]
            session = self.sessions.get(agent_id)
            if session is not None:
                session.on_offer(event)
        elif key.startswith(keys.INTERACTIONS) and event.kind == EventKind.DELETE:
            agent_id = key[len(keys.INTERACTIONS) :].split("/", 1)[0]
            session = self.sessions.get(agent_id)
            if session is not None:
                session.on_interaction_gone(event)

    async def _cancel_orphaned_offers(self, agent_id: str) -> None:
        """The agent's session ended (cleanly or by lease): its open offers are cancelled.
        Every replica may try; the compare-and-swap makes it happen once."""
        try:
            if await self._store.get(keys.presence(agent_id), pr_store.StoredPresence) is not None:
                return  # a new session already started; it delivers the open offers
            entries, _ = await self._store.get_prefix(keys.offers(agent_id), pr_store.StoredOffer)
            for entry in entries:
                if entry.value.state == pr_store.OFFER_STATE_OPEN:
                    await offers.set_offer_state(
                        self._store,
                        entry,
                        pr_store.OFFER_STATE_CANCELLED,
                        cancel_reason=pr_pb2.OFFER_CANCEL_REASON_SESSION_ENDED,
                    )
        except AccesslineError as exc:
            log.warning(
                "could not cancel offers of an ended session",
                extra={"fields": {"agent_id": agent_id, "error": exc.message}},
            )
