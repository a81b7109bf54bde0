"""The hand-written wire encoding of polygons parses as the protobuf library's own messages."""

from __future__ import annotations

import numpy as np
import pytest

from histosam.backend.core.geometry import PolygonXY, mask_to_polygons
from histosam.backend.serving.wire import EncodedReply, encode_polygons, serialize_reply
from histosam.v1 import segmentation_pb2 as pb


def reference_message(polygons: list[PolygonXY], **fields) -> pb.ClickResponse:
    return pb.ClickResponse(
        polygons=[
            pb.Polygon(exterior=np.ravel(p.exterior).tolist(), holes=[pb.Ring(xy=np.ravel(h).tolist()) for h in p.holes])
            for p in polygons
        ],
        **fields,
    )


def random_polygons(rng: np.random.Generator) -> list[PolygonXY]:
    mask = rng.random((int(rng.integers(1, 60)), int(rng.integers(1, 60)))) < rng.random()
    return mask_to_polygons(mask, origin=(float(rng.normal() * 1e5), -3.25), downsample=float(rng.uniform(0.1, 8)))


@pytest.mark.parametrize("seed", range(20))
def test_encoded_reply_parses_as_the_library_message(seed):
    rng = np.random.default_rng(seed)
    polygons = random_polygons(rng)
    fields = dict(predicted_iou=0.75, decode_seconds=0.01, num_points=3, mask_pixels=int(rng.integers(0, 10**9)),
                  mask_png=b"\x89PNG" * seed)
    wire = serialize_reply(EncodedReply(pb.ClickResponse(**fields), encode_polygons(polygons)))
    parsed = pb.ClickResponse.FromString(wire)
    assert parsed == reference_message(polygons, **fields)
    # Same bytes as the library writes when the polygons come first (field 1, packed doubles).
    assert encode_polygons(polygons) == reference_message(polygons).SerializeToString()


def test_large_rings_need_multi_byte_lengths_and_keep_every_bit():
    ring = np.random.default_rng(0).normal(size=(5000, 2)) * 1e6  # 80 kB: a 3-byte length varint
    poly = PolygonXY(ring, [ring[:3] + 0.5, ring[:300]])
    parsed = pb.ClickResponse.FromString(encode_polygons([poly]))
    assert np.array_equal(np.reshape(parsed.polygons[0].exterior, (-1, 2)), ring)
    assert [len(h.xy) for h in parsed.polygons[0].holes] == [6, 600]


def test_plain_messages_serialise_as_usual():
    msg = pb.GetServerInfoResponse(version="1.2.3")
    assert serialize_reply(msg) == msg.SerializeToString()
    assert serialize_reply(EncodedReply(msg)) == msg.SerializeToString()
