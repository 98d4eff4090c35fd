"""Identity and access against the five services as real processes over mutual TLS: a
role x RPC matrix generated from the access options in the protos, and the attacks that
worked before callers were authenticated (each now refused). The links and keys
(certificates, etcd's, the issuer's keys) are test_links.py's."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.descriptor import MethodDescriptor

from accessline.access.v1 import access_pb2
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.runtime import devpki
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.identity import ROLE_NAMES, method_policy
from tests.conftest import (
    ROOT,
    error_details,
    identity,
)
from tests.support.rpc import invoke, request_for
from tests.support.stack import Stack, start_stack, stop_stack, window

SERVICES = {
    "numberdistribution": nd_pb2.DESCRIPTOR.services_by_name["NumberDistributionService"],
    "callmatching": cm_pb2.DESCRIPTOR.services_by_name["CallMatchingService"],
    "presence": pr_pb2.DESCRIPTOR.services_by_name["PresenceService"],
    "notification": nt_pb2.DESCRIPTOR.services_by_name["NotificationService"],
    "routing": rt_pb2.DESCRIPTOR.services_by_name["RoutingService"],
}
# Stack.processes order: nd, pr, nt, cm, routers.
PROCESS_INDEX = {
    "numberdistribution": 0,
    "presence": 1,
    "notification": 2,
    "callmatching": 3,
    "routing": 4,
}
# Every gRPC service each process serves: CallMatching hosts JourneyService besides.
HOSTED = [*SERVICES.items(), ("callmatching", jn_pb2.DESCRIPTOR.services_by_name["JourneyService"])]
METHODS = [(name, m) for name, s in HOSTED for m in s.methods]
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@pytest.fixture(scope="module")
async def stack(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    built = await start_stack(
        etcd, f"/access-{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("access")
    )
    yield built
    await stop_stack(built)


def token(*roles: str, **claims: Any) -> str:
    return identity().token("matrix-subject", *roles, **claims)


def other_roles(method: MethodDescriptor) -> list[str]:
    allowed = method_policy(method).roles
    return [name for role, name in ROLE_NAMES.items() if role not in allowed]


def forged(subject: str, roles: list[str]) -> str:
    """A token naming the issuer's key id, signed with another key."""
    kid = json.loads(identity().files.jwks.read_text())["keys"][0]["kid"]
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return devpki.mint_token(key, kid, subject, roles, applications=["*"], switch="*")


EVERY_ROLE = sorted(ROLE_NAMES.values())
SCOPED_ROLE = {
    access_pb2.SCOPE_KIND_APPLICATION: "app_backend",
    access_pb2.SCOPE_KIND_SWITCH: "switch",
    access_pb2.SCOPE_KIND_AGENT: "agent",
    access_pb2.SCOPE_KIND_CUSTOMER: "customer",
}


def service_name(service: int) -> str:
    return access_pb2.Service.Name(service).removeprefix("SERVICE_").lower()  # type: ignore[arg-type]


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
async def test_every_rpc_answers_each_caller_as_its_access_option_declares(
    stack: Stack, service: str, method: MethodDescriptor
) -> None:
    address = stack.processes[PROCESS_INDEX[service]].address
    files = identity().files
    policy = method_policy(method)
    empty = request_for(method)

    async def status(
        creds: grpc.ChannelCredentials, request: Any = empty
    ) -> tuple[grpc.StatusCode, str]:
        return await invoke(address, method, creds, request)

    everyone = {"applications": ["*"], "switch": "*"}
    bad_tokens = {
        "no token": "",
        "expired": files.token("m", EVERY_ROLE, ttl=-120, **everyone),
        "forged signature": forged("m", EVERY_ROLE),
        "wrong audience": files.token("m", EVERY_ROLE, audience="someone-else", **everyone),
        "wrong issuer": files.token("m", EVERY_ROLE, issuer="https://elsewhere.test", **everyone),
    }
    for case, bad in bad_tokens.items():
        code, _ = await status(identity().credentials(bad))
        assert code == grpc.StatusCode.UNAUTHENTICATED, case

    allowed_roles = {ROLE_NAMES[r] for r in policy.roles}
    wrong = [name for name in EVERY_ROLE if name not in allowed_roles]
    if wrong:
        refused = await status(identity().credentials(token(*wrong, **everyone)))
        assert refused == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_ROLE"), wrong
    # A service the option does not name, by its certificate alone, is refused too.
    unnamed = [s for s in SERVICES if s not in {service_name(x) for x in policy.services}]
    if unnamed:
        code, _ = await status(identity().service_credentials(unnamed[0]))
        assert code in DENIED, unnamed[0]

    # The caller the option allows gets past the check: whatever the empty request
    # deserves (INVALID_ARGUMENT, NOT_FOUND...), never a refusal of the caller.
    owned = {
        path: "probe-subject"
        if kind in (access_pb2.SCOPE_KIND_AGENT, access_pb2.SCOPE_KIND_CUSTOMER)
        else "bank"
        for kind, path in policy.scopes
    }
    code, reason = await status(identity().allowed(method), request_for(method, **owned))
    assert code not in DENIED, reason

    # A scoped caller naming what is someone else's is refused.
    if not method.client_streaming:
        for kind, path in policy.scopes:
            role = SCOPED_ROLE[kind]
            if role not in allowed_roles:
                continue
            outsider = identity().credentials(
                identity().token("matrix-outsider", role, applications=["mine"], switch="mine")
            )
            refused = await status(outsider, request_for(method, **{path: "victim"}))
            assert refused == (grpc.StatusCode.PERMISSION_DENIED, "OUT_OF_SCOPE"), path


# -- the attacks that worked before callers were authenticated -------------------------


def as_(token_: str) -> grpc.ChannelCredentials:
    return identity().credentials(token_)


def stub_of(stack: Stack, service: str, cls: Any, token_: str) -> Any:
    address = stack.processes[PROCESS_INDEX[service]].address
    return cls(grpc.aio.secure_channel(address, as_(token_)))


async def refused_with(call: Any, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert error_details(caught.value)["ErrorInfo"].reason == reason


def bank_backend() -> str:
    return identity().token("bank-backend", "app_backend", applications=["bank-a"])


async def test_an_app_backend_cannot_re_register_an_application(stack: Stack) -> None:
    app_id = f"bank-a-{uuid.uuid4().hex[:6]}"
    await stack.cm.RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id, match_schema=common_pb2.MATCH_SCHEMA_NUMBER_ANI_CODE
            )
        )
    )
    backend = stub_of(
        stack,
        "callmatching",
        cm_grpc.CallMatchingServiceStub,
        identity().token("bank-backend", "app_backend", applications=[app_id]),
    )
    weaker = cm_pb2.Application(application_id=app_id, match_schema=common_pb2.MATCH_SCHEMA_NUMBER)
    await refused_with(
        backend.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=weaker)),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_ROLE",
    )
    kept = await stack.cm.GetApplication(cm_pb2.GetApplicationRequest(application_id=app_id))
    assert kept.application.match_schema == common_pb2.MATCH_SCHEMA_NUMBER_ANI_CODE


async def test_an_agent_can_neither_redirect_an_agent_nor_log_in_as_one(stack: Stack) -> None:
    victim = f"agent-{uuid.uuid4().hex[:6]}"
    desk = pr_pb2.ChannelConfig(channel=common_pb2.CHANNEL_DESK_VOICE, address="ext-1001")
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(agent_id=victim, resource_groups=["g"], channels=[desk])
        )
    )
    mallory = identity().token("mallory", "agent")
    presence = stub_of(stack, "presence", pr_grpc.PresenceServiceStub, mallory)
    elsewhere = pr_pb2.ChannelConfig(channel=common_pb2.CHANNEL_DESK_VOICE, address="ext-6666")
    await refused_with(
        presence.RegisterAgent(
            pr_pb2.RegisterAgentRequest(
                agent=pr_pb2.Agent(agent_id=victim, resource_groups=["g"], channels=[elsewhere])
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_ROLE",
    )
    stream = presence.Connect()
    await stream.write(pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id=victim)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(caught.value)["ErrorInfo"].reason == "NOT_THIS_AGENT"
    kept = await stack.pr.GetAgent(pr_pb2.GetAgentRequest(agent_id=victim))
    assert [c.address for c in kept.agent.channels] == ["ext-1001"]


async def test_a_switch_gets_only_its_own_dials_and_reports_only_on_them(stack: Stack) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=common_pb2.CHANNEL_DESK_VOICE,
                        address="ext-7",
                        available_on_login=True,
                    )
                ],
            )
        )
    )
    agent_stream = stub_of(
        stack, "presence", pr_grpc.PresenceServiceStub, identity().token(agent_id, "agent")
    ).Connect()
    await agent_stream.write(pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id=agent_id)))
    assert (await agent_stream.read()).HasField("snapshot")
    sw1 = stub_of(
        stack,
        "routing",
        rt_grpc.RoutingServiceStub,
        identity().token("sw1", "switch", switch="sw1"),
    )
    sw2 = stub_of(
        stack,
        "routing",
        rt_grpc.RoutingServiceStub,
        identity().token("sw2", "switch", switch="sw2"),
    )
    # Another switch's id in the request: refused before anything is streamed.
    snooping = sw2.StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="sw1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await snooping.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    dials = sw1.StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="sw1"))
    requested = await stack.routers[0].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank-a",
            customer_id=f"c-{uuid.uuid4().hex[:6]}",
            phone_number="+33 6 11 22 33 44",
            resource_group=group,
            latest=window(3600),
        )
    )
    offer = await agent_stream.read()
    while not offer.HasField("offer"):
        offer = await agent_stream.read()
    await agent_stream.write(
        pr_pb2.ConnectRequest(
            offer_response=pr_pb2.OfferResponse(
                offer_id=offer.offer.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
            )
        )
    )
    dial = await asyncio.wait_for(dials.read(), 20)
    assert dial.callback_id == requested.callback.callback_id
    await refused_with(
        sw2.ReportCallbackAttempt(
            rt_pb2.ReportCallbackAttemptRequest(
                callback_id=dial.callback_id, outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "OUT_OF_SCOPE",
    )
    done = await sw1.ReportCallbackAttempt(
        rt_pb2.ReportCallbackAttemptRequest(
            callback_id=dial.callback_id, outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED
        )
    )
    assert done.callback.state == rt_pb2.CALLBACK_STATE_COMPLETED
    dials.cancel()
    agent_stream.cancel()


async def test_a_customer_reaches_only_their_own_devices_and_ids_match_exactly(
    stack: Stack,
) -> None:
    victim = f"nt-victim-{uuid.uuid4().hex[:6]}"
    spy = f"{victim}/spy"  # once a prefix path of the victim's key
    backend = identity().token("bank-backend", "app_backend", applications=["bank-a"])
    notification = stub_of(stack, "notification", nt_grpc.NotificationServiceStub, backend)
    device = f"d-{uuid.uuid4().hex[:6]}"
    await notification.RegisterDevice(
        nt_pb2.RegisterDeviceRequest(
            device=nt_pb2.Device(
                device_id=device,
                customer_id=victim,
                application_id="bank-a",
                platform=nt_pb2.PLATFORM_IN_APP,
            )
        )
    )
    as_spy = stub_of(
        stack, "notification", nt_grpc.NotificationServiceStub, identity().token(spy, "customer")
    )
    # The victim's device id, streamed or registered again by someone else: refused.
    stolen = as_spy.StreamNotifications(nt_pb2.StreamNotificationsRequest(device_id=device))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stolen.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await refused_with(
        as_spy.RegisterDevice(
            nt_pb2.RegisterDeviceRequest(
                device=nt_pb2.Device(
                    device_id=device,
                    customer_id=spy,
                    application_id="bank-a",
                    platform=nt_pb2.PLATFORM_IN_APP,
                )
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEVICE_TAKEN",
    )
    # A device of the spy's own, as `victim/spy`, gets nothing published to `victim`.
    own = f"d-{uuid.uuid4().hex[:6]}"
    await as_spy.RegisterDevice(
        nt_pb2.RegisterDeviceRequest(
            device=nt_pb2.Device(
                device_id=own,
                customer_id=spy,
                application_id="bank-a",
                platform=nt_pb2.PLATFORM_IN_APP,
            )
        )
    )
    published = await notification.Publish(
        nt_pb2.PublishRequest(customer_id=victim, event_type=nt_pb2.EVENT_TYPE_SURVEY, title="t")
    )
    delivery = await notification.GetDelivery(
        nt_pb2.GetDeliveryRequest(notification_id=published.notification_id)
    )
    assert [d.device_id for d in delivery.deliveries] == [device]


async def test_sessions_and_idempotency_keys_stay_their_owners(stack: Stack) -> None:
    subject = f"s-{uuid.uuid4().hex[:6]}"
    pool_id = f"p-{uuid.uuid4().hex[:6]}"
    await stack.nd.CreatePool(
        nd_pb2.CreatePoolRequest(pool=nd_pb2.Pool(pool_id=pool_id, subjects=[subject]))
    )
    await stack.nd.AddNumbers(
        nd_pb2.AddNumbersRequest(
            pool_id=pool_id, numbers=[f"+331{uuid.uuid4().int % 10**8:08d}" for _ in range(3)]
        )
    )
    for app_id in ("bank-a", "bank-b"):
        await stack.cm.RegisterApplication(
            cm_pb2.RegisterApplicationRequest(
                application=cm_pb2.Application(
                    application_id=app_id, match_schema=common_pb2.MATCH_SCHEMA_NUMBER
                )
            )
        )
    bank_a = stub_of(
        stack,
        "callmatching",
        cm_grpc.CallMatchingServiceStub,
        identity().token("a", "app_backend", applications=["bank-a"]),
    )
    bank_b = stub_of(
        stack,
        "callmatching",
        cm_grpc.CallMatchingServiceStub,
        identity().token("b", "app_backend", applications=["bank-b"]),
    )
    request = cm_pb2.StartHandoffRequest(
        application_id="bank-a",
        customer_id="alice",
        idempotency_key=f"k-{uuid.uuid4().hex[:6]}",
        context=common_pb2.ContextData(subject=subject),
    )
    started = await bank_a.StartHandoff(request)
    # Another bank cannot end it, nor see it.
    await refused_with(
        bank_b.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=started.session_id)),
        grpc.StatusCode.PERMISSION_DENIED,
        "OUT_OF_SCOPE",
    )
    # The same key for another customer, or with another request, is refused by name.
    other_customer = cm_pb2.StartHandoffRequest()
    other_customer.CopyFrom(request)
    other_customer.customer_id = "mallory"
    await refused_with(
        bank_a.StartHandoff(other_customer), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_TAKEN"
    )
    changed = cm_pb2.StartHandoffRequest()
    changed.CopyFrom(request)
    changed.context.attributes["note"] = "different"
    await refused_with(
        bank_a.StartHandoff(changed), grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"
    )
    # The same request again is the same session.
    assert (await bank_a.StartHandoff(request)).session_id == started.session_id


def access_table() -> list[str]:
    """The README's table of who may call each RPC, as the protos declare it."""
    kinds = {1: "application", 2: "switch", 3: "agent", 4: "customer"}
    rows = [
        "| RPC | roles (bearer token) | services (certificate) | the caller's scope checked on"
        " | audited as |",
        "|---|---|---|---|---|",
    ]
    for _, service in HOSTED:
        for method in service.methods:
            policy = method_policy(method)
            roles = ", ".join(sorted(ROLE_NAMES[r] for r in policy.roles)) or "—"
            services = ", ".join(sorted(service_name(s) for s in policy.services)) or "—"
            scopes = ", ".join(f"`{f}` ({kinds[k]})" for k, f in policy.scopes) or "—"
            audit = f"`{policy.audit[0]}`" if policy.audit else "—"
            rows.append(
                f"| {service.name.removesuffix('Service')}.{method.name} | {roles} | {services}"
                f" | {scopes} | {audit} |"
            )
    return rows


def test_the_readme_states_every_rpcs_access_as_the_protos_declare() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(access_table()) in readme
