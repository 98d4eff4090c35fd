"""Routing's feed of offers' answers (routing/offerfeed.py) against a real etcd: an
answer is handed to a waiter who asked before it came and kept for one who asks after;
the first answer is the answer (a later delete does not undo an accept); an open offer
is no answer; and an offer written before the feed started, or an answer not come in
time, is left to the waiter's own watch."""

from __future__ import annotations

import asyncio

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline_server.presence import offers as pr_offers
from accessline_server.routing.offerfeed import NOT_COVERED, OfferFeed
from accessline_server.runtime.store import Store
from tests.conftest import eventually


def offer(state: int) -> pr_store.StoredOffer:
    return pr_store.StoredOffer(state=state)  # type: ignore[arg-type]


async def test_answers_reach_their_waiters_before_and_after_they_ask(store: Store) -> None:
    before = await store.put(pr_offers.offer_key("a1", "o-old"), offer(pr_store.OFFER_STATE_OPEN))
    feed = OfferFeed(store)
    feed.start()
    try:
        await eventually(lambda: feed.following, what="the feed following")
        # Written before the feed started: the waiter watches it itself.
        assert await feed.answer(pr_offers.offer_key("a1", "o-old"), before, 1.0) is NOT_COVERED
        early, late = pr_offers.offer_key("a1", "o1"), pr_offers.offer_key("a2", "o2")
        written = await store.put(early, offer(pr_store.OFFER_STATE_OPEN))
        await store.put(late, offer(pr_store.OFFER_STATE_OPEN))
        waiting = asyncio.ensure_future(feed.answer(early, written, 10.0))
        await store.put(early, offer(pr_store.OFFER_STATE_ACCEPTED))
        await store.delete(early)
        answered = await waiting
        assert isinstance(answered, pr_store.StoredOffer)
        assert answered.state == pr_store.OFFER_STATE_ACCEPTED
        # Answered (declined) before anybody asked: kept; then deleted: still declined.
        await store.put(late, offer(pr_store.OFFER_STATE_DECLINED))
        await store.delete(late)

        async def kept_answer() -> pr_store.StoredOffer | None:
            found = await feed.answer(late, written, 0.0)
            return found if isinstance(found, pr_store.StoredOffer) else None

        kept = await eventually(kept_answer, what="the kept answer")
        assert kept.state == pr_store.OFFER_STATE_DECLINED
        # Gone without an answer: None; still open at the timeout: left to the waiter.
        gone = pr_offers.offer_key("a3", "o3")
        at = await store.put(gone, offer(pr_store.OFFER_STATE_OPEN))
        vanishing = asyncio.ensure_future(feed.answer(gone, at, 10.0))
        await store.delete(gone)
        assert await vanishing is None
        still_open = pr_offers.offer_key("a4", "o4")
        at = await store.put(still_open, offer(pr_store.OFFER_STATE_OPEN))
        assert await feed.answer(still_open, at, 0.2) is NOT_COVERED
    finally:
        await feed.stop()
