"""The audit trail: every change to what operators administer (pools, numbers,
applications, agents, the routing value rules in force) and every refused call is one
structured event: who (subject, roles or service, peer), what (action, RPC, target),
when, the outcome and the trace id. Each event is logged (`accessline.audit`) and, when
ACCESSLINE_AUDIT_DSN is set, written to the `audit_events` table of that database (the
match history's in a deployment), buffered like the history so that a database outage
never fails a call. `accessline audit` lists the table.

Which RPCs are audited is declared in the protos (`audit` in the access option)."""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from opentelemetry import metrics
from sqlalchemy import BigInteger, Column, Index, MetaData, String, Table, and_, or_, select

from accessline.access.v1 import access_pb2
from accessline_server.runtime import tables
from accessline_server.runtime.identity import ROLE_NAMES, Authorizer, Caller, current, field_value
from accessline_server.runtime.interceptor import Finished

log = logging.getLogger("accessline.audit")

# Refusals that are always audited, whatever the RPC.
DENIALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}

metadata = MetaData()
events = Table(
    "audit_events",
    metadata,
    Column("event_id", String(40), primary_key=True),
    Column("at_us", BigInteger, nullable=False),
    Column("subject", String(256), nullable=False),
    Column("roles", String(256), nullable=False),
    Column("service", String(32), nullable=False),
    Column("peer", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("method", String(256), nullable=False),
    Column("target", String(256), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("trace_id", String(32), nullable=False),
)
Index("ix_audit_events_at", events.c.at_us, events.c.event_id)


@dataclass(frozen=True)
class AuditEvent:
    """One audited act; `outcome` is OK or the gRPC status code's name."""

    action: str
    method: str
    target: str
    outcome: str
    subject: str = ""
    roles: str = ""
    service: str = ""
    peer: str = ""
    reason: str = ""
    trace_id: str = ""
    at_us: int = field(default_factory=lambda: int(time.time() * 1e6))
    event_id: str = field(default_factory=lambda: "e" + secrets.token_urlsafe(15))


def who(caller: Caller) -> tuple[str, str, str]:
    """The subject, roles and service of a caller, as an event names them."""
    if caller.unchecked:
        return "(unchecked)", "", ""
    if caller.service:
        name = access_pb2.Service.Name(caller.service)  # type: ignore[arg-type]
        return "", "", name.removeprefix("SERVICE_").lower()
    return caller.subject, ",".join(sorted(ROLE_NAMES[r] for r in caller.roles)), ""


class AuditTrail:
    """Logs every event and, with a DSN, writes it to the database."""

    def __init__(
        self,
        dsn: str,
        *,
        create_schema: bool,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._writer = (
            tables.BufferedWriter(
                tables.engine_for(dsn),
                events,
                "audit",
                "{event}",
                create_schema=create_schema,
                on_health=on_health,
                meter=meter,
            )
            if dsn
            else None
        )

    async def start(self) -> None:
        if self._writer is not None:
            await self._writer.start()

    async def stop(self) -> None:
        if self._writer is not None:
            await self._writer.stop()

    async def flush(self, timeout: float = 10.0) -> None:
        if self._writer is not None:
            await self._writer.flush(timeout)

    def record(self, event: AuditEvent) -> None:
        """Logs and queues the event; never blocks and never raises."""
        row = asdict(event)
        # `service` names the process in every log line: the caller's is said apart.
        shown = {("caller_service" if k == "service" else k): v for k, v in row.items()}
        log.info("audit %s %s", event.action, event.outcome, extra={"fields": shown})
        if self._writer is not None:
            self._writer.add(row)


def _token(at_us: int, event_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at_us}:{event_id}".encode()).decode()


async def list_events(
    dsn: str,
    *,
    limit: int = 100,
    since_us: int | None = None,
    subject: str = "",
    denied_only: bool = False,
    before: str = "",
) -> tuple[list[dict[str, Any]], str]:
    """The newest events first (at most `limit`), and a token for the page after."""
    conditions: list[Any] = []
    if since_us is not None:
        conditions.append(events.c.at_us >= since_us)
    if subject:
        conditions.append(events.c.subject == subject)
    if denied_only:
        conditions.append(events.c.outcome.in_([c.name for c in DENIALS]))
    if before:
        at, event_id = base64.urlsafe_b64decode(before.encode()).decode().split(":", 1)
        conditions.append(
            or_(
                events.c.at_us < int(at),
                and_(events.c.at_us == int(at), events.c.event_id < event_id),
            )
        )
    statement = (
        select(events)
        .where(and_(True, *conditions))
        .order_by(events.c.at_us.desc(), events.c.event_id.desc())
        .limit(limit + 1)
    )
    engine = tables.engine_for(dsn)
    try:
        async with engine.connect() as conn:
            rows = [dict(r._mapping) for r in (await conn.execute(statement)).fetchall()]
    finally:
        await engine.dispose()
    page = rows[:limit]
    token = _token(page[-1]["at_us"], page[-1]["event_id"]) if len(rows) > limit else ""
    return page, token


def observer(trail: AuditTrail, authorizer: Authorizer) -> Callable[[Finished], None]:
    """What the server's interceptor tells of each call as it ends: an event for every
    call of an audited RPC and every refused call of any RPC."""

    def observe(call: Finished) -> None:
        policy = authorizer.policy(call.method)
        audited = policy.audit if policy is not None else None
        if audited is None and call.code not in DENIALS:
            return
        action, path = audited or ("call.refused", "")
        target = ""
        caller = current()
        if call.code == grpc.StatusCode.UNAUTHENTICATED and caller.unchecked:
            subject, roles, service = "", "", ""  # nobody was identified
        else:
            subject, roles, service = who(caller)
        if path and call.request is not None:
            with contextlib.suppress(AttributeError, ValueError):
                target = field_value(call.request, path)[:256]
        trail.record(
            AuditEvent(
                action=action,
                method=call.method,
                target=target,
                outcome=call.code.name,
                reason=call.reason,
                peer=call.peer[:128],
                trace_id=call.trace_id,
                subject=subject,
                roles=roles,
                service=service,
            )
        )

    return observe
