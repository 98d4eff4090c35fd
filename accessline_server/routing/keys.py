"""Routing's key layout in etcd.

    rt/claims/{agent_id}/{channel}/{slot}       AgentClaim         (the claim's lease)
    rt/leader                                   Leader             (the leader's lease)
    rt/queue/{group}/{interaction_id}           QueuedInteraction  (calls: the holding
                                                                    replica's lease)
    rt/notify/{request_id}                      NotifyRequest      (lease to its expiry)
    rt/holds/{customer}                         AgentHold          (the hold claim's lease)
    rt/callbacks/{callback_id}                  StoredCallback
    rt/callback-owners/{group}/{customer}       CallbackOwner
    rt/dials/{callback_id}                      PendingDial
    rt/no-answer/{agent_id}                     NoAnswerCount
    rt/hours/{group}                            BusinessHours      (set by operators)
    rt/places/{group}/{n}                       empty              (the call's lease)

{customer} is a keyed hash of the customer id (Sealer.keyed_name): no customer id
appears in a key name. An agent's channel has as many slots as its capacity; claiming one
is a create-if-absent, so two Routing replicas never offer one agent more calls than the
channel holds.
"""

from __future__ import annotations

from accessline_server.runtime.sealing import Sealer

ROOT = "rt/"
CLAIMS = "rt/claims/"
LEADER = "rt/leader"
QUEUE = "rt/queue/"
NOTIFY = "rt/notify/"
HOLDS = "rt/holds/"
CALLBACKS = "rt/callbacks/"
DIALS = "rt/dials/"


def claim(agent_id: str, channel: int, slot: int) -> str:
    return f"{CLAIMS}{agent_id}/{channel}/{slot}"


def claims_of(agent_id: str) -> str:
    return f"{CLAIMS}{agent_id}/"


def queue(group: str) -> str:
    return f"{QUEUE}{group}/"


def queued(group: str, interaction_id: str) -> str:
    return f"{QUEUE}{group}/{interaction_id}"


def redirect(interaction_id: str) -> str:
    """A connected call the switch may still send back to its queue (its agent's phone
    did not take it), until its lease ends."""
    return f"{ROOT}redirects/{interaction_id}"


def place(group: str, index: int) -> str:
    return f"rt/places/{group}/{index}"


def places(group: str) -> str:
    return f"rt/places/{group}/"


def notify(request_id: str) -> str:
    return NOTIFY + request_id


def hold(sealer: Sealer, customer_id: str) -> str:
    return HOLDS + sealer.keyed_name("customer", customer_id)


def callback(callback_id: str) -> str:
    return CALLBACKS + callback_id


def callback_owner(sealer: Sealer, group: str, customer_id: str) -> str:
    return f"rt/callback-owners/{group}/{sealer.keyed_name('customer', customer_id)}"


def dial(callback_id: str) -> str:
    return DIALS + callback_id


def no_answer(agent_id: str) -> str:
    return f"rt/no-answer/{agent_id}"


def hours(group: str) -> str:
    """A group's business hours (BusinessHours), set by operators."""
    return f"{ROOT}hours/{group}"
