"""Server-side state: the embedding cache, click sessions and each session's prompt history.

Why this shape:

* Encoding is the expensive step (hundreds of ms to seconds); a click is only the decoder. So
  the encoder output of every opened image goes into an LRU cache bounded in bytes and keyed by
  a *signature* of the pixels (content hash, or slide path + mtime + region) and the model's
  sha256: opening the same image again, from any client, runs no encoder. Concurrent opens of
  one image wait for a single encode instead of each running their own.
* The cache is the only owner of embeddings; a session holds a *weak* reference to the one it
  was opened on (and its cache key, so each click keeps the entry recently used). So the bytes
  of embeddings in memory stay within the cache's budget however many sessions are open: an
  earlier design pinned one embedding per session, and 128 sessions on distinct LiteMedSAM
  images then held 512 MiB beyond the budget. When the cache evicts an embedding no click is
  using, it is freed at once and its sessions answer NOT_FOUND ("re-open"), as do sessions
  dropped for count (least recently used) or idle time; the clients re-open transparently.
* Clicks carry all points so far. Each session keeps the low-res logits of every prompt
  *prefix* (points[:k] + box + mask prompt), keyed by a chained hash of that exact prefix, and
  decodes step k with step k-1's logits as the mask prompt, as SAM's interactive loop does
  (with a box, step 0 is the box alone; the first step gets the refine-mask prompt, if any). So
  a shorter list (undo) or the same list again (a retry) is answered from the history, a
  changed earlier point starts a new chain, and a session rebuilt after a re-open replays the
  missing steps to the very same answer.
* Those histories count against the same byte budget as the embeddings (``ByteLedger``):
  uncounted, a server's sessions could hold many times the budget while the cache reported a
  few MB. Over the budget, the histories of the least recently used sessions are trimmed first
  (a trimmed history costs only decoder steps to replay), then embeddings are evicted.
* One click runs per session at a time, and at most ``MAX_WAITING_CLICKS`` more wait for it;
  further clicks on that session are refused at once (RESOURCE_EXHAUSTED). Otherwise a burst of
  clicks on one session sat on every server thread, waiting on its lock, and starved all other
  clients.
  Long work checks a ``cancelled`` callable between steps, so a cancelled call (client gone,
  deadline, server shutdown) stops within one decoder step.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histosam.backend.core.errors import (
    CancelledError,
    InvalidInputError,
    NotFoundError,
    ResourceLimitError,
)

# Prompt prefixes remembered per session (each 256x256 float32 = 256 KiB). Older prefixes are
# recomputed from the newest remembered one when a client asks for them again.
HISTORY_LIMIT = 32
# Clicks that may wait on a session while one of its clicks runs; more are refused at once.
MAX_WAITING_CLICKS = 1
# How often a click waiting for its session's turn looks whether its call was cancelled (s).
TURN_POLL_SECONDS = 0.05


def never_cancelled() -> bool:
    return False


class ByteLedger:
    """Bytes held outside the embedding cache (session histories), counted against its budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def add(self, delta: int) -> None:
        with self._lock:
            self._bytes += int(delta)


@dataclass(frozen=True)
class Frame:
    """client coordinate = origin + image pixel * downsample."""

    origin_x: float = 0.0
    origin_y: float = 0.0
    downsample: float = 1.0

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.origin_x, self.origin_y, self.downsample)):
            raise InvalidInputError("frame has a non-finite value")
        if self.downsample <= 0:
            raise InvalidInputError(f"frame downsample must be positive, got {self.downsample}")

    @property
    def origin(self) -> tuple[float, float]:
        return (self.origin_x, self.origin_y)

    def to_pixels(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) client x,y -> image pixel x,y (inf where a huge coordinate overflows: callers
        check finiteness and answer that as outside the image)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return (np.asarray(xy, np.float64) - (self.origin_x, self.origin_y)) / self.downsample

    def check_extent(self, width: int, height: int) -> None:
        """Refuse a frame whose image corners have no finite client coordinates.

        Origin 1e308 with downsample 1e308 passes every per-value check, yet every polygon a
        click returns would then hold ``inf``.
        """
        corners = (self.origin_x + width * self.downsample, self.origin_y + height * self.downsample)
        if not all(math.isfinite(v) for v in corners):
            raise InvalidInputError(
                f"frame (origin {self.origin_x:g}, {self.origin_y:g}, downsample {self.downsample:g}) places the "
                f"{width}x{height} image beyond the largest finite coordinate"
            )

    def describe_extent(self, width: int, height: int) -> str:
        x1 = self.origin_x + width * self.downsample
        y1 = self.origin_y + height * self.downsample
        return f"x in [{self.origin_x:g}, {x1:g}], y in [{self.origin_y:g}, {y1:g}]"


@dataclass(frozen=True)
class Embedding:
    """An image's encoder output, shared read-only by every session on that image."""

    features: dict[str, np.ndarray]
    height: int
    width: int
    encode_seconds: float = 0.0
    decode_image_seconds: float = 0.0
    # Click propagation: the walker's graph, built at encode when the server propagates by
    # default (histosam.backend.postprocess.propagation.ImageGraph), and the small RGB copy it is built
    # from, kept always so that a click can ask for propagation on a server where it is off.
    graph: Any = None
    working_image: np.ndarray | None = None
    # Edge snapping (histosam.backend.postprocess.edge_snap): the image's CIELAB working copy, kept when the
    # server snaps mask edges (<= 0.44 MB at 384 px).
    snap_lab: np.ndarray | None = None

    @property
    def hw(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def nbytes(self) -> int:
        graph_bytes = 0 if self.graph is None else int(self.graph.nbytes)
        small_bytes = 0 if self.working_image is None else int(self.working_image.nbytes)
        snap_bytes = 0 if self.snap_lab is None else int(self.snap_lab.nbytes)
        return int(sum(a.nbytes for a in self.features.values())) + graph_bytes + small_bytes + snap_bytes


class EmbeddingCache:
    """LRU of embeddings bounded in bytes, with single-flight computation per key.

    The newest entry is always kept even if it alone exceeds the budget (a budget smaller
    than one embedding then means "cache only the last image").
    """

    def __init__(self, max_bytes: int, ledger: ByteLedger | None = None) -> None:
        self.max_bytes = int(max_bytes)
        # Other bytes the same budget bounds (session histories): embeddings make room for them.
        self.ledger = ledger if ledger is not None else ByteLedger()
        self._entries: OrderedDict[str, Embedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def get(self, key: str) -> Embedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, embedding: Embedding) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = embedding
            self._bytes += embedding.nbytes
            self._evict_locked()

    def shrink(self) -> None:
        """Evict least recently used embeddings until the budget (with the ledger's bytes) holds."""
        with self._lock:
            self._evict_locked()

    def _evict_locked(self) -> None:
        while self._bytes + self.ledger.used_bytes > self.max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes

    def get_or_compute(self, key: str, compute: Callable[[], Embedding]) -> tuple[Embedding, bool]:
        """(embedding, cache_hit). One thread computes a missing key; others wait for it."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry, True
                waiting = self._inflight.get(key)
                if waiting is None:
                    done = threading.Event()
                    self._inflight[key] = done
                    self.misses += 1
                    break
            waiting.wait()  # the computing thread finished (or failed): look again
        try:
            embedding = compute()
            self.put(key, embedding)
            return embedding, False
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            done.set()


@dataclass(frozen=True)
class Prompt:
    """One Click's prompt in image pixels.

    ``mask_key`` identifies the refine-an-annotation mask prompt (b"" when none) and
    ``mask_logits`` produces its logits on demand (only the first step needs them).
    """

    points: np.ndarray  # (N, 2) float64 x, y
    labels: np.ndarray  # (N,) 1 positive, 0 negative
    box: np.ndarray | None = None  # (4,) x0, y0, x1, y1
    mask_key: bytes = b""
    mask_logits: Callable[[], np.ndarray] | None = None

    def prefix_keys(self) -> list[bytes]:
        """Key of step k (k = 0..N): a chained hash of the base (mask, box) and points[:k]."""
        base = hashlib.sha256(b"histosam-prompt/1|" + self.mask_key + b"|")
        base.update(b"nobox" if self.box is None else struct.pack("<4d", *map(float, self.box)))
        keys = [base.digest()]
        for (x, y), label in zip(self.points, self.labels, strict=True):
            keys.append(hashlib.sha256(keys[-1] + struct.pack("<2dB", float(x), float(y), int(label))).digest())
        return keys


@dataclass(frozen=True)
class StepResult:
    low_res: np.ndarray  # (256, 256) float32 logits
    iou: float
    # Correction clicks of this prefix whose answers ignored them (see ``Session.resolve``'s
    # ``judge``): carried along the chain, so "auto" propagation needs no replay to count them.
    ignored: int = 0


# judge(point, label, low_res) -> did the answer to a correction click ignore it?
JudgeFn = Callable[[np.ndarray, int, np.ndarray], bool]


# decode(points, labels, box, mask_logits) -> (low_res, iou)
DecodeFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"], tuple[np.ndarray, float]]


EVICTED_MESSAGE = (
    "session {sid!r}: its image embedding was evicted from the server's embedding cache "
    "(memory budget reached by other images): re-open the image"
)


@dataclass
class Session:
    """One opened image: model, a weak reference to its embedding, frame and prompt history.

    The reference is weak so that the embedding cache alone decides which embeddings stay in
    memory (see the module docstring); ``embedding`` raises NotFoundError once it is gone.
    """

    session_id: str
    model: Any  # histosam.backend.serving.model_store.LoadedModel (kept loose: tests use plain objects)
    embedding_ref: weakref.ref[Embedding]
    frame: Frame
    last_used: float
    width: int
    height: int
    cache_key: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    history: OrderedDict[bytes, StepResult] = field(default_factory=OrderedDict)
    ledger: ByteLedger | None = None
    _history_nbytes: int = field(default=0, repr=False)
    _dropped: bool = field(default=False, repr=False)
    _bytes_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _turn: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _admit: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _queued: int = field(default=0, repr=False)

    @property
    def alive(self) -> bool:
        return self.embedding_ref() is not None

    @property
    def embedding(self) -> Embedding:
        """The embedding (a strong reference: hold it for the duration of one request)."""
        embedding = self.embedding_ref()
        if embedding is None:
            raise NotFoundError(EVICTED_MESSAGE.format(sid=self.session_id))
        return embedding

    @property
    def history_bytes(self) -> int:
        with self._bytes_lock:
            return self._history_nbytes

    def _count(self, delta: int) -> None:
        """Book ``delta`` history bytes (call with ``_bytes_lock``); a dropped session books none."""
        if self._dropped:
            return
        self._history_nbytes += delta
        if self.ledger is not None:
            self.ledger.add(delta)

    def _remember(self, key: bytes, result: StepResult) -> None:
        with self._bytes_lock:
            old = self.history.pop(key, None)
            if old is not None:
                self._count(-old.low_res.nbytes)
            self.history[key] = result
            self._count(result.low_res.nbytes)
            while len(self.history) > HISTORY_LIMIT:
                _, gone = self.history.popitem(last=False)
                self._count(-gone.low_res.nbytes)

    def trim_history(self, want: int) -> int:
        """Forget up to ``want`` bytes of the oldest history (never while a click resolves).

        Returns the bytes freed; 0 when the session is busy (its lock is held).
        """
        if not self.lock.acquire(blocking=False):
            return 0
        try:
            freed = 0
            with self._bytes_lock:
                while self.history and freed < want:
                    _, gone = self.history.popitem(last=False)
                    freed += gone.low_res.nbytes
                    self._count(-gone.low_res.nbytes)
            return freed
        finally:
            self.lock.release()

    def drop(self) -> None:
        """The store let go of this session: its history bytes leave the ledger (a click still
        running on it keeps its own references until it ends)."""
        with self._bytes_lock:
            if not self._dropped:
                if self.ledger is not None:
                    self.ledger.add(-self._history_nbytes)
                self._dropped = True

    @contextmanager
    def turn(self, cancelled: Callable[[], bool] = never_cancelled) -> Iterator[None]:
        """This session's click turn: one runs, ``MAX_WAITING_CLICKS`` wait, the rest are refused.

        A waiting click gives up (CancelledError) as soon as ``cancelled()`` says its call ended.
        """
        with self._admit:
            if self._queued > MAX_WAITING_CLICKS:
                raise ResourceLimitError(
                    f"session {self.session_id!r} is busy: a click is running and {MAX_WAITING_CLICKS} more "
                    "waiting on it; send the next click when one has answered"
                )
            self._queued += 1
        try:
            while not self._turn.acquire(timeout=TURN_POLL_SECONDS):
                if cancelled():
                    raise CancelledError(f"session {self.session_id!r}: the click was cancelled while it waited")
            try:
                yield
            finally:
                self._turn.release()
        finally:
            with self._admit:
                self._queued -= 1

    def resolve(
        self, prompt: Prompt, decode: DecodeFn, judge: JudgeFn | None = None,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> tuple[StepResult, float, int]:
        """The answer to ``prompt``: (result, decoder seconds spent, steps decoded now).

        ``judge`` tells whether a step's answer ignored its own (correction) click; each step's
        ``ignored`` is its predecessor's plus that verdict.

        Call with ``self.lock`` held (one click at a time per session keeps the history
        consistent; different sessions run in parallel). ``cancelled`` is looked at before
        every decoder step: a call that ended stops there (CancelledError), its finished steps
        kept in the history.
        """
        keys = prompt.prefix_keys()
        n = len(prompt.points)
        # With a box, step 0 is the box alone and every point refines the answer before it;
        # without one, step 1 (the first point) is the first step.
        first = 0 if prompt.box is not None else 1
        if n < first:
            raise InvalidInputError("a click needs at least one point or a box")
        start = first
        for k in range(n, first - 1, -1):  # newest remembered prefix
            if keys[k] in self.history:
                self.history.move_to_end(keys[k])
                start = k + 1
                break
        if start > n:
            return self.history[keys[n]], 0.0, 0
        seconds = 0.0
        result: StepResult | None = None
        for k in range(start, n + 1):
            if cancelled():
                raise CancelledError(f"session {self.session_id!r}: the click was cancelled after {k - start} of "
                                     f"{n + 1 - start} decoder steps")
            ignored = 0
            if k <= first:
                previous = prompt.mask_logits() if prompt.mask_logits is not None else None
            else:
                before = self.history[keys[k - 1]]
                previous, ignored = before.low_res, before.ignored
            t0 = time.perf_counter()
            low, iou = decode(prompt.points[:k], prompt.labels[:k], prompt.box, previous)
            seconds += time.perf_counter() - t0
            low = np.asarray(low, np.float32).copy()
            if judge is not None and k > first:
                ignored += bool(judge(prompt.points[k - 1], int(prompt.labels[k - 1]), low))
            result = StepResult(low, float(iou), ignored)
            self._remember(keys[k], result)
        assert result is not None
        return result, seconds, n + 1 - start


class SessionStore:
    """Sessions by id, thread-safe, dropped after ``idle_seconds``, beyond ``max_sessions``, or
    when the cache has evicted their embedding."""

    def __init__(self, idle_seconds: float, max_sessions: int, clock: Callable[[], float] = time.monotonic,
                 ledger: ByteLedger | None = None) -> None:
        self.idle_seconds = float(idle_seconds)
        self.max_sessions = int(max_sessions)
        self.ledger = ledger if ledger is not None else ByteLedger()
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(self, model: Any, embedding: Embedding, frame: Frame, cache_key: str = "") -> Session:
        now = self._clock()
        # Hex, not urlsafe base64: an id starting with "-" (1 in 64 of those) reads as an option
        # on a command line (`histosam client click --session -x...` failed that way in a test run).
        session = Session(secrets.token_hex(16), model, weakref.ref(embedding), frame, now,
                          embedding.width, embedding.height, cache_key, ledger=self.ledger)
        with self._lock:
            self._expire(now)
            self._sessions[session.session_id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)[1].drop()
        return session

    def get(self, session_id: str) -> Session:
        now = self._clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and now - session.last_used > self.idle_seconds:
                del self._sessions[session_id]
                session.drop()
                session = None
            if session is None:
                raise NotFoundError(
                    f"session {session_id!r} is unknown or was dropped (idle over {self.idle_seconds:g} s, "
                    "evicted to keep the memory budget, or the server restarted): re-open the image"
                )
            if not session.alive:
                del self._sessions[session_id]
                session.drop()
                raise NotFoundError(EVICTED_MESSAGE.format(sid=session_id))
            session.last_used = now
            self._sessions.move_to_end(session_id)
            return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.drop()
        return True

    def sweep(self) -> int:
        """Drop idle sessions and those whose embedding is gone, now; returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        stale = [sid for sid, s in self._sessions.items()
                 if now - s.last_used > self.idle_seconds or not s.alive]
        for sid in stale:
            self._sessions.pop(sid).drop()
        return len(stale)

    def resident_embedding_bytes(self) -> int:
        """Bytes of the distinct embeddings the sessions can still reach (the memory check).

        They are all in the cache (or in use by a running request), so this stays within the
        cache budget; tests and the load bench compare the two.
        """
        with self._lock:
            sessions = list(self._sessions.values())
        seen: dict[int, int] = {}
        for session in sessions:
            embedding = session.embedding_ref()
            if embedding is not None:
                seen[id(embedding)] = embedding.nbytes
        return sum(seen.values())

    def history_bytes(self) -> int:
        """Bytes of the prompt histories (at most HISTORY_LIMIT low-res logits per session)."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.history_bytes for s in sessions)

    def trim_histories(self, want: int, keep: Session | None = None) -> int:
        """Free ``want`` bytes of history, least recently used sessions first, never ``keep``'s.

        Returns the bytes freed (less than ``want`` when the histories are smaller, or busy).
        """
        with self._lock:
            sessions = [s for s in self._sessions.values() if s is not keep]
        freed = 0
        for session in sessions:
            if freed >= want:
                break
            freed += session.trim_history(want - freed)
        return freed
