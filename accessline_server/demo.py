"""`accessline demo`: plays the whole call-matching path against running services (the
embedded run of `accessline up` by default) with simulated customers' apps, a simulated
switch and simulated agents, and shows it live in the terminal.

Customers ask for a handoff (StartHandoff), then dial: most key in the right access code,
some a wrong one (the call then goes through the IVR and is routed by the number's group).
The switch routes every call (RouteInboundCall); agents on Presence streams accept,
decline or ignore offers. The view shows handoffs, match outcomes, calls in progress,
agents' presence and latency percentiles, and a summary at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.demo_journey import JourneyShown, show_journey
from accessline_server.runtime.devpki import DevIdentity

C = common_pb2


# Where `make up` keeps its development identity (certificates, signing key).
DEFAULT_IDENTITY = Path(".accessline/identity")


@dataclass
class Addresses:
    numbers: str = "127.0.0.1:50051"
    matching: str = "127.0.0.1:50052"
    routing: str = "127.0.0.1:50053"
    presence: str = "127.0.0.1:50054"


@dataclass
class Tally:
    """What the view shows."""

    handoffs: int = 0
    calls_started: int = 0
    connected: int = 0
    failed: int = 0
    exhausted: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    offers: Counter[str] = field(default_factory=Counter)
    in_progress: int = 0
    waiting: int = 0
    queued_calls: int = 0
    longest_position: int = 0
    to_match: list[float] = field(default_factory=list)
    to_connect: list[float] = field(default_factory=list)
    agents: dict[str, str] = field(default_factory=dict)
    # Customers whose call matched their handoff and reached an agent (a call with a
    # wrong code may reach one too, as a caller unknown).
    connected_customers: list[str] = field(default_factory=list)
    journey: JourneyShown | None = None


@dataclass
class Access:
    """How the simulated apps, switch and agents reach the services: over mutual TLS with
    the development identity and bearer tokens it signs, or in plain text when the
    services run with ACCESSLINE_INSECURE (`identity` None)."""

    identity: DevIdentity | None

    def channel(self, address: str, token: str = "") -> grpc.aio.Channel:
        if self.identity is None:
            return grpc.aio.insecure_channel(address)
        return self.identity.channel(address, token)

    def token(self, subject: str, *roles: str, applications: Sequence[str] = ()) -> str:
        if self.identity is None:
            return ""
        return self.identity.token(
            subject, roles, applications=applications, switch="*" if "switch" in roles else ""
        )


def development_access(folder: Path = DEFAULT_IDENTITY) -> Access:
    """The access of `make up`'s development identity, when there is one."""
    found = DevIdentity(folder)
    return Access(found if found.exists() else None)


class SimulatedAgent:
    """An agent app: accepts most offers, declines some, ignores a few; wraps up `talk`
    seconds after an accept."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        agent_id: str,
        tally: Tally,
        decline: float,
        ignore: float,
        talk: float = 0.0,
    ) -> None:
        self.agent_id = agent_id
        # Seconds on a call before wrapping up (0: at the accept).
        self._talk = talk
        self._tally = tally
        self._decline = decline
        self._ignore = ignore
        self._channel = channel
        self._outbox: asyncio.Queue[pr_pb2.ConnectRequest | None] = asyncio.Queue()
        stub: Any = pr_grpc.PresenceServiceStub(channel)
        self._call = stub.Connect(self._requests())
        self._task: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[pr_pb2.ConnectRequest]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def start(self) -> None:
        self._outbox.put_nowait(pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id=self.agent_id)))
        snapshot = await self._call.read()
        self._tally.agents[self.agent_id] = C.OverallPresence.Name(
            snapshot.snapshot.presence.overall
        )
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        pending: dict[str, str] = {}
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                kind = reply.WhichOneof("message")
                if kind == "offer":
                    roll = random.random()
                    if roll < self._ignore:
                        self._tally.offers["ignored"] += 1
                        continue
                    accept = roll >= self._ignore + self._decline
                    self._tally.offers["accepted" if accept else "declined"] += 1
                    if accept:
                        pending[reply.offer.offer_id] = reply.offer.interaction_id
                    decision = (
                        pr_pb2.OFFER_DECISION_ACCEPT if accept else pr_pb2.OFFER_DECISION_DECLINE
                    )
                    self._outbox.put_nowait(
                        pr_pb2.ConnectRequest(
                            offer_response=pr_pb2.OfferResponse(
                                offer_id=reply.offer.offer_id, decision=decision
                            )
                        )
                    )
                elif kind == "offer_response_recorded":
                    interaction = pending.pop(reply.offer_response_recorded.offer_id, "")
                    if interaction:
                        end = pr_pb2.ConnectRequest(
                            end_interaction=pr_pb2.EndInteraction(interaction_id=interaction)
                        )
                        asyncio.get_running_loop().call_later(
                            self._talk, self._outbox.put_nowait, end
                        )
                elif (
                    kind == "offer_cancelled"
                    and reply.offer_cancelled.reason == pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT
                ):
                    # Set not ready for missing offers: the agent notices and comes back.
                    self._tally.offers["set not ready (no answer)"] += 1
                    self._outbox.put_nowait(
                        pr_pb2.ConnectRequest(
                            set_channel_presence=pr_pb2.SetChannelPresence(
                                channel=C.CHANNEL_DESK_VOICE, available=True
                            )
                        )
                    )
                elif kind == "presence_confirmed":
                    overall = reply.presence_confirmed.presence.overall
                    self._tally.agents[self.agent_id] = C.OverallPresence.Name(overall)

    def stop(self) -> None:
        self._outbox.put_nowait(None)
        if self._task is not None:
            self._task.cancel()


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a refusal, bounded to keep the demo moving."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(min(2.0, max(0.1, info.retry_delay.ToNanoseconds() / 1e9)))
    return 1.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def render(tally: Tally, calls: int) -> Group:
    summary = Table(title="Accessline demo", show_header=False)
    summary.add_row("handoffs started", f"{tally.handoffs} / {calls}")
    summary.add_row("calls routed", str(tally.calls_started))
    summary.add_row("calls in progress", str(tally.in_progress))
    summary.add_row("waiting in the queue now", str(tally.waiting))
    summary.add_row(
        "calls that queued (deepest position)", f"{tally.queued_calls} ({tally.longest_position})"
    )
    summary.add_row("connected to an agent", str(tally.connected))
    summary.add_row("failed (no agent)", str(tally.failed))
    summary.add_row("handoffs told to wait (numbers busy)", str(tally.exhausted))
    outcomes = Table(title="match outcomes")
    outcomes.add_column("outcome")
    outcomes.add_column("calls", justify="right")
    for name, count in sorted(tally.outcomes.items()):
        outcomes.add_row(name.removeprefix("MATCH_OUTCOME_"), str(count))
    offers = Table(title="offers")
    offers.add_column("answer")
    offers.add_column("count", justify="right")
    for name, count in sorted(tally.offers.items()):
        offers.add_row(name, str(count))
    latency = Table(title="latency (ms)")
    latency.add_column("stage")
    for column in ("p50", "p95", "p99"):
        latency.add_column(column, justify="right")
    for name, values in (
        ("call to match decision", tally.to_match),
        ("call to agent accepted", tally.to_connect),
    ):
        latency.add_row(name, *(f"{percentile(values, p):.0f}" for p in (50, 95, 99)))
    agents = Table(title="agents")
    agents.add_column("presence")
    agents.add_column("agents", justify="right")
    for name, count in sorted(Counter(tally.agents.values()).items()):
        agents.add_row(name.removeprefix("OVERALL_PRESENCE_"), str(count))
    return Group(summary, outcomes, offers, latency, agents)


async def setup(
    addresses: Addresses, agents: int, run: str, channels: list[grpc.aio.Channel]
) -> tuple[Any, Any, Any, Any]:
    nd: Any = nd_grpc.NumberDistributionServiceStub(channels[0])
    cm: Any = cm_grpc.CallMatchingServiceStub(channels[1])
    pr: Any = pr_grpc.PresenceServiceStub(channels[2])
    rt: Any = rt_grpc.RoutingServiceStub(channels[3])
    group = f"demo-{run}"
    pool = nd_pb2.Pool(
        pool_id=f"demo-{run}",
        display_name="Demo numbers, Lyon",
        subjects=[f"mortgage-{run}"],
        resource_group=group,
        access_code_policy=nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=6),
    )
    pool.city.name = "Lyon"
    pool.quarantine.FromSeconds(1)
    await nd.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    numbers = [f"+3347{secrets.randbelow(10**7):07d}" for _ in range(max(40, agents * 4))]
    await nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=pool.pool_id, numbers=numbers))
    app = cm_pb2.Application(
        application_id=f"demo-bank-{run}",
        match_schema=C.MATCH_SCHEMA_NUMBER_CODE,
        skip_ivr_on_match=True,
        survey_after_call=True,
    )
    await cm.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=app))
    for i in range(agents):
        await pr.RegisterAgent(
            pr_pb2.RegisterAgentRequest(
                agent=pr_pb2.Agent(
                    agent_id=f"demo-{run}-agent-{i:02d}",
                    display_name=f"Agent {i}",
                    skills=[pr_pb2.Skill(name=f"mortgage-{run}", level=1 + i % 10)],
                    languages=["fr-FR"],
                    resource_groups=[group],
                    channels=[
                        pr_pb2.ChannelConfig(
                            channel=C.CHANNEL_DESK_VOICE,
                            address=f"{4000 + i}",
                            available_on_login=True,
                        )
                    ],
                )
            )
        )
    return nd, cm, pr, rt


@dataclass
class Customers:
    """The demo's customers: each starts a handoff in the bank's app, calls the number it
    got (some keying in a wrong code) and follows the call to an agent, in the tally."""

    cm: Any
    rt: Any
    run: str
    tally: Tally
    gate: asyncio.Semaphore
    wrong_code_share: float

    async def handoff(self, request: cm_pb2.StartHandoffRequest) -> cm_pb2.StartHandoffResponse:
        # A real app waits as told when every number is taken, then asks again.
        while True:
            try:
                reply: cm_pb2.StartHandoffResponse = await self.cm.StartHandoff(request)
                return reply
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self.tally.exhausted += 1
                await asyncio.sleep(retry_delay(error))

    async def call(self, n: int) -> None:
        tally = self.tally
        async with self.gate:
            started = await self.handoff(
                cm_pb2.StartHandoffRequest(
                    application_id=f"demo-bank-{self.run}",
                    customer_id=f"customer-{n}",
                    device_can_dial=True,
                    device_can_send_dtmf=True,
                    context=C.ContextData(
                        subject=f"mortgage-{self.run}",
                        language="fr-FR",
                        service_request_id=f"SR-{1000 + n}",
                        attributes={"display_name": f"Customer {n}"},
                    ),
                )
            )
            tally.handoffs += 1
            digits = started.access_code
            if random.random() < self.wrong_code_share:
                digits = str((int(digits) + 1) % 10**6).zfill(6)
            arrived = time.perf_counter()
            tally.calls_started += 1
            tally.in_progress += 1
            call = self.rt.RouteInboundCall(
                rt_pb2.RouteInboundCallRequest(
                    call_id=f"demo-call-{self.run}-{n}",
                    dnis=started.access_number,
                    # Each simulated customer calls from a mobile number of their own.
                    ani=f"+33612{n:06d}",
                    dtmf_digits=digits,
                )
            )
            await self._follow(call, arrived, f"customer-{n}")

    async def _follow(self, call: Any, arrived: float, customer: str) -> None:
        """Counts the call's events until it ends."""
        tally = self.tally
        queued = counted = matched = False
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "queued":
                    position = event.queued.position
                    tally.longest_position = max(tally.longest_position, position)
                    if not queued:
                        queued = True
                        tally.waiting += 1
                    if not counted and (position > 1 or event.queued.estimated_wait.seconds):
                        counted = True
                        tally.queued_calls += 1
                    continue
                if queued:
                    queued = False
                    tally.waiting -= 1
                if kind == "match_decided":
                    tally.outcomes[cm_pb2.MatchOutcome.Name(event.match_decided.outcome)] += 1
                    matched = event.match_decided.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
                    tally.to_match.append(time.perf_counter() - arrived)
                elif kind == "connect":
                    tally.connected += 1
                    if matched:
                        tally.connected_customers.append(customer)
                    tally.to_connect.append(time.perf_counter() - arrived)
                elif kind == "failed":
                    tally.failed += 1
        finally:
            tally.in_progress -= 1
            if queued:
                tally.waiting -= 1


async def play(
    addresses: Addresses,
    calls: int,
    agents: int,
    concurrency: int,
    *,
    live: bool = True,
    wrong_code_share: float = 0.15,
    decline: float = 0.1,
    ignore: float = 0.05,
    access: Access | None = None,
    console: Console | None = None,
) -> Tally:
    console = console or Console()
    access = access or development_access()
    run = secrets.token_hex(3)
    tally = Tally()
    # The operator (pools, application, agents), the bank's app backend and the switch.
    operator = access.token(
        f"demo-{run}",
        "admin",
        "app_backend",
        "switch",
        "supervisor",
        applications=[f"demo-bank-{run}"],
    )
    channels = [
        access.channel(a, operator)
        for a in (addresses.numbers, addresses.matching, addresses.presence, addresses.routing)
    ]
    _, cm, _, rt = await setup(addresses, agents, run, channels)
    agent_ids = [f"demo-{run}-agent-{i:02d}" for i in range(agents)]
    agent_channels = [
        access.channel(addresses.presence, access.token(agent_id, "agent"))
        for agent_id in agent_ids
    ]
    channels += agent_channels
    team = [
        SimulatedAgent(channel, agent_id, tally, decline, ignore)
        for channel, agent_id in zip(agent_channels, agent_ids, strict=True)
    ]
    for member in team:
        await member.start()
    customers = Customers(cm, rt, run, tally, asyncio.Semaphore(concurrency), wrong_code_share)
    with Live(
        render(tally, calls), console=console, refresh_per_second=4, transient=not live
    ) as view:

        async def refresh() -> None:
            while True:
                view.update(render(tally, calls))
                await asyncio.sleep(0.25)

        painter = asyncio.create_task(refresh())
        try:
            await asyncio.gather(*(customers.call(n) for n in range(calls)))
        finally:
            painter.cancel()
            view.update(render(tally, calls))
    for member in team:
        member.stop()
    if tally.connected_customers:
        tally.journey = await show_journey(
            channels[1], f"demo-bank-{run}", tally.connected_customers[0], console
        )
    for channel in channels:
        await channel.close()
    to_connect = tally.to_connect
    console.print(render(tally, calls))
    p50 = statistics.median(to_connect) * 1000 if to_connect else 0.0
    matched = tally.outcomes.get("MATCH_OUTCOME_MATCHED", 0)
    console.print(
        f"summary: {tally.handoffs} handoffs, {tally.connected} calls connected,"
        f" {tally.failed} without an agent, {matched} matched; call to agent p50 {p50:.0f} ms"
    )
    return tally
