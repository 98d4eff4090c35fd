"""The slim client distribution: `accessline-api` is built from gen/, installed into a
fresh virtual environment with nothing else, and calls a running service with its
typed stubs; the environment holds no server code."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import ROOT, identity, spawn_service, wait_serving

CALL = textwrap.dedent(
    """
    import importlib.util, json, sys
    import grpc
    from accessline.numberdistribution.v1 import number_distribution_pb2 as nd
    from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc

    address, ca, cert, key, token = sys.argv[1:]
    tls = grpc.ssl_channel_credentials(
        open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read()
    )
    creds = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))
    with grpc.secure_channel(address, creds) as channel:
        stub = nd_grpc.NumberDistributionServiceStub(channel)
        stub.CreatePool(nd.CreatePoolRequest(pool=nd.Pool(pool_id="slim", subjects=["slim"])))
        stub.AddNumbers(nd.AddNumbersRequest(pool_id="slim", numbers=["+33100000001"]))
        stats = stub.GetPoolStats(nd.GetPoolStatsRequest(pool_id="slim")).stats
    print(json.dumps({
        "free": stats.free,
        "server_code": importlib.util.find_spec("accessline_server") is not None,
    }))
    """
)


# What the stubs need, and nothing of the server (no etcd, no gazetteer, no exact pins a
# host application would clash with).
EXPECTED = {"accessline-api", "grpcio", "protobuf", "typing-extensions", "pip", "setuptools"}


def run(*command: str | Path, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=600, **options
    )


async def test_the_client_package_installs_alone_and_calls_a_service(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    built = await asyncio.to_thread(
        run, sys.executable, ROOT / "tools" / "build_client.py", "--out", tmp_path, check=True
    )
    wheel = Path(built.stdout.strip().splitlines()[-1])
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    await asyncio.to_thread(run, sys.executable, "-m", "venv", venv, check=True)
    await asyncio.to_thread(run, python, "-m", "pip", "install", "--quiet", wheel, check=True)
    listed = await asyncio.to_thread(run, python, "-m", "pip", "list", "--format=json")
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "accessline-api" in names
    assert names <= EXPECTED, names - EXPECTED

    service = spawn_service("accessline_server.numberdistribution", etcd.endpoint, "/slim-client")
    try:
        await wait_serving(service)
        files = identity().files
        script = tmp_path / "call.py"
        script.write_text(CALL)
        called = await asyncio.to_thread(
            run,
            python,
            script,
            service.address,
            files.ca,
            files.client_cert("admin"),
            files.client_key("admin"),
            identity().superuser,
            cwd=tmp_path,
        )
    finally:
        await service.stop_async()
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"free": 1, "server_code": False}
