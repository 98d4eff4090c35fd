"""Server reflection, v1 and v1alpha: what `grpcurl`, `buf curl --reflect` and other
tools ask a server for its contract. grpcio ships only v1alpha; v1 is the same protocol
(the same messages, field for field) under the package `grpc.reflection.v1`, so one
servicer answers both: v1's descriptor is v1alpha's renamed, added to the default pool
so that reflection describes it too, and its calls are parsed with v1alpha's classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA: Any = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_service() -> ServiceDescriptor:
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.", 1)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    pool.Add(proto)
    return pool.FindServiceByName("grpc.reflection.v1.ServerReflection")


V1 = _v1_service()
SERVICES = (V1, V1ALPHA)
NAMES = tuple(service.full_name for service in SERVICES)


def add_v1_to_server(servicer: Any, server: Any) -> None:
    """Registers the servicer's ServerReflectionInfo under v1's name (the generated
    `add_*_to_server` of v1alpha, renamed)."""
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1.full_name, handlers),))
    server.add_registered_method_handlers(V1.full_name, handlers)


def registrations(service_names: Sequence[str]) -> list[tuple[Any, Any, ServiceDescriptor]]:
    """Reflection of the names given (and of itself), v1 and v1alpha, as (servicer,
    `add_*_to_server`, descriptor) for a server to add."""
    servicer = ReflectionServicer([*service_names, *NAMES])
    return [
        (servicer, add_v1_to_server, V1),
        (servicer, reflection_pb2_grpc.add_ServerReflectionServicer_to_server, V1ALPHA),
    ]
