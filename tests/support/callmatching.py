"""The CallMatching tests' system: a NumberDistribution and two CallMatching replicas as
processes on one etcd prefix, shared by the test modules of CallMatching
(test_callmatching.py, test_callmatching_history.py), and the helpers that make pools,
applications, handoffs and calls."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import ServiceProcess, connect, spawn_service, wait_serving

PREFIX = "/cm-functional"
_serial = itertools.count(1)
S = common_pb2
MARKER = "PERSONAL-DATA-MARKER-7731"  # must never reach a log line
# Withheld callers share one bucket, and the module's many tests call withheld (the
# buckets are tested in test_guessing.py).
WITHHELD_LIMIT = "100000"


def fresh_numbers(count: int) -> list[str]:
    return [f"+3324{next(_serial):07d}" for _ in range(count)]


def fresh_ani() -> str:
    return f"+33612{next(_serial):06d}"


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


@dataclass
class System:
    nd: Any
    cm: Any
    cm2: Any
    processes: list[ServiceProcess]


@contextlib.asynccontextmanager
async def running_system(etcd: EmbeddedEtcd, tmp: Path) -> AsyncIterator[System]:
    """NumberDistribution and two CallMatching replicas on `PREFIX`, with stubs as
    Routing sees them (it alone may call MatchCall)."""
    nd = spawn_service("accessline_server.numberdistribution", etcd.endpoint, PREFIX)
    await wait_serving(nd)
    common = {
        "ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS": nd.address,
        "ACCESSLINE_ANI_FAILURE_LIMIT": "4",
        "ACCESSLINE_WITHHELD_FAILURE_LIMIT": WITHHELD_LIMIT,
        # Most tests reuse a number at once; the window is tested on its own.
        "ACCESSLINE_LATE_CALL_WINDOW_SECONDS": "0",
    }
    cm = spawn_service(
        "accessline_server.callmatching",
        etcd.endpoint,
        PREFIX,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp}/h1.db",
        **common,
    )
    cm2 = spawn_service(
        "accessline_server.callmatching",
        etcd.endpoint,
        PREFIX,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp}/h2.db",
        **common,
    )
    async with as_system([nd, cm, cm2]) as system:
        yield system


@contextlib.asynccontextmanager
async def as_system(processes: list[ServiceProcess]) -> AsyncIterator[System]:
    """A NumberDistribution's and two CallMatchings' processes, once serving, with stubs as
    Routing sees them (it alone may call MatchCall), with the superuser's token besides;
    the processes stopped after."""
    channels: list[Any] = []
    try:
        for process in processes:
            await wait_serving(process)
        channels = [connect(p.address, service="routing") for p in processes]
        yield System(
            nd_grpc.NumberDistributionServiceStub(channels[0]),
            cm_grpc.CallMatchingServiceStub(channels[1]),
            cm_grpc.CallMatchingServiceStub(channels[2]),
            processes,
        )
    finally:
        for channel in channels:
            await channel.close()
        for process in processes:
            process.stop()


async def make_pool(system: System, count: int = 1, **fields: Any) -> tuple[str, list[str]]:
    subject = f"s-{uuid.uuid4().hex[:10]}"
    pool = nd_pb2.Pool(pool_id=f"p-{uuid.uuid4().hex[:10]}", subjects=[subject], **fields)
    await system.nd.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    numbers = fresh_numbers(count)
    await system.nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=pool.pool_id, numbers=numbers))
    return subject, numbers


async def register(system: System, schema: int, **fields: Any) -> str:
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    app = cm_pb2.Application(
        application_id=app_id, match_schema=schema, skip_ivr_on_match=True, **fields
    )
    await system.cm.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=app))
    return app_id


def context(subject: str, **attributes: str) -> common_pb2.ContextData:
    return common_pb2.ContextData(
        subject=subject, language="fr-FR", service_request_id="SR-1042", attributes=attributes
    )


async def handoff(
    system: System, app_id: str, subject: str, **fields: Any
) -> cm_pb2.StartHandoffResponse:
    return await system.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id,
            customer_id="customer-1",
            context=fields.pop("ctx", None) or context(subject, note=MARKER),
            device_can_dial=True,
            device_can_send_dtmf=True,
            **fields,
        )
    )


async def call(
    stub: Any, dnis: str, ani: str = "", dtmf: str = "", call_id: str = ""
) -> cm_pb2.MatchCallResponse:
    return await stub.MatchCall(
        cm_pb2.MatchCallRequest(
            call_id=call_id or f"call-{uuid.uuid4().hex[:8]}", dnis=dnis, ani=ani, dtmf_digits=dtmf
        )
    )


CODE_POLICY = nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_OPTIONAL, length=6)
