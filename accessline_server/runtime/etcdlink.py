"""How the store reaches etcd: one channel per cluster member, the member requests go to
now, and the move to the next healthy member when one fails. etcd's failures become
Accessline's Unavailable / DeadlineExceeded errors with a retry delay.

Every request asks for a member with a leader, so a member cut off from the quorum
refuses at once instead of serving stale reads or holding streams open. Reads are
retried on the next member; writes only when etcd cannot have applied them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aetcd.rpc as etcdrpc
import grpc

from accessline_server.runtime.errors import AccesslineError, DeadlineExceeded, Unavailable

log = logging.getLogger("accessline.store")

# How long callers are told to wait before retrying after etcd failed.
RETRY_AFTER_SECONDS = 1.0
# Every request asks for a member that has a leader: one that lost it refuses with
# "etcdserver: no leader" before doing anything, and cancels the streams it holds.
REQUIRE_LEADER = (("hasleader", "true"),)
# Failures after which etcd cannot have applied a request (safe to send it elsewhere).
_NOT_APPLIED = ("no leader", "failed to connect", "connection refused", "not connected")
# A member that failed is avoided for this long when another one is available.
FAILED_MEMBER_AVOID_SECONDS = 5.0


class StoreUnavailable(Unavailable):
    """etcd could not be reached."""

    default_reason = "ETCD_UNAVAILABLE"


class StoreTimeout(DeadlineExceeded):
    """etcd did not answer within the store's deadline."""

    default_reason = "ETCD_TIMEOUT"


class StoreRejected(AccesslineError):
    """etcd refused the request (too large, bad lease...): a bug or a limit, not an outage."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "ETCD_REJECTED"


def _timed_out(exc: grpc.aio.AioRpcError) -> bool:
    # etcd reports its own side of a deadline as an error text, not always as the code.
    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or "deadline exceeded" in (
        exc.details() or ""
    )


def translate(exc: grpc.aio.AioRpcError) -> AccesslineError:
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return StoreUnavailable(f"etcd is unavailable: {detail}", retry_after=RETRY_AFTER_SECONDS)
    if _timed_out(exc):
        return StoreTimeout("etcd did not answer in time", retry_after=RETRY_AFTER_SECONDS)
    if code == grpc.StatusCode.CANCELLED:
        return StoreUnavailable("etcd request was cancelled", retry_after=RETRY_AFTER_SECONDS)
    return StoreRejected(f"etcd refused the request: {detail}")


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd: the CA that signs the members' certificates and, for etcd started
    with `--client-cert-auth`, the client certificate and key (PEM bytes). `server_name`
    overrides the name checked in the members' certificates."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """`host:port` endpoints from a comma-separated string or a list."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [item.strip() for item in items if item.strip()]
    if not out:
        raise ValueError("at least one etcd endpoint is needed")
    return out


class Member:
    """One etcd endpoint: its channel and the etcd API stubs on it."""

    def __init__(self, address: str, tls: EtcdTls | None, options: list[tuple[str, Any]]) -> None:
        self.address = address
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
            )
            if tls.server_name:
                options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.maintenance = etcdrpc.MaintenanceStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.failed_at = -math.inf

    def usable(self, now: float) -> bool:
        state = self.channel.get_state(try_to_connect=True)
        recently_failed = now - self.failed_at < FAILED_MEMBER_AVOID_SECONDS
        return state != grpc.ChannelConnectivity.TRANSIENT_FAILURE and not recently_failed


def not_applied(exc: grpc.aio.AioRpcError) -> bool:
    detail = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(t in detail for t in _NOT_APPLIED)


def member_fault(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAVAILABLE or _timed_out(exc)


class Members:
    """The cluster's members and the one requests go to now."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        tls: EtcdTls | None,
        timeout: float,
        reconnect_backoff_max: float,
    ) -> None:
        options: list[tuple[str, Any]] = [
            # Reconnecting to a member that came back takes at most this long.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(100, int(reconnect_backoff_max * 1000))),
            # A frozen member (its connection open, nothing answering) is noticed.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        self.all = [Member(a, tls, options) for a in parse_endpoints(endpoints)]
        self._current = 0
        self._timeout = timeout

    @property
    def current(self) -> Member:
        return self.all[self._current]

    async def close(self) -> None:
        for member in self.all:
            await member.channel.close()

    def failed(self, member: Member, exc: grpc.aio.AioRpcError) -> None:
        """A request to `member` failed in a way that speaks against the member: move on
        to the next member that looks healthy (or simply the next one)."""
        member.failed_at = time.monotonic()
        if len(self.all) == 1 or self.current is not member:
            return
        now = time.monotonic()
        count = len(self.all)
        start = self.all.index(member)
        order = [self.all[(start + i) % count] for i in range(1, count)]
        chosen = next((m for m in order if m.usable(now)), order[0])
        self._current = self.all.index(chosen)
        log.warning(
            "etcd member %s failed (%s); using %s",
            member.address,
            exc.code().name,
            chosen.address,
        )

    async def call(
        self, stub: str, method: str, request: Any, *, read: bool, timeout: float | None = None
    ) -> Any:
        """One request to the current member. A member at fault is left for the next one;
        the request follows it when it is a read, or a write etcd cannot have applied."""
        for attempt in range(len(self.all)):
            member = self.current
            fn = getattr(getattr(member, stub), method)
            try:
                return await fn(request, timeout=timeout or self._timeout, metadata=REQUIRE_LEADER)
            except grpc.aio.AioRpcError as exc:
                if not member_fault(exc):
                    raise translate(exc) from None
                self.failed(member, exc)
                last = attempt + 1 == len(self.all)
                if last or not (read or not_applied(exc)):
                    raise translate(exc) from None
        raise AssertionError("unreachable")
