"""WatchPresence served from a replica's shared feed, in-process against a real etcd: the
watchers of a replica share its one etcd watch, a slow watcher gets a fresh snapshot
rather than an unbounded backlog, and resumes replay the same changes whether the feed
still holds them, only etcd does, or the replica's view is behind the token."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from accessline.common.v1 import common_pb2 as C
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence.directory import Directory
from accessline_server.presence.feed import Feed
from accessline_server.presence.hub import Hub
from accessline_server.presence.roster import Sealing
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.errors import InvalidArgument
from accessline_server.runtime.store import Store
from tests.support.waiting import eventually

Stream = AsyncIterator[pr_pb2.WatchPresenceResponse]


@asynccontextmanager
async def replica(store: Store, feed: Feed | None = None) -> AsyncIterator[Hub]:
    """A replica's hub (its one watch, keeping the feed) running in this process."""
    hub = Hub(store, feed=feed)
    await hub.start()
    await hub.ready(15)
    try:
        yield hub
    finally:
        await hub.stop()


def directory(store: Store, feed: Feed | None) -> Directory:
    return Directory(store, Sealing(b"feed test secret"), feed=feed, resume_revisions=1_000)


async def register(store: Store, agent_id: str, group: str = "feed") -> int:
    """Registers an agent (a change every watcher of its group is shown); the revision."""
    agent = pr_pb2.Agent(
        agent_id=agent_id,
        resource_groups=[group],
        channels=[pr_pb2.ChannelConfig(channel=C.CHANNEL_CHAT, address=agent_id)],
    )
    await directory(store, None).register(agent)
    return await store.revision()


def watch(found: Directory, **request: object) -> tuple[Stream, asyncio.Event]:
    stopping = asyncio.Event()
    return found.watch(pr_pb2.WatchPresenceRequest(**request), stopping), stopping  # type: ignore[arg-type]


async def changed(stream: Stream, count: int) -> list[str]:
    """The agents of the next `count` messages, which must be changes."""
    seen = []
    for _ in range(count):
        message = await asyncio.wait_for(anext(stream), 15)
        assert message.HasField("change"), message
        seen.append(message.change.agent_id)
    return seen


def etcd_watchers(etcd: EmbeddedEtcd) -> int:
    """The watchers etcd holds now (its own gauge)."""
    url = f"http://{etcd.host}:{etcd.client_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", text, re.M)
    assert found is not None
    return int(float(found.group(1)))


async def test_the_watchers_of_a_replica_share_its_one_etcd_watch(
    private_etcd: EmbeddedEtcd, prefix: str
) -> None:
    """20 watchers served from the feed: etcd holds one watcher, the replica's hub's; the
    same 20 served by etcd each (the path a resume the feed cannot serve takes) add 20."""
    async with Store(private_etcd.endpoint, prefix, timeout=5.0) as store:
        await register(store, "agent-0")
        async with replica(store) as hub:
            shared = [
                watch(directory(store, hub.feed), resource_groups=["feed"]) for _ in range(20)
            ]
            for stream, _ in shared:
                assert (await anext(stream)).HasField("snapshot")
            await register(store, "agent-1")
            for stream, _ in shared:
                assert await changed(stream, 1) == ["agent-1"]
            assert etcd_watchers(private_etcd) == 1  # the hub's
            own = [watch(directory(store, None), resource_groups=["feed"]) for _ in range(20)]
            for stream, _ in own:
                assert (await anext(stream)).HasField("snapshot")
            steps = [asyncio.ensure_future(changed(stream, 1)) for stream, _ in own]
            await eventually(lambda: etcd_watchers(private_etcd) == 21, what="watches")
            await register(store, "agent-2")
            assert [await step for step in steps] == [["agent-2"]] * 20
            for stream, stopping in shared + own:
                stopping.set()
                await stream.aclose()


async def test_a_watcher_that_falls_behind_gets_a_fresh_snapshot(
    store: Store,
) -> None:
    """A watcher that reads nothing while more changes than its backlog come is sent a
    snapshot holding them all, then the changes after it, never a partial history."""
    async with replica(store, Feed(backlog=3)) as hub:
        stream, stopping = watch(directory(store, hub.feed), resource_groups=["slow"])
        first = await anext(stream)
        assert first.HasField("snapshot")
        assert not first.snapshot.agents
        for n in range(5):
            last = await register(store, f"slow-{n}", "slow")
        await eventually(lambda: hub.feed.revision >= last, what="the feed to see them")
        fresh = await asyncio.wait_for(anext(stream), 15)
        assert fresh.HasField("snapshot")
        assert sorted(a.agent_id for a in fresh.snapshot.agents) == [f"slow-{n}" for n in range(5)]
        assert int(fresh.resume_token) >= last
        await register(store, "slow-5", "slow")
        assert await changed(stream, 1) == ["slow-5"]
        stopping.set()
        await stream.aclose()


async def test_a_resume_replays_the_same_changes_from_the_feed_or_from_etcd(
    store: Store,
) -> None:
    """A token the feed holds is replayed from memory; one older than the feed's last
    changes (yet within the resume horizon) from etcd; both the same, in order."""
    async with replica(store, Feed(recent=2)) as small, replica(store, Feed()) as large:
        token = await store.revision()
        for n in range(4):
            last = await register(store, f"again-{n}", "again")
        for hub in (small, large):
            await eventually(lambda hub=hub: hub.feed.revision >= last, what="the feeds")
        assert not small.feed.holds_since(token)
        assert large.feed.holds_since(token)
        streams = [
            watch(directory(store, hub.feed), resume_token=str(token), resource_groups=["again"])
            for hub in (small, large)
        ]
        for stream, _ in streams:
            assert await changed(stream, 4) == [f"again-{n}" for n in range(4)]
        await register(store, "again-4", "again")
        for stream, stopping in streams:
            assert await changed(stream, 1) == ["again-4"]
            stopping.set()
            await stream.aclose()


async def test_a_token_past_the_replicas_view_is_served_from_etcd(store: Store) -> None:
    """A replica whose view lags (here: its hub stopped) still serves a token another
    replica gave from a later revision, and refuses one from the future."""
    async with replica(store) as hub:
        pass
    behind = hub.feed
    ahead = await register(store, "late-0", "late")
    assert ahead > behind.revision
    stream, stopping = watch(
        directory(store, behind), resume_token=str(ahead), resource_groups=["late"]
    )
    step = asyncio.ensure_future(changed(stream, 1))
    await register(store, "late-1", "late")
    assert await step == ["late-1"]
    stopping.set()
    await stream.aclose()
    future, _ = watch(directory(store, behind), resume_token=str(ahead + 10**9))
    with pytest.raises(InvalidArgument):
        await anext(future)
