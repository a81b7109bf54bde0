"""Python client for the histosam segmentation server (histosam.v1.Segmentation).

::

    with SegmentationClient("127.0.0.1:50051", token=token) as client:
        image = client.open_image("patch.png")                 # or open_slide_region(...)
        result = image.click([(120, 80, True)])                # all points so far
        result = image.click([(120, 80, True), (60, 40, False)])
        result.polygons                                        # PolygonXY, client coordinates

Every call carries a deadline (``timeout``; opening gets ``open_timeout`` since encoding is the
slow step). An ``ImageSession`` remembers the request it was opened with, so when a click is
answered NOT_FOUND (the session expired, was evicted, or the server restarted) the client
re-opens the image (cheap when the server still caches its embedding) and repeats the click
once, transparently: clicks carry every point, so the repeated click gives the same answer.
Server errors come back as the matching ``HistosamError`` subclass with the gRPC status in
``.code``, so the CLI prints them as one line.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from histosam.backend.core.errors import (
    HistosamError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceLimitError,
)
from histosam.backend.core.geometry import PolygonXY
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

_ERROR_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceLimitError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def _unreachable(target: str, details: str, tls: bool | None) -> str:
    """Why a channel to ``target`` failed, in words: gRPC's own text ends in TLS library codes
    ("... verification context: OK") that do not say what to change."""
    if "WRONG_VERSION_NUMBER" in details:
        return f"TLS handshake with {target} failed: the server does not speak TLS (a plaintext server? drop --tls)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        why = details.rsplit("CERTIFICATE_VERIFY_FAILED:", 1)[-1].split(":")[0].strip()
        return (f"TLS handshake with {target} failed: its certificate is not trusted ({why or 'verify failed'}); "
                "give the server's certificate or its CA with --tls-ca")
    if "Tls handshake failed" in details or "security handshaker" in details:
        return f"TLS handshake with {target} failed (check --tls-ca and the server's --tls-cert)"
    if tls is False and "Socket closed" in details:
        return (f"cannot reach the histosam server at {target}: it closed the connection at once "
                "(a TLS server? add --tls, or --tls-ca F for a self-signed certificate)")
    return f"cannot reach the histosam server at {target}: {details}"


def rpc_error(exc: grpc.RpcError, target: str, tls: bool | None = None) -> HistosamError:
    """A gRPC failure as the matching HistosamError, with ``.code`` set to the status.

    ``tls``: whether the channel uses TLS (None: unknown), for the hint when a connection fails.
    """
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        message = _unreachable(target, details, tls)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the server at {target} did not answer in time (deadline exceeded)"
    else:
        message = f"{code.name}: {details}"
    error = _ERROR_OF.get(code, HistosamError)(message)
    error.code = code  # type: ignore[attr-defined]
    return error


def _frame(frame: pb.Frame | Sequence[float] | None) -> pb.Frame | None:
    if frame is None or isinstance(frame, pb.Frame):
        return frame
    ox, oy, ds = (float(v) for v in frame)
    return pb.Frame(origin_x=ox, origin_y=oy, downsample=ds)


def _points(points: Iterable[Any]) -> list[pb.Point]:
    """(x, y) or (x, y, positive) tuples, or pb.Point, -> messages (positive by default)."""
    out = []
    for p in points:
        if isinstance(p, pb.Point):
            out.append(p)
            continue
        values = tuple(p)
        if len(values) not in (2, 3):
            raise InvalidInputError(f"a point is (x, y) or (x, y, positive), got {values!r}")
        positive = bool(values[2]) if len(values) == 3 else True
        out.append(pb.Point(x=float(values[0]), y=float(values[1]), positive=positive))
    return out


def polygons_from_message(polygons: Iterable[pb.Polygon]) -> list[PolygonXY]:
    return [
        PolygonXY(
            exterior=np.asarray(p.exterior, np.float64).reshape(-1, 2),
            holes=[np.asarray(h.xy, np.float64).reshape(-1, 2) for h in p.holes],
        )
        for p in polygons
    ]


def polygon_messages(polygons: Iterable[PolygonXY]) -> list[pb.Polygon]:
    return [
        pb.Polygon(
            exterior=np.asarray(p.exterior, np.float64).ravel().tolist(),
            holes=[pb.Ring(xy=np.asarray(h, np.float64).ravel().tolist()) for h in p.holes],
        )
        for p in polygons
    ]


def png_to_mask(data: bytes) -> np.ndarray:
    """The server's mask PNG -> (H, W) bool."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 0


def _propagation_value(choice: bool | str) -> int:
    """True / False / "on" / "off" / "auto" -> ClickRequest.propagation."""
    if isinstance(choice, bool):
        choice = "on" if choice else "off"
    values = {"on": pb.PROPAGATION_ON, "off": pb.PROPAGATION_OFF, "auto": pb.PROPAGATION_AUTO}
    if choice not in values:
        raise InvalidInputError(f"propagation must be on, off, auto, True or False, got {choice!r}")
    return values[choice]


def _named(exc: HistosamError, what: str) -> HistosamError:
    """The same error (class and gRPC code), its message led by what it is about."""
    message = str(exc)
    for prefix in ("INVALID_ARGUMENT: ", "RESOURCE_EXHAUSTED: "):
        message = message.removeprefix(prefix)
    named = type(exc)(f"{what}: {message.removeprefix('image ')}")
    named.code = getattr(exc, "code", None)  # type: ignore[attr-defined]
    return named


def _read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise NotFoundError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"the token file {path} is not text") from None
    if not token:
        raise InvalidInputError(f"the token file {path} is empty")
    return token


def _read_roots(path: Path) -> bytes:
    """PEM root certificates from ``path``; checked here, since gRPC only says it "failed to
    create a security handshaker" once it connects."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NotFoundError(f"cannot read the TLS CA file {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidInputError(f"the TLS CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return data


@dataclass(frozen=True)
class ClickResult:
    """One click's answer, with polygons as PolygonXY (client coordinates)."""

    polygons: list[PolygonXY]
    predicted_iou: float
    decode_seconds: float
    num_points: int
    decoded_steps: int
    mask_pixels: int
    mask_png: bytes
    reopened: bool
    response: pb.ClickResponse

    @property
    def propagated(self) -> bool:
        """The server spread the clicks with click propagation (see ClickRequest.propagation)."""
        return bool(self.response.propagated)

    @property
    def mask(self) -> np.ndarray | None:
        """(H, W) bool image-pixel mask, when the click asked for it."""
        return png_to_mask(self.mask_png) if self.mask_png else None


class ImageSession:
    """An opened image: its server session and how to re-open it."""

    def __init__(self, client: SegmentationClient, request: pb.OpenImageRequest, response: pb.OpenImageResponse) -> None:
        self.client = client
        self.request = request
        self.response = response
        self.reopen_count = 0

    @property
    def session_id(self) -> str:
        return self.response.session_id

    @property
    def width(self) -> int:
        return self.response.width

    @property
    def height(self) -> int:
        return self.response.height

    @property
    def frame(self) -> tuple[float, float, float]:
        f = self.response.frame
        return (f.origin_x, f.origin_y, f.downsample)

    @property
    def cache_hit(self) -> bool:
        return self.response.cache_hit

    def click(self, points: Iterable[Any] = (), **kwargs: Any) -> ClickResult:
        return self.client.click(self, points, **kwargs)

    def close(self) -> bool:
        return self.client.close_image(self)

    def __enter__(self) -> ImageSession:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except HistosamError:
            pass  # the server is gone: nothing left to free


class SegmentationClient:
    """A channel to one server; a context manager that closes the channel."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        timeout: float = 30.0,
        open_timeout: float = 300.0,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        if token is None and token_file is not None:
            token = _read_token_file(Path(token_file))
        self.target = target
        self.timeout = float(timeout)
        self.open_timeout = float(open_timeout)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.tls = bool(tls or root_certificates is not None)
        if self.tls:
            roots = root_certificates
            if isinstance(roots, str | Path):
                roots = _read_roots(Path(roots))
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.SegmentationStub(self.channel)

    # -- lifecycle
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects (e.g. right after starting a server)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.timeout if timeout is None else timeout)
        except grpc.FutureTimeoutError:
            raise HistosamError(f"cannot reach the histosam server at {self.target}") from None

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc, self.target, self.tls) from None

    # -- RPCs
    def info(self) -> pb.GetServerInfoResponse:
        return self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest())

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name (``SERVING``...) of ``service`` ("" = the server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def open_image(
        self,
        image: bytes | str | Path | np.ndarray,
        *,
        model: str = "",
        frame: pb.Frame | Sequence[float] | None = None,
    ) -> ImageSession:
        """Open encoded bytes, an image file (PNG/JPEG/TIFF) or an RGB array (sent as PNG)."""
        if isinstance(image, np.ndarray):
            import cv2

            arr = image if image.ndim == 2 else image[..., :3][..., ::-1]  # RGB -> BGR for cv2
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
            if not ok:
                raise InvalidInputError("cannot encode the array as PNG")
            data = buf.tobytes()
        elif isinstance(image, str | Path):
            try:
                data = Path(image).read_bytes()
            except OSError as exc:
                raise NotFoundError(f"cannot read image {image}: {exc.strerror}") from None
            request = pb.OpenImageRequest(model=model, encoded_image=data, frame=_frame(frame))
            try:
                return self._open(request)
            except (InvalidInputError, ResourceLimitError) as exc:  # the server's words, about this file
                raise _named(exc, f"image {image}") from None
        else:
            data = bytes(image)
        request = pb.OpenImageRequest(model=model, encoded_image=data, frame=_frame(frame))
        return self._open(request)

    def open_slide_region(
        self,
        slide_path: str | Path,
        x: float,
        y: float,
        width: float,
        height: float,
        downsample: float = 1.0,
        *,
        model: str = "",
        frame: pb.Frame | Sequence[float] | None = None,
    ) -> ImageSession:
        """Open a level-0 rectangle of a slide the server reads (path as the server sees it)."""
        region = pb.SlideRegion(slide_path=str(slide_path), x=x, y=y, width=width, height=height,
                                downsample=downsample)
        return self._open(pb.OpenImageRequest(model=model, slide_region=region, frame=_frame(frame)))

    def _open(self, request: pb.OpenImageRequest) -> ImageSession:
        return ImageSession(self, request, self._call(self.stub.OpenImage, request, self.open_timeout))

    def reopen(self, session: ImageSession) -> ImageSession:
        """Open ``session``'s image again and point the handle at the new server session."""
        session.response = self._call(self.stub.OpenImage, session.request, self.open_timeout)
        session.reopen_count += 1
        return session

    def click(
        self,
        session: ImageSession,
        points: Iterable[Any] = (),
        *,
        box: Sequence[float] | None = None,
        want_mask: bool = False,
        simplify_tolerance: float = 0.0,
        min_area: float | None = None,
        mask_prompt_png: bytes | None = None,
        mask_prompt_polygons: Iterable[PolygonXY] | None = None,
        propagation: bool | str | None = None,
    ) -> ClickResult:
        """All points so far (and/or a box) -> the mask; re-opens once on NOT_FOUND.

        ``propagation``: "on" / "off" / "auto" (or True / False) for this answer; None leaves it
        to the server's default.
        """
        request = pb.ClickRequest(
            points=_points(points),
            want_mask_png=want_mask,
            simplify_tolerance=simplify_tolerance,
            mask_prompt_png=mask_prompt_png or b"",
            mask_prompt_polygons=polygon_messages(mask_prompt_polygons or ()),
        )
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            request.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
        if min_area is not None:
            request.min_area = float(min_area)
        if propagation is not None:
            request.propagation = _propagation_value(propagation)
        reopened = False
        request.session_id = session.session_id
        try:
            response = self.stub.Click(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or session.request.WhichOneof("source") is None:
                raise rpc_error(exc, self.target, self.tls) from None  # nothing known to re-open
            self.reopen(session)
            reopened = True
            request.session_id = session.session_id
            response = self._call(self.stub.Click, request)
        return ClickResult(
            polygons=polygons_from_message(response.polygons),
            predicted_iou=float(response.predicted_iou),
            decode_seconds=float(response.decode_seconds),
            num_points=int(response.num_points),
            decoded_steps=int(response.decoded_steps),
            mask_pixels=int(response.mask_pixels),
            mask_png=bytes(response.mask_png),
            reopened=reopened,
            response=response,
        )

    def close_image(self, session: ImageSession) -> bool:
        return self._call(self.stub.CloseImage, pb.CloseImageRequest(session_id=session.session_id)).closed
