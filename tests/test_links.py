"""The links and keys of identity: every service and etcd refuse clients without a
certificate of the deployment's CA, a renewed certificate and a rotated issuer key are
taken without a restart, production refuses the development signing key, and an
admitted client stream is told so before it writes. On the session's stack (the five
services as processes) where services are needed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime import devpki
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.identity import ROLE_NAMES, JwksKeys, TokenVerifier
from accessline_server.runtime.store import EtcdTls, Store
from tests.conftest import (
    connect,
    eventually,
    identity,
    spawn_service,
    wait_serving,
)
from tests.support.stack import Stack

# Stack.processes order: nd, pr, nt, cm, routers.
PRESENCE = 1
EVERY_ROLE = sorted(ROLE_NAMES.values())


async def test_production_refuses_the_development_signing_key() -> None:
    keys = JwksKeys(identity().jwks_url, refuse_development=True)
    verifier = TokenVerifier(
        keys, issuer=devpki.DEV_ISSUER, audience=devpki.DEV_AUDIENCE, algorithms=("ES256",)
    )
    with pytest.raises(AccesslineError) as refused:
        await verifier.verify(identity().token("ann", "agent"))
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    await keys.close()


async def test_a_client_without_a_certificate_of_the_ca_reaches_no_service(
    stack: Stack, tmp_path: Path
) -> None:
    files = identity().files
    stranger = devpki.create(tmp_path / "other", services=(), clients=("admin",))
    candidates = {
        "no client certificate": grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=files.ca.read_bytes()),
            grpc.access_token_call_credentials(identity().superuser),
        ),
        "another CA's certificate": grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(
                root_certificates=files.ca.read_bytes(),
                private_key=stranger.client_key("admin").read_bytes(),
                certificate_chain=stranger.client_cert("admin").read_bytes(),
            ),
            grpc.access_token_call_credentials(identity().superuser),
        ),
    }
    for case, credentials in candidates.items():
        for process in stack.processes:
            async with grpc.aio.secure_channel(process.address, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await nd_grpc.NumberDistributionServiceStub(channel).ListPools(
                        nd_pb2.ListPoolsRequest(), timeout=5
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, case
    # Plain text reaches nothing either.
    async with grpc.aio.insecure_channel(stack.processes[0].address) as plain:
        with pytest.raises(grpc.aio.AioRpcError):
            await nd_grpc.NumberDistributionServiceStub(plain).ListPools(
                nd_pb2.ListPoolsRequest(), timeout=5
            )


async def test_etcd_takes_only_clients_with_a_certificate_of_the_ca(tmp_path: Path) -> None:
    files = identity().files
    server = EmbeddedEtcd(
        tmp_path / "etcd",
        free_port(),
        free_port(),
        fsync=False,
        extra_args=files.etcd_server_args(),
        client_tls=files.etcd_client("numberdistribution"),
    )
    server.start()
    try:
        await server.wait_ready()
        stranger = devpki.create(tmp_path / "other", services=("numberdistribution",), clients=())
        refused = {
            "no certificate": EtcdTls(ca=files.ca.read_bytes()),
            "another CA's": EtcdTls(
                ca=files.ca.read_bytes(),
                cert=stranger.cert("numberdistribution").read_bytes(),
                key=stranger.key("numberdistribution").read_bytes(),
            ),
        }
        for tls in refused.values():
            store = Store(server.endpoint, "/probe", timeout=2.0, tls=tls)
            await store.connect()
            with pytest.raises(AccesslineError):
                await store.ping()
            await store.close()
        # A service with its certificate runs on it, over TLS all the way.
        env = identity().files.service_env("numberdistribution", identity().jwks_url)
        process = spawn_service(
            "accessline_server.numberdistribution", server.endpoint, "/tls-probe", **env
        )
        try:
            await wait_serving(process)
            async with connect(process.address) as channel:
                listed = await nd_grpc.NumberDistributionServiceStub(channel).ListPools(
                    nd_pb2.ListPoolsRequest()
                )
            assert list(listed.pools) == []
        finally:
            await process.stop_async()
    finally:
        server.stop()


def served_certificate_name(address: str) -> str:
    """The common name of the certificate a server shows a new connection."""
    files = identity().files
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.client_cert("admin")), str(files.client_key("admin")))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME
    )
    return str(names[0].value)


async def test_a_renewed_certificate_is_served_without_a_restart(
    service_factory: Any, tmp_path: Path
) -> None:
    files = identity().files
    cert, key = tmp_path / "serving.pem", tmp_path / "serving.key"
    shutil.copy(files.cert("numberdistribution"), cert)
    shutil.copy(files.key("numberdistribution"), key)
    process = service_factory(
        "tests.support.probe_service",
        ACCESSLINE_TLS_CERT_FILE=str(cert),
        ACCESSLINE_TLS_KEY_FILE=str(key),
    )
    await wait_serving(process)
    assert served_certificate_name(process.address) == "numberdistribution"
    # cert-manager writes the renewed pair in place: key and certificate replaced.
    for source, target in ((files.key("callmatching"), key), (files.cert("callmatching"), cert)):
        staged = target.with_suffix(".new")
        shutil.copy(source, staged)
        os.replace(staged, target)
    await eventually(
        lambda: served_certificate_name(process.address) == "callmatching",
        what="the renewed certificate on a new connection",
    )


async def test_a_rotated_issuer_key_is_taken_without_a_restart(tmp_path: Path) -> None:
    """The issuer publishes a new key and signs with it: the first token naming it makes
    the cached key set refresh (at most every min_refresh seconds), and tokens of the old
    key, once it is withdrawn, stop working at the next refresh."""
    old = devpki.create(tmp_path / "old", services=(), clients=())
    new = devpki.create(tmp_path / "new", services=(), clients=())
    published = tmp_path / "jwks.json"
    published.write_text(old.jwks.read_text())
    server = devpki.JwksServer(published)
    keys = JwksKeys(server.url, min_refresh=0.0, refresh=3600.0)
    verifier = TokenVerifier(
        keys, issuer=devpki.DEV_ISSUER, audience=devpki.DEV_AUDIENCE, algorithms=("ES256",)
    )
    try:
        assert (await verifier.verify(old.token("ann", ["agent"]))).subject == "ann"
        rotated = {
            "keys": json.loads(old.jwks.read_text())["keys"]
            + json.loads(new.jwks.read_text())["keys"]
        }
        published.write_text(json.dumps(rotated))
        assert (await verifier.verify(new.token("bob", ["agent"]))).subject == "bob"
        published.write_text(new.jwks.read_text())  # the old key withdrawn
        await keys.load()
        with pytest.raises(AccesslineError) as refused:
            await verifier.verify(old.token("carol", ["agent"]))
        assert refused.value.reason == "UNKNOWN_KEY"
    finally:
        await keys.close()
        server.close()


async def test_an_admitted_client_stream_is_told_so_before_its_first_message(
    stack: Stack,
) -> None:
    """Presence's Connect, admitted, sends its initial metadata before the agent's app
    writes anything: a client can learn the verdict without racing a write into it."""
    address = stack.processes[PRESENCE].address
    credentials = identity().credentials(
        identity().token("m", *EVERY_ROLE, applications=["*"], switch="*")
    )
    async with grpc.aio.secure_channel(address, credentials) as channel:
        call: Any = channel.stream_stream(
            "/accessline.presence.v1.PresenceService/Connect", bytes, bytes
        )(timeout=30)
        await asyncio.wait_for(call.initial_metadata(), 10)
        assert not call.done()
        call.cancel()
