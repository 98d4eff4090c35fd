"""Surveys in the journey: a customer rates an interaction an agent handled, once (one
conditional UPDATE: two answers at once leave one rating), and operators read the
ratings per agent, group or topic."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, func, select, update

from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline_server.callmatching.journey import schema
from accessline_server.callmatching.journey.reads import Journey, customer_condition, interaction
from accessline_server.runtime.errors import FailedPrecondition, NotFound

t = schema.interactions
SUMMARY_ROWS = 1000
GROUPED_BY: dict[int, Any] = {
    jn_pb2.SURVEY_GROUPING_AGENT: t.c.agent_id,
    jn_pb2.SURVEY_GROUPING_RESOURCE_GROUP: t.c.resource_group,
    jn_pb2.SURVEY_GROUPING_TOPIC: t.c.topic,
}


async def submit(
    journey: Journey, application_id: str, customer_id: str, interaction_id: str, rating: int
) -> jn_pb2.Interaction:
    key = journey.correlator.customer(application_id, customer_id) or ""
    now = int(time.time() * 1_000_000)
    theirs = and_(
        t.c.application_id == application_id,
        t.c.interaction_id == interaction_id,
        customer_condition(application_id, key),
    )

    async def work(conn: Any) -> Any:
        rated = await conn.execute(
            update(t)
            .where(theirs, t.c.rating.is_(None), t.c.agent_id.is_not(None))
            .values(rating=rating, rated_us=now)
        )
        found = (await conn.execute(select(t).where(theirs))).first()
        return rated.rowcount, found

    count, found = await journey.run(work)
    if found is None:
        raise NotFound(
            f"interaction {interaction_id} is not in this customer's journey",
            reason="INTERACTION_NOT_FOUND",
        )
    if count != 1:
        if found.rating is not None:
            raise FailedPrecondition(
                f"interaction {interaction_id} is rated already", reason="SURVEY_ANSWERED"
            )
        raise FailedPrecondition(
            f"no agent handled interaction {interaction_id}", reason="NOT_HANDLED_BY_AGENT"
        )
    return interaction(found)


async def summary(
    journey: Journey,
    application_id: str,
    grouping: int,
    start_us: int | None,
    end_us: int | None,
) -> list[jn_pb2.SurveyRow]:
    column = GROUPED_BY[grouping]
    conditions = [t.c.application_id == application_id, t.c.rating.is_not(None)]
    if start_us is not None:
        conditions.append(t.c.occurred_us >= start_us)
    if end_us is not None:
        conditions.append(t.c.occurred_us < end_us)
    count = func.count().label("n")
    statement = (
        select(column, count, func.avg(t.c.rating))
        .where(and_(*conditions))
        .group_by(column)
        .order_by(count.desc(), column)
        .limit(SUMMARY_ROWS)
    )

    async def work(conn: Any) -> Any:
        return (await conn.execute(statement)).fetchall()

    return [
        jn_pb2.SurveyRow(key=key or "", count=n, mean_rating=float(mean))
        for key, n, mean in await journey.run(work, read=True)
    ]
