"""No personal datum is kept in clear anywhere in etcd: a customer's whole journey
through the five services, then every key and value under the stack's prefix searched
for what the customer and the agent told. On the session's stack (tests/conftest.py's
`stack`)."""

from __future__ import annotations

import struct
import uuid

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.runtime.store import Op
from tests.support.presence import App
from tests.support.stack import (
    ACCEPT,
    C,
    Call,
    Stack,
    answer,
    handoff,
    new_group,
    pool_subject,
    setup_numbers,
    window,
)


async def raw_etcd(stack: Stack) -> list[tuple[str, bytes]]:
    """Every key and value the five services keep under the stack's prefix, raw."""
    found = await stack.store.txn([], [Op.get_prefix("")])
    return [(key, value) for key, value, _ in found.gets[0]]


def in_clear(entries: list[tuple[str, bytes]], needles: dict[str, bytes]) -> list[str]:
    return [
        f"{what} in {key}"
        for key, value in entries
        for what, needle in needles.items()
        if needle in value or needle in key.encode()
    ]


async def mobile_agent(stack: Stack, agent_id: str, subject: str, group: str, mobile: str) -> App:
    """An agent of the group, logged in, reached on their mobile number."""
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                skills=[pr_pb2.Skill(name=subject, level=5)],
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_MOBILE_VOICE, address=mobile, available_on_login=True
                    )
                ],
            )
        )
    )
    agent_app = App(stack.processes[1].address)
    await agent_app.login(agent_id)
    return agent_app


async def a_device(stack: Stack, customer: str, app_id: str) -> None:
    """The customer's phone, registered with its push token."""
    await stack.nt.RegisterDevice(
        nt_pb2.RegisterDeviceRequest(
            device=nt_pb2.Device(
                device_id=f"d-{uuid.uuid4().hex[:6]}",
                customer_id=customer,
                application_id=app_id,
                platform=nt_pb2.PLATFORM_FCM,
                push_token="push-token-7f3a9c51e2",
            )
        )
    )


async def test_no_personal_datum_is_kept_in_clear_anywhere_in_etcd(stack: Stack) -> None:
    """A customer's whole journey (a handoff with a name, a location and private
    attributes, the call queued, offered and connected to an agent with a mobile
    number, a callback to a phone number, a notify request, a device with a push token),
    every raw etcd value and key read at each step: none holds a personal datum."""
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, count=2)
    subject = await pool_subject(stack, group)
    customer = f"c-leak-{uuid.uuid4().hex[:6]}"
    mobile = "+33799887766"
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    agent_app = await mobile_agent(stack, agent_id, subject, group, mobile)
    await a_device(stack, customer, app_id)
    context = C.ContextData(
        subject=subject,
        attributes={"display_name": "Ms Leakproof", "iban": "FR76LEAKPROOF0042"},
        location=C.GeoPoint(latitude=48.856613, longitude=2.352222),
    )
    needles = {
        "name": b"Ms Leakproof",
        "attribute": b"FR76LEAKPROOF0042",
        "latitude": struct.pack("<d", 48.856613),
        "longitude": struct.pack("<d", 2.352222),
        "agent's mobile": b"799887766",
        "push token": b"push-token-7f3a9c51e2",
        "callback number": b"655443322",
    }
    started = await handoff(stack, app_id, customer, context)
    leaks = in_clear(await raw_etcd(stack), needles)
    call = Call(stack.routers[0], started.access_number)
    await call.until("offered")
    leaks += in_clear(await raw_etcd(stack), needles)
    await answer(agent_app, ACCEPT)
    connect_to = (await call.until("connect")).connect
    assert (connect_to.address, connect_to.context) == (mobile, context)
    leaks += in_clear(await raw_etcd(stack), needles)
    await stack.routers[1].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id=app_id,
            customer_id=customer,
            phone_number="+33 6 55 44 33 22",
            latest=window(3600),
            resource_group=new_group(),
            context=context,
        )
    )
    await stack.routers[0].RequestNotifyWhenAvailable(
        rt_pb2.RequestNotifyWhenAvailableRequest(
            customer_id=customer,
            resource_group=new_group(),
            handoff=cm_pb2.StartHandoffRequest(application_id=app_id, context=context),
        )
    )
    entries = await raw_etcd(stack)
    leaks += in_clear(entries, needles)
    assert leaks == []
    # Customer ids are the apps' own (pseudonymous) ids: kept in values where a record
    # needs its owner, never in a key name, where they would match by prefix.
    assert [key for key, _ in entries if customer in key] == []
    agent_app.call.cancel()
