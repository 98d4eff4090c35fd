"""The end of the demo: one connected customer's journey as the app shows it (their
handoff and call, with the agent who answered and how it matched), their rating of the
call (the survey's answer) and the ratings per agent as operators read them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline.journey.v1 import journey_pb2_grpc as jn_grpc

# Records are written off the call path: the journey shows a call a moment after it.
WAIT_SECONDS = 10.0


@dataclass
class JourneyShown:
    customer: str = ""
    records: list[jn_pb2.Interaction] = field(default_factory=list)
    rated: str = ""
    ratings: list[jn_pb2.SurveyRow] = field(default_factory=list)


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


async def _answered(stub: Any, app_id: str, customer: str) -> list[jn_pb2.Interaction]:
    """The customer's records once one shows the agent who answered and how the call
    matched (or as they are after the wait)."""
    found: list[jn_pb2.Interaction] = []
    for _ in range(int(WAIT_SECONDS / 0.1)):
        reply = await stub.ListInteractions(
            jn_pb2.ListInteractionsRequest(application_id=app_id, customer_id=customer)
        )
        found = list(reply.interactions)
        if any(r.agent_id and r.outcome for r in found):  # Routing and CallMatching both
            return found
        await asyncio.sleep(0.1)
    return found


async def show_journey(
    channel: grpc.aio.Channel, app_id: str, customer: str, console: Console
) -> JourneyShown:
    stub: Any = jn_grpc.JourneyServiceStub(channel)
    shown = JourneyShown(customer, await _answered(stub, app_id, customer))
    table = Table(title=f"journey of {customer} (JourneyService, newest first)")
    for column in ("when", "channel", "status", "transaction", "agent", "group", "outcome"):
        table.add_column(column)
    for r in shown.records:
        table.add_row(
            r.occurred_at.ToDatetime().strftime("%H:%M:%S"),
            _name(jn_pb2.InteractionChannel, r.channel, "INTERACTION_CHANNEL_"),
            _name(jn_pb2.InteractionStatus, r.status, "INTERACTION_STATUS_"),
            r.transaction_id,
            r.agent_id,
            r.resource_group,
            r.outcome,
        )
    console.print(table)
    answered = next((r for r in shown.records if r.agent_id), None)
    if answered is None:
        return shown
    rated = await stub.SubmitSurvey(
        jn_pb2.SubmitSurveyRequest(
            application_id=app_id,
            customer_id=customer,
            interaction_id=answered.interaction_id,
            rating=5,
        )
    )
    shown.rated = f"{customer} rated the call with {rated.interaction.agent_id}: 5 of 5"
    console.print(f"survey: {shown.rated}")
    summary = await stub.GetSurveySummary(
        jn_pb2.GetSurveySummaryRequest(application_id=app_id, group_by=jn_pb2.SURVEY_GROUPING_AGENT)
    )
    shown.ratings = list(summary.rows)
    for row in shown.ratings:
        console.print(f"ratings of {row.key}: {row.count}, mean {row.mean_rating:.1f}")
    return shown
