"""What Notification records in the customer's journey, through CallMatching's published
`records` module: a notification sent to a customer of a named application (closed: it
asks nothing of them), a link an agent sent (pending: the customer has a page to open;
the application's backend closes it when its form is done)."""

from __future__ import annotations

from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.callmatching.journey import records


def notification(request: nt_pb2.PublishRequest, notification_id: str) -> None:
    if not (request.application_id and request.customer_id):
        return
    records.record(
        records.Record(
            application_id=request.application_id,
            interaction_id=notification_id,
            channel=jn_pb2.INTERACTION_CHANNEL_NOTIFICATION,
            status=jn_pb2.INTERACTION_STATUS_CLOSED,
            customer_id=request.customer_id,
            topic=nt_pb2.EventType.Name(request.event_type).removeprefix("EVENT_TYPE_").lower(),
        )
    )


def link(application_id: str, customer_id: str, agent_id: str, notification_id: str) -> None:
    if not application_id:
        return
    records.record(
        records.Record(
            application_id=application_id,
            interaction_id=notification_id,
            channel=jn_pb2.INTERACTION_CHANNEL_LINK,
            status=jn_pb2.INTERACTION_STATUS_PENDING,
            customer_id=customer_id,
            agent_id=agent_id,
        )
    )
