"""Reading customers' journeys from the stack's CallMatching (JourneyService)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accessline.journey.v1 import journey_pb2 as jn
from accessline.journey.v1 import journey_pb2_grpc as jn_grpc
from tests.conftest import connect, eventually
from tests.support.stack import Stack


def journey(stack: Stack, token: str | None = None) -> Any:
    """JourneyService on the stack's CallMatching (the superuser's unless a token)."""
    channel = stack.channels[1] if token is None else connect(stack.processes[3].address, token)
    return jn_grpc.JourneyServiceStub(channel)


async def listed(stub: Any, app_id: str, customer: str = "", **more: Any) -> list[jn.Interaction]:
    reply = await stub.ListInteractions(
        jn.ListInteractionsRequest(application_id=app_id, customer_id=customer, **more)
    )
    return list(reply.interactions)


async def until_listed(
    stack: Stack, app_id: str, customer: str, check: Callable[[list[Any]], Any]
) -> list[Any]:
    """The customer's records once `check` holds of them (services write off the call
    path: a record lands a moment after what it records)."""
    found: list[Any] = []

    async def holds() -> bool:
        nonlocal found
        found = await listed(journey(stack), app_id, customer)
        return bool(check(found))

    await eventually(holds, timeout=20, what="the journey to show it")
    return found


def by_channel(found: list[Any], channel: int) -> list[tuple[int, str]]:
    """(status, outcome) of the records of one channel, newest first."""
    return [(r.status, r.outcome) for r in found if r.channel == channel]
