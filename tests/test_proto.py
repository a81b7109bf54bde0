"""The wire contract: the committed generated code matches the .proto, and the names clients
(the Groovy scripts, grpcurl users) rely on are there with their types."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as F

from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

PROTO_DIR = Path(__file__).resolve().parents[1] / "protos" / "histosam" / "v1"


def _file_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    out = descriptor_pb2.FileDescriptorSet()
    out.ParseFromString(data)
    return out


def _clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_generated_files_are_not_stale(tmp_path):
    pytest.importorskip("grpc_tools")
    import grpc_tools
    import protogen  # tools/protogen.py

    fresh = protogen.compile_proto(tmp_path)
    fresh_set = _file_set(fresh["histosam/v1/segmentation.desc"].read_bytes())
    # The committed descriptor set (read by the Groovy client) is the .proto's.
    assert _file_set((PROTO_DIR / "segmentation.desc").read_bytes()) == fresh_set
    # The descriptor embedded in segmentation_pb2.py is the .proto's.
    embedded = descriptor_pb2.FileDescriptorProto()
    embedded.ParseFromString(pb.DESCRIPTOR.serialized_pb)
    fresh_file = next(f for f in fresh_set.file if f.name == "histosam/v1/segmentation.proto")
    _clear_json_names(fresh_file.message_type)  # python gencode leaves out the derived json_name
    assert embedded == fresh_file, "segmentation.proto changed: run python tools/protogen.py"
    # Byte for byte too, when the committed files came from this grpcio-tools version.
    committed_grpc = (PROTO_DIR / "segmentation_pb2_grpc.py").read_text()
    tools_version = getattr(grpc_tools, "__version__", None)
    if tools_version is None:
        from importlib.metadata import version

        tools_version = version("grpcio-tools")
    if f"GRPC_GENERATED_VERSION = '{tools_version}'" in committed_grpc:
        assert protogen.stale_files() == []
        assert protogen.main(["--check"]) == 0


def test_generated_code_imports_as_histosam_v1():
    text = (PROTO_DIR / "segmentation_pb2_grpc.py").read_text()
    assert "from histosam.v1 import segmentation_pb2" in text
    assert pb.DESCRIPTOR.package == "histosam.v1"
    assert hasattr(pb_grpc, "SegmentationStub") and hasattr(pb_grpc, "add_SegmentationServicer_to_server")


def test_service_methods():
    service = pb.DESCRIPTOR.services_by_name["Segmentation"]
    assert service.full_name == "histosam.v1.Segmentation"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "GetServerInfo": ("GetServerInfoRequest", "GetServerInfoResponse"),
        "OpenImage": ("OpenImageRequest", "OpenImageResponse"),
        "Click": ("ClickRequest", "ClickResponse"),
        "CloseImage": ("CloseImageRequest", "CloseImageResponse"),
    }


# message -> field -> (type, label-or-message-type); the names the contract fixes.
CONTRACT = {
    "OpenImageRequest": {"model": F.TYPE_STRING, "encoded_image": F.TYPE_BYTES, "slide_region": "SlideRegion",
                         "frame": "Frame"},
    "Frame": {"origin_x": F.TYPE_DOUBLE, "origin_y": F.TYPE_DOUBLE, "downsample": F.TYPE_DOUBLE},
    "SlideRegion": {"slide_path": F.TYPE_STRING, "x": F.TYPE_DOUBLE, "y": F.TYPE_DOUBLE, "width": F.TYPE_DOUBLE,
                    "height": F.TYPE_DOUBLE, "downsample": F.TYPE_DOUBLE},
    "OpenImageResponse": {"session_id": F.TYPE_STRING, "width": F.TYPE_INT32, "height": F.TYPE_INT32,
                          "model": F.TYPE_STRING, "cache_hit": F.TYPE_BOOL, "encode_seconds": F.TYPE_DOUBLE,
                          "frame": "Frame"},
    "Point": {"x": F.TYPE_DOUBLE, "y": F.TYPE_DOUBLE, "positive": F.TYPE_BOOL},
    "Box": {"x0": F.TYPE_DOUBLE, "y0": F.TYPE_DOUBLE, "x1": F.TYPE_DOUBLE, "y1": F.TYPE_DOUBLE},
    "ClickRequest": {"session_id": F.TYPE_STRING, "points": "Point", "box": "Box", "want_mask_png": F.TYPE_BOOL,
                     "simplify_tolerance": F.TYPE_DOUBLE, "min_area": F.TYPE_DOUBLE,
                     "mask_prompt_png": F.TYPE_BYTES, "mask_prompt_polygons": "Polygon"},
    "Polygon": {"exterior": F.TYPE_DOUBLE, "holes": "Ring"},
    "Ring": {"xy": F.TYPE_DOUBLE},
    "ClickResponse": {"polygons": "Polygon", "mask_png": F.TYPE_BYTES, "predicted_iou": F.TYPE_FLOAT,
                      "decode_seconds": F.TYPE_DOUBLE, "num_points": F.TYPE_INT32},
    "CloseImageRequest": {"session_id": F.TYPE_STRING},
    "GetServerInfoResponse": {"version": F.TYPE_STRING, "models": "ModelInfo", "providers": F.TYPE_STRING,
                              "limits": "Limits"},
}
REPEATED = {("ClickRequest", "points"), ("ClickRequest", "mask_prompt_polygons"), ("Polygon", "exterior"),
            ("Polygon", "holes"), ("Ring", "xy"), ("ClickResponse", "polygons"),
            ("GetServerInfoResponse", "models"), ("GetServerInfoResponse", "providers")}


@pytest.mark.parametrize("message", sorted(CONTRACT))
def test_contract_fields(message):
    desc = pb.DESCRIPTOR.message_types_by_name[message]
    for name, kind in CONTRACT[message].items():
        field = desc.fields_by_name.get(name)
        assert field is not None, f"{message}.{name} is missing"
        if isinstance(kind, str):
            assert field.type == F.TYPE_MESSAGE and field.message_type.name == kind, f"{message}.{name}"
        else:
            assert field.type == kind, f"{message}.{name}"
        assert (field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED) == (
            (message, name) in REPEATED
        ), f"{message}.{name} repeatedness"


def test_source_oneof_and_optional_min_area():
    request = pb.DESCRIPTOR.message_types_by_name["OpenImageRequest"]
    assert [f.name for f in request.oneofs_by_name["source"].fields] == ["encoded_image", "slide_region"]
    click = pb.ClickRequest()
    assert not click.HasField("min_area")  # unset -> the server's documented default
    click.min_area = 0.0
    assert click.HasField("min_area")  # 0 is "keep everything", distinguishable from unset
