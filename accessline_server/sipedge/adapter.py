"""The SIP adapter: Kamailio holds each INVITE to an access number and tells the
adapter over its event socket; the adapter collects the caller's access code (DTMF
relayed from SIP INFO), routes the call with Routing.RouteInboundCall as the switch,
and answers Kamailio: forward the INVITE to the accepting agent's SIP address, to the
IVR, or refuse it with a SIP status. A caller who hangs up (CANCEL, BYE) cancels the
routing stream, which takes the call out of Accessline's queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry import metrics

from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.sipedge.settings import SipEdgeSettings

log = logging.getLogger("accessline.sipedge")
meter = metrics.get_meter("accessline.sipedge")
# Calls answered to Kamailio, by what was done: forward (code 0) or the SIP refusal.
ANSWERS = meter.create_counter(
    "accessline.sipedge.answers", unit="{call}", description="Answers given to Kamailio"
)
# Calls sent back to their queue because the agent's phone did not take them.
REDIRECTS = meter.create_counter(
    "accessline.sipedge.redirects", unit="{call}", description="Calls whose phone failed"
)

# The caller's number is passed on only when it looks like one (never a name).
_NUMBER = re.compile(r"^\+?[0-9]{3,20}$")
_WITHHELD = {"anonymous", "restricted", "unknown", "unavailable", "private"}
# Events kept for calls whose INVITE has not reached the adapter yet: how many calls,
# events per call, and for how long.
EARLY_CALLS = 1000
EARLY_EVENTS = 40
EARLY_SECONDS = 10.0
# A SERVER_STOPPING refusal is resumed on another replica at most this many times.
RESUMES = 3
IVR_TREATMENTS = {rt_pb2.TREATMENT_IVR_AUTHENTICATE, rt_pb2.TREATMENT_IVR_STANDARD}
# Routing's reasons for giving up, as SIP answers to the caller.
FAILURES: dict[int, tuple[int, str]] = {
    rt_pb2.FAILURE_REASON_NO_AGENTS: (480, "No Agent Available"),
    rt_pb2.FAILURE_REASON_QUEUE_TIMEOUT: (480, "Queue Timeout"),
    rt_pb2.FAILURE_REASON_QUEUE_FULL: (486, "Busy Here"),
    rt_pb2.FAILURE_REASON_UNKNOWN_NUMBER: (404, "Not Found"),
    rt_pb2.FAILURE_REASON_UNAVAILABLE: (503, "Service Unavailable"),
}
TERMINATED: dict[str, Any] = {"action": "reject", "code": 487, "reason": "Request Terminated"}
NOT_ANSWERED: dict[str, Any] = {"action": "reject", "code": 480, "reason": "Not Answered"}
# A forwarded call is remembered this long (or until its redirect time), in case the
# phone does not take it.
KEEP_FORWARDED_SECONDS = 120.0


def caller_number(from_user: str, pai_user: str, privacy: str) -> str:
    """The ANI to give Routing: P-Asserted-Identity's user, else From's; empty when the
    caller withheld it (a Privacy of id, user or header, or an anonymous From)."""
    asked = {part.strip().lower() for part in privacy.split(";")}
    if asked & {"id", "user", "header"}:
        return ""
    user = pai_user or from_user
    if user.lower() in _WITHHELD or not _NUMBER.match(user):
        return ""
    return user


def reject(code: int, reason: str, retry_after: float | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"action": "reject", "code": code, "reason": reason}
    if retry_after:
        answer["retry_after"] = str(max(1, math.ceil(retry_after)))
    return answer


def _retry_after(error: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for packed in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if packed.Unpack(info):
            return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None


@dataclass
class HeldCall:
    """A call Kamailio holds for the adapter: its transaction and what is known so far."""

    call_id: str
    index: int
    label: int
    dnis: str
    ani: str
    arrived_at: float = field(default_factory=time.time)
    digits: str = ""
    keyed: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False
    task: asyncio.Task[None] | None = None
    # From the connect: how to send the call back to its queue if the phone fails.
    redirect_token: str = ""
    redirect_before: float = 0.0
    # Once forwarded: until when the adapter remembers the call.
    kept_until: float = 0.0

    def key(self, digit: str, wanted: int) -> None:
        """One key of the caller's: the code is complete at `wanted` digits or at `#`
        (keys after that are not part of it)."""
        if self.keyed.is_set():
            return
        if digit == "#" or len(self.digits) >= wanted:
            self.keyed.set()
            return
        self.digits += digit
        if len(self.digits) >= wanted:
            self.keyed.set()


class Adapter:
    """One connection to Kamailio's event socket and the calls it holds."""

    def __init__(
        self,
        settings: SipEdgeSettings,
        routing: Any,
        send: Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
    ) -> None:
        self._settings = settings
        self._routing = routing
        self._send = send
        self.calls: dict[str, HeldCall] = {}
        self._answering: set[asyncio.Task[None]] = set()
        # Events of calls whose INVITE has not come yet: Kamailio's SIP workers relay
        # them side by side, so a caller's first key can overtake its INVITE.
        self._early: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    def receive(self, message: dict[str, Any]) -> None:
        """One event from Kamailio."""
        event = message.get("event")
        call_id = str(message.get("call_id", ""))[:128]
        if event == "invite":
            self._invite(message)
            for early in self._early.pop(call_id, (0.0, []))[1]:
                self.receive(early)
            return
        call = self.calls.get(call_id)
        if call is None and event == "forward_failed":
            # A call this adapter does not know (it restarted meanwhile): refused at once.
            answer = {"index": message["index"], "label": message["label"], **NOT_ANSWERED}
            task = asyncio.create_task(self._send(answer))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
            return
        if call is None:
            self._keep_early(call_id, message)
            return
        if event == "dtmf":
            call.key(str(message.get("digit", "")), self._settings.sipedge_code_digits)
        elif event == "hangup":
            call.gone = True
            if call.task is not None and not call.task.done():
                call.task.cancel()
            else:
                self.calls.pop(call_id, None)
        elif event == "forward_failed":
            self._forward_failed(call, message)

    def _forward_failed(self, call: HeldCall, message: dict[str, Any]) -> None:
        """The phone the call was forwarded to did not take it (busy, declined, not
        answered): Kamailio holds the call again; back to its queue for the next agent
        while the connect's redirect token is good, else refused."""
        log.info(
            "phone did not take the call",
            extra={"fields": {"call_id": call.call_id, "status": message.get("status")}},
        )
        call.index, call.label = int(message["index"]), int(message["label"])
        token, call.redirect_token = call.redirect_token, ""
        if time.time() >= call.redirect_before:
            token = ""
        REDIRECTS.add(1, {"accessline.sip.redirected": bool(token)})
        call.task = asyncio.create_task(self._handle(call, token), name=f"sip-call-{call.call_id}")

    def _keep_early(self, call_id: str, message: dict[str, Any]) -> None:
        now = time.monotonic()
        while self._early and (
            len(self._early) >= EARLY_CALLS
            or next(iter(self._early.values()))[0] < now - EARLY_SECONDS
        ):
            self._early.popitem(last=False)
        kept = self._early.setdefault(call_id, (now, []))[1]
        if len(kept) < EARLY_EVENTS:
            kept.append(message)

    def _invite(self, message: dict[str, Any]) -> None:
        call = HeldCall(
            call_id=str(message.get("call_id", ""))[:128],
            index=int(message["index"]),
            label=int(message["label"]),
            dnis=str(message.get("ruri_user") or message.get("to_user") or ""),
            ani=caller_number(
                str(message.get("from_user", "")),
                str(message.get("pai_user", "")),
                str(message.get("privacy", "")),
            ),
        )
        now = time.time()
        for known in list(self.calls.values()):
            past = known.kept_until and known.kept_until < now
            if past and (known.task is None or known.task.done()):
                self.calls.pop(known.call_id, None)
        self.calls[call.call_id] = call
        call.task = asyncio.create_task(self._handle(call), name=f"sip-call-{call.call_id}")
        log.info("call held", extra={"fields": {"call_id": call.call_id}})

    async def _handle(self, call: HeldCall, redirect: str | None = None) -> None:
        """Routes the call (or sends it back to its queue with `redirect`; an empty one:
        nowhere to send it) and gives Kamailio the answer."""
        answer = TERMINATED
        try:
            try:
                if redirect == "":
                    answer = NOT_ANSWERED
                else:
                    answer = await self._decide(call, redirect or "")
            except asyncio.CancelledError:
                if not call.gone:
                    raise
            if call.gone:
                answer = TERMINATED
            await self._send({"index": call.index, "label": call.label, **answer})
            ANSWERS.add(
                1,
                {
                    "accessline.sip.action": answer["action"],
                    "accessline.sip.status": int(answer.get("code", 0)),
                },
            )
            log.info(
                "call answered",
                extra={
                    "fields": {
                        "call_id": call.call_id,
                        "action": answer["action"],
                        "code": answer.get("code", 0),
                    }
                },
            )
        finally:
            # A forwarded call stays known a while: its phone may not take it.
            if call.gone or answer["action"] != "forward":
                self.calls.pop(call.call_id, None)
            else:
                call.kept_until = max(call.redirect_before, time.time() + KEEP_FORWARDED_SECONDS)

    async def _decide(self, call: HeldCall, resume: str = "") -> dict[str, Any]:
        wanted = self._settings.sipedge_code_digits
        if wanted and not resume:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    call.keyed.wait(), self._settings.sipedge_dtmf_timeout_seconds
                )
        log.info(
            "routing the call",
            extra={"fields": {"call_id": call.call_id, "digits": len(call.digits)}},
        )
        for _ in range(RESUMES + 1):
            answer, resume, delay = await self._route(call, resume)
            if answer is not None:
                return answer
            await asyncio.sleep(delay)
        return reject(503, "Service Unavailable", 1.0)

    async def _route(self, call: HeldCall, resume: str) -> tuple[dict[str, Any] | None, str, float]:
        """One RouteInboundCall stream: the answer for Kamailio, or none and the token and
        delay with which to resume the call on another Routing replica."""
        arrived = timestamp_pb2.Timestamp()
        arrived.FromNanoseconds(int(call.arrived_at * 1e9))
        stream = self._routing.RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(
                call_id=call.call_id,
                dnis=call.dnis,
                ani=call.ani,
                dtmf_digits=call.digits,
                call_arrived_at=arrived,
                resume_token=resume,
            )
        )
        try:
            async for event in stream:
                if event.HasField("connect"):
                    call.redirect_token = event.connect.redirect_token
                    call.redirect_before = event.connect.redirect_before.ToNanoseconds() / 1e9
                outcome = self._on_event(event)
                if outcome is not None:
                    return outcome
            return reject(503, "Service Unavailable", 1.0), "", 0.0
        except grpc.aio.AioRpcError as error:
            log.warning(
                "routing refused the call",
                extra={"fields": {"call_id": call.call_id, "code": error.code().name}},
            )
            return reject(503, "Service Unavailable", _retry_after(error) or 1.0), "", 0.0
        finally:
            stream.cancel()

    def _on_event(
        self, event: rt_pb2.RouteInboundCallResponse
    ) -> tuple[dict[str, Any] | None, str, float] | None:
        kind = event.WhichOneof("event")
        if kind == "match_decided":
            decided = event.match_decided
            if decided.treatment in IVR_TREATMENTS and self._settings.sipedge_ivr_uri:
                return self._forward(self._settings.sipedge_ivr_uri, ""), "", 0.0
        elif kind == "connect":
            uri = self._agent_uri(event.connect.address)
            if uri is None:
                return reject(480, "Agent Not Reachable"), "", 0.0
            return self._forward(uri, event.connect.session_id), "", 0.0
        elif kind == "failed":
            failed = event.failed
            delay = failed.retry_after.ToNanoseconds() / 1e9
            if failed.reason == rt_pb2.FAILURE_REASON_SERVER_STOPPING:
                return None, failed.resume_token, delay
            code, phrase = FAILURES.get(failed.reason, (500, "Server Internal Error"))
            return reject(code, phrase, delay or None), "", 0.0
        return None

    def _forward(self, uri: str, session_id: str) -> dict[str, Any]:
        return {"action": "forward", "uri": uri, "session": session_id}

    def _agent_uri(self, address: str) -> str | None:
        if address.startswith(("sip:", "sips:")):
            return address
        domain = self._settings.sipedge_agent_domain
        if domain and re.match(r"^[A-Za-z0-9+*#._\-]{1,64}$", address):
            return f"sip:{address}@{domain}"
        return None
