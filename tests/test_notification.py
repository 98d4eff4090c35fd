"""Notification through real Notification processes, a real etcd and local HTTP/2 servers
that answer as APNs, FCM and Google's OAuth2 endpoint do: fan-out, idempotency, retries
after 429 and 5xx, deactivation on unregistered tokens, expiry, a worker killed
mid-delivery, the in-app stream's replay, and payloads that carry ids only."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from accessline_server.runtime.store import Store
from tests.conftest import (
    ServiceProcess,
    connect,
    eventually,
    identity,
    violated_fields,
    wait_serving,
)
from tests.support.push_servers import PushServers, make_credentials

N = nt_pb2
MARKER = "PERSONAL-CONTEXT-9152"


@dataclass
class Setup:
    servers: PushServers
    stubs: list[Any]
    replicas: list[ServiceProcess]
    store: Store

    def customer(self, replica: int, customer_id: str) -> Any:
        """A stub as the customer's own app calls it (its in-app stream)."""
        channel = connect(self.replicas[replica].address, identity().token(customer_id, "customer"))
        return nt_grpc.NotificationServiceStub(channel)


@pytest.fixture
async def setup(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess], etcd: EmbeddedEtcd, prefix: str
) -> AsyncIterator[Setup]:
    port = free_port()
    servers = PushServers(make_credentials(tmp_path, port))
    stop = asyncio.Event()
    task = asyncio.create_task(servers.run(port, stop))
    creds = servers.credentials
    env = {
        "ACCESSLINE_APNS_URL": f"https://127.0.0.1:{port}",
        "ACCESSLINE_APNS_KEY_FILE": str(creds.apns_key_file),
        "ACCESSLINE_APNS_KEY_ID": "KEY123",
        "ACCESSLINE_APNS_TEAM_ID": "TEAM456",
        "ACCESSLINE_APNS_TOPIC": "com.example.bank",
        "ACCESSLINE_FCM_URL": f"https://127.0.0.1:{port}",
        "ACCESSLINE_FCM_SERVICE_ACCOUNT_FILE": str(creds.fcm_account_file),
        "ACCESSLINE_PUSH_CA_FILE": str(creds.ca_file),
        "ACCESSLINE_DELIVERY_BACKOFF_SECONDS": "0.2",
        "ACCESSLINE_DELIVERY_WORKER_LEASE_SECONDS": "3",
    }
    replicas = [service_factory("accessline_server.notification", **env) for _ in range(2)]
    for replica in replicas:
        await wait_serving(replica)
    channels = [connect(r.address) for r in replicas]
    async with Store(etcd.endpoint, prefix) as store:
        yield Setup(
            servers, [nt_grpc.NotificationServiceStub(c) for c in channels], replicas, store
        )
    for channel in channels:
        await channel.close()
    # The services' provider connections close first, so the servers stop at once.
    await asyncio.gather(*(replica.stop_async() for replica in replicas))
    servers.release.set()
    stop.set()
    await task


async def device(stub: Any, customer: str, platform: int, token: str = "") -> str:
    reply = await stub.RegisterDevice(
        N.RegisterDeviceRequest(
            device=N.Device(
                customer_id=customer,
                application_id="bank",
                platform=platform,
                push_token=token,
                locale="fr-FR",
            )
        )
    )
    return str(reply.device.device_id)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def publish(stub: Any, **fields: Any) -> N.PublishResponse:
    fields.setdefault("event_type", N.EVENT_TYPE_AGENT_AVAILABLE)
    fields.setdefault("title", "An agent is free")
    fields.setdefault("body", "Open the app to call now.")
    return await stub.Publish(N.PublishRequest(**fields))


async def statuses(stub: Any, notification_id: str) -> dict[str, N.DeviceDelivery]:
    reply = await stub.GetDelivery(N.GetDeliveryRequest(notification_id=notification_id))
    return {d.device_id: d for d in reply.deliveries}


async def settled(
    stub: Any, notification_id: str, want: dict[str, int], timeout: float = 20
) -> dict[str, N.DeviceDelivery]:
    async def check() -> dict[str, N.DeviceDelivery] | None:
        found = await statuses(stub, notification_id)
        return found if {k: v.status for k, v in found.items()} == want else None

    result: dict[str, N.DeviceDelivery] = await eventually(
        check, timeout=timeout, what=f"deliveries {want}"
    )
    return result


async def test_a_topic_fans_out_to_every_platform_with_the_providers_exact_requests(
    setup: Setup,
) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    ios = await device(setup.stubs[0], customer, N.PLATFORM_APNS, "ok-ios-1")
    android = await device(setup.stubs[0], customer, N.PLATFORM_FCM, "ok-android-1")
    topic = f"service-request/SR-{uuid.uuid4().hex[:6]}"
    await setup.stubs[1].Subscribe(N.SubscribeRequest(topic=topic, customer_id=customer))
    app, stream = await live_in_app_stream(setup, f"{customer}-app", topic)

    sent = await publish(
        setup.stubs[0],
        topic=topic,
        event_type=N.EVENT_TYPE_SERVICE_REQUEST_STATUS_CHANGED,
        title="Your request moved",
        body="SR is now in progress.",
        data={"service_request_id": "SR-1042"},
        priority=N.PRIORITY_HIGH,
        collapse_key="sr-1042",
        ttl=seconds(600),
    )
    assert sent.device_count == 3
    live = await asyncio.wait_for(stream.read(), 15)
    assert (live.notification.notification_id, live.replayed) == (sent.notification_id, False)
    await settled(
        setup.stubs[1],
        sent.notification_id,
        {ios: N.DELIVERY_STATUS_SENT, android: N.DELIVERY_STATUS_SENT, app: N.DELIVERY_STATUS_SENT},
    )

    [apns] = setup.servers.to("/3/device/ok-ios-1")
    assert apns.http_version == "2"
    assert apns.method == "POST"
    headers = apns.headers
    assert (headers["apns-topic"], headers["apns-push-type"], headers["apns-priority"]) == (
        "com.example.bank",
        "alert",
        "10",
    )
    assert headers["apns-collapse-id"] == "sr-1042"
    assert int(headers["apns-expiration"]) > 0
    scheme, token = headers["authorization"].split(" ", 1)
    assert scheme == "bearer"
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "KEY123", "typ": "JWT"}
    assert (
        jwt.decode(token, setup.servers.credentials.apns_public_key, algorithms=["ES256"])["iss"]
        == "TEAM456"
    )
    assert json.loads(apns.body) == {
        "aps": {"alert": {"title": "Your request moved", "body": "SR is now in progress."}},
        "service_request_id": "SR-1042",
    }

    [fcm] = setup.servers.to("/v1/projects/accessline-test/messages:send")
    assert fcm.http_version == "2"
    assert fcm.headers["authorization"] == "Bearer fcm-access-token"
    message = json.loads(fcm.body)["message"]
    assert message["token"] == "ok-android-1"
    assert message["notification"] == {
        "title": "Your request moved",
        "body": "SR is now in progress.",
    }
    assert message["data"] == {
        "service_request_id": "SR-1042",
        "notification_id": sent.notification_id,
        "event_type": "EVENT_TYPE_SERVICE_REQUEST_STATUS_CHANGED",
    }
    assert message["android"]["priority"] == "HIGH"
    assert message["android"]["collapse_key"] == "sr-1042"
    assert len(setup.servers.to("/token")) == 1
    stream.cancel()


async def live_in_app_stream(setup: Setup, listener: str, topic: str) -> tuple[str, Any]:
    """An in-app device of `listener`, following `topic`, and its stream once it follows
    live: a notification to that customer alone is read first (until then, what is
    published may come as the stream's replay)."""
    app = await device(setup.stubs[0], listener, N.PLATFORM_IN_APP)
    await setup.stubs[1].Subscribe(N.SubscribeRequest(topic=topic, customer_id=listener))
    stream = setup.customer(1, listener).StreamNotifications(
        N.StreamNotificationsRequest(device_id=app)
    )
    first = await publish(setup.stubs[0], customer_id=listener)
    assert (await asyncio.wait_for(stream.read(), 15)).notification.notification_id == (
        first.notification_id
    )
    return app, stream


async def test_a_repeated_idempotency_key_sends_nothing_new(setup: Setup) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    token = f"ok-{uuid.uuid4().hex[:6]}"
    phone = await device(setup.stubs[0], customer, N.PLATFORM_APNS, token)
    first = await publish(setup.stubs[0], customer_id=customer, idempotency_key="agent-free-77")
    again = await publish(setup.stubs[1], customer_id=customer, idempotency_key="agent-free-77")
    assert (again.notification_id, again.duplicate, first.duplicate) == (
        first.notification_id,
        True,
        False,
    )
    await settled(setup.stubs[0], first.notification_id, {phone: N.DELIVERY_STATUS_SENT})
    assert len(setup.servers.for_token(token)) == 1


@pytest.mark.parametrize("platform", [N.PLATFORM_APNS, N.PLATFORM_FCM], ids=["apns", "fcm"])
async def test_429_and_5xx_are_retried_and_retry_after_is_honoured(
    setup: Setup, platform: int
) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    busy = await device(setup.stubs[0], customer, platform, f"busy-{uuid.uuid4().hex[:6]}")
    flaky = await device(setup.stubs[0], customer, platform, f"flaky-{uuid.uuid4().hex[:6]}")
    sent = await publish(setup.stubs[0], customer_id=customer)
    found = await settled(
        setup.stubs[0],
        sent.notification_id,
        {busy: N.DELIVERY_STATUS_SENT, flaky: N.DELIVERY_STATUS_SENT},
    )
    assert found[busy].attempts == 2
    assert found[flaky].attempts == 2
    tokens = {
        d.device_id: d
        for d in (
            await setup.stubs[0].GetDelivery(
                N.GetDeliveryRequest(notification_id=sent.notification_id)
            )
        ).deliveries
    }
    assert set(tokens) == {busy, flaky}
    busy_token = next(
        t
        for t in setup.servers.seen_tokens
        if t.startswith("busy-") and setup.servers.seen_tokens[t] == 2
    )
    first, second = setup.servers.for_token(busy_token)[:2]
    assert (first.status, second.status) == (429, 200)
    # The provider said Retry-After: 1, counted from its answer.
    assert second.at - first.answered_at >= 1.0


@pytest.mark.parametrize("platform", [N.PLATFORM_APNS, N.PLATFORM_FCM], ids=["apns", "fcm"])
async def test_a_retry_after_that_is_no_delay_falls_back_to_the_backoff(
    setup: Setup, platform: int
) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    token = f"soon-{uuid.uuid4().hex[:6]}"
    soon = await device(setup.stubs[0], customer, platform, token)
    sent = await publish(setup.stubs[0], customer_id=customer)
    found = await settled(setup.stubs[0], sent.notification_id, {soon: N.DELIVERY_STATUS_SENT})
    # One refusal, one retry after the backoff: no loop of sends on a header it cannot read.
    assert found[soon].attempts == 2
    assert [r.status for r in setup.servers.for_token(token)] == [429, 200]


@pytest.mark.parametrize("platform", [N.PLATFORM_APNS, N.PLATFORM_FCM], ids=["apns", "fcm"])
async def test_an_unregistered_token_deactivates_its_device(setup: Setup, platform: int) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    gone = await device(setup.stubs[0], customer, platform, f"gone-{uuid.uuid4().hex[:6]}")
    bad = await device(setup.stubs[0], customer, platform, f"bad-{uuid.uuid4().hex[:6]}")
    sent = await publish(setup.stubs[0], customer_id=customer)
    found = await settled(
        setup.stubs[0],
        sent.notification_id,
        {gone: N.DELIVERY_STATUS_FAILED, bad: N.DELIVERY_STATUS_FAILED},
    )
    assert found[gone].failure_reason == (
        "UNREGISTERED" if platform == N.PLATFORM_FCM else "Unregistered"
    )
    assert found[bad].attempts == 1
    again = await publish(setup.stubs[1], customer_id=customer)
    assert again.device_count == 1  # the unregistered device is no longer a target


async def test_an_undeliverable_notification_expires_after_its_ttl(setup: Setup) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    down = await device(setup.stubs[0], customer, N.PLATFORM_FCM, f"down-{uuid.uuid4().hex[:6]}")
    sent = await publish(setup.stubs[0], customer_id=customer, ttl=seconds(1))
    found = await settled(setup.stubs[0], sent.notification_id, {down: N.DELIVERY_STATUS_EXPIRED})
    assert found[down].attempts >= 1


async def test_a_worker_killed_mid_delivery_leaves_the_item_to_another(setup: Setup) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    token = f"hang-{uuid.uuid4().hex[:6]}"
    phone = await device(setup.stubs[0], customer, N.PLATFORM_APNS, token)
    sent = await publish(setup.stubs[0], customer_id=customer)
    await asyncio.wait_for(setup.servers.hung.wait(), 15)
    claim = await setup.store.get(f"nt/claims/{sent.notification_id}/{phone}", nt_store.Claim)
    assert claim is not None
    holder = next(r for r in setup.replicas if claim.value.worker_id in "\n".join(r.lines))
    survivor = next(r for r in setup.replicas if r is not holder)
    holder.signal(signal.SIGKILL)
    stub = setup.stubs[setup.replicas.index(survivor)]
    found = await settled(stub, sent.notification_id, {phone: N.DELIVERY_STATUS_SENT}, timeout=30)
    assert found[phone].attempts == 1
    answered = [r for r in setup.servers.for_token(token) if r.status == 200]
    assert len(answered) == 1  # delivered once, by the surviving worker
    setup.servers.release.set()


async def test_the_in_app_stream_replays_what_was_not_acknowledged(setup: Setup) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    app = await device(setup.stubs[0], customer, N.PLATFORM_IN_APP)
    first = await publish(setup.stubs[0], customer_id=customer, title="one")
    second = await publish(setup.stubs[0], customer_id=customer, title="two")

    stream = setup.customer(1, customer).StreamNotifications(
        N.StreamNotificationsRequest(device_id=app)
    )
    replayed = [await asyncio.wait_for(stream.read(), 15) for _ in range(2)]
    assert {r.notification.notification_id for r in replayed} == {
        first.notification_id,
        second.notification_id,
    }
    assert all(r.replayed for r in replayed)
    acked = await setup.customer(1, customer).AcknowledgeNotifications(
        N.AcknowledgeNotificationsRequest(device_id=app, notification_ids=[first.notification_id])
    )
    assert acked.acknowledged == 1
    third = await publish(setup.stubs[0], customer_id=customer, title="three")
    live = await asyncio.wait_for(stream.read(), 15)
    assert (live.notification.notification_id, live.replayed) == (third.notification_id, False)
    stream.cancel()

    again = setup.customer(0, customer).StreamNotifications(
        N.StreamNotificationsRequest(device_id=app)
    )
    replay = [await asyncio.wait_for(again.read(), 15) for _ in range(2)]
    assert {r.notification.notification_id for r in replay} == {
        second.notification_id,
        third.notification_id,
    }
    again.cancel()
    found = await statuses(setup.stubs[0], first.notification_id)
    assert found[app].status == N.DELIVERY_STATUS_SENT


async def test_payloads_carry_ids_and_display_text_only(setup: Setup) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    await device(setup.stubs[0], customer, N.PLATFORM_FCM, f"ok-{uuid.uuid4().hex[:6]}")
    for data in ({"access_code": "482913"}, {"session_id": f"s {MARKER}"}, {"context": MARKER}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(setup.stubs[0], customer_id=customer, data=data)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(f.startswith("data[") for f in violated_fields(caught.value))
    ok = await publish(setup.stubs[0], customer_id=customer, data={"session_id": "s-123"})
    await eventually(lambda: _sent(setup, ok.notification_id), what="sent")
    captured = b"".join(r.body for r in setup.servers.requests)
    assert MARKER.encode() not in captured
    assert b"482913" not in captured


async def _sent(setup: Setup, notification_id: str) -> bool:
    found = await statuses(setup.stubs[0], notification_id)
    return all(d.status == N.DELIVERY_STATUS_SENT for d in found.values())


async def test_bad_requests_name_their_fields(setup: Setup) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await setup.stubs[0].RegisterDevice(
            N.RegisterDeviceRequest(
                device=N.Device(application_id="bank", platform=N.PLATFORM_APNS)
            )
        )
    assert violated_fields(caught.value) == {"device.owner", "device.push_token"}
    with pytest.raises(grpc.aio.AioRpcError) as no_target:
        await setup.stubs[0].Publish(
            N.PublishRequest(event_type=N.EVENT_TYPE_SURVEY, ttl=seconds(90 * 86400))
        )
    assert violated_fields(no_target.value) == {"target", "ttl"}
    # A push travels through the platforms' servers and shows on a locked screen: a value
    # that could be an access code or a phone number is refused, whatever its key.
    for value in ("4821", "+33612345678", "06 12 34 56 78", "0612-345-678"):
        with pytest.raises(grpc.aio.AioRpcError) as leaky:
            await setup.stubs[0].Publish(
                N.PublishRequest(
                    customer_id="c-1", event_type=N.EVENT_TYPE_SURVEY, data={"session_id": value}
                )
            )
        assert leaky.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(leaky.value) == {"data[session_id]"}, value
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await setup.stubs[0].GetDelivery(N.GetDeliveryRequest(notification_id="n-unknown"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_device_holds_at_most_its_streams_over_all_replicas(setup: Setup) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    in_app = await device(setup.stubs[0], customer, N.PLATFORM_IN_APP)
    request = N.StreamNotificationsRequest(device_id=in_app)
    # Five at once over two replicas: two are taken (the default), the rest refused.
    streams = [setup.customer(i % 2, customer).StreamNotifications(request) for i in range(5)]
    await publish(setup.stubs[0], customer_id=customer)
    answers = await asyncio.gather(*(s.read() for s in streams), return_exceptions=True)
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == 3
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    served = [s for s, a in zip(streams, answers, strict=True) if not isinstance(a, Exception)]
    assert all(a.notification.title for a in answers if not isinstance(a, Exception))
    served[0].cancel()

    async def another() -> bool:
        late = setup.customer(1, customer).StreamNotifications(request)
        await publish(setup.stubs[0], customer_id=customer)
        try:
            return bool((await late.read()).notification.title)
        except grpc.aio.AioRpcError:
            return False
        finally:
            late.cancel()

    await eventually(another, what="a stream once another closed")
    served[1].cancel()
