"""Key watches sharing one etcd Watch stream, against a real etcd: one stream for many
watches, each seeing its own key only and from its own start revision, every event kept
across an etcd restart, compaction ending one watch and not the others, and a watch
closed mid-way (even while its create is being written) leaving the rest alone."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
from google.protobuf import wrappers_pb2

from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import Store, StoreUnavailable, WatchCompacted, WatchEvent
from tests.support.waiting import eventually


def text(value: str) -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=value)


def watch_streams(etcd: EmbeddedEtcd) -> int:
    """Watch streams etcd has seen opened so far (its own counter)."""
    url = f"http://{etcd.host}:{etcd.client_port}/metrics"
    metrics = urllib.request.urlopen(url, timeout=5).read().decode()
    found = re.search(
        r'^grpc_server_started_total\{[^}]*grpc_method="Watch"[^}]*\} (\S+)$', metrics, re.M
    )
    return int(float(found.group(1))) if found else 0


class Follower:
    """A key's events as one watch sees them, in a task."""

    def __init__(self, store: Store, key: str, start: int) -> None:
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.task = asyncio.ensure_future(self._run(store, key, start))

    async def _run(self, store: Store, key: str, start: int) -> None:
        try:
            async for event in store.watch_key(key, start):
                self.events.append(event)
        except WatchCompacted as exc:
            self.error = exc

    def values(self) -> list[str]:
        return [e.decode(wrappers_pb2.StringValue).value for e in self.events]

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def test_key_watches_share_one_stream_and_each_sees_its_own_key_from_its_start(
    private_etcd: EmbeddedEtcd,
) -> None:
    async with Store(private_etcd.endpoint, "/mux", timeout=2.0) as store:
        for n in range(30):
            await store.put(f"calls/{n}", text("before"))
        start = await store.revision() + 1
        opened = watch_streams(private_etcd)
        followers = [Follower(store, f"calls/{n}", start) for n in range(30)]
        # calls/1 is a prefix of calls/10..19: none of theirs may reach calls/1's watch.
        for n in range(30):
            await store.put(f"calls/{n}", text(f"v{n}"))
        await store.delete("calls/0")
        await eventually(
            lambda: all(len(f.events) == (2 if n == 0 else 1) for n, f in enumerate(followers)),
            what="every watch's events",
        )
        assert [f.values() for f in followers[1:]] == [[f"v{n}"] for n in range(1, 30)]
        assert [e.kind.value for e in followers[0].events] == ["put", "delete"]
        assert watch_streams(private_etcd) - opened == 1
        for follower in followers:
            await follower.stop()


async def test_key_watches_keep_every_event_across_an_etcd_restart(
    private_etcd: EmbeddedEtcd,
) -> None:
    async with Store(private_etcd.endpoint, "/mux-restart", timeout=2.0) as store:
        start = await store.revision() + 1
        followers = [Follower(store, f"offers/{n}", start) for n in range(5)]
        for n in range(5):
            await store.put(f"offers/{n}", text("open"))
        await eventually(lambda: all(f.values() == ["open"] for f in followers), what="opened")
        private_etcd.stop()
        with pytest.raises(StoreUnavailable):
            await store.put("offers/0", text("lost?"))
        private_etcd.start()
        await private_etcd.wait_ready()
        # Written before the stream has necessarily reconnected: each watch resumes from
        # the revision after the last event it saw, not from "now".
        for n in range(5):
            await store.put(f"offers/{n}", text("answered"))
        await eventually(
            lambda: all(len(f.events) == 2 for f in followers), timeout=30, what="resumed"
        )
        assert [f.values() for f in followers] == [["open", "answered"]] * 5
        for follower in followers:
            revisions = [e.revision for e in follower.events]
            assert revisions == sorted(set(revisions))
            await follower.stop()


async def test_a_compacted_key_watch_ends_alone_and_a_closed_one_leaves_the_rest_alone(
    private_etcd: EmbeddedEtcd,
) -> None:
    async with Store(private_etcd.endpoint, "/mux-compact", timeout=2.0) as store:
        first = await store.put("keys/old", text("a"))
        for i in range(5):
            await store.put("keys/old", text(str(i)))
        latest = await store.revision()
        await store.compact(latest)
        live = Follower(store, "keys/live", latest + 1)
        closed = Follower(store, "keys/closed", latest + 1)
        old = Follower(store, "keys/old", first)
        await eventually(lambda: old.task.done(), what="the compacted watch to end")
        assert isinstance(old.error, WatchCompacted)
        assert old.error.compact_revision >= latest
        await store.put("keys/closed", text("seen"))
        await eventually(lambda: closed.values() == ["seen"], what="the closed watch's event")
        await closed.stop()
        await store.put("keys/closed", text("after its end"))
        await store.put("keys/live", text("still here"))
        await eventually(lambda: live.values() == ["still here"], what="the live watch's event")
        assert closed.values() == ["seen"]
        await live.stop()


async def test_a_watch_cancelled_while_its_create_is_written_leaves_the_stream_to_the_rest(
    private_etcd: EmbeddedEtcd,
) -> None:
    """A waiting call hung up at any instant cancels its watch's task, possibly while the
    watch's create is being written on the shared stream: the stream, and every other
    watch on it, lives on (the cancelled write once cancelled the stream itself, and the
    rest heard nothing more until some other watch was made)."""
    async with Store(private_etcd.endpoint, "/mux-cancel", timeout=2.0) as store:
        start = await store.revision() + 1
        waiting = Follower(store, "calls/waiting", start)
        await store.put("calls/waiting", text("0"))
        await eventually(lambda: waiting.values() == ["0"], what="the first event")
        for turns in range(1, 5):
            # Hung up after `turns` turns of the loop: after one, inside the create's write.
            hung_up = Follower(store, f"calls/{turns}", start)
            for _ in range(turns):
                await asyncio.sleep(0)
            await hung_up.stop()
            await store.put("calls/waiting", text(str(turns)))
            await eventually(
                lambda turns=turns: waiting.values()[-1:] == [str(turns)],  # type: ignore[misc]
                what=f"the waiting watch's event after a watch ended {turns} turns in",
            )
        # The stream cancelled under the reader by anything else: the reader opens another.
        store._mux._call.cancel()
        await store.put("calls/waiting", text("5"))
        await eventually(lambda: waiting.values()[-1:] == ["5"], what="the event after a cancel")
        assert waiting.values() == ["0", "1", "2", "3", "4", "5"]
        await waiting.stop()
