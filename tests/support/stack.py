"""The stack the routing tests and the chaos tests share: the five services as real
processes (two Routing replicas) on one etcd, their typed stubs, and the helpers that
play the agent, the customer and the switch."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.routing import keys as rt_keys
from accessline_server.routing.__main__ import SEAL_PURPOSE
from accessline_server.routing.settings import DEVELOPMENT_SECRET
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Entry, Op, Store
from tests.conftest import (
    ServiceProcess,
    connect,
    eventually,
    free_port,
    identity,
    spawn_service,
    wait_serving,
)
from tests.support.callmatching import WITHHELD_LIMIT
from tests.support.presence import App

C = common_pb2


# Routing's sealing in the test processes (their development secret).
ROUTING_SEALER = Sealer(DEVELOPMENT_SECRET.encode(), SEAL_PURPOSE)


ROUTING_ENV = {
    "ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS": "2",
    "ACCESSLINE_ROUTING_NO_ANSWER_LIMIT": "2",
    "ACCESSLINE_ROUTING_OWNER_WAIT_SECONDS": "1.5",
    "ACCESSLINE_ROUTING_DISPATCH_INTERVAL_SECONDS": "0.2",
    "ACCESSLINE_ROUTING_QUEUE_UPDATE_SECONDS": "0.2",
    "ACCESSLINE_ROUTING_LEADER_LEASE_SECONDS": "2",
    "ACCESSLINE_ROUTING_HOLD_SECONDS": "3",
    "ACCESSLINE_ROUTING_CALLBACK_RETRY_SECONDS": "0",
    "ACCESSLINE_ROUTING_CALLBACK_DIAL_TIMEOUT_SECONDS": "4",
    # Gold customers are worth more, but ordinary calls have a short SLA and their
    # priority rises fast once it is missed.
    "ACCESSLINE_ROUTING_VALUE_RULES": '[{"segment": "gold", "value": 50, "sla_seconds": 600}]',
    "ACCESSLINE_ROUTING_DEFAULT_VALUE": "10",
    "ACCESSLINE_ROUTING_DEFAULT_SLA_SECONDS": "1",
    "ACCESSLINE_ROUTING_PRIORITY_PER_SECOND": "40",
}


@dataclass
class Stack:
    """The running services: a typed stub of each (a stub per Routing replica), a store
    on their etcd prefix, and their processes."""

    nd: NumberDistributionServiceAsyncStub
    cm: CallMatchingServiceAsyncStub
    pr: PresenceServiceAsyncStub
    nt: NotificationServiceAsyncStub
    routers: list[RoutingServiceAsyncStub]
    store: Store
    processes: list[ServiceProcess]
    router_processes: list[ServiceProcess]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    prefix: str = ""
    # Each service's Connect and gRPC-Web address (the first Routing replica's for
    # routing), when the stack was started with them.
    web: dict[str, str] = field(default_factory=dict)
    # The history database's file (match attempts, the customers' journeys).
    history: Path | None = None


async def start_stack(
    etcd: EmbeddedEtcd | str,
    prefix: str,
    tmp: Path,
    *,
    web: Mapping[str, str] | None = None,
    notification_env: Mapping[str, str] | None = None,
    presence_env: Mapping[str, str] | None = None,
    web_ports: Mapping[str, int] | None = None,
    **routing_env: str,
) -> Stack:
    """The five services (two Routing replicas) on an etcd, or on the endpoints given;
    with `web` (settings of the web ports, on the `web_ports` given or free ones), each
    also serves Connect and gRPC-Web; Notification and Presence with `notification_env`
    and `presence_env` besides."""
    endpoints = etcd if isinstance(etcd, str) else etcd.endpoint
    ports = {name: str(port) for name, port in (web_ports or {}).items()}

    def web_env(name: str) -> dict[str, str]:
        if web is None:
            return {}
        ports.setdefault(name, str(free_port()))
        return {**web, "ACCESSLINE_WEB_PORT": ports[name]}

    # One history database for the services that write the customers' journeys.
    history = {"ACCESSLINE_HISTORY_DSN": f"sqlite+aiosqlite:///{tmp / 'history.db'}"}
    nd = spawn_service("accessline_server.numberdistribution", endpoints, prefix, **web_env("nd"))
    pr = spawn_service(
        "accessline_server.presence",
        endpoints,
        prefix,
        **web_env("presence"),
        **(presence_env or {}),
    )
    nt = spawn_service(
        "accessline_server.notification",
        endpoints,
        prefix,
        **{**web_env("notification"), **history, **(notification_env or {})},
    )
    await wait_serving(nd)
    cm = spawn_service(
        "accessline_server.callmatching",
        endpoints,
        prefix,
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
        # Withheld callers share one bucket, and the modules on this stack place many
        # unmatched calls withheld, the others' failures counting against each (the
        # buckets are tested in test_guessing.py).
        ACCESSLINE_WITHHELD_FAILURE_LIMIT=WITHHELD_LIMIT,
        **{**history, **web_env("callmatching")},
    )
    for service in (pr, nt, cm):
        await wait_serving(service)
    routers = [
        spawn_service(
            "accessline_server.routing",
            endpoints,
            prefix,
            ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
            ACCESSLINE_PRESENCE_ADDRESS=pr.address,
            ACCESSLINE_NOTIFICATION_ADDRESS=nt.address,
            **{**history, **ROUTING_ENV, **routing_env, **web_env(f"routing-{index}")},
        )
        for index in range(2)
    ]
    for router in routers:
        await wait_serving(router)
    return await _assembled(endpoints, prefix, [nd, pr, nt, cm, *routers], ports, tmp)


async def _assembled(
    endpoints: str,
    prefix: str,
    processes: list[ServiceProcess],
    ports: Mapping[str, str],
    tmp: Path,
) -> Stack:
    """The stack of started processes (nd, pr, nt, cm, routers): a stub of each."""
    nd, pr, nt, cm, *routers = processes
    channels = [connect(p.address) for p in (nd, cm, pr, nt, *routers)]
    store = Store(endpoints, prefix)
    await store.connect()
    return Stack(
        nd_grpc.NumberDistributionServiceStub(channels[0]),
        cm_grpc.CallMatchingServiceStub(channels[1]),
        pr_grpc.PresenceServiceStub(channels[2]),
        nt_grpc.NotificationServiceStub(channels[3]),
        [rt_grpc.RoutingServiceStub(c) for c in channels[4:]],
        store,
        [nd, pr, nt, cm, *routers],
        routers,
        channels,
        prefix,
        {name.removesuffix("-0"): f"127.0.0.1:{port}" for name, port in ports.items()},
        tmp / "history.db",
    )


async def stop_stack(stack: Stack) -> None:
    for channel in stack.channels:
        await channel.close()
    await stack.store.close()
    await asyncio.gather(*(p.stop_async() for p in stack.processes))


async def leading_router(stack: Stack) -> tuple[int, Entry[rt_store.Leader]]:
    """The index of the Routing replica that runs the dispatch loop, and its key."""
    leader = await eventually(
        lambda: stack.store.get(rt_keys.LEADER, rt_store.Leader), what="a dispatch leader"
    )
    pid = int(leader.value.replica_id.split("/")[1])
    index = next(i for i, p in enumerate(stack.router_processes) if p.process.pid == pid)
    return index, leader


def new_group() -> str:
    return f"g-{uuid.uuid4().hex[:6]}"


async def agent(
    stack: Stack,
    group: str,
    level: int = 5,
    languages: tuple[str, ...] = (),
    *,
    available: bool = True,
    skill: str = "mortgage",
    address: str = "",
) -> tuple[str, App]:
    """An agent of `group` with a desk phone (at `address`, by default an extension of
    their own), logged in (and available)."""
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                skills=[pr_pb2.Skill(name=skill, level=level)],
                languages=list(languages),
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_DESK_VOICE,
                        address=address or f"ext-{agent_id}",
                        available_on_login=available,
                    )
                ],
            )
        )
    )
    app = App(stack.processes[1].address)
    await app.login(agent_id)
    return agent_id, app


async def set_available(app: App, available: bool) -> None:
    await app.send(
        set_channel_presence=pr_pb2.SetChannelPresence(
            channel=C.CHANNEL_DESK_VOICE, available=available
        )
    )
    await app.next_kind("presence_confirmed")


async def answer(app: App, decision: int) -> pr_pb2.Offer:
    preview = await app.next_kind("offer")
    await app.send(
        offer_response=pr_pb2.OfferResponse(offer_id=preview.offer_id, decision=decision)
    )
    return preview


ACCEPT = pr_pb2.OFFER_DECISION_ACCEPT


DECLINE = pr_pb2.OFFER_DECISION_DECLINE


async def setup_numbers(
    stack: Stack,
    group: str,
    count: int = 1,
    *,
    skip_ivr: bool = True,
    code_length: int = 0,
    schema: int = 0,
    survey_after_call: bool = False,
) -> tuple[str, list[str]]:
    """A pool of `count` numbers for `group` and an application matching by number (and
    by an access code of `code_length` digits when given, the pool issuing them), or by
    the match `schema` given."""
    pool_id = f"p-{uuid.uuid4().hex[:6]}"
    subject = f"mortgage-{pool_id}"
    pool = nd_pb2.Pool(pool_id=pool_id, subjects=[subject], resource_group=group)
    if code_length:
        pool.access_code_policy.mode = nd_pb2.ACCESS_CODE_MODE_REQUIRED
        pool.access_code_policy.length = code_length
    await stack.nd.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    numbers = [f"+3313{uuid.uuid4().int % 10**7:07d}" for _ in range(count)]
    await stack.nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=pool_id, numbers=numbers))
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    await stack.cm.RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id,
                match_schema=schema
                or (C.MATCH_SCHEMA_NUMBER_CODE if code_length else C.MATCH_SCHEMA_NUMBER),
                skip_ivr_on_match=skip_ivr,
                survey_after_call=survey_after_call,
            )
        )
    )
    return app_id, numbers


async def pool_subject(stack: Stack, group: str) -> str:
    pools = await stack.nd.ListPools(nd_pb2.ListPoolsRequest())
    return next(p.subjects[0] for p in pools.pools if p.resource_group == group)


class Call:
    """The switch's side of one RouteInboundCall stream."""

    def __init__(
        self,
        router: Any,
        dnis: str,
        call_id: str | None = None,
        resume_token: str = "",
        ani: str = "",
    ) -> None:
        self.call_id = call_id or f"call-{uuid.uuid4().hex[:8]}"
        self.call = router.RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(
                call_id=self.call_id, dnis=dnis, resume_token=resume_token, ani=ani
            )
        )
        self.events: list[rt_pb2.RouteInboundCallResponse] = []

    async def next(self, timeout: float = 20.0) -> rt_pb2.RouteInboundCallResponse:
        event = await asyncio.wait_for(self.call.read(), timeout)
        assert event is not grpc.aio.EOF, self.events
        self.events.append(event)
        return event

    async def until(self, *kinds: str, timeout: float = 20.0) -> rt_pb2.RouteInboundCallResponse:
        """Reads events (queued updates included) until one of `kinds` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(0.1, deadline - time.monotonic()))
            if event.WhichOneof("event") in kinds:
                return event

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("event")) for e in self.events]

    def hang_up(self) -> None:
        self.call.cancel()


async def handoff(
    stack: Stack, app_id: str, customer: str, context: C.ContextData, **extra: Any
) -> cm_pb2.StartHandoffResponse:
    return await stack.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id, customer_id=customer, context=context, **extra
        )
    )


def window(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return out


if TYPE_CHECKING:
    from accessline.callmatching.v1.call_matching_pb2_grpc import CallMatchingServiceAsyncStub
    from accessline.notification.v1.notification_pb2_grpc import NotificationServiceAsyncStub
    from accessline.numberdistribution.v1.number_distribution_pb2_grpc import (
        NumberDistributionServiceAsyncStub,
    )
    from accessline.presence.v1.presence_pb2_grpc import PresenceServiceAsyncStub
    from accessline.routing.v1.routing_pb2_grpc import RoutingServiceAsyncStub


@contextlib.asynccontextmanager
async def one_more_router(etcd: EmbeddedEtcd, prefix: str, **env: str) -> AsyncIterator[Any]:
    """A Routing process of its own settings, stopped on exit; yields its stub."""
    process = spawn_service("accessline_server.routing", etcd.endpoint, prefix, **env)
    try:
        await wait_serving(process)
        async with connect(process.address) as channel:
            yield rt_grpc.RoutingServiceStub(channel)
    finally:
        await process.stop_async()


async def stored_anywhere(stack: Stack, *needles: bytes) -> bool:
    """Whether any of `needles` appears in clear in a value of Routing's keys."""
    found = await stack.store.txn([], [Op.get_prefix(rt_keys.ROOT)])
    return any(n in value for _, value, _ in found.gets[0] for n in needles)


async def in_app(stack: Stack, customer: str, application_id: str = "customer-app") -> Any:
    """The in-app stream of a device of the customer's app (of `application_id`)."""
    device = f"d-{uuid.uuid4().hex[:6]}"
    await stack.nt.RegisterDevice(
        nt_pb2.RegisterDeviceRequest(
            device=nt_pb2.Device(
                device_id=device,
                customer_id=customer,
                application_id=application_id,
                platform=nt_pb2.PLATFORM_IN_APP,
            )
        )
    )
    own = nt_grpc.NotificationServiceStub(
        connect(stack.processes[2].address, identity().token(customer, "customer"))
    )
    return own.StreamNotifications(nt_pb2.StreamNotificationsRequest(device_id=device))


@dataclass
class CallPath:
    """The four services of the call path (no Notification), one process each."""

    nd: ServiceProcess
    cm: ServiceProcess
    pr: ServiceProcess
    rt: ServiceProcess


async def call_path_services(
    start: Callable[..., ServiceProcess],
    tmp: Path,
    env: dict[str, str] | None = None,
    **routing_env: str,
) -> CallPath:
    """NumberDistribution, CallMatching, Presence and Routing started with `start` (the
    `service_factory` fixture, which stops them after the test), each with `env`, and
    Routing with `routing_env` as well; returns once all serve."""
    # CallMatching and Routing share the history (the journey is written by both).
    env = {"ACCESSLINE_HISTORY_DSN": f"sqlite+aiosqlite:///{tmp / 'h.db'}", **(env or {})}
    nd = start("accessline_server.numberdistribution", **env)
    pr = start("accessline_server.presence", **env)
    await wait_serving(nd)
    cm = start(
        "accessline_server.callmatching", ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address, **env
    )
    await wait_serving(pr)
    await wait_serving(cm)
    rt = start(
        "accessline_server.routing",
        ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
        ACCESSLINE_PRESENCE_ADDRESS=pr.address,
        **env,
        **routing_env,
    )
    await wait_serving(rt)
    return CallPath(nd, cm, pr, rt)
