"""Masks <-> polygons <-> GeoJSON, in one coordinate convention.

Convention (the one QuPath uses): pixel ``(col, row)`` of a mask covers the square
``[col, col+1) x [row, row+1)``; polygon vertices lie on pixel *corners*, not centres. A mask
covering a slide region is placed in slide level-0 ("client") coordinates by a frame::

    client = origin + pixel * downsample

so a polygon traced around the pixels of a 256x256 mask of a region read at downsample 4 from
``(ox, oy)`` lands exactly on that region in QuPath.

Why not the usual ``cv2.findContours`` + ``cv2.fillPoly`` pair: findContours traces pixel
*centres* (every shape loses half a pixel all round, a 1-pixel speck becomes a point) and
fillPoly fills boundary pixels inclusively (every shape gains a pixel on its right and bottom),
so a round trip drifts by a pixel per trip, which ruins small shapes. Here tracing is exact
(findContours' pixel-centre borders turned into the pixel-edge outlines of the mask's closed
pixel squares) and filling
samples pixel centres with the even-odd rule, so mask -> polygons -> mask is the identity when
no simplification is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from histosam.backend.core.errors import InvalidInputError

DEFAULT_CLASS_NAME = "Tumor"
DEFAULT_CLASS_COLOR = (200, 0, 0)
# Masks above this many pixels are refused by mask_to_polygons: a whole level 0 passed by
# mistake should fail clearly, not exhaust memory.
MAX_TRACE_PIXELS = 64_000_000


@dataclass(frozen=True)
class PolygonXY:
    """One polygon with holes. ``exterior``: (K, 2) float x,y; ``holes``: list of (M, 2).

    Rings are open (the first vertex is not repeated at the end).
    """

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    @property
    def area(self) -> float:
        """Exterior area minus hole areas (shoelace), in squared coordinate units."""
        return abs(ring_area(self.exterior)) - sum(abs(ring_area(h)) for h in self.holes)

    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior."""
        ext = np.asarray(self.exterior, np.float64)
        return float(ext[:, 0].min()), float(ext[:, 1].min()), float(ext[:, 0].max()), float(ext[:, 1].max())

    def transformed(self, offset: tuple[float, float], scale: float) -> PolygonXY:
        """``offset + self * scale`` applied to every ring."""
        o = np.asarray(offset, np.float64)
        return PolygonXY(
            exterior=o + np.asarray(self.exterior, np.float64) * scale,
            holes=[o + np.asarray(h, np.float64) * scale for h in self.holes],
        )


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of an open ring (positive = clockwise on screen, y down)."""
    r = np.asarray(ring, np.float64)
    if len(r) < 3:
        return 0.0
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# --------------------------------------------------------------------------- mask -> polygons


def _ring_neighbours(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the next and previous point within each ring of concatenated rings."""
    n = int(lengths.sum())
    ends = np.cumsum(lengths)
    starts = ends - lengths
    nxt = np.arange(1, n + 1, dtype=np.intp)
    nxt[ends - 1] = starts
    prev = np.arange(-1, n - 1, dtype=np.intp)
    prev[starts] = ends - 1
    return nxt, prev


# Pixel corners in counter-clockwise screen order: TL, BL, BR, TR (offsets from the pixel).
_CORNERS = np.array([[0, 0], [0, 1], [1, 1], [1, 0]], np.int32)


def _direction_table(table: dict[tuple[int, int], int]) -> np.ndarray:
    lut = np.full(9, -1, np.int32)
    for (dx, dy), corner in table.items():
        lut[(dx + 1) * 3 + dy + 1] = corner
    return lut


# OpenCV traces every border (outer and hole) with the background on its right. Leaving a
# pixel by step b, the outline passes to the next pixel through the corner they share on the
# background side (_LEAVE); arriving by step a, it starts at that same corner seen from the
# new pixel (_ARRIVE). In between it runs counter-clockwise along the pixel's free sides.
_LEAVE = _direction_table({(1, 0): 2, (1, -1): 3, (0, -1): 3, (-1, -1): 0,
                           (-1, 0): 0, (-1, 1): 1, (0, 1): 1, (1, 1): 2})
_ARRIVE = _direction_table({(1, 0): 1, (1, -1): 1, (0, -1): 2, (-1, -1): 2,
                            (-1, 0): 3, (-1, 1): 3, (0, 1): 0, (1, 1): 0})


def _exact_rings(contours: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Borders traced through pixel centres -> exact pixel-corner rings, and their areas.

    ``contours`` are OpenCV's unit-step borders (CHAIN_APPROX_NONE) of the mask itself. Each
    visited pixel contributes the corners between its arrival and leaving corners (none at a
    concave turn, all four around a tip the border turns back from, all four for a lone
    pixel), so the rings run along pixel edges exactly; points inside straight runs are then
    dropped. Tracing at the mask's own resolution, not on a 2x lattice, keeps this a quarter of
    the memory traffic: it runs on every click. All rings are processed in one vectorised pass.

    Returns ``(xy, starts, areas)``: ring ``i`` is ``xy[starts[i]:starts[i + 1]]`` in mask
    coordinates (``starts`` has one entry more than there are rings), ``areas`` are signed.
    Slicing is left to the caller: most traced rings are specks it drops.
    """
    # Flat 1-D int32 arrays and ``take``: 2-D fancy indexing costs several times more here.
    lengths = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    pts = np.concatenate(contours).reshape(-1, 2)
    x, y = pts[:, 0].astype(np.int32), pts[:, 1].astype(np.int32)
    nxt, prev = _ring_neighbours(lengths)
    ax, ay = x - x.take(prev), y - y.take(prev)
    bx, by = x.take(nxt) - x, y.take(nxt) - y
    start = _ARRIVE.take((ax + 1) * 3 + ay + 1)
    count = (_LEAVE.take((bx + 1) * 3 + by + 1) - start) & 3
    tip = (count == 0) & (ax == -bx) & (ay == -by)
    count[tip] = 4
    lone = np.flatnonzero(lengths == 1)
    if len(lone):
        at = (np.cumsum(lengths) - 1)[lone]
        count[at], start[at] = 4, 0
    src = np.repeat(np.arange(len(x), dtype=np.int32), count)
    step = np.arange(len(src), dtype=np.int32) - np.repeat((np.cumsum(count) - count).astype(np.int32), count)
    corner = (start.take(src) + step) & 3
    x, y = x.take(src) + _CORNERS[:, 0].take(corner), y.take(src) + _CORNERS[:, 1].take(corner)
    ring_of = np.repeat(np.arange(len(lengths)), lengths)
    lengths = np.bincount(ring_of, weights=count, minlength=len(lengths)).astype(np.int64)
    nxt, prev = _ring_neighbours(lengths)
    xn, yn = x.take(nxt), y.take(nxt)
    d1x, d1y, d2x, d2y = x - x.take(prev), y - y.take(prev), xn - x, yn - y
    # Keep turning points (and reversals, which only degenerate rings have).
    keep = (d1x * d2y != d1y * d2x) | (d1x * d2x + d1y * d2y < 0)
    ring_of = np.repeat(np.arange(len(lengths)), lengths)
    terms = x.astype(np.float64) * yn - xn.astype(np.float64) * y  # shoelace per ring
    areas = np.bincount(ring_of, weights=terms, minlength=len(lengths)) / 2.0
    kept_counts = np.bincount(ring_of[keep], minlength=len(lengths))
    xy = np.empty((len(kept_counts) and int(kept_counts.sum()), 2), np.float64)
    xy[:, 0], xy[:, 1] = x[keep], y[keep]
    return xy, np.concatenate([[0], np.cumsum(kept_counts)]), areas


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance <= 0 or len(ring) <= 4:
        return ring
    approx = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), tolerance, True)
    return approx.reshape(-1, 2).astype(np.float64)


# Simplified polygons with more edges than this are not checked (the pairs of overlapping edges
# can grow quadratically): the polygon keeps its exact outline instead, which is always valid.
MAX_CHECKED_EDGES = 20000


def _edges_cross(p: np.ndarray, q: np.ndarray, r: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Whether segments p-q and r-t intersect, touching included, pair by pair: (N,) bool."""

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.sign((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))

    def on_segment(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:  # c on a-b, given collinear
        return ((np.minimum(a[:, 0], b[:, 0]) <= c[:, 0]) & (c[:, 0] <= np.maximum(a[:, 0], b[:, 0]))
                & (np.minimum(a[:, 1], b[:, 1]) <= c[:, 1]) & (c[:, 1] <= np.maximum(a[:, 1], b[:, 1])))

    o1, o2, o3, o4 = orient(p, q, r), orient(p, q, t), orient(r, t, p), orient(r, t, q)
    proper = (o1 != o2) & (o3 != o4)
    return (proper | ((o1 == 0) & on_segment(p, q, r)) | ((o2 == 0) & on_segment(p, q, t))
            | ((o3 == 0) & on_segment(r, t, p)) | ((o4 == 0) & on_segment(r, t, q)))


def _candidate_pairs(a0: np.ndarray, a1: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of edges of one owner whose bounding boxes overlap, by a sweep along x: the exact
    test then runs on these only, not on every pair. Each owner's edges get an x range of their
    own (shifted by owner * span), so the sweep never pairs edges of two owners."""
    lo = np.minimum(a0[:, 0], a1[:, 0])
    base = lo.min() if len(lo) else 0.0
    span = float(np.maximum(a0[:, 0], a1[:, 0]).max() - base) + 1.0 if len(lo) else 1.0
    xmin = lo - base + owner * span
    xmax = np.maximum(a0[:, 0], a1[:, 0]) - base + owner * span
    order = np.argsort(xmin, kind="stable")
    hi = np.searchsorted(xmin[order], xmax[order], side="right")  # sorted edges starting before i ends
    counts = np.maximum(hi - np.arange(len(order)) - 1, 0)
    first = np.repeat(np.arange(len(order)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    i, j = order[first], order[first + 1 + offsets]
    ymin, ymax = np.minimum(a0[:, 1], a1[:, 1]), np.maximum(a0[:, 1], a1[:, 1])
    overlap = (ymin[i] <= ymax[j]) & (ymin[j] <= ymax[i])
    return i[overlap], j[overlap]


def _inside(point: np.ndarray, ring: np.ndarray) -> bool:
    """Even-odd point-in-ring test for a point on no edge of ``ring``."""
    x, y = point
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    straddles = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(straddles & (x < cross_x)) % 2)


def valid_polygons(polygons: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]]) -> np.ndarray:
    """For each (exterior, holes): are the rings simple, does no ring touch another and does
    every hole lie inside the exterior? What Douglas-Peucker (which simplifies each ring on its
    own) can break and shapely's ``simplify(preserve_topology=True)`` guarantees. One sweep
    over the edges of all polygons at once: a mask's many small components cost little."""
    ok = np.ones(len(polygons), bool)
    rings = [(k, r) for k, (ext, holes) in enumerate(polygons) for r in (ext, *holes)]
    if not rings:
        return ok
    ok &= np.array([all(len(r) >= 3 for r in (ext, *holes)) for ext, holes in polygons])
    ok &= np.bincount([k for k, r in rings], [len(r) for _, r in rings], len(polygons)) <= MAX_CHECKED_EDGES
    a0 = np.concatenate([r for _, r in rings])
    a1 = np.concatenate([np.roll(r, -1, axis=0) for _, r in rings])
    owner = np.concatenate([np.full(len(r), k) for k, r in rings])
    ring_of = np.concatenate([np.full(len(r), n) for n, (_, r) in enumerate(rings)])
    index = np.concatenate([np.arange(len(r)) for _, r in rings])
    size = np.concatenate([np.full(len(r), len(r)) for _, r in rings])
    i, j = _candidate_pairs(a0, a1, owner)
    gap = np.abs(index[i] - index[j])
    adjacent = (ring_of[i] == ring_of[j]) & ((gap <= 1) | (gap == size[i] - 1))  # neighbours share a vertex
    i, j = i[~adjacent], j[~adjacent]
    ok[owner[i[_edges_cross(a0[i], a1[i], a0[j], a1[j])]]] = False
    for k, (ext, holes) in enumerate(polygons):
        if ok[k] and not all(_inside(h[0], ext) for h in holes):
            ok[k] = False
    return ok


def valid_polygon(exterior: np.ndarray, holes: Sequence[np.ndarray]) -> bool:
    """``valid_polygons`` for one polygon."""
    return bool(valid_polygons([(exterior, holes)])[0])


def mask_to_polygons(
    mask: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    simplify_tolerance: float = 0.0,
    min_area: float = 0.0,
) -> list[PolygonXY]:
    """Every connected component of ``mask`` as a polygon with holes, in client coordinates.

    Args:
        mask: HxW, non-zero = foreground (bool or any integer type).
        origin: client coordinates (x, y) of the mask's top-left pixel corner.
        downsample: client units per mask pixel (``client = origin + pixel * downsample``).
        simplify_tolerance: Douglas-Peucker tolerance in *mask pixels*; 0 (default) keeps the
            exact pixel outline (a round trip through ``polygons_to_mask`` gives the mask back).
        min_area: in *mask pixels* (pixel count), default 0 (keep everything). Components
            smaller than this are dropped and holes smaller than this are filled, which
            removes specks a model leaves around a prediction.

    Returns:
        One ``PolygonXY`` per 8-connected foreground component (holes are 4-connected
        background), largest first. An island inside a hole is its own polygon.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InvalidInputError(f"mask must be 2-D, got shape {m.shape}")
    if m.size > MAX_TRACE_PIXELS:
        raise InvalidInputError(
            f"mask of {m.shape[1]}x{m.shape[0]} pixels is too large to trace "
            f"(limit {MAX_TRACE_PIXELS} pixels): trace it at a larger downsample"
        )
    if not (math.isfinite(downsample) and downsample > 0):
        raise InvalidInputError(f"downsample must be a positive number, got {downsample}")
    h, w = m.shape
    if h == 0 or w == 0:
        return []
    # A tolerance beyond the mask's diagonal simplifies no further (every ring collapses to its
    # extreme points), and OpenCV refuses huge ones outright (1e30: "Epsilon not valid").
    simplify_tolerance = min(simplify_tolerance, math.hypot(h, w))
    binary = m.view(np.uint8) if m.dtype == np.bool_ else (m != 0).view(np.uint8)
    # Only the foreground's bounding box is traced: on a large slide region the object is
    # usually small, and the tracing cost follows the traced area.
    x0, y0, bw, bh = cv2.boundingRect(binary)
    if bw == 0 or bh == 0:
        return []
    crop = binary if (bw, bh) == (w, h) else np.ascontiguousarray(binary[y0:y0 + bh, x0:x0 + bw])
    contours, hierarchy = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE, offset=(int(x0), int(y0)))
    if hierarchy is None:
        return []
    parent = hierarchy[0][:, 3]
    xy, starts, signed = _exact_rings(contours)
    areas = np.abs(signed)

    def ring(k: int) -> np.ndarray:
        return xy[starts[k]:starts[k + 1]]

    is_hole = parent >= 0
    # Pixel count of each component: its exterior minus all its holes (small ones included).
    net = areas - np.bincount(parent[is_hole], weights=areas[is_hole], minlength=len(areas))
    outers = np.flatnonzero(~is_hole & (net >= min_area) & (net > 0))
    if len(outers) == 0:
        return []
    kept_holes: dict[int, list[int]] = {}
    for j in np.flatnonzero(is_hole & (areas >= min_area)):
        kept_holes.setdefault(int(parent[j]), []).append(int(j))
    order = outers[np.argsort(-net[outers], kind="stable")]  # largest first
    exact = [(ring(i), [ring(j) for j in kept_holes.get(int(i), ())]) for i in order]
    if simplify_tolerance <= 0:
        return [PolygonXY(ext, holes).transformed(origin, downsample) for ext, holes in exact]
    simple = [(_simplify(ext, simplify_tolerance), [h for h in (_simplify(r, simplify_tolerance) for r in holes)
                                                    if len(h) >= 3]) for ext, holes in exact]
    # Where simplifying broke a polygon (a ring crossing itself or another, a hole outside its
    # exterior, an exterior of fewer than 3 vertices), it keeps its exact outline instead.
    valid = valid_polygons(simple)
    return [PolygonXY(*(simple[k] if valid[k] else exact[k])).transformed(origin, downsample)
            for k in range(len(exact))]


# --------------------------------------------------------------------------- polygons -> mask


# Crossings rasterised at once, and rows per band: _fill works band by band so that its working
# memory stays bounded (tens of bytes per crossing in flight) whatever the polygons; in one
# piece, a zigzag ring whose every edge crosses every row cost gigabytes for a small request.
FILL_CHUNK_CROSSINGS = 1 << 18
FILL_BAND_ROWS = 512


def _edges(rings: Sequence[np.ndarray], owners: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ring edge as (start points, end points, owner polygon), all rings in one array."""
    lengths = np.array([len(r) for r in rings], np.int64)
    p0 = np.concatenate([np.asarray(r, np.float64)[:, :2] for r in rings])
    ring_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = np.arange(len(p0))
    nxt = np.where(idx + 1 < ring_start + np.repeat(lengths, lengths), idx + 1, ring_start)
    return p0, p0[nxt], np.repeat(np.asarray(owners, np.int64), lengths)


def _row_spans(p0: np.ndarray, p1: np.ndarray, row0: int, row1: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row, row count) of the pixel-centre rows in [row0, row1) each edge crosses."""
    y0, y1 = p0[:, 1], p1[:, 1]
    row_start = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), row0, row1)
    row_stop = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), row0, row1)
    return row_start, np.maximum(row_stop - row_start, 0).astype(np.int64)


def _crossings(
    p0: np.ndarray, p1: np.ndarray, owner: np.ndarray, row0: int, row1: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where edges cross pixel-centre rows in [row0, row1): (rows, cols, owner polygon).

    An edge crosses row r when its y-span contains r + 0.5 (half-open, so a vertex exactly on
    a centre line counts once); ``cols`` is the first pixel whose centre lies at or right of
    the crossing, clipped to [0, width]. All edges are handled in one vectorised pass.
    """
    row_start, counts = _row_spans(p0, p1, row0, row1)
    total = int(counts.sum())
    if total == 0:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    edge = np.repeat(np.arange(len(p0)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    rows = row_start[edge].astype(np.int64) + (np.arange(total) - first)
    y0, y1, x0, x1 = p0[edge, 1], p1[edge, 1], p0[edge, 0], p1[edge, 0]
    t = (rows + 0.5 - y0) / (y1 - y0)
    cols = np.clip(np.ceil(x0 + t * (x1 - x0) - 0.5), 0, width).astype(np.int64)
    return rows, cols, owner[edge]


def _rings_of(polygons: Sequence[PolygonXY]) -> tuple[list[np.ndarray], list[int]]:
    rings, owners = [], []
    for i, poly in enumerate(polygons):
        for ring in [poly.exterior, *poly.holes]:
            if len(ring) >= 3:
                rings.append(ring)
                owners.append(i)
    return rings, owners


def _bands(p0: np.ndarray, p1: np.ndarray, height: int) -> list[tuple[int, int]]:
    """Row bands [r0, r1) of at most FILL_BAND_ROWS rows and (but for single rows) at most
    FILL_CHUNK_CROSSINGS crossings."""
    row_start, counts = _row_spans(p0, p1, 0, height)
    per_row = np.zeros(height + 1, np.int64)
    np.add.at(per_row, row_start.astype(np.int64), 1)
    np.add.at(per_row, (row_start + counts).astype(np.int64), -1)
    running = np.cumsum(np.cumsum(per_row[:height]))  # crossings in rows [0, r]
    bands, r0, done = [], 0, 0
    while r0 < height:
        r1 = int(np.searchsorted(running, done + FILL_CHUNK_CROSSINGS, side="right"))
        r1 = min(max(r1, r0 + 1), r0 + FILL_BAND_ROWS, height)
        bands.append((r0, r1))
        done = int(running[r1 - 1])
        r0 = r1
    return bands


def crossing_count(polygons: Sequence[PolygonXY], height: int, width: int) -> int:
    """How many (edge, pixel row) crossings rasterising ``polygons`` (mask pixels) takes.

    The time ``_fill`` needs grows with it; it is counted from the vertices alone, so a
    server can refuse a costly prompt before any of that work.
    """
    rings, owners = _rings_of(polygons)
    if not rings or height <= 0 or width <= 0:
        return 0
    p0, p1, _ = _edges(rings, owners)
    return int(_row_spans(p0, p1, 0, height)[1].sum())


def _fill(polygons: Sequence[PolygonXY], height: int, width: int) -> np.ndarray:
    """Union over polygons of the pixels whose centre is inside (even-odd within a polygon).

    Per row and polygon, sorted crossings pair up into spans [c_2k, c_2k+1) (the even-odd
    rule, so holes are holes whatever their orientation); spans of all polygons are OR-ed, so
    overlapping annotations add up and one polygon's hole never erases another polygon.
    Row band by row band, so memory stays bounded (see FILL_CHUNK_CROSSINGS).
    """
    out = np.zeros((max(height, 0), max(width, 0)), bool)
    rings, owners = _rings_of(polygons)
    if not rings or height <= 0 or width <= 0:
        return out
    p0, p1, owner_of_edge = _edges(rings, owners)
    for r0, r1 in _bands(p0, p1, height):
        rows, cols, owner = _crossings(p0, p1, owner_of_edge, r0, r1, width)
        if not len(rows):
            continue
        order = np.lexsort((cols, owner, rows))
        rows, cols = rows[order], cols[order]
        # Every (row, polygon) group has an even count (closed rings), so global pairs are spans.
        starts, stops, span_rows = cols[0::2], cols[1::2], rows[0::2] - r0
        diff = np.zeros((r1 - r0, width + 1), np.int32)
        np.add.at(diff, (span_rows, starts), 1)
        np.add.at(diff, (span_rows, stops), -1)
        out[r0:r1] = np.cumsum(diff[:, :width], axis=1, dtype=np.int32) > 0
    return out


def fill_polygon(polygon: PolygonXY, height: int, width: int) -> np.ndarray:
    """Pixels of an HxW mask whose centre lies inside ``polygon`` (mask-pixel coordinates)."""
    return _fill([polygon], height, width)


def polygons_to_mask(
    polygons: Iterable[PolygonXY],
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
) -> np.ndarray:
    """Rasterise client-coordinate polygons into an HxW bool mask placed by the frame.

    The inverse of ``mask_to_polygons``: a pixel is inside when its centre is inside a
    polygon (even-odd over the polygon's rings); polygons partly outside are clipped.
    """
    if not (math.isfinite(downsample) and downsample > 0):
        raise InvalidInputError(f"downsample must be a positive number, got {downsample}")
    height, width = int(shape[0]), int(shape[1])
    o = np.asarray(origin, np.float64)
    local = [
        PolygonXY(
            exterior=(np.asarray(p.exterior, np.float64)[:, :2] - o) / downsample,
            holes=[(np.asarray(h, np.float64)[:, :2] - o) / downsample for h in p.holes],
        )
        for p in polygons
        if len(p.exterior) >= 3
    ]
    return _fill(local, height, width)


# --------------------------------------------------------------------------- GeoJSON


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = [[round(float(x), 4), round(float(y), 4)] for x, y in np.asarray(ring)]
    if pts and pts[0] != pts[-1]:
        pts.append(list(pts[0]))
    return pts


def polygon_geometry(polygons: Sequence[PolygonXY]) -> dict[str, Any]:
    """A GeoJSON Polygon (one polygon) or MultiPolygon geometry; rings are closed."""
    rings = [[_closed(p.exterior), *[_closed(h) for h in p.holes]] for p in polygons]
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": rings[0]}
    return {"type": "MultiPolygon", "coordinates": rings}


def annotation_feature(
    polygons: Sequence[PolygonXY],
    *,
    class_name: str = DEFAULT_CLASS_NAME,
    color: tuple[int, int, int] = DEFAULT_CLASS_COLOR,
    name: str | None = None,
    measurements: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One QuPath annotation: a Feature whose geometry holds all ``polygons``."""
    if not polygons:
        raise InvalidInputError("an annotation needs at least one polygon")
    properties: dict[str, Any] = {
        "objectType": "annotation",
        "classification": {"name": class_name, "color": [int(c) for c in color]},
    }
    if name is not None:
        properties["name"] = name
    if measurements:
        properties["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {"type": "Feature", "geometry": polygon_geometry(polygons), "properties": properties}


def feature_collection(features: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def mask_to_geojson(
    mask: np.ndarray,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    class_name: str = DEFAULT_CLASS_NAME,
    color: tuple[int, int, int] = DEFAULT_CLASS_COLOR,
    name: str | None = None,
    predicted_iou: float | None = None,
    simplify_tolerance: float = 0.0,
    min_area: float = 0.0,
    merge: bool = True,
) -> dict[str, Any]:
    """A mask as a FeatureCollection QuPath imports as annotations (File > Import objects).

    ``merge=True`` gives one annotation (MultiPolygon when several components), the way a
    pathologist thinks of one click-segmented region; ``merge=False`` one per component.
    An empty mask gives an empty collection.
    """
    polygons = mask_to_polygons(
        mask, origin=origin, downsample=downsample, simplify_tolerance=simplify_tolerance, min_area=min_area
    )
    measurements = None if predicted_iou is None else {"predicted IoU": float(predicted_iou)}
    groups = [polygons] if merge else [[p] for p in polygons]
    return feature_collection(
        annotation_feature(g, class_name=class_name, color=color, name=name, measurements=measurements)
        for g in groups
        if g
    )


@dataclass(frozen=True)
class ClassifiedPolygon:
    """A polygon read from GeoJSON with its classification name (``Unclassified`` if none)."""

    class_name: str
    polygon: PolygonXY


UNCLASSIFIED = "Unclassified"
# QuPath exports these with annotations when "export all objects" is chosen; they are cell or
# tile outlines, not regions anyone drew, so they never become part of a region mask.
NON_REGION_OBJECT_TYPES = frozenset({"detection", "cell", "tile"})


def _ring_array(coords: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(coords, np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: coordinates are not numbers") from exc
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise InvalidInputError(f"{where}: a ring must be a list of [x, y] pairs")
    arr = arr[:, :2]
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{where}: coordinates must be finite")
    if len(arr) > 1 and (arr[0] == arr[-1]).all():
        arr = arr[:-1]
    return arr


def _polygon_from_rings(rings: Any, where: str) -> PolygonXY | None:
    if not isinstance(rings, list) or not rings:
        raise InvalidInputError(f"{where}: a Polygon needs a list of rings")
    exterior = _ring_array(rings[0], where)
    if len(exterior) < 3:
        return None
    holes = [r for r in (_ring_array(r, where) for r in rings[1:]) if len(r) >= 3]
    return PolygonXY(exterior=exterior, holes=holes)


def geometry_polygons(geometry: Mapping[str, Any] | None, where: str = "geometry") -> list[PolygonXY]:
    """Polygons of a GeoJSON geometry; points and lines (no area) give none."""
    if geometry is None:
        return []
    if not isinstance(geometry, Mapping) or "type" not in geometry:
        raise InvalidInputError(f"{where}: not a GeoJSON geometry")
    kind = geometry["type"]
    if kind == "Polygon":
        poly = _polygon_from_rings(geometry.get("coordinates"), where)
        return [poly] if poly is not None else []
    if kind == "MultiPolygon":
        parts = geometry.get("coordinates")
        if not isinstance(parts, list):
            raise InvalidInputError(f"{where}: MultiPolygon coordinates must be a list")
        return [p for p in (_polygon_from_rings(r, where) for r in parts) if p is not None]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in geometry_polygons(g, where)]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []
    raise InvalidInputError(f"{where}: unknown geometry type {kind!r}")


def _class_name(properties: Mapping[str, Any]) -> str:
    cls = properties.get("classification")
    if isinstance(cls, Mapping):
        name = cls.get("name")
        if name is None and isinstance(cls.get("names"), list):  # QuPath derived classes
            name = ": ".join(str(n) for n in cls["names"])
        if name:
            return str(name)
    elif isinstance(cls, str) and cls:
        return cls
    return UNCLASSIFIED


def _features(obj: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(obj, list):
        for item in obj:
            yield from _features(item)
        return
    if not isinstance(obj, Mapping) or "type" not in obj:
        raise InvalidInputError("not GeoJSON: expected a FeatureCollection, a Feature or a list of Features")
    if obj["type"] == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list):
            raise InvalidInputError("FeatureCollection without a 'features' list")
        yield from _features(features)
    elif obj["type"] == "Feature":
        yield obj
    else:  # a bare geometry
        yield {"type": "Feature", "geometry": obj, "properties": {}}


def geojson_to_polygons(obj: Any) -> list[ClassifiedPolygon]:
    """Region polygons of parsed GeoJSON (FeatureCollection, Feature, list, or geometry)."""
    out: list[ClassifiedPolygon] = []
    for i, feature in enumerate(_features(obj)):
        properties = feature.get("properties") or {}
        if not isinstance(properties, Mapping):
            raise InvalidInputError(f"feature {i}: 'properties' must be an object")
        if str(properties.get("objectType", "annotation")).lower() in NON_REGION_OBJECT_TYPES:
            continue
        name = _class_name(properties)
        for poly in geometry_polygons(feature.get("geometry"), f"feature {i}"):
            out.append(ClassifiedPolygon(name, poly))
    return out


def geojson_to_mask(
    obj: Any,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    classes: Iterable[str] | None = None,
) -> np.ndarray:
    """GeoJSON back to a mask in a frame; ``classes`` (None = all) selects classifications."""
    wanted = None if classes is None else set(classes)
    polys = [c.polygon for c in geojson_to_polygons(obj) if wanted is None or c.class_name in wanted]
    return polygons_to_mask(polys, shape, origin=origin, downsample=downsample)
