"""What the app may offer a customer now (GetContactOptions), and the group's hours as
operators read them (GetBusinessHours): from the group's business hours and its live
availability (Presence's counts, cached per replica like the queue's estimates)."""

from __future__ import annotations

import time

from google.protobuf import duration_pb2

from accessline.common.v1 import common_pb2
from accessline.routing.v1 import hours_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.routing import hours
from accessline_server.routing.estimates import Estimates
from accessline_server.runtime.clock import timestamp
from accessline_server.runtime.store import Store

CLOSED, NO_AGENTS = "CLOSED", "NO_AGENTS"


def _option(
    channel: int,
    reason: str,
    earliest: float | None,
    wait: duration_pb2.Duration | None = None,
) -> hours_pb2.ContactOption:
    option = hours_pb2.ContactOption(channel=channel, offered=not reason, reason=reason)  # type: ignore[arg-type]
    if earliest is not None:
        option.earliest.CopyFrom(timestamp(earliest))
    if wait is not None and not reason:
        option.estimated_wait.CopyFrom(wait)
    return option


async def open_state(
    store: Store, group: str, now: float
) -> tuple[bool, float | None, float | None]:
    """(open now, next opening, next closing) of the group; a group without hours is
    always open."""
    calendar = await hours.calendar(store, group)
    return (True, None, None) if calendar is None else calendar.state(now)


async def business_hours(store: Store, group: str) -> rt_pb2.GetBusinessHoursResponse:
    answer = rt_pb2.GetBusinessHoursResponse()
    found = await hours.get(store, group)
    if found is not None:
        answer.hours.CopyFrom(found)
    answer.open_now, opens, closes = await open_state(store, group, time.time())
    if opens is not None:
        answer.opens_at.CopyFrom(timestamp(opens))
    if closes is not None:
        answer.closes_at.CopyFrom(timestamp(closes))
    return answer


async def contact_options(
    store: Store, estimates: Estimates, group: str
) -> rt_pb2.GetContactOptionsResponse:
    now = time.time()
    open_now, opens, closes = await open_state(store, group, now)
    answer = rt_pb2.GetContactOptionsResponse(open_now=open_now)
    if opens is not None:
        answer.opens_at.CopyFrom(timestamp(opens))
    if closes is not None:
        answer.closes_at.CopyFrom(timestamp(closes))
    earliest = now if open_now else opens
    _, voice_staffed = await estimates.availability(group)
    _, chat_staffed = await estimates.availability(group, common_pb2.CHANNEL_CHAT)
    voice_reason = CLOSED if not open_now else NO_AGENTS if not voice_staffed else ""
    chat_reason = CLOSED if not open_now else NO_AGENTS if not chat_staffed else ""
    voice_wait = (await estimates.estimate_wait(group, 0)).estimated_wait
    chat_wait = (await estimates.estimate_wait(group, common_pb2.CHANNEL_CHAT)).estimated_wait
    answer.options.extend(
        [
            _option(hours_pb2.CONTACT_CHANNEL_VOICE_NOW, voice_reason, earliest, voice_wait),
            # A callback waits for the next opening: offered unless none is near.
            _option(hours_pb2.CONTACT_CHANNEL_CALLBACK, "" if earliest else CLOSED, earliest),
            _option(hours_pb2.CONTACT_CHANNEL_NOTIFY_WHEN_AVAILABLE, voice_reason, earliest),
            _option(hours_pb2.CONTACT_CHANNEL_CHAT, chat_reason, earliest, chat_wait),
        ]
    )
    return answer
