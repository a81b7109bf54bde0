"""Server reflection under both of its names: ``grpc.reflection.v1`` (what grpcurl and newer
gRPC clients ask for first) and the older ``grpc.reflection.v1alpha``.

grpcio-reflection (1.85) serves only v1alpha. The v1 protocol is the same messages under
another package (same fields, numbers and types), so v1 is served by the same servicer under
the v1 name; the v1 file descriptor is added to the descriptor pool, so that a client asking
reflection about the reflection service itself gets an answer under either name.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PREFIX = ".grpc.reflection.v1alpha."
_V1_PREFIX = ".grpc.reflection.v1."


def _add_v1_descriptor() -> None:
    """grpc/reflection/v1/reflection.proto in the default pool, derived from v1alpha's."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return  # a newer grpcio-reflection (or an earlier call) put it there
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(_V1ALPHA_PREFIX):
                f.type_name = _V1_PREFIX + f.type_name[len(_V1ALPHA_PREFIX):]
    for service in proto.service:
        for method in service.method:
            method.input_type = _V1_PREFIX + method.input_type[len(_V1ALPHA_PREFIX):]
            method.output_type = _V1_PREFIX + method.output_type[len(_V1ALPHA_PREFIX):]
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Reflection for ``service_names`` (and itself, under both names) on ``server``."""
    _add_v1_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,  # the same wire format
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),))
