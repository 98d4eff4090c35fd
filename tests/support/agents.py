"""Agents at work for the tests that run calls under load or faults: an agent app that
behaves as a real one does."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from accessline.presence.v1 import presence_pb2 as pr_pb2
from tests.support.presence import App
from tests.support.stack import set_available


@dataclass
class WorkingAgent:
    """An agent at work, as a real agent app behaves: each offer accepted after a moment
    of reading (`reading` seconds), the call ended `talking` seconds later; available
    again when set not ready for letting offers go unanswered; signed in again on a new
    stream when the server ends this one (as in an etcd outage). It keeps what it was
    offered and when, and a log of what it saw, for a failing test to show."""

    agent_id: str
    app: App
    reading: float = 0.15
    talking: float = 0.3
    open_offers: dict[str, float] = field(default_factory=dict)
    overlaps: int = 0
    gone: int = 0
    log: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _started: float = field(default_factory=time.monotonic)

    def _note(self, what: str) -> None:
        self.log.append(f"{time.monotonic() - self._started:.1f}s {what}")

    async def work(self) -> None:
        while True:
            try:
                reply = await self.app.next(timeout=120)
            except grpc.aio.AioRpcError as exc:
                reply = exc
            if not isinstance(reply, pr_pb2.ConnectResponse):
                # The stream ended: the app signs in again, as its user would not notice.
                self._note(f"stream ended: {reply!r}")
                self.open_offers.clear()
                self.app = App(self.app.address)
                await self._sign_in()
                continue
            kind = reply.WhichOneof("message")
            self._note(f"{kind} {getattr(reply, kind)}".replace("\n", " "))
            if kind == "offer":
                if self.open_offers:
                    self.overlaps += 1
                self.open_offers[reply.offer.offer_id] = time.monotonic()
                task = asyncio.ensure_future(self._take(reply.offer))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif kind in ("offer_cancelled", "offer_response_refused"):
                self.open_offers.pop(getattr(reply, kind).offer_id, None)
                reason = reply.offer_cancelled.reason if kind == "offer_cancelled" else 0
                if reason == pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE:
                    self.gone += 1
                if reason == pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT:
                    await set_available(self.app, True)
            elif kind == "offer_response_recorded":
                self.open_offers.pop(reply.offer_response_recorded.offer_id, None)

    async def _sign_in(self) -> None:
        while True:
            try:
                await self.app.login(self.agent_id)
                return
            except (grpc.aio.AioRpcError, AssertionError, TimeoutError) as exc:
                self._note(f"sign-in refused: {exc!r}")
                self.app = App(self.app.address)
                await asyncio.sleep(1.0)  # an app's reconnect backoff

    async def _take(self, offer: pr_pb2.Offer) -> None:
        # Reading the preview (pacing, so a dispatcher ignoring claims would show here).
        await asyncio.sleep(self.reading)
        accept = pr_pb2.OfferResponse(
            offer_id=offer.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
        )
        if not await self._send(offer_response=accept):
            return
        await asyncio.sleep(self.talking)
        end = pr_pb2.EndInteraction(interaction_id=offer.interaction_id)
        for _ in range(30):
            # The agent clicks "end" again until the app has a stream to say it on.
            if await self._send(end_interaction=end):
                return
            await asyncio.sleep(0.5)

    async def _send(self, **message: Any) -> bool:
        try:
            await self.app.send(**message)
            return True
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
            self._note(f"could not send {list(message)}: {exc!r}")
            return False

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.app.call.cancel()
