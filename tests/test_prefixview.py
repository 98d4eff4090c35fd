"""The watch-synced copy of a prefix (runtime/prefixview.py) against a real etcd: the
keys there at its start, then every put and delete, with the revisions a compare needs;
not loaded while etcd cannot be read, loaded once it can; in step again after an etcd
restart."""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.prefixview import PrefixView
from accessline_server.runtime.store import Store
from tests.support.waiting import eventually

S = wrappers_pb2.StringValue


def values(view: PrefixView[S], *keys: str) -> list[str | None]:
    found = [view.get(k) for k in keys]
    return [e.value.value if e is not None else None for e in found]


async def test_the_copy_has_the_keys_at_its_start_then_every_change(store: Store) -> None:
    await store.put("holds/a", S(value="a1"))
    await store.put("other/x", S(value="not under the prefix"))
    view = PrefixView(store, "holds/", S)
    view.start()
    try:
        await eventually(lambda: view.loaded, what="the copy loaded")
        assert values(view, "holds/a", "other/x") == ["a1", None]
        revision = await store.put("holds/b", S(value="b1"))
        await store.put("holds/a", S(value="a2"))
        await store.delete("holds/a")
        await eventually(
            lambda: values(view, "holds/a", "holds/b") == [None, "b1"], what="the changes"
        )
        held = view.get("holds/b")
        assert held is not None
        assert (held.meta.mod_revision, held.meta.create_revision) == (revision, revision)
    finally:
        await view.stop()
    assert not view.loaded


async def test_the_copy_loads_once_etcd_answers_and_follows_it_across_a_restart(
    private_etcd: EmbeddedEtcd,
) -> None:
    async with Store(private_etcd.endpoint, "/view", timeout=2.0) as store:
        await store.put("holds/a", S(value="a1"))
        private_etcd.stop()
        view = PrefixView(store, "holds/", S)
        view.start()
        try:
            private_etcd.start()
            await private_etcd.wait_ready()
            await eventually(lambda: view.loaded, timeout=30, what="the copy loaded")
            assert values(view, "holds/a") == ["a1"]
            private_etcd.stop()
            private_etcd.start()
            await private_etcd.wait_ready()
            await store.put("holds/a", S(value="a2"))
            await store.put("holds/c", S(value="c1"))
            await eventually(
                lambda: values(view, "holds/a", "holds/c") == ["a2", "c1"],
                timeout=30,
                what="the changes after the restart",
            )
            assert view.loaded
        finally:
            await view.stop()
