"""Notification's published module for surveys: Presence writes a survey invitation in
the transaction that ends an agent's interaction with a customer of an app (the op
below); Notification's survey worker records the call closed in the customer's journey,
sends the survey once when the application asks for one, and deletes the invitation
(survey_worker.py).

    nt/surveys/{application_id}/{interaction_id}    SurveyInvitation
"""

from __future__ import annotations

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline_server.runtime.store import Op

SURVEYS = "nt/surveys/"


def invitation_op(
    application_id: str, customer_id: str, interaction_id: str, agent_id: str, *, ask: bool
) -> Op:
    """The write of a survey invitation, for the transaction that ends the interaction
    (`interaction_id` is its id in the customer's journey; `ask`: send the survey, else
    only record the call closed)."""
    return Op.put(
        f"{SURVEYS}{application_id}/{interaction_id}",
        nt_store.SurveyInvitation(
            application_id=application_id,
            customer_id=customer_id,
            interaction_id=interaction_id,
            agent_id=agent_id,
            ask=ask,
        ),
    )
