"""Protobuf wire encoding of polygons, straight from numpy, for the Click reply.

Why: a click on a 640x640 patch returns thousands of vertices. Building ``pb.Polygon``
messages means one Python float per coordinate (about 1 ms per click, as much as the rest of
the gRPC path); the wire format of ``repeated double`` (packed, proto3's default) is just the
little-endian float64 array behind a tag and a length, which numpy writes in microseconds.
Serialised protobuf messages concatenate as a merge (repeated fields append), so the reply is
``ClickResponse(without polygons).SerializeToString() + encode_polygons(...)`` and any client
parses it as one ordinary ``ClickResponse``.

Only the field numbers of ``histosam.v1`` below are assumed; tests/test_wire.py checks the
bytes against the protobuf library's own encoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from histosam.backend.core.geometry import PolygonXY

_LEN = 2  # wire type of length-delimited fields (messages, packed repeated scalars)
CLICK_RESPONSE_POLYGONS = 1  # ClickResponse.polygons
POLYGON_EXTERIOR = 1  # Polygon.exterior
POLYGON_HOLES = 2  # Polygon.holes
RING_XY = 1  # Ring.xy


def _varint(value: int) -> bytes:
    if value < 0x80:  # tags and the lengths of small rings: most calls
        return _SMALL[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL = [bytes((v,)) for v in range(0x80)]


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | _LEN) + _varint(len(payload)) + payload


def _packed_doubles(field: int, ring: np.ndarray) -> bytes:
    data = np.ascontiguousarray(ring, dtype="<f8").tobytes()
    return _length_delimited(field, data) if data else b""


def encode_polygon(poly: PolygonXY) -> bytes:
    """One ``histosam.v1.Polygon`` message body (x0, y0, x1, y1, ... per ring)."""
    parts = [_packed_doubles(POLYGON_EXTERIOR, poly.exterior)]
    parts.extend(_length_delimited(POLYGON_HOLES, _packed_doubles(RING_XY, hole)) for hole in poly.holes)
    return b"".join(parts)


def encode_polygons(polygons: Iterable[PolygonXY], field: int = CLICK_RESPONSE_POLYGONS) -> bytes:
    """``repeated Polygon`` field ``field`` of an enclosing message, ready to append to it."""
    return b"".join(_length_delimited(field, encode_polygon(p)) for p in polygons)


@dataclass(frozen=True)
class EncodedReply:
    """A reply message plus wire bytes of further fields, serialised by ``serialize_reply``."""

    message: Any
    extra: bytes = b""


def serialize_reply(reply: Any) -> bytes:
    """The gRPC response serializer: plain messages as usual, ``EncodedReply`` concatenated."""
    if isinstance(reply, EncodedReply):
        return reply.message.SerializeToString() + reply.extra
    return reply.SerializeToString()
