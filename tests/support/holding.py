"""What keeps a pool's numbers from being free, for a failing test to say."""

from __future__ import annotations

from typing import Any

from accessline.numberdistribution.storage.v1 import storage_pb2 as nd_store
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys as nd_keys
from accessline_server.runtime.store import Op, Store


async def what_holds(stubs: list[Any], store: Store, pool_id: str) -> str:
    """Each replica's counts of the pool (free, reserved, quarantined), and the slots and
    quarantine records etcd still has, with their leases' time to live."""
    counts = []
    for stub in stubs:
        stats = (await stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool_id))).stats
        counts.append((stats.free, stats.reserved, stats.quarantined))
    found = []
    for prefix in (nd_keys.SLOTS, nd_keys.QUARANTINE):
        result = await store.txn([], [Op.get_prefix(prefix)])
        for kv in result.gets[0]:
            ttl = await store.lease_ttl(kv.meta.lease) if kv.meta.lease else None
            held = f"{kv.key} lease {kv.meta.lease:x} ttl {ttl}"
            if prefix == nd_keys.SLOTS:
                record = nd_store.StoredReservation.FromString(kv.value)
                held += f" session {record.session_id} revision {kv.meta.create_revision}"
            found.append(held)
    return f"replicas (free, reserved, quarantined): {counts}; in etcd: {found}"
