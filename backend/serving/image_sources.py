"""Where an OpenImage request's pixels come from: encoded bytes or a slide region.

Each source has two steps, so a cache hit costs neither decoding nor reading: a *signature*
(cheap: a content hash, or slide path + mtime + size + region) that keys the embedding cache,
and the pixels themselves (RGB uint8), produced only on a miss.

Untrusted input is checked before any large allocation: an encoded image's width and height
come from its header (PIL reads them lazily, without decoding) and are compared with the
pixel limit first, which defuses decompression bombs; a slide region's output size is
computed from its numbers before OpenSlide reads anything. Slide paths must resolve (symlinks
followed, ``..`` collapsed) inside one of the configured slide roots.

A slide is opened once, when its path is checked, and read through that descriptor
(``/proc/self/fd/N``), never by name again: someone who can write inside a root could
otherwise swap a folder for a symlink between the check and the read (which waits for an
encode slot), so that a slide outside the roots was read and its embedding cached under the
in-root name. The cache key names the file that was opened (device, inode, mtime, size).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosam.backend.core.errors import (
    HistosamError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceLimitError,
)

# What OpenImage accepts; other PIL formats (and their parsers) are refused outright.
ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF")


def content_signature(data: bytes) -> str:
    return "bytes:" + hashlib.sha256(data).hexdigest()


def _open_header(data: bytes, what: str):
    """PIL image with only its header read; InvalidInputError when it is not PNG/JPEG/TIFF."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInputError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked right after; PIL's global one is not ours to apply.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ResourceLimitError(f"{what} is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInputError(f"{what} cannot be decoded as PNG, JPEG or TIFF: it is none of these formats") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(f"{what} cannot be decoded as PNG, JPEG or TIFF: {exc}") from None


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
    """(width, height) from the header alone."""
    return tuple(_open_header(data, what).size)  # type: ignore[return-value]


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> np.ndarray:
    """PNG/JPEG/TIFF bytes -> RGB uint8 (H, W, 3), refusing > ``max_pixels`` before decoding.

    Grey images are replicated to RGB, alpha is composited on white (transparent = glass),
    16-bit images keep their top 8 bits.
    """
    from PIL import Image

    img = _open_header(data, what)
    width, height = img.size
    if width * height > max_pixels:
        raise ResourceLimitError(
            f"{what} of {width}x{height} = {width * height} pixels exceeds the server's limit of "
            f"{max_pixels} pixels: send a smaller region or a larger downsample"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ResourceLimitError(f"{what} is too large to decode: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(f"{what} is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def _to_rgb(img) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=2))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), np.uint8))


def decode_mask_png(data: bytes, height: int, width: int) -> np.ndarray:
    """A mask prompt PNG (non-zero grey = inside) -> (H, W) bool; it must be image-sized.

    Decoded straight to 8-bit grey as it is read (16-bit images keep their top 8 bits, alpha
    is ignored), so it costs 2 bytes per pixel whatever its depth and channels: decoded as an
    image (RGBA, 16 bit, composited in float) a small, highly compressed prompt cost tens of
    bytes per pixel of memory that no limit counted.
    """
    import cv2

    w, h = image_size(data, "mask_prompt_png")
    if (w, h) != (width, height):
        raise InvalidInputError(f"mask_prompt_png is {w}x{h} but the image is {width}x{height}")
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None or grey.shape != (height, width):
        raise InvalidInputError("mask_prompt_png is truncated or corrupt")
    return grey > 0


# --------------------------------------------------------------------------- slide regions


# Formats OpenSlide recognises by the file's name (or reads sibling files of): read by their
# checked real path, as a descriptor path has no name. The rest are read through the descriptor.
NAMED_SLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
PROC_FD = Path("/proc/self/fd")


@dataclass(frozen=True)
class CheckedRegion:
    """A validated slide region: level-0 rectangle, downsample and output size.

    ``fd`` is the slide opened when its path was checked (close it with ``close``); its pixels
    are read through it.
    """

    path: Path  # resolved, inside a slide root
    x: float
    y: float
    width: float
    height: float
    downsample: float
    mtime_ns: int
    size: int
    fd: int | None = None
    device: int = 0
    inode: int = 0

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:  # pragma: no cover - closed twice
                pass

    @property
    def read_path(self) -> Path:
        """What OpenSlide opens: the checked file itself (its descriptor), not its name."""
        if self.fd is None or self.path.suffix.lower() in NAMED_SLIDE_SUFFIXES or not PROC_FD.is_dir():
            return self.path
        return PROC_FD / str(self.fd)

    @property
    def out_width(self) -> int:
        return max(1, round(self.width / self.downsample))

    @property
    def out_height(self) -> int:
        return max(1, round(self.height / self.downsample))

    @property
    def signature(self) -> str:
        return "slide:" + "|".join(
            str(v) for v in (self.path, self.device, self.inode, self.mtime_ns, self.size, repr(self.x), repr(self.y),
                             repr(self.width), repr(self.height), repr(self.downsample))
        )


def resolve_slide_path(slide_path: str, roots: Sequence[Path]) -> Path:
    """The real path of ``slide_path`` if it lies inside a root; PERMISSION_DENIED otherwise.

    A relative path is looked up under each root in turn, then against the server's working
    folder (a client on the same machine, started from the same folder as the server, names a
    slide the way the server's ``--slide-root`` did: ``slides/a.svs`` with ``--slide-root
    slides``). Symlinks are resolved before the check, so neither ``..`` nor a link inside a
    root can reach a file outside it.
    """
    if not slide_path:
        raise InvalidInputError("slide_region.slide_path is empty")
    if "\x00" in slide_path:
        raise InvalidInputError("slide_region.slide_path contains a NUL byte")
    if not roots:
        raise PermissionDeniedError("this server reads no slides: start it with --slide-root DIR")
    real_roots = [Path(r).resolve() for r in roots]
    given = Path(slide_path)
    candidates = [given] if given.is_absolute() else [root / given for root in real_roots]
    outside = False
    for candidate in [*candidates, *([] if given.is_absolute() else _in_working_folder(given))]:
        by_root = candidate in candidates  # the working-folder guess only counts when it finds the slide
        try:
            real = candidate.resolve()  # follows symlinks, collapses ..
            if not any(real.is_relative_to(root) for root in real_roots):
                outside = outside or by_root
                continue
            if real.is_file():
                return real
        except (OSError, RuntimeError) as exc:  # name too long, symlink loop, ...
            if not by_root:
                continue
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InvalidInputError(f"slide path {_short(slide_path)!r} cannot be resolved: {reason}") from None
    if outside:
        raise PermissionDeniedError(
            f"slide {_short(slide_path)!r} is outside the server's slide roots ({_root_names(real_roots)}): give it "
            "relative to a root ('slide.svs', 'folder/slide.svs') or as an absolute path inside one"
        )
    raise NotFoundError(
        f"slide {_short(slide_path)!r} does not exist under the server's slide roots ({_root_names(real_roots)}): "
        "give it relative to a root ('slide.svs', 'folder/slide.svs') or as an absolute path inside one"
    )


def _in_working_folder(given: Path) -> list[Path]:
    try:
        return [Path.cwd() / given]
    except OSError:  # the server's working folder was deleted
        return []


def _root_names(roots: Sequence[Path]) -> str:
    """The roots by folder name only: a client need not learn the server's folder layout."""
    return ", ".join(f"{r.name or r}/" for r in roots)


def _short(text: str, limit: int = 200) -> str:
    """``text`` cut for an error message (a hostile path may be megabytes long)."""
    return text if len(text) <= limit else text[:limit] + "..."


def make_region(
    slide_path: str,
    x: float,
    y: float,
    width: float,
    height: float,
    downsample: float,
    roots: Sequence[Path],
    max_pixels: int,
) -> CheckedRegion:
    """Validate a region request (numbers, permission, size) without reading pixels."""
    downsample = downsample or 1.0  # proto3 unset = 0 means 1
    values = {"x": x, "y": y, "width": width, "height": height, "downsample": downsample}
    for name, value in values.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"slide_region.{name} is not a finite number")
    for name in ("width", "height", "downsample"):
        if values[name] <= 0:
            raise InvalidInputError(f"slide_region.{name} must be positive, got {values[name]:g}")
    if x < 0 or y < 0:
        raise InvalidInputError(f"slide region origin ({x:g}, {y:g}) is outside the slide")
    path = resolve_slide_path(slide_path, roots)
    # In floats first: width / downsample may overflow to inf, which has no integer size.
    out_w, out_h = max(1.0, width / downsample), max(1.0, height / downsample)
    if not (math.isfinite(out_w) and math.isfinite(out_h)) or out_w * out_h > 2.0 * max_pixels:
        raise ResourceLimitError(
            f"slide region of {out_w:.6g}x{out_h:.6g} pixels exceeds the server's limit of {max_pixels} "
            "pixels: use a larger downsample or a smaller region"
        )
    if min(out_w, out_h) < 1.5:  # rounds to < 2 px; checked before the slide is read (validate_rgb would say only "too small")
        raise InvalidInputError(
            f"slide region {width:g}x{height:g} at downsample {downsample:g} is under 2 pixels a side "
            f"({out_w:.3g}x{out_h:.3g}): use a smaller downsample"
        )
    fd = _open_checked(path, slide_path, roots)
    stat = os.fstat(fd)
    region = CheckedRegion(path, float(x), float(y), float(width), float(height), float(downsample),
                           stat.st_mtime_ns, stat.st_size, fd, stat.st_dev, stat.st_ino)
    pixels = region.out_width * region.out_height
    if pixels > max_pixels:
        region.close()
        raise ResourceLimitError(
            f"slide region of {region.out_width}x{region.out_height} = {pixels} pixels exceeds the "
            f"server's limit of {max_pixels} pixels: use a larger downsample or a smaller region"
        )
    return region


def _open_checked(path: Path, slide_path: str, roots: Sequence[Path]) -> int:
    """A read-only descriptor of ``path``, checked again by what was opened: its real path (from
    /proc) must be ``path`` (the one the root check passed), so a folder swapped for a symlink
    after that check is refused instead of followed."""
    # O_NONBLOCK: a FIFO swapped in after the check must not hang the open (no effect on files).
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise NotFoundError(f"slide {_short(slide_path)!r} cannot be read: {exc.strerror}") from None
    try:
        link = PROC_FD / str(fd)
        opened = Path(os.readlink(link)) if PROC_FD.is_dir() else Path(os.path.realpath(path))
        real_roots = [Path(r).resolve() for r in roots]
        if opened != path or not any(opened.is_relative_to(root) for root in real_roots):
            raise PermissionDeniedError(
                f"slide {_short(slide_path)!r} changed while it was opened (a folder on its path was replaced): "
                "refused, as it may lie outside the server's slide roots"
            )
        if not os.path.isfile(link if PROC_FD.is_dir() else path):
            raise InvalidInputError(f"slide {_short(slide_path)!r} is not a file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_region(region: CheckedRegion) -> np.ndarray:
    """RGB uint8 of the region (OpenSlide via histosam.backend.wsi.slides); refuses regions off the slide.

    A region reaching past the slide's right or bottom edge is cut there: the white fill beyond
    would otherwise be segmented as if it were tissue (a click near the edge returned polygons
    over the glass). The origin is kept, so the client's frame stays exact; the response's
    width and height say what was read.
    """
    from histosam.backend.wsi.slides import open_slide

    try:
        slide = open_slide(region.read_path)
    except HistosamError as exc:  # name the slide, not its descriptor
        raise type(exc)(str(exc).replace(str(region.read_path), str(region.path))) from None
    with slide:
        w0, h0 = slide.dimensions
        if region.x >= w0 or region.y >= h0:
            raise InvalidInputError(
                f"slide region origin ({region.x:g}, {region.y:g}) is outside the {w0}x{h0} slide"
            )
        out_w, out_h = region.out_width, region.out_height
        if region.x + region.width > w0:  # cut: whole output pixels that lie on the slide
            out_w = min(out_w, math.floor((w0 - region.x) / region.downsample))
        if region.y + region.height > h0:
            out_h = min(out_h, math.floor((h0 - region.y) / region.downsample))
        if out_w < 2 or out_h < 2:
            raise InvalidInputError(
                f"slide region origin ({region.x:g}, {region.y:g}) is within {2 * region.downsample:g} px of the "
                f"{w0}x{h0} slide's edge: under 2 pixels of it would be read at downsample {region.downsample:g}"
            )
        return slide.read_scaled(region.x, region.y, out_w, out_h, region.downsample)
