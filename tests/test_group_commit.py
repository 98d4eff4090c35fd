"""Group commit against a real etcd: concurrent transactions of one process sent as one
etcd transaction (nested, each with its own compares) are each answered as if sent
alone; transactions touching each other's keys are never in one batch; a batch etcd
refuses as a whole is sent again one by one; a request whose caller gave up before it
was sent is never applied."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from aetcd.rpc import TxnRequest
from google.protobuf import wrappers_pb2

from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.groupcommit import Footprint, describe, overlaps
from accessline_server.runtime.kv import Compare, Op, compare_message, op_message
from accessline_server.runtime.store import Store, StoreRejected


@pytest.fixture
async def batching(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[Store]:
    """A store that sends one transaction (or batch) at a time: every transaction asked
    while one is under way joins the next batch."""
    async with Store(etcd.endpoint, prefix, timeout=5.0, group_commit=1) as store:
        yield store


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


async def test_racing_creates_batched_together_each_get_their_own_answer(
    batching: Store,
) -> None:
    """200 create-if-absent on 50 keys, 4 contenders each, all at once: one winner per
    key, each loser reads the winner's value in its failure branch."""

    async def create(key: str, who: str) -> tuple[str, bool, str, int]:
        result = await batching.txn([Compare.absent(key)], [Op.put(key, text(who))], [Op.get(key)])
        seen = (
            ""
            if result.succeeded
            else wrappers_pb2.StringValue.FromString(result.gets[0][0].value).value
        )
        return key, result.succeeded, seen, result.revision

    answers = await asyncio.gather(
        *(create(f"race/{k}", f"{k}-{c}") for c in range(4) for k in range(50))
    )
    assert batching.batches is not None
    assert batching.batches.sent < batching.batches.asked == 200
    for k in range(50):
        key = f"race/{k}"
        mine = [a for a in answers if a[0] == key]
        winners = [a for a in mine if a[1]]
        assert len(winners) == 1
        stored = await batching.get(key, wrappers_pb2.StringValue)
        assert stored is not None
        assert stored.meta.mod_revision == winners[0][3]
        assert {a[2] for a in mine if not a[1]} == {stored.value.value}


def test_only_transactions_touching_none_of_each_others_keys_are_batched() -> None:
    def keys(compares: list[Compare], ops: list[Op]) -> tuple[list, list, int]:
        return describe(
            TxnRequest(
                compare=[compare_message(c, c.key.encode()) for c in compares],
                success=[op_message(o, o.key.encode()) for o in ops],
            )
        )

    put_a1 = keys([], [Op.put("a/1", text("x"))])
    read_a = keys([], [Op.get_prefix("a/")])
    put_b1 = keys([Compare.absent("b/1")], [Op.put("b/1", text("x"))])
    drop_b = keys([], [Op.delete_prefix("b/")])
    fenced = keys([Compare.created_at("a/1", 7)], [Op.put("c/1", text("x"))])
    assert overlaps(put_a1[1], read_a[0])  # a write in a range another reads
    assert overlaps(drop_b[1], put_b1[1])  # a deleted range holding another's write
    assert overlaps(put_a1[1], fenced[0])  # a write to a key another compares
    assert not overlaps(put_a1[1], put_b1[0] + put_b1[1])
    assert not overlaps(put_b1[1], read_a[0])
    assert not overlaps([(b"a/1", b"")], [(b"a/10", b"")])  # a key is not its prefix
    assert overlaps([(b"z/1", b"")], [(b"a", b"\0")])  # every key from "a" on
    assert not overlaps([(b"0", b"")], [(b"a", b"\0")])


def test_a_batchs_footprint_finds_the_same_conflicts_as_comparing_each_pair() -> None:
    """The batch's keys kept in sets and range lists answer as the pairwise rule does:
    random requests of single keys, prefixes and open ranges over a small key space."""
    rng = random.Random(7)
    names = [b"a", b"a/1", b"a/10", b"a/2", b"b", b"b/1", b"c/1", b"z"]

    def interval() -> tuple[bytes, bytes]:
        start = rng.choice(names)
        return (start, rng.choice([b"", b"", b"", start + b"\xff", b"\0"]))

    def request() -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        return (
            [interval() for _ in range(rng.randint(0, 3))],
            [interval() for _ in range(rng.randint(0, 2))],
        )

    found = set()
    for _ in range(400):
        batch = [request() for _ in range(rng.randint(1, 4))]
        footprint = Footprint()
        for reads, writes in batch:
            footprint.add(reads, writes)
        reads, writes = request()
        pairwise = any(
            overlaps(writes, w) or overlaps(writes, r) or overlaps(w, reads) for r, w in batch
        )
        assert footprint.conflicts(reads, writes) == pairwise, (batch, reads, writes)
        found.add(pairwise)
    assert found == {True, False}


async def test_a_batch_refused_as_a_whole_answers_each_as_alone(batching: Store) -> None:
    """One put under a lease that is gone makes etcd refuse the whole batch: that one is
    refused, the others are applied."""
    gone = await batching.grant_lease(60)
    await batching.revoke_lease(gone)
    first = asyncio.ensure_future(batching.txn([], [Op.put("refused/first", text("x"))]))
    others = [
        asyncio.ensure_future(batching.txn([], [Op.put(f"refused/{i}", text("x"))]))
        for i in range(5)
    ]
    bad = asyncio.ensure_future(batching.txn([], [Op.put("refused/bad", text("x"), gone)]))
    await first
    with pytest.raises(StoreRejected):
        await bad
    assert all(r.succeeded for r in await asyncio.gather(*others))
    assert await batching.count_prefix("refused/") == 6
    assert batching.batches is not None
    assert batching.batches.sent == 1 + 1 + 6  # alone, the refused batch, then one by one


async def test_a_transaction_whose_caller_gave_up_before_it_was_sent_is_not_applied(
    batching: Store,
) -> None:
    first = asyncio.ensure_future(batching.txn([], [Op.put("gave-up/first", text("x"))]))
    abandoned = asyncio.ensure_future(batching.txn([], [Op.put("gave-up/never", text("x"))]))
    kept = asyncio.ensure_future(batching.txn([], [Op.put("gave-up/kept", text("x"))]))
    await asyncio.sleep(0)  # both are waiting behind `first`
    abandoned.cancel()
    await first
    assert (await kept).succeeded
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert await batching.get("gave-up/never", wrappers_pb2.StringValue) is None
