"""What Routing records in the customer's journey, through CallMatching's published
`records` module: a matched call connected to its agent or abandoned in its queue, a
callback scheduled and how it ended, a notify-when-available request and how it ended.
Records are queued off the call path (never slowing or failing it)."""

from __future__ import annotations

from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.callmatching.journey import records

ANSWERED = jn_pb2.INTERACTION_STATUS_ANSWERED
CLOSED = jn_pb2.INTERACTION_STATUS_CLOSED
PENDING = jn_pb2.INTERACTION_STATUS_PENDING


def interaction_id(item: rt_store.QueuedInteraction) -> str:
    """The id of a queued interaction's record in the journey: a call's handoff session,
    a callback's own id."""
    if item.kind == rt_store.INTERACTION_KIND_CALL:
        return item.session_id or item.interaction_id
    return item.interaction_id


def surveyed_id(item: rt_store.QueuedInteraction) -> str:
    """The journey id an offer carries so that the call's end (and the survey after it)
    can name it: a call of an app's customer only (a callback's dial may not have reached
    the customer when its agent ends it)."""
    if item.kind != rt_store.INTERACTION_KIND_CALL or not item.application_id:
        return ""
    return interaction_id(item)


def _record(
    application_id: str, interaction_id: str, channel: int, status: int, **known: str
) -> None:
    """One of Routing's records, of an application's customer only; empty: not known."""
    if application_id:
        found = {name: value or None for name, value in known.items()}  # text fields only
        record = records.Record(application_id, interaction_id, channel, status, **found)  # type: ignore[arg-type]
        records.record(record)


def call(item: rt_store.QueuedInteraction, *, connected: bool, agent_id: str = "") -> None:
    """A matched call connected to its agent (answered), or gone before (closed)."""
    if item.kind != rt_store.INTERACTION_KIND_CALL:
        return
    _record(
        item.application_id,
        interaction_id(item),
        jn_pb2.INTERACTION_CHANNEL_APP_VOICE,
        ANSWERED if connected else CLOSED,
        customer_id=item.customer_id,
        agent_id=agent_id,
        resource_group=item.resource_group,
        outcome="" if connected else "ABANDONED",
    )


def callback(
    stored: rt_store.StoredCallback,
    status: int,
    *,
    outcome: str = "",
    agent_id: str = "",
    topic: str = "",
    transaction_id: str = "",
) -> None:
    """A callback scheduled (pending), made (answered) or given up (closed)."""
    _record(
        stored.application_id,
        stored.callback.callback_id,
        jn_pb2.INTERACTION_CHANNEL_CALLBACK,
        status,
        customer_id=stored.customer_id,
        agent_id=agent_id,
        resource_group=stored.callback.resource_group,
        outcome=outcome,
        topic=topic,
        transaction_id=transaction_id,
    )


def callback_attempt(stored: rt_store.StoredCallback, state: int) -> None:
    """How a dial of the callback went: completed, given up, or to be tried again."""
    if state == rt_pb2.CALLBACK_STATE_COMPLETED:
        callback(stored, ANSWERED, outcome="COMPLETED")
    elif state == rt_pb2.CALLBACK_STATE_FAILED:
        callback(stored, CLOSED, outcome="NOT_REACHED")
    else:
        callback(stored, PENDING, outcome="NOT_REACHED_YET")


def notify_request(
    application_id: str,
    request_id: str,
    status: int,
    *,
    customer_id: str = "",
    resource_group: str = "",
    outcome: str = "",
    topic: str = "",
) -> None:
    """A notify-when-available request made (pending), answered by an agent held for the
    customer (answered), or cancelled (closed)."""
    _record(
        application_id,
        request_id,
        jn_pb2.INTERACTION_CHANNEL_NOTIFY_WHEN_AVAILABLE,
        status,
        customer_id=customer_id,
        resource_group=resource_group,
        outcome=outcome,
        topic=topic,
    )
