"""A 3-member etcd cluster on loopback for the tests that kill its members."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port

# Debian's etcd 3.4 for clusters whose members the tests kill (see tools/ensure-test-deps.sh).
CLUSTER_ETCD = Path("/usr/bin/etcd")


@dataclass
class EtcdCluster:
    """A 3-member etcd cluster on loopback, each member its own process."""

    members: list[EmbeddedEtcd]

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def member(self, endpoint: str) -> EmbeddedEtcd:
        return next(m for m in self.members if m.endpoint == endpoint)

    async def leader(self) -> EmbeddedEtcd:
        """The member that leads the cluster now (asked of every live member)."""
        import aetcd.rpc as etcdrpc

        for member in self.members:
            if member.process is None or member.process.poll() is not None:
                continue
            async with grpc.aio.insecure_channel(member.endpoint) as channel:
                try:
                    status = await etcdrpc.MaintenanceStub(channel).Status(
                        etcdrpc.StatusRequest(), timeout=2
                    )
                except grpc.aio.AioRpcError:
                    continue
                if status.leader == status.header.member_id:
                    return member
        raise AssertionError("no member leads the cluster")

    async def wait_ready(self) -> None:
        await asyncio.gather(*(m.wait_ready() for m in self.members))

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def new_cluster(root: Path, size: int = 3) -> EtcdCluster:
    if not CLUSTER_ETCD.exists():
        pytest.fail(f"{CLUSTER_ETCD} is missing; `make check` installs Debian's etcd-server")
    # Members fsync; in memory that costs nothing and still runs etcd's real write path.
    shm = Path("/dev/shm")  # noqa: S108 - a private folder made by mkdtemp inside it
    base = Path(tempfile.mkdtemp(prefix="accessline-etcd-", dir=shm if shm.is_dir() else None))
    ports = [(free_port(), free_port()) for _ in range(size)]
    names = [f"m{i}" for i in range(size)]
    initial = ",".join(
        f"{n}=http://127.0.0.1:{peer}" for n, (_, peer) in zip(names, ports, strict=True)
    )
    members = [
        EmbeddedEtcd(
            base / name,
            client,
            peer,
            name=name,
            binary=CLUSTER_ETCD,
            initial_cluster=initial,
            log_file=root / f"{name}.log",
        )
        for name, (client, peer) in zip(names, ports, strict=True)
    ]
    return EtcdCluster(members)
