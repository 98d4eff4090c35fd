"""How an agent session records the agent's answer to an offer: an accept in one
transaction with the agent busy and the interaction started, a decline, or the refusal
the app is told."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from opentelemetry import trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import keys, offers
from accessline_server.presence.answers import accept_ops, already_answered, refusal_of
from accessline_server.runtime.errors import FieldViolation, InvalidArgument
from accessline_server.runtime.store import Compare, Entry, KeptLease, KeyMeta, Op, Store
from accessline_server.runtime.telemetry import context_from

if TYPE_CHECKING:
    from accessline_server.presence.session import Limits, SessionEnded

tracer = trace.get_tracer("accessline.presence")

C = common_pb2


class OfferAnswering:
    """The answering part of an agent session (session.py's AgentSession)."""

    store: Store
    limits: Limits
    agent: pr_pb2.Agent
    state: pr_store.StoredPresence
    revision: int
    lease: KeptLease | None
    delivered: set[str]
    offers_seen: dict[str, Entry[pr_store.StoredOffer]]
    interactions_kept: dict[str, Entry[pr_store.StoredInteraction]]
    write_lock: asyncio.Lock

    def send(self, message: pr_pb2.ConnectResponse | SessionEnded) -> None:
        raise NotImplementedError

    def public(self) -> pr_pb2.AgentPresence:
        raise NotImplementedError

    def _channel(self, channel: C.Channel.ValueType, field_name: str) -> pr_store.StoredChannel:
        raise NotImplementedError

    async def _answer(self, response: pr_pb2.OfferResponse) -> None:
        if response.decision not in (pr_pb2.OFFER_DECISION_ACCEPT, pr_pb2.OFFER_DECISION_DECLINE):
            raise InvalidArgument(
                [FieldViolation("offer_response.decision", "must be ACCEPT or DECLINE")]
            )
        if not response.offer_id or len(response.offer_id) > 64:
            raise InvalidArgument(
                [FieldViolation("offer_response.offer_id", "must be 1 to 64 characters")]
            )
        # The offer as this session saw it written, else as etcd holds it.
        entry = self.offers_seen.get(response.offer_id)
        seen = entry is not None
        if entry is None:
            entry = await self._read_offer(response.offer_id)
        parent = (
            context_from(entry.value.trace.traceparent, entry.value.trace.tracestate)
            if entry
            else None
        )
        # The agent's answer joins the trace of the call that made the offer.
        with tracer.start_as_current_span(
            "accessline.offer.answer",
            context=parent,
            attributes={
                "accessline.agent": self.agent.agent_id,
                "accessline.offer.decision": pr_pb2.OfferDecision.Name(response.decision)
                if response.decision in pr_pb2.OfferDecision.values()
                else "UNKNOWN",
            },
        ):
            if not await self._answer_offer(response, entry, seen=seen):
                await self._answer_offer(response, await self._read_offer(response.offer_id))

    async def _read_offer(self, offer_id: str) -> Entry[pr_store.StoredOffer] | None:
        return await self.store.get(keys.offer(self.agent.agent_id, offer_id), pr_store.StoredOffer)

    def _recorded(self, response: pr_pb2.OfferResponse, stored: pr_store.StoredOffer) -> None:
        recorded = pr_pb2.OfferResponseRecorded(
            offer_id=response.offer_id, decision=response.decision
        )
        if response.decision == pr_pb2.OFFER_DECISION_ACCEPT:
            # The agent who takes the interaction gets its whole context.
            context = self.limits.sealing.context(stored)
            if context is not None:
                recorded.context.CopyFrom(context)
        self.send(pr_pb2.ConnectResponse(offer_response_recorded=recorded))

    async def _answer_offer(
        self,
        response: pr_pb2.OfferResponse,
        entry: Entry[pr_store.StoredOffer] | None,
        *,
        seen: bool = False,
    ) -> bool:
        """Records the agent's accept or decline of an offer in one transaction (an
        accept with the agent busy and the interaction started), or tells the agent why
        not. False, and nothing told, when the offer as the session `seen` it changed
        since: it is to be answered again as etcd holds it."""

        def refuse(reason: pr_pb2.OfferRefusal.ValueType) -> None:
            self.send(
                pr_pb2.ConnectResponse(
                    offer_response_refused=pr_pb2.OfferResponseRefused(
                        offer_id=response.offer_id, reason=reason
                    )
                )
            )

        if entry is not None and already_answered(response, entry.value):
            self._recorded(response, entry.value)
            return True
        refusal = refusal_of(response, entry, self._channel, self.state.do_not_disturb)
        if refusal is not None or entry is None:
            refuse(refusal or pr_pb2.OFFER_REFUSAL_UNKNOWN_OFFER)
            return True
        stored = entry.value
        accept = response.decision == pr_pb2.OFFER_DECISION_ACCEPT
        channel_id = response.accept_channel or stored.offer.channel
        async with self.write_lock:
            also: tuple[list[Compare], list[Op]] = ([], [])
            lasts = 0
            busy: pr_store.StoredPresence | None = None
            ongoing: pr_store.StoredInteraction | None = None
            if accept:
                assert self.lease is not None
                lasts = await self.store.shared_lease(self.limits.max_interaction, window=60.0)
                compares, ops, busy, ongoing = accept_ops(
                    self.state,
                    stored,
                    channel_id,
                    agent_id=self.agent.agent_id,
                    presence=(self.lease.id, self.revision),
                    lasts=lasts,
                )
                also = (compares, ops)
            written = await offers.set_offer_state(
                self.store,
                entry,
                pr_store.OFFER_STATE_ACCEPTED if accept else pr_store.OFFER_STATE_DECLINED,
                accepted_channel=channel_id if accept else C.CHANNEL_UNSPECIFIED,
                interaction_lease=lasts if accept else 0,
                also=also,
            )
            if not written:
                if seen:
                    return False  # changed since the session saw it: answered again
                refuse(pr_pb2.OFFER_REFUSAL_NO_LONGER_OPEN)
                return True
            # Answered: a repeat of the answer reads it as it is now.
            self.offers_seen.pop(response.offer_id, None)
            self.delivered.discard(response.offer_id)
            self._recorded(response, stored)
            if ongoing is not None:
                self._keep(ongoing, KeyMeta(written, written, 1, stored.call_lease or lasts))
            if busy is not None:
                # The accept's transaction wrote the presence as read (its compare): it is
                # `busy` now, at the transaction's revision.
                self.state, self.revision = busy, written
                self.send(
                    pr_pb2.ConnectResponse(
                        presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
                    )
                )
        return True

    def _keep(self, ongoing: pr_store.StoredInteraction, meta: KeyMeta) -> None:
        """The interaction as an accept wrote it (created at the transaction's revision):
        its end is written from it, unread, while its key is still that one."""
        key = keys.interaction(self.agent.agent_id, ongoing.interaction_id)
        self.interactions_kept[ongoing.interaction_id] = Entry(key, ongoing, meta)
