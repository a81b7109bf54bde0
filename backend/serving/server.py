"""The gRPC segmentation server (histosam.v1.Segmentation) over onnxruntime.

Constructible in-process with explicit ``ServerSettings`` and startable/stoppable from tests
(port 0 binds a free port)::

    with SegmentationServer(ServerSettings(port=0, bundles=(bundle_dir,))) as server:
        channel = grpc.insecure_channel(server.address)

What the service does per RPC is in ``segmentation.proto``; the state (embedding cache,
sessions, prompt history) is in ``histosam.backend.serving.sessions``. Every user-facing error is a
``HistosamError`` mapped to one status code with one message; anything else is logged with
its traceback and answered INTERNAL, and the server keeps serving. Next to the service run the
standard ``grpc.health.v1`` health service (exempt from the token) and server reflection (v1
and v1alpha), so grpcurl-style tools work. Never imports torch (the default bundle comes from the cache; see
``histosam.backend.serving.model_store``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import cv2
import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ConfigDict, Strict

from histosam.backend import __version__
from histosam.backend.bundles.onnx_predictor import lower_thread_priority
from histosam.backend.core.errors import (
    CancelledError,
    HistosamError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceLimitError,
)
from histosam.backend.core.geometry import (
    PolygonXY,
    crossing_count,
    mask_to_polygons,
    polygons_to_mask,
)
from histosam.backend.core.settings import (
    STRICT_CONFIG,
    Flag,
    Number,
    OptPath,
    OptText,
    OptWhole,
    Paths,
    Text,
    Whole,
    parse_settings,
    required,
)
from histosam.backend.core.transforms import mask_to_prompt_logits
from histosam.backend.postprocess.edge_snap import EdgeSnapSettings, snap_mask, working_lab
from histosam.backend.postprocess.propagation import (
    SERVED_DEFAULT,
    ImageGraph,
    PropagationSettings,
    auto_propagates,
    check_mode,
    click_ignored,
    model_confidence,
)
from histosam.backend.serving.image_sources import (
    content_signature,
    decode_image,
    decode_mask_png,
    make_region,
    read_region,
)
from histosam.backend.serving.model_store import (
    ENCODER_NICENESS,
    LoadedModel,
    ModelStore,
    default_bundle_path,
    discover_bundles,
)
from histosam.backend.serving.reflection import enable_reflection
from histosam.backend.serving.sessions import (
    TURN_POLL_SECONDS,
    ByteLedger,
    Embedding,
    EmbeddingCache,
    Frame,
    Prompt,
    Session,
    SessionStore,
    StepResult,
    never_cancelled,
)
from histosam.backend.serving.wire import EncodedReply, encode_polygons, serialize_reply
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

log = logging.getLogger("histosam.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Segmentation"].full_name
# Components (and holes) smaller than this many image pixels are dropped (filled) unless the
# ClickRequest sets min_area: SAM leaves specks of a few pixels around its masks.
DEFAULT_MIN_AREA = 16.0
EDGE_SNAP_CHOICES = ("model", "on", "off")  # ServerSettings.edge_snap

# ServerSettings.propagation -> the ClickRequest / GetServerInfoResponse enum value.
PROPAGATION_CHOICES = {"off": pb.PROPAGATION_OFF, "on": pb.PROPAGATION_ON, "auto": pb.PROPAGATION_AUTO}
# Mask-prompt polygon vertices may lie outside the image (an annotation larger than the opened
# region), but not so far that rasterising them overflows (1e308 / downsample = inf).
MAX_PROMPT_PIXEL_COORD = 1e9
# Mask-prompt polygons: vertices in one click (4 MB of coordinates), and (edge, pixel row)
# crossings per image pixel. Rasterising costs time per crossing, and a zigzag ring whose every
# edge spans the image makes vertices x rows of them, while an annotation's outline crosses a
# row a few times (0.25 per pixel allows 194 crossings per row of 775 pixels).
MAX_PROMPT_VERTICES = 250_000
MAX_PROMPT_CROSSINGS_PER_PIXEL = 0.25
TOKEN_METADATA_KEYS = ("authorization", "x-histosam-token")
HEALTH_PREFIX = "/grpc.health.v1.Health/"

STATUS_OF: tuple[tuple[type[HistosamError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (CancelledError, grpc.StatusCode.CANCELLED),
)


def status_for(exc: HistosamError) -> grpc.StatusCode:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs; the CLI, a config file and tests all build one of these.

    ``bundles`` (explicit bundle folders) and ``models_dir`` (a bundle, or a folder of
    bundles) add up; with neither, the cached default bundle is served. A config file's or the
    CLI's values are checked by the one settings loader (histosam.backend.core.settings).
    """

    __pydantic_config__: ClassVar[ConfigDict] = STRICT_CONFIG

    host: Text = "127.0.0.1"
    port: Whole = 50051
    models_dir: OptPath = None
    bundles: Paths = ()
    default_model: OptText = None
    slide_roots: Paths = ()
    token: OptText = None
    token_file: OptPath = None
    tls_cert: OptPath = None
    tls_key: OptPath = None
    threads: Whole = 8
    # RPCs admitted at once (running + queued for a thread); beyond it grpc answers
    # RESOURCE_EXHAUSTED at once instead of queueing without bound.
    max_concurrent_rpcs: Whole = 32
    # Image encodes running at once. Each holds the encoder's working memory (LiteMedSAM on
    # CPU: ~300 MB), which the embedding cache budget does not cover: 8 clients opening at once
    # took the server from 0.2 to 3 GB. Others wait their turn (their clicks do not).
    max_concurrent_encodes: Whole = 2
    # Clicks computed at once (decoder + edge snapping or propagation), across sessions; more
    # wait their turn. 0: one per CPU core. A click is one thread of work (the served decoder
    # runs on one onnxruntime thread), so more at once only time-slices the same cores.
    max_concurrent_clicks: Whole = 0
    # onnxruntime intra-op threads per session; None: the decoder gets 1 (see max_concurrent_clicks)
    # and the encoder onnxruntime's choice (all cores, at lower priority than clicks).
    ort_threads: OptWhole = None
    prefer_gpu: Flag = True
    # Embeddings and the sessions' prompt histories together (GetServerInfo: cache_used_bytes +
    # session_bytes); over it, other sessions' histories are trimmed, then embeddings evicted.
    cache_bytes: Whole = 1 << 30
    session_idle_seconds: Number = 1800.0
    max_sessions: Whole = 128
    max_pixels: Whole = 4096 * 4096
    max_message_bytes: Whole = 64 << 20
    max_points: Whole = 100
    grace_seconds: Number = 5.0
    # Click propagation (backend/postprocess/propagation.py): the model's mask as the prior of a
    # click-seeded random walker, so a click spreads over its colour region. This is what a
    # Click gets when it does not choose (ClickRequest.propagation); every click may choose.
    # "off", "on" or "auto" (propagate once the model is unsure of the image or ignores a
    # correction click); true / false mean on / off. The default (catalog.SERVED_PROPAGATION)
    # was chosen on tumour regions first, glands beside; see the model card. Settings from
    # ``propagation_config`` (a YAML file), else the shipped propagation.yaml.
    propagation: PropagationMode = SERVED_DEFAULT
    propagation_config: OptPath = None
    # Edge snapping (backend/postprocess/edge_snap.py): the model's mask edge moved onto the image's colour
    # edge within a thin band. "model" (default): for the models whose bundle asks for it (the
    # shipped default; its effect and cost are in the model card and `histosam bench serve`);
    # "on": every model; "off": none (fastest, and the model's raw masks). Applies to the model's masks, not to propagated ones (the walker
    # already follows colour edges). Settings from ``edge_snap_config``, else edge_snap.yaml.
    edge_snap: EdgeSnapMode = "model"
    edge_snap_config: OptPath = None

    def __post_init__(self) -> None:
        for name in ("threads", "max_concurrent_rpcs", "max_concurrent_encodes", "cache_bytes", "max_sessions", "max_pixels", "max_message_bytes", "max_points"):
            if int(getattr(self, name)) <= 0:
                raise InvalidInputError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if int(self.max_concurrent_clicks) < 0:
            raise InvalidInputError(f"max-concurrent-clicks must be 0 (one per core) or positive, got {self.max_concurrent_clicks}")
        if not (0 <= self.port <= 65535):
            raise InvalidInputError(f"port must be 0-65535, got {self.port}")
        if not (self.session_idle_seconds > 0 and math.isfinite(self.session_idle_seconds)):
            raise InvalidInputError("session-idle-seconds must be a positive number")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("--tls-cert and --tls-key go together")
        if self.token is not None and self.token_file is not None:
            raise InvalidInputError("give a token or a token file, not both")
        object.__setattr__(self, "propagation", _propagation_mode(self.propagation))
        object.__setattr__(self, "edge_snap", _edge_snap_mode(self.edge_snap))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerSettings:
        """Build from a dict (a config file, CLI flags): keys with dashes or underscores."""
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            key = {"slide_root": "slide_roots", "models": "models_dir"}.get(key, key)
            if value is not None:  # no value: the default
                kwargs[key] = value
        return parse_settings(cls, kwargs, "server setting")

    def resolve_token(self) -> str | None:
        if self.token is not None:
            token = self.token
        elif self.token_file is not None:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise NotFoundError(f"cannot read token file {self.token_file}: {exc.strerror}") from None
        else:
            return None
        if not token:
            raise InvalidInputError("the token is empty")
        return token

    def bundle_paths(self) -> list[Path]:
        paths = [Path(p) for p in self.bundles]
        if self.models_dir is not None:
            paths += discover_bundles(Path(self.models_dir))
        return paths or [default_bundle_path()]


def _propagation_mode(value: Any) -> str:
    if isinstance(value, bool):  # YAML's on/off read as booleans
        return "on" if value else "off"
    return check_mode(str(value))


def _edge_snap_mode(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in EDGE_SNAP_CHOICES:
        raise InvalidInputError(f"edge_snap must be one of {', '.join(EDGE_SNAP_CHOICES)}, got {value!r}")
    return value


PropagationMode = Annotated[str, Strict(), required(_propagation_mode)]
EdgeSnapMode = Annotated[str, Strict(), required(_edge_snap_mode)]


def click_concurrency(settings: ServerSettings) -> int:
    """Clicks computed at once: ``max_concurrent_clicks``, or the CPU cores this process may use."""
    if settings.max_concurrent_clicks > 0:
        return int(settings.max_concurrent_clicks)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- service


def _ring_array(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, np.float64)
    if arr.size % 2 or arr.size < 6:
        raise InvalidInputError(f"{what} needs an even number (>= 6) of coordinates, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{what} has a non-finite coordinate")
    return arr.reshape(-1, 2)


def _cancel_check(context: grpc.ServicerContext) -> Callable[[], bool]:
    """``cancelled()`` for long work: true once the call ended (client gone, deadline passed, or
    the server's shutdown grace ran out), so the work stops instead of outliving the call."""
    return lambda: not context.is_active()


@contextmanager
def _slot(slots: threading.BoundedSemaphore, cancelled: Callable[[], bool], what: str) -> Iterator[None]:
    """Hold one of ``slots``; while waiting for it, give up once the call is cancelled."""
    while not slots.acquire(timeout=TURN_POLL_SECONDS):
        if cancelled():
            raise CancelledError(f"{what} was cancelled while it waited for its turn")
    try:
        yield
    finally:
        slots.release()


@dataclass(frozen=True)
class MalformedRequest:
    """What a request that is no valid protobuf message deserialises to (-> INVALID_ARGUMENT).

    grpc's own deserialiser failure would end the call with INTERNAL, a code that tells the
    client the server is broken; the bytes are the client's mistake.
    """

    message_type: str
    error: str


def _lenient_parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the client's bytes
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc)[:200])

    return parse


def add_servicer(servicer: SegmentationServicer, server: grpc.Server) -> None:
    """Like the generated ``add_SegmentationServicer_to_server``, with lenient request parsing."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Segmentation"].methods:
        request_class = getattr(pb, method.input_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(request_class),
            response_serializer=serialize_reply,  # Click replies carry pre-encoded polygons
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class SegmentationServicer(pb_grpc.SegmentationServicer):
    """The four RPCs; state lives in the model store, the embedding cache and the session store."""

    def __init__(self, settings: ServerSettings, models: ModelStore | None, token_required: bool) -> None:
        self.settings = settings
        self.models = models
        # One budget (cache_bytes) for the embeddings and the sessions' prompt histories.
        ledger = ByteLedger()
        self.cache = EmbeddingCache(settings.cache_bytes, ledger)
        self.sessions = SessionStore(settings.session_idle_seconds, settings.max_sessions, ledger=ledger)
        self._encode_slots = threading.BoundedSemaphore(settings.max_concurrent_encodes)
        # Mask prompts decoded or rasterised at once (a full-size mask each, up to max_pixels):
        # as many as encodes, so clicks of many sessions cannot add them up without bound.
        self._prompt_slots = threading.BoundedSemaphore(settings.max_concurrent_encodes)
        # Encodes run on their own threads, at lower priority than the RPC threads that compute
        # clicks (the encoder's intra-op threads are lowered too: models.ENCODER_NICENESS), so an
        # encode takes the CPU that clicks leave instead of stalling them for its whole duration.
        self._encoders = futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrent_encodes, thread_name_prefix="histosam-encode",
            initializer=lower_thread_priority, initargs=(ENCODER_NICENESS,))
        self._click_slots = threading.BoundedSemaphore(click_concurrency(settings))
        self.token_required = token_required
        # Loaded (and checked) even when off by default: any click may ask for propagation.
        self.propagation = PropagationSettings.load(settings.propagation_config)
        # Loaded (and checked) even when off: a bad file is a startup error, not a surprise later.
        self.edge_snap = EdgeSnapSettings.load(settings.edge_snap_config)

    # -- plumbing
    def _call(self, context: grpc.ServicerContext, name: str, fn: Callable[[], Any], request: Any = None) -> Any:
        """Run ``fn``; map HistosamError to its status, anything else to INTERNAL (logged).

        Every request is logged at INFO with its status and latency (``--log-level WARNING``
        silences them), so a server's log shows its traffic, not only its failures.
        """
        started = time.perf_counter()
        outcome = "OK"
        try:
            if isinstance(request, MalformedRequest):
                outcome = "INVALID_ARGUMENT: not a valid message"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{name}: the request is not a valid {request.message_type} message ({request.error})")
            if self.models is None:  # bound, still loading: the health status says NOT_SERVING
                outcome = "UNAVAILABLE: still loading"
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its models: retry shortly")
            try:
                return fn()
            except HistosamError as exc:
                code, message = status_for(exc), str(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
                log.exception("%s failed", name)
                code, message = grpc.StatusCode.INTERNAL, f"internal server error in {name}: {type(exc).__name__}: {exc}"
            outcome = f"{code.name}: {message[:300]}"
            context.abort(code, message)  # raises: grpc ends the call with this status
        finally:
            if log.isEnabledFor(logging.INFO):
                log.info("%s %s %.1f ms from %s", name, outcome, (time.perf_counter() - started) * 1e3, context.peer())

    # -- RPCs
    def GetServerInfo(self, request, context):
        return self._call(context, "GetServerInfo", self._info, request)

    def OpenImage(self, request, context):
        return self._call(context, "OpenImage", lambda: self._open(request, _cancel_check(context)), request)

    def Click(self, request, context):
        return self._call(context, "Click", lambda: self._click(request, _cancel_check(context)), request)

    def CloseImage(self, request, context):
        return self._call(context, "CloseImage",
                          lambda: pb.CloseImageResponse(closed=self.sessions.close(request.session_id)), request)

    # -- implementations
    def _info(self) -> pb.GetServerInfoResponse:
        s = self.settings
        return pb.GetServerInfoResponse(
            version=__version__,
            models=[
                pb.ModelInfo(name=m.name, sha256=m.sha256, input_size=m.transform.input_size,
                             is_default=m.name == self.models.default_name, edge_snap=self.snaps_edges(m))
                for m in self.models.models()
            ],
            default_model=self.models.default_name,
            providers=self.models.providers,
            limits=pb.Limits(max_pixels=s.max_pixels, max_message_bytes=s.max_message_bytes,
                             max_points=s.max_points, session_idle_seconds=s.session_idle_seconds,
                             cache_bytes=s.cache_bytes, max_sessions=s.max_sessions,
                             max_concurrent_rpcs=s.max_concurrent_rpcs,
                             max_concurrent_encodes=s.max_concurrent_encodes),
            token_required=self.token_required,
            slides_enabled=bool(s.slide_roots),
            open_sessions=len(self.sessions),
            cache_used_bytes=self.cache.used_bytes,
            session_bytes=self.sessions.ledger.used_bytes,
            cache_entries=len(self.cache),
            propagation_default=PROPAGATION_CHOICES[s.propagation],
        )

    def _open(self, request: pb.OpenImageRequest, cancelled: Callable[[], bool] = never_cancelled) -> pb.OpenImageResponse:
        model = self.models.get(request.model)
        source = request.WhichOneof("source")
        s = self.settings
        if source == "encoded_image":
            data = request.encoded_image
            if not data:
                raise InvalidInputError("encoded_image is empty")
            signature = content_signature(data)
            default_frame = Frame()

            def pixels() -> np.ndarray:
                return decode_image(data, s.max_pixels)
        elif source == "slide_region":
            r = request.slide_region
            region = make_region(r.slide_path, r.x, r.y, r.width, r.height, r.downsample,
                                 s.slide_roots, s.max_pixels)
            signature = region.signature
            default_frame = Frame(region.x, region.y, region.downsample)

            def pixels() -> np.ndarray:
                return read_region(region)
        else:
            raise InvalidInputError("OpenImage needs a source: encoded_image or slide_region")
        try:
            return self._open_source(request, model, signature, default_frame, pixels, cancelled)
        finally:
            if source == "slide_region":
                region.close()  # opened when its path was checked; read (or a cache hit) by now

    def _open_source(self, request: pb.OpenImageRequest, model: LoadedModel, signature: str, default_frame: Frame,
                     pixels: Callable[[], np.ndarray], cancelled: Callable[[], bool]) -> pb.OpenImageResponse:
        frame = default_frame
        if request.HasField("frame"):
            f = request.frame
            frame = Frame(f.origin_x, f.origin_y, f.downsample or 1.0)
        key = hashlib.sha256(f"{signature}|{model.sha256}".encode()).hexdigest()
        embedding, hit = self.cache.get_or_compute(key, lambda: self._encode_in_turn(model, pixels, cancelled))
        frame.check_extent(embedding.width, embedding.height)
        session = self.sessions.create(model, embedding, frame, key)
        log.debug("open %s: %dx%d %s, cache %s", session.session_id, embedding.width, embedding.height,
                  model.name, "hit" if hit else "miss")
        return pb.OpenImageResponse(
            session_id=session.session_id, width=embedding.width, height=embedding.height,
            model=model.name, cache_hit=hit, encode_seconds=0.0 if hit else embedding.encode_seconds,
            frame=pb.Frame(origin_x=frame.origin_x, origin_y=frame.origin_y, downsample=frame.downsample),
            model_sha256=model.sha256,
            decode_image_seconds=0.0 if hit else embedding.decode_image_seconds,
        )

    def _encode_in_turn(self, model: LoadedModel, pixels: Callable[[], np.ndarray],
                        cancelled: Callable[[], bool] = never_cancelled) -> Embedding:
        with _slot(self._encode_slots, cancelled, "the image open"):  # bounds the decode + encoder working memory
            return self._encoders.submit(self._encode, model, pixels).result()

    def close(self) -> None:
        """Stop the encoder threads (the server is stopping)."""
        self._encoders.shutdown(wait=False, cancel_futures=True)

    def _encode(self, model: LoadedModel, pixels: Callable[[], np.ndarray]) -> Embedding:
        t0 = time.perf_counter()
        rgb = pixels()
        t1 = time.perf_counter()
        features = model.encoder(rgb)
        # The walker's graph is per image like the embedding, and cached with it: built now when
        # clicks propagate by default, else from the small copy when a click first asks.
        small = ImageGraph.working_image(rgb, self.propagation)
        graph = (ImageGraph.from_working_image(small, rgb.shape[:2], self.propagation)
                 if self.settings.propagation != "off" else None)
        snap_lab = working_lab(rgb, self.edge_snap) if self.snaps_edges(model) else None
        t2 = time.perf_counter()
        return Embedding(features, int(rgb.shape[0]), int(rgb.shape[1]), t2 - t1, t1 - t0, graph, small, snap_lab)

    def snaps_edges(self, model: LoadedModel) -> bool:
        """Are this model's masks edge-snapped here? (ServerSettings.edge_snap)"""
        return self.settings.edge_snap == "on" or (self.settings.edge_snap == "model" and model.bundle.edge_snap)

    def _propagation_mode(self, request: pb.ClickRequest) -> str:
        """off / on / auto for this click: its own choice, else the server's default."""
        choice = request.propagation
        if choice == pb.PROPAGATION_SERVER_DEFAULT:
            return self.settings.propagation
        for mode, value in PROPAGATION_CHOICES.items():
            if choice == value:
                return mode
        raise InvalidInputError(
            f"propagation {choice} is not one of PROPAGATION_SERVER_DEFAULT (0), PROPAGATION_ON (1), "
            "PROPAGATION_OFF (2), PROPAGATION_AUTO (3)"
        )

    def _auto_propagates(self, prompt: Prompt, session: Session, decode, judge, result: StepResult,
                         cancelled: Callable[[], bool] = never_cancelled) -> bool:
        """auto: was the model unsure of its answer to the prompt's first step (first point, or
        the box), or has it ignored correction clicks since (``propagation.auto_propagates``)?

        Both read the history (the first step's logits, the chain's count of ignored clicks),
        so it costs nothing beside the decoder and always answers the same clicks the same way.
        """
        first = 0 if prompt.box is not None else 1
        head = Prompt(prompt.points[:first], prompt.labels[:first], prompt.box, prompt.mask_key, prompt.mask_logits)
        with session.lock:
            step, _, _ = session.resolve(head, decode, judge, cancelled)
        confidence = model_confidence(step.low_res, session.model.transform, session.embedding.hw,
                                      self.propagation.temperature)
        return auto_propagates(confidence, result.ignored, self.propagation)

    @staticmethod
    def _graph(embedding: Embedding, settings: PropagationSettings) -> ImageGraph:
        if embedding.graph is not None:
            return embedding.graph
        if embedding.working_image is None:  # pragma: no cover - every _encode keeps one
            raise InvalidInputError("this image was opened without the copy click propagation needs")
        # ~20 ms at 160 px: rebuilt per click rather than held per session (1.8 MB each, and the
        # factor's ~10 MB); its one solve orders, analyses and factors at once.
        return ImageGraph.from_working_image(embedding.working_image, embedding.hw, settings, analyse=False)

    def _prompt(self, request: pb.ClickRequest, session: Session,
                cancelled: Callable[[], bool] = never_cancelled) -> Prompt:
        w, h, frame = session.width, session.height, session.frame
        n = len(request.points)
        if n > self.settings.max_points:
            raise ResourceLimitError(f"{n} points in one click exceed the server's limit of {self.settings.max_points}")
        client = np.array([(p.x, p.y) for p in request.points], np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(client)):
            raise InvalidInputError("a point has a non-finite coordinate")
        pts = frame.to_pixels(client)
        outside = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
        if outside.any():
            i = int(np.argmax(outside))
            raise InvalidInputError(
                f"point {i} ({client[i, 0]:g}, {client[i, 1]:g}) is outside the image "
                f"({frame.describe_extent(w, h)})"
            )
        labels = np.array([1 if p.positive else 0 for p in request.points], np.int64)
        box = None
        if request.HasField("box"):
            b = request.box
            corners = np.array([[b.x0, b.y0], [b.x1, b.y1]], np.float64)
            if not np.all(np.isfinite(corners)):
                raise InvalidInputError("box has a non-finite coordinate")
            px = frame.to_pixels(corners)
            x0, x1 = sorted(np.clip(px[:, 0], 0, w))
            y0, y1 = sorted(np.clip(px[:, 1], 0, h))
            if x1 <= x0 or y1 <= y0:
                raise InvalidInputError(
                    f"box ({b.x0:g}, {b.y0:g}, {b.x1:g}, {b.y1:g}) does not overlap the image "
                    f"({frame.describe_extent(w, h)})"
                )
            box = np.array([x0, y0, x1, y1], np.float64)
        if n == 0 and box is None:
            raise InvalidInputError("a click needs at least one point or a box")
        mask_key, mask_logits = self._mask_prompt(request, session, cancelled)
        return Prompt(pts, labels, box, mask_key, mask_logits)

    def _mask_prompt(self, request: pb.ClickRequest, session: Session,
                     cancelled: Callable[[], bool]) -> tuple[bytes, Callable[[], np.ndarray] | None]:
        png, polys = request.mask_prompt_png, request.mask_prompt_polygons
        if png and polys:
            raise InvalidInputError("give mask_prompt_png or mask_prompt_polygons, not both")
        transform = session.model.transform
        h, w, frame = session.height, session.width, session.frame
        if png:
            key = b"png:" + hashlib.sha256(png).digest()
            with _slot(self._prompt_slots, cancelled, "the mask prompt"):
                mask = decode_mask_png(png, h, w)  # validated now, so a bad prompt fails every time
            return key, lambda: mask_to_prompt_logits(mask, transform)
        if polys:
            polygons = self._prompt_polygons(polys, session)
            digest = hashlib.sha256()
            for poly in polygons:
                for ring in (poly.exterior, *poly.holes):
                    digest.update(ring.tobytes() + b"|")
                digest.update(b"#")

            def logits() -> np.ndarray:
                with _slot(self._prompt_slots, cancelled, "the mask prompt"):
                    mask = polygons_to_mask(polygons, (h, w), origin=frame.origin, downsample=frame.downsample)
                    return mask_to_prompt_logits(mask, transform)

            return b"poly:" + digest.digest(), logits
        return b"", None

    @staticmethod
    def _prompt_polygons(polys: Sequence[pb.Polygon], session: Session) -> list[PolygonXY]:
        """The mask-prompt polygons, refused (before any rasterising) beyond the vertex and
        crossing limits or when they reach absurdly far outside the image."""
        h, w, frame = session.height, session.width, session.frame
        vertices = sum(len(p.exterior) + sum(len(r.xy) for r in p.holes) for p in polys) // 2
        if vertices > MAX_PROMPT_VERTICES:
            raise ResourceLimitError(
                f"mask_prompt_polygons have {vertices} vertices, over the server's limit of {MAX_PROMPT_VERTICES}: "
                "simplify the annotation"
            )
        polygons, local = [], []
        for i, poly in enumerate(polys):
            ext = _ring_array(poly.exterior, f"mask_prompt_polygons[{i}].exterior")
            holes = [_ring_array(r.xy, f"mask_prompt_polygons[{i}].holes[{j}]") for j, r in enumerate(poly.holes)]
            pixel_rings = [frame.to_pixels(ring) for ring in (ext, *holes)]
            for px in pixel_rings:
                if not (np.all(np.isfinite(px)) and np.abs(px).max() <= MAX_PROMPT_PIXEL_COORD):
                    raise InvalidInputError(
                        f"mask_prompt_polygons[{i}] reaches absurdly far outside the image (beyond "
                        f"{MAX_PROMPT_PIXEL_COORD:g} image pixels)"
                    )
            polygons.append(PolygonXY(ext, holes))
            local.append(PolygonXY(pixel_rings[0], pixel_rings[1:]))
        limit = max(1024, int(MAX_PROMPT_CROSSINGS_PER_PIXEL * h * w))
        crossings = crossing_count(local, h, w)
        if crossings > limit:
            raise ResourceLimitError(
                f"mask_prompt_polygons cross the image's pixel rows {crossings} times, over the server's limit of "
                f"{limit} for a {w}x{h} image (is it a zigzag?): send the annotation's outline"
            )
        return polygons

    def _click(self, request: pb.ClickRequest, cancelled: Callable[[], bool] = never_cancelled) -> EncodedReply:
        session = self.sessions.get(request.session_id)
        tolerance = float(request.simplify_tolerance)
        min_area = float(request.min_area) if request.HasField("min_area") else DEFAULT_MIN_AREA
        for name, value in (("simplify_tolerance", tolerance), ("min_area", min_area)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInputError(f"{name} must be a non-negative number, got {value}")
        # One click of a session runs at a time (one more may wait): the rest are refused now
        # rather than each holding a server thread while it waits.
        with session.turn(cancelled):
            try:
                return self._click_in_turn(request, session, tolerance, min_area, cancelled)
            finally:
                self._keep_budget(session)

    def _keep_budget(self, session: Session) -> None:
        """Embeddings + histories within cache_bytes: trim other sessions' histories, then evict."""
        over = self.cache.used_bytes + self.sessions.ledger.used_bytes - self.cache.max_bytes
        if over > 0:
            self.sessions.trim_histories(over, keep=session)
            self.cache.shrink()

    def _click_in_turn(self, request: pb.ClickRequest, session: Session, tolerance: float, min_area: float,
                       cancelled: Callable[[], bool]) -> EncodedReply:
        embedding = session.embedding  # a strong reference for this request (NOT_FOUND if evicted)
        self.cache.get(session.cache_key)  # a click keeps its image's embedding recently used
        prompt = self._prompt(request, session, cancelled)
        mode = self._propagation_mode(request) if len(prompt.points) else "off"
        model: LoadedModel = session.model
        features, hw = embedding.features, embedding.hw

        def decode(points, labels, box, mask_logits):
            return model.decoder(features, hw, points, labels, box, mask_logits)

        def judge(point, label, low_res) -> bool:
            return click_ignored(low_res, model.transform, hw, point, label)

        with self._click_slots:  # clicks of all sessions share the cores (max_concurrent_clicks)
            with session.lock:
                result, seconds, steps = session.resolve(prompt, decode, judge, cancelled)
            propagate, spread = mode == "on", "model"
            if mode == "auto":
                if self._auto_propagates(prompt, session, decode, judge, result, cancelled):
                    propagate = True
                elif self.propagation.auto_when_sure == "correction":
                    propagate, spread = True, "correction"
            if propagate:
                graph = self._graph(embedding, self.propagation)
                mask = graph.refine(result.low_res, model.transform, prompt.points, prompt.labels, spread=spread)
            else:
                mask = model.transform.mask_from_logits(result.low_res, hw)
                if embedding.snap_lab is not None:  # kept only where this server snaps this model's edges
                    mask = snap_mask(embedding.snap_lab, mask, prompt.points, prompt.labels, self.edge_snap)
        if cancelled():
            raise CancelledError("the click was cancelled before its polygons were traced")
        frame = session.frame
        polygons = mask_to_polygons(mask, origin=frame.origin, downsample=frame.downsample,
                                    simplify_tolerance=tolerance, min_area=min_area)
        response = pb.ClickResponse(
            predicted_iou=result.iou,
            decode_seconds=seconds,
            num_points=len(prompt.points),
            decoded_steps=steps,
            mask_pixels=int(np.count_nonzero(mask)),
            width=session.width,
            height=session.height,
            propagated=propagate,
        )
        if request.want_mask_png:
            ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
            if not ok:  # pragma: no cover - cv2 encodes any uint8 image
                raise RuntimeError("PNG encoding failed")
            response.mask_png = buf.tobytes()
        # The polygons go on the wire straight from numpy (see wire.py): same message, ~1 ms less.
        return EncodedReply(response, encode_polygons(polygons))


# --------------------------------------------------------------------------- auth


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""

    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer TOKEN`` (or ``x-histosam-token: TOKEN``) on every call
    but the health service; compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _valid(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key not in TOKEN_METADATA_KEYS:
                continue
            text = value.decode() if isinstance(value, bytes) else str(value)
            if key == "authorization":
                scheme, _, text = text.partition(" ")
                if scheme.lower() != "bearer":
                    continue
            if hmac.compare_digest(text.strip().encode(), self._token):
                return True
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._valid(handler_call_details.invocation_metadata):
            return handler
        return _abort_handler(handler, "missing or wrong token: send metadata 'authorization: Bearer TOKEN'")


# --------------------------------------------------------------------------- server


def _check_port_free(host: str, port: int, bind: str) -> None:
    """Say "address in use" in one line before gRPC tries: its C core logs a cryptic line first.

    The probe sets SO_REUSEADDR like gRPC does, so a port left in TIME_WAIT by a server that just
    stopped is not mistaken for a busy one; only a live listener fails it.
    """
    import errno
    import socket

    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # gRPC reports unresolvable hosts itself
    busy = 0
    for family, kind, proto, _, address in addresses:  # "localhost" may be ::1 and 127.0.0.1
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                busy += exc.errno == errno.EADDRINUSE
    if addresses and busy == len(addresses):
        raise HistosamError(f"cannot listen on {bind}: the address is in use (another server on port {port}?)")


def check_tls_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """(key, certificate chain) PEM bytes, checked to be a usable pair before gRPC sees them:
    gRPC reports a bad one only as C-core log lines and a failure to bind the port."""
    import ssl

    data = {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            data[flag] = path.read_bytes()
        except OSError as exc:
            raise NotFoundError(f"{flag} {path} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data["--tls-cert"]:
        raise InvalidInputError(f"--tls-cert {cert} is not a PEM certificate (no -----BEGIN CERTIFICATE-----)")
    if b"PRIVATE KEY-----" not in data["--tls-key"]:
        raise InvalidInputError(f"--tls-key {key} is not a PEM private key (no -----BEGIN ... PRIVATE KEY-----)")
    if b"ENCRYPTED" in data["--tls-key"]:
        raise InvalidInputError(f"--tls-key {key} is encrypted: gRPC needs an unencrypted key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        reason = "the key does not belong to the certificate" if exc.reason == "KEY_VALUES_MISMATCH" else \
            f"they cannot be used together ({exc.reason or exc})"
        raise InvalidInputError(f"--tls-cert {cert} and --tls-key {key}: {reason}") from None
    return data["--tls-key"], data["--tls-cert"]


@dataclass
class SegmentationServer:
    """A running (after ``start``) gRPC server; ``stop`` ends it gracefully."""

    settings: ServerSettings
    models: ModelStore | None = None
    port: int | None = field(default=None, init=False)
    _server: grpc.Server | None = field(default=None, init=False, repr=False)
    _health: health.HealthServicer | None = field(default=None, init=False, repr=False)
    servicer: SegmentationServicer | None = field(default=None, init=False, repr=False)
    _stop_sweeper: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("server is not started")
        host = self.settings.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{host}:{self.port}"

    @property
    def providers(self) -> list[str]:
        assert self.models is not None
        return self.models.providers

    def start(self) -> int:
        """Bind, serve, load models (unless given); returns the bound port.

        The port is bound before the models load so that a readiness probe sees the health
        status NOT_SERVING (and Segmentation calls get UNAVAILABLE) until the default model is
        loaded and verified; only then does it turn SERVING. A failed load stops the server
        and raises (``histosam serve`` prints it as one line and exits non-zero).
        """
        s = self.settings
        token = s.resolve_token()
        for root in s.slide_roots:
            if not Path(root).is_dir():
                raise NotFoundError(f"slide root {root} is not a folder")
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [TokenInterceptor(token)] if token else []
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=s.threads, thread_name_prefix="histosam-rpc"),
                             options=options, interceptors=interceptors,
                             maximum_concurrent_rpcs=s.max_concurrent_rpcs)
        self.servicer = SegmentationServicer(s, self.models, token_required=bool(token))
        add_servicer(self.servicer, server)
        self._health = health.HealthServicer()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)  # v1 and v1alpha
        bind = f"[{s.host}]:{s.port}" if ":" in s.host and not s.host.startswith("[") else f"{s.host}:{s.port}"
        _check_port_free(s.host, s.port, bind)
        try:
            if s.tls_cert is not None and s.tls_key is not None:
                pair = check_tls_pair(Path(s.tls_cert), Path(s.tls_key))
                port = server.add_secure_port(bind, grpc.ssl_server_credentials([pair]))
            else:
                port = server.add_insecure_port(bind)
        except (RuntimeError, OSError) as exc:
            raise HistosamError(f"cannot listen on {bind}: {exc}") from None
        if not port:
            raise HistosamError(f"cannot listen on {bind} (address in use or not available)")
        server.start()
        self._server, self.port = server, port
        try:
            if self.models is None:
                self.models = ModelStore.load(s.bundle_paths(), s.default_model, s.prefer_gpu, s.ort_threads,
                                              serving=True)
        except BaseException:
            self._server.stop(0).wait()
            self._server = None
            raise
        self.servicer.models = self.models
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._stop_sweeper.clear()
        threading.Thread(target=self._sweep_loop, name="histosam-session-sweeper", daemon=True).start()
        log.info("histosam %s listening on %s (%s), models %s, providers %s", __version__, self.address,
                 "TLS" if s.tls_cert else "plaintext", ", ".join(self.models.names), ", ".join(self.providers))
        return port

    def _sweep_loop(self) -> None:
        interval = min(60.0, max(0.05, self.settings.session_idle_seconds / 4))
        while not self._stop_sweeper.wait(interval):
            if self.servicer is not None:
                dropped = self.servicer.sessions.sweep()
                if dropped:
                    log.debug("dropped %d idle sessions", dropped)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then end."""
        self._stop_sweeper.set()
        if self._server is None:
            return
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        self._server.stop(self.settings.grace_seconds if grace is None else grace).wait()
        self._server = None
        if self.servicer is not None:
            self.servicer.close()
        log.info("histosam server on port %s stopped", self.port)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server ends (True) or ``timeout`` passes (False)."""
        if self._server is None:
            return True
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> SegmentationServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)
