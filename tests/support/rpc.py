"""Any RPC of the contracts called by its descriptor, with an empty or partly filled
request, reporting the status it ends with: how the access matrix calls every RPC."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor

from tests.conftest import error_details


def request_for(method: MethodDescriptor, **scoped: str) -> Any:
    """An empty request of the method, with dotted fields set as given."""
    cls = message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(method.input_type.full_name)
    )
    request = cls()
    for path, value in scoped.items():
        target = request
        *parents, leaf = path.split(".")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return request


async def invoke(
    address: str, method: MethodDescriptor, credentials: grpc.ChannelCredentials, request: Any
) -> tuple[grpc.StatusCode, str]:
    """The status the call ends with and its ErrorInfo reason (OK when it answers;
    DEADLINE_EXCEEDED for a stream that was admitted and waits)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = type(request).SerializeToString
    async with grpc.aio.secure_channel(address, credentials) as channel:
        try:
            if method.client_streaming:
                call: Any = (
                    channel.stream_stream(path, serialize, bytes)
                    if method.server_streaming
                    else channel.stream_unary(path, serialize, bytes)
                )(timeout=3)
                # The server's verdict first (admitted streams send their initial
                # metadata at once): writing into a refusal makes gRPC's Python client
                # report INTERNAL instead of the server's status (grpc/grpc#36066).
                await call.initial_metadata()
                if call.done():
                    raise grpc.aio.AioRpcError(
                        await call.code(),
                        grpc.aio.Metadata(),
                        await call.trailing_metadata(),
                        await call.details(),
                    )
                await call.write(request)
                if method.server_streaming:
                    await call.read()
                    call.cancel()
                else:
                    await call.done_writing()
                    await call
            elif method.server_streaming:
                stream = channel.unary_stream(path, serialize, bytes)(request, timeout=3)
                await stream.read()
                stream.cancel()
            else:
                await channel.unary_unary(path, serialize, bytes)(request, timeout=3)
        except grpc.aio.AioRpcError as exc:
            info = error_details(exc).get("ErrorInfo") if exc.trailing_metadata() else None
            return exc.code(), info.reason if info is not None else ""
    return grpc.StatusCode.OK, ""
