"""Peers as groups of replicas: round-robin over several addresses (or a name that
resolves to all of them), a deadline on every call, and retries on another replica only
for the calls the contract declares free of side effects or idempotent."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from google.rpc.error_details_pb2 import ErrorInfo

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.peers import PeerError, peer_channel, peer_target, service_config
from tests.conftest import ServiceProcess, connect, eventually, identity, wait_serving

ND = nd_pb2.DESCRIPTOR.services_by_name["NumberDistributionService"]
Factory = Callable[..., ServiceProcess]


def test_the_service_config_retries_only_what_the_contract_declares_safe() -> None:
    config = json.loads(service_config(ND, 7.5))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    retried = {n["method"] for c in config["methodConfig"] if "retryPolicy" in c for n in c["name"]}
    plain = {
        n["method"] for c in config["methodConfig"] if "retryPolicy" not in c for n in c["name"]
    }
    assert {"ResolveNumber", "GetPool", "ListPools", "GetPoolStats"} <= retried
    assert {"ReserveNumber", "ReleaseNumber", "CreatePool", "DeletePool"} <= plain
    assert retried | plain == {m.name for m in ND.methods}
    assert {c["timeout"] for c in config["methodConfig"]} == {"7.500s"}


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("numberdistribution:50051", "numberdistribution:50051"),
        ("dns:///numberdistribution-peers:50051", "dns:///numberdistribution-peers:50051"),
        ("10.0.0.1:50051, 10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[::1]:50051,[::2]:50051", "ipv6:[::1]:50051,[::2]:50051"),
    ],
)
def test_a_peer_address_names_one_group_of_replicas(address: str, target: str) -> None:
    assert peer_target(address) == target
    with pytest.raises(ValueError, match="IP addresses"):
        peer_target("a.example:1,b.example:1")


async def test_calls_free_of_side_effects_are_retried_on_another_replica_and_others_not(
    service_factory: Factory,
) -> None:
    # The probe serves NumberDistribution's contract, so it shows that service's certificate.
    as_numbers = {
        "ACCESSLINE_TLS_CERT_FILE": str(identity().files.cert("numberdistribution")),
        "ACCESSLINE_TLS_KEY_FILE": str(identity().files.key("numberdistribution")),
    }
    replicas = [service_factory("tests.support.probe_service", **as_numbers) for _ in range(2)]
    for replica in replicas:
        await wait_serving(replica)
    address = ",".join(r.address for r in replicas)
    credentials = identity().service_credentials("callmatching", identity().superuser)
    async with peer_channel(address, ND, 10.0, credentials=credentials) as channel:
        stub = nd_grpc.NumberDistributionServiceStub(channel)
        # Each replica refuses the first call naming the pool: the retry goes on.
        got = await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="flaky-pool"))
        assert got.pool.pool_id == "flaky-pool"
        # A reservation is not repeated behind the caller's back; its failure reaches the
        # caller as the peer's error, with the peer's status.
        with pytest.raises(PeerError) as refused:
            await stub.ReserveNumber(nd_pb2.ReserveNumberRequest(session_id="flaky-session"))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.reason == "PEER_UNAVAILABLE"
        # Both replicas take calls.
        await asyncio.gather(
            *(stub.GetPool(nd_pb2.GetPoolRequest(pool_id=f"p{i}")) for i in range(20))
        )
    served = [sum("GetPool in flight" in line for line in r.lines) for r in replicas]
    assert all(count > 0 for count in served), served


async def test_callmatching_keeps_serving_when_one_numberdistribution_replica_dies(
    service_factory: Factory,
) -> None:
    numbers = [service_factory("accessline_server.numberdistribution") for _ in range(2)]
    for replica in numbers:
        await wait_serving(replica)
    matching = service_factory(
        "accessline_server.callmatching",
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=",".join(r.address for r in numbers),
    )
    await wait_serving(matching)
    subject = f"s-{uuid.uuid4().hex[:6]}"
    async with (
        connect(numbers[0].address, service="callmatching") as nd_channel,
        connect(matching.address, service="routing") as cm_channel,
    ):
        nd: Any = nd_grpc.NumberDistributionServiceStub(nd_channel)
        cm: Any = cm_grpc.CallMatchingServiceStub(cm_channel)
        await nd.CreatePool(
            nd_pb2.CreatePoolRequest(pool=nd_pb2.Pool(pool_id=subject, subjects=[subject]))
        )
        await nd.AddNumbers(
            nd_pb2.AddNumbersRequest(pool_id=subject, numbers=[f"+3323{i:07d}" for i in range(40)])
        )
        await cm.RegisterApplication(
            cm_pb2.RegisterApplicationRequest(
                application=cm_pb2.Application(
                    application_id=subject, match_schema=common_pb2.MATCH_SCHEMA_NUMBER_ANI
                )
            )
        )

        async def handoff() -> cm_pb2.StartHandoffResponse:
            return await cm.StartHandoff(
                cm_pb2.StartHandoffRequest(
                    application_id=subject,
                    customer_id="c",
                    ani_hint="+33612345678",
                    context=common_pb2.ContextData(subject=subject),
                ),
                timeout=15,
            )

        await handoff()
        numbers[1].process.kill()

        async def ten_in_a_row() -> bool:
            try:
                for _ in range(10):
                    await handoff()
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(ten_in_a_row, timeout=20, what="handoffs served by the survivor")


def _retry_delay(error: PeerError) -> float | None:
    for packed in error.packed_details():
        info = error_details_pb2.RetryInfo()
        if packed.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def test_a_peer_that_is_unavailable_or_too_slow_is_refused_with_retry_info(
    service_factory: Factory,
) -> None:
    # A caller told UNAVAILABLE or DEADLINE_EXCEEDED by way of a peer (a switch whose call
    # CallMatching could not decide in time while etcd elected a leader) is told when to
    # try again, as for etcd's own refusals.
    probe = service_factory(
        "tests.support.probe_service",
        ACCESSLINE_TLS_CERT_FILE=str(identity().files.cert("numberdistribution")),
        ACCESSLINE_TLS_KEY_FILE=str(identity().files.key("numberdistribution")),
        PROBE_WORK_SECONDS="5",
    )
    await wait_serving(probe)
    credentials = identity().service_credentials("callmatching", identity().superuser)
    async with peer_channel(probe.address, ND, 10.0, credentials=credentials) as channel:
        stub = nd_grpc.NumberDistributionServiceStub(channel)
        with pytest.raises(PeerError) as refused:
            await stub.ReserveNumber(nd_pb2.ReserveNumberRequest(session_id="flaky-once"))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
        assert _retry_delay(refused.value) == 1.0
        infos = [d for d in refused.value.packed_details() if d.Is(ErrorInfo.DESCRIPTOR)]
        assert len(infos) == 1
        with pytest.raises(PeerError) as slow:
            await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="slow-pool"), timeout=0.5)
        assert slow.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _retry_delay(slow.value) == 1.0
