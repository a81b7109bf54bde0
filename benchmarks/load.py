"""`histosam bench load`: one server, several pathologists clicking at once.

The server runs as a separate process (``histosam serve``), so its memory is its own: the
bench samples its resident set while ``--clients`` threads, each with its own channel and its
own image, click ``--clicks`` times as the evaluator's simulated user does (the RITM rule of
``histosam.backend.evaluation.clicker`` against a ground-truth mask; all points so far in every Click,
the mask sent back as a PNG to place the next click). Images are real OCDC patches from the
shared data when present (``patches/ocdc``), synthetic blobs otherwise. A sequence that is
already perfect, or reaches the server's points limit, starts over with a fresh prompt.

Reported (printed, and written as JSON with a PNG of latency and memory over time): clicks per
second over the click phase, p50/p99 per-click latency (client wall time, gRPC included),
errors (must be 0), re-opens, the server's peak RSS (the kernel's high-water mark, VmHWM) and
its RSS after loading the model, and its embedding-cache figures from GetServerInfo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histosam.backend.core.atomic import atomic_write, write_json
from histosam.backend.evaluation.metrics import iou

LISTENING = re.compile(r"listening on (\S+)")


def register_bench(p: argparse.ArgumentParser) -> None:
    """Concurrent clients clicking against one `histosam serve` process: clicks/s, latency, RSS."""
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one image each (default %(default)s)")
    p.add_argument("--clicks", type=int, default=50, help="Click calls per client (default %(default)s)")
    p.add_argument("--models", type=Path, metavar="DIR",
                   help="bundle (or folder of bundles) to serve (default: the server's default model)")
    p.add_argument("--threads", type=int, default=8, help="server RPC threads (default %(default)s)")
    p.add_argument("--ort-threads", type=int, help="onnxruntime intra-op threads in the server")
    p.add_argument("--cache-bytes", type=int, help="server embedding cache budget (default: the server's)")
    p.add_argument("--images", type=Path, help="folder with images/ and masks/ (default: shared OCDC patches)")
    p.add_argument("--cpu", action="store_true", help="CPU provider even when CUDA is available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-load.json"), help="JSON results (default %(default)s)")
    p.add_argument("--hostile", action="store_true",
                   help="run the honest clients (--clients - 1) twice, alone and beside one hostile client (the attacks "
                   "of issue 22), and report their p50/p99 side by side")
    p.add_argument("--sweep", type=int, nargs="+", metavar="N",
                   help="run once per client count (a fresh server each, e.g. --sweep 1 4 8) and report clicks/s, "
                   "p50 and p99 of each, and each p50 over the first count's; --clients is then ignored")
    p.set_defaults(bench_func=run_bench)


# --------------------------------------------------------------------------- workload


def _data_dir() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("HISTOSAM_DATA") or repo.parent / "shared" / "data")


def load_pairs(n: int, folder: Path | None, seed: int) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str]:
    """``n`` (name, RGB image, bool mask) pairs: real patches when found, synthetic otherwise.

    With fewer real patches than clients, patches repeat flipped/rotated so that every client
    still has distinct pixels (and so its own embedding).
    """
    import cv2

    folder = folder if folder is not None else _data_dir() / "patches" / "ocdc"
    real = []
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        masks = {p.stem: p for p in (folder / "masks").iterdir()}
        for image_path in sorted((folder / "images").iterdir()):
            mask_path = masks.get(image_path.stem)
            bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) if mask_path else None
            if bgr is not None and mask is not None and mask.shape == bgr.shape[:2] and (mask > 127).any():
                real.append((image_path.stem, np.ascontiguousarray(bgr[..., ::-1]), mask > 127))
    if real:
        pairs = []
        for i in range(n):
            name, rgb, mask = real[i % len(real)]
            turn = i // len(real)
            pairs.append((f"{name}-r{turn}", np.ascontiguousarray(np.rot90(rgb, turn)),
                          np.ascontiguousarray(np.rot90(mask, turn))))
        return pairs, f"real OCDC patches from {folder}"
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        img = np.full((512, 512, 3), 232, np.uint8)
        gt = np.zeros((512, 512), np.uint8)
        for _ in range(30):
            c = tuple(int(v) for v in rng.integers(0, 512, 2))
            cv2.circle(img, c, int(rng.integers(8, 40)), tuple(int(v) for v in rng.integers(120, 220, 3)), -1)
        c, r = tuple(int(v) for v in rng.integers(150, 362, 2)), int(rng.integers(60, 120))
        cv2.circle(img, c, r, (150, 60, 160), -1)
        cv2.circle(gt, c, r, 1, -1)
        pairs.append((f"synthetic-{i}", img, gt > 0))
    return pairs, "synthetic images (no shared data found)"


@dataclass
class ClientLog:
    latencies: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reopens: int = 0
    restarts: int = 0
    open_seconds: float = 0.0


def click_like_the_evaluator(target: str, rgb: np.ndarray, gt: np.ndarray, clicks: int, max_points: int,
                             start: threading.Barrier, log: ClientLog, progress) -> None:
    """One client: open its image, then ``clicks`` Click calls placed by the RITM rule."""
    from histosam.backend.core.errors import HistosamError
    from histosam.backend.evaluation.clicker import next_click
    from histosam.backend.serving.client import SegmentationClient

    with SegmentationClient(target, timeout=120) as client:
        try:
            t0 = time.perf_counter()
            session = client.open_image(rgb)
            log.open_seconds = time.perf_counter() - t0
        except HistosamError as exc:
            log.errors.append(f"open: {exc}")
            start.wait()
            return
        start.wait()  # every client has its embedding: the click phase starts together
        points: list[tuple[float, float, bool]] = []
        pred = np.zeros_like(gt)
        clicked = np.zeros_like(gt)
        for _ in range(clicks):
            click = next_click(gt, pred, clicked)
            if click is None or len(points) >= max_points:  # perfect, or out of points: start over
                points, pred, clicked = [], np.zeros_like(gt), np.zeros_like(gt)
                log.restarts += 1
                click = next_click(gt, pred, clicked)
            clicked[click.y, click.x] = True
            points.append((click.x + 0.5, click.y + 0.5, click.positive))  # the pixel's centre
            t0 = time.perf_counter()
            try:
                result = session.click(points, want_mask=True)
            except HistosamError as exc:
                log.errors.append(f"click: {exc}")
                progress.update(1)
                continue
            t1 = time.perf_counter()
            log.latencies.append(t1 - t0)
            log.finished_at.append(t1)
            log.reopens += int(result.reopened)
            pred = result.mask
            log.ious.append(iou(pred, gt))
            progress.update(1)


# --------------------------------------------------------------------------- server process


def run_clients(target: str, pairs, clicks: int, max_points: int, desc: str,
                cpu_marks: dict[str, float] | None = None, server: ServerProcess | None = None
                ) -> tuple[list[ClientLog], float, float]:
    """One honest client thread per (name, rgb, gt) pair, clicking together once all have opened.

    Returns the clients' logs and the click phase's start and end (``time.perf_counter``).
    ``cpu_marks``, when given, gets the CPU seconds used during the click phase alone (the opens'
    encodes excluded): ``clients`` by this process (the simulated users) and, with ``server``,
    ``server`` by the server process.
    """
    from tqdm import tqdm

    logs = [ClientLog() for _ in pairs]
    start = threading.Barrier(len(pairs) + 1)
    with tqdm(total=len(pairs) * clicks, desc=desc, unit="click") as progress:
        threads = [threading.Thread(target=click_like_the_evaluator,
                                    args=(target, rgb, gt, clicks, max_points, start, log, progress))
                   for (_, rgb, gt), log in zip(pairs, logs, strict=True)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        clients0, server0 = time.process_time(), server.cpu_seconds() if server is not None else 0.0
        for t in threads:
            t.join()
        t1 = time.perf_counter()
        if cpu_marks is not None:
            cpu_marks["clients"] = time.process_time() - clients0
            if server is not None:
                cpu_marks["server"] = server.cpu_seconds() - server0
        return logs, t0, t1


class ServerProcess:
    """``histosam serve`` as a child process, with its RSS sampled while it runs."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def wait_listening(self, timeout: float) -> str:
        """The address from the server's "listening on" line (it binds before loading models)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            match = LISTENING.search(line)
            if match:
                return match.group(1)
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise RuntimeError(f"the server did not start: {err.strip()[-500:]}")

    def status_kib(self, field_name: str) -> int:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) if match else 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far, all its threads (/proc/PID/stat)."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start_sampling(self, every: float = 0.05) -> None:
        def sample() -> None:
            while not self._stop.wait(every):
                self.samples.append((time.perf_counter(), self.status_kib("VmRSS") * 1024))

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- the bench


def _percentiles(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan"), "max_ms": float("nan")}
    ms = np.asarray(values_s, np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


def run_bench(args: argparse.Namespace) -> int:

    from histosam.backend.core.errors import InvalidInputError
    from histosam.backend.serving.client import SegmentationClient

    if getattr(args, "hostile", False) and getattr(args, "sweep", None):
        raise InvalidInputError("give --hostile or --sweep, not both")
    if getattr(args, "hostile", False):
        return run_hostile_bench(args)
    if getattr(args, "sweep", None):
        return run_sweep(args)
    if args.clients < 1 or args.clicks < 1:
        raise InvalidInputError("--clients and --clicks must be positive")
    pairs, source = load_pairs(args.clients, args.images, args.seed)
    argv = [sys.executable, "-m", "histosam.backend.cli", "serve", "--port", "0", "--threads", str(args.threads),
            "--max-sessions", str(max(128, 2 * args.clients)), "--log-level", "WARNING"]
    if args.models is not None:
        argv += ["--models", str(args.models)]
    if args.ort_threads is not None:
        argv += ["--ort-threads", str(args.ort_threads)]
    if args.cache_bytes is not None:
        argv += ["--cache-bytes", str(args.cache_bytes)]
    if args.cpu:
        argv.append("--cpu")
    server = ServerProcess(argv)
    try:
        target = server.wait_listening(600)
        with SegmentationClient(target, timeout=600) as probe:
            probe.wait_ready(600)
            deadline = time.monotonic() + 600
            while probe.health() != "SERVING":  # readiness: the default model is loaded
                if time.monotonic() > deadline:
                    raise RuntimeError("the server never became ready")
                time.sleep(0.2)
            info = probe.info()
        rss_ready = server.status_kib("VmRSS") * 1024
        server.start_sampling()
        cpu: dict[str, float] = {}
        logs, t_start, t_end = run_clients(target, pairs, args.clicks, int(info.limits.max_points), "clicks",
                                           cpu_marks=cpu, server=server)
        with SegmentationClient(target, timeout=60) as probe:
            after = probe.info()
        peak_rss = server.status_kib("VmHWM") * 1024
    finally:
        server.stop()

    latencies = [v for log in logs for v in log.latencies]
    errors = [e for log in logs for e in log.errors]
    wall = t_end - t_start
    result: dict[str, Any] = {
        "bench": "load",
        "clients": args.clients,
        "clicks_per_client": args.clicks,
        "images": source,
        "image_size": [int(pairs[0][1].shape[1]), int(pairs[0][1].shape[0])],
        "model": info.default_model,
        "model_sha256": next((m.sha256 for m in info.models if m.is_default), ""),
        "providers": list(info.providers),
        "server_threads": args.threads,
        "clicks": len(latencies),
        "click_phase_seconds": wall,
        "clicks_per_second": len(latencies) / wall if wall > 0 else 0.0,
        "click_latency": _percentiles(latencies),
        # CPU per click in the click phase: what the server spends, and what the simulated users in
        # this process spend placing clicks (on the same cores: it is CPU the server does not get).
        "server_cpu_ms_per_click": 1e3 * cpu.get("server", 0.0) / len(latencies) if latencies else None,
        "client_cpu_ms_per_click": 1e3 * cpu.get("clients", 0.0) / len(latencies) if latencies else None,
        "open_latency": _percentiles([log.open_seconds for log in logs if log.open_seconds]),
        "errors": len(errors),
        "error_messages": errors[:20],
        "reopens": sum(log.reopens for log in logs),
        "sequence_restarts": sum(log.restarts for log in logs),
        "final_iou_mean": float(np.mean([log.ious[-1] for log in logs if log.ious])) if latencies else None,
        "server_rss_ready_bytes": rss_ready,
        "server_peak_rss_bytes": peak_rss,
        "server_cache_budget_bytes": int(after.limits.cache_bytes),
        "server_cache_used_bytes": int(after.cache_used_bytes),
        "server_cache_entries": int(after.cache_entries),
        "server_open_sessions": int(after.open_sessions),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }
    _write_json(args.out, result)
    plot = _plot(args.out.with_suffix(".png"), logs, t_start, server.samples, result)
    _print_summary(result, args.out, plot)
    return 0 if not errors else 1


def run_sweep(args: argparse.Namespace) -> int:
    """``run_bench`` once per ``--sweep`` client count; one JSON with every run and the ratios.

    Each count gets its own server, so no run inherits another's cache or sessions; the per-count
    results (and plots) are written beside ``--out`` as ``<stem>-<N>clients.json``.
    """
    import copy

    from histosam.backend.core.errors import InvalidInputError

    counts = list(args.sweep)
    if any(n < 1 for n in counts) or args.clicks < 1:
        raise InvalidInputError("--sweep client counts and --clicks must be positive")
    runs, status = [], 0
    for n in counts:
        sub = copy.copy(args)
        sub.sweep, sub.clients = None, n
        sub.out = args.out.with_name(f"{args.out.stem}-{n}clients{args.out.suffix or '.json'}")
        status |= run_bench(sub)
        runs.append(json.loads(sub.out.read_text()))
    base = runs[0]["click_latency"]["p50_ms"]
    summary = [{"clients": r["clients"], "clicks_per_second": r["clicks_per_second"],
                "p50_ms": r["click_latency"]["p50_ms"], "p99_ms": r["click_latency"]["p99_ms"],
                "p50_over_first": r["click_latency"]["p50_ms"] / base if base else None,
                "server_cpu_ms_per_click": r["server_cpu_ms_per_click"],
                "client_cpu_ms_per_click": r["client_cpu_ms_per_click"],
                "errors": r["errors"]} for r in runs]
    _write_json(args.out, {"bench": "load-sweep", "clicks_per_client": args.clicks, "cpu_count": os.cpu_count(),
                           "summary": summary, "runs": runs})
    print(f"load sweep ({args.clicks} clicks per client, {os.cpu_count()} CPUs):")
    print(f"{'clients':>8}{'clicks/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'p50 / first':>13}{'errors':>8}"
          f"{'server CPU ms/click':>21}{'clients CPU ms/click':>22}")
    for row in summary:
        ratio = row["p50_over_first"]
        print(f"{row['clients']:>8}{row['clicks_per_second']:>10.2f}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}"
              f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>13}{row['errors']:>8}"
              f"{_ms_or_dash(row['server_cpu_ms_per_click']):>21}{_ms_or_dash(row['client_cpu_ms_per_click']):>22}")
    print(f"  wrote {args.out}")
    return status


def _ms_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _write_json(path: Path, result: dict[str, Any]) -> None:
    write_json(path, result, indent=2)


def _plot(path: Path, logs: list[ClientLog], t0: float, rss: list[tuple[float, int]], r: dict[str, Any]) -> Path:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it was

    fig = Figure(figsize=(9, 6.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for i, log in enumerate(logs):
        ax1.plot(np.asarray(log.finished_at) - t0, np.asarray(log.latencies) * 1000, ".", ms=3, label=f"client {i}")
    ax1.set_ylabel("click latency (ms)")
    ax1.set_title(f"{r['clients']} clients x {r['clicks_per_client']} clicks, {r['model']}: "
                  f"{r['clicks_per_second']:.1f} clicks/s, p50 {r['click_latency']['p50_ms']:.0f} ms, "
                  f"p99 {r['click_latency']['p99_ms']:.0f} ms", fontsize=9)
    if len(logs) <= 10:
        ax1.legend(fontsize=6, ncol=5)
    if rss:
        t, b = zip(*rss, strict=True)
        ax2.plot(np.asarray(t) - t0, np.asarray(b) / 2**20, "k-")
    ax2.axhline(r["server_peak_rss_bytes"] / 2**20, color="r", ls="--", lw=1, label="peak (VmHWM)")
    ax2.set_ylabel("server RSS (MiB)")
    ax2.set_xlabel("seconds since the click phase started")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def _print_summary(r: dict[str, Any], out: Path, plot: Path) -> None:
    lat = r["click_latency"]
    mib = 2**20
    print(f"load bench: {r['clients']} clients x {r['clicks_per_client']} clicks on {r['model']} "
          f"({', '.join(r['providers'])}), {r['images']}")
    print(f"  clicks/s        {r['clicks_per_second']:.2f}  ({r['clicks']} clicks in {r['click_phase_seconds']:.1f} s)")
    print(f"  click latency   p50 {lat['p50_ms']:.1f} ms   p99 {lat['p99_ms']:.1f} ms   max {lat['max_ms']:.1f} ms")
    print(f"  errors          {r['errors']}   re-opens {r['reopens']}   sequence restarts {r['sequence_restarts']}")
    print(f"  CPU per click   server {_ms_or_dash(r['server_cpu_ms_per_click'])} ms   simulated users (this process, "
          f"same cores) {_ms_or_dash(r['client_cpu_ms_per_click'])} ms")
    print(f"  server RSS      ready {r['server_rss_ready_bytes'] / mib:.0f} MiB   peak {r['server_peak_rss_bytes'] / mib:.0f} MiB")
    print(f"  embedding cache {r['server_cache_used_bytes'] / mib:.1f} / {r['server_cache_budget_bytes'] / mib:.0f} MiB "
          f"({r['server_cache_entries']} entries, {r['server_open_sessions']} sessions)")
    if r["final_iou_mean"] is not None:
        print(f"  final IoU mean  {r['final_iou_mean']:.3f}")
    print(f"  wrote {out} and {plot}")


# --------------------------------------------------------------------------- one hostile client


def _hostile_argv(args: argparse.Namespace, clients: int) -> list[str]:
    argv = [sys.executable, "-m", "histosam.backend.cli", "serve", "--port", "0", "--threads", str(args.threads),
            "--max-sessions", str(max(128, 4 * clients)), "--log-level", "WARNING"]
    for flag, value in (("--models", args.models), ("--ort-threads", args.ort_threads), ("--cache-bytes", args.cache_bytes)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--cpu"] if args.cpu else [])


def _hostile_requests(rgb: np.ndarray, max_points: int, seed: int) -> tuple[bytes, list[tuple[str, str, Any]]]:
    """The image's PNG, and the attacks of issue 22 as (name, call, request factory): each was
    once answered INTERNAL, held memory beyond every limit, or held the server's threads."""
    import cv2

    from histosam.v1 import segmentation_pb2 as pb

    h, w = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    xs = np.linspace(0, w, 20_000)
    zig = pb.Polygon(exterior=np.stack([xs, np.where(np.arange(xs.size) % 2, -1.0, h + 1.0)], 1).ravel().tolist())
    mask16 = np.zeros((h, w, 4), np.uint16)
    cv2.circle(mask16, (w // 2, h // 2), min(h, w) // 4, (65535, 65535, 65535, 65535), -1)
    mask_png = cv2.imencode(".png", mask16)[1].tobytes()
    thin = cv2.imencode(".png", np.full((2, 1100), 128, np.uint8))[1].tobytes()
    image = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()

    def points(n: int) -> list:
        return [pb.Point(x=float(x), y=float(y), positive=bool(i % 3))
                for i, (x, y) in enumerate(rng.uniform((0, 0), (w, h), (n, 2)))]

    return image, [
        ("flood", "click", lambda sid: pb.ClickRequest(session_id=sid, points=points(max_points))),
        ("zigzag", "click", lambda sid: pb.ClickRequest(session_id=sid, points=points(1), mask_prompt_polygons=[zig])),
        ("mask16", "click", lambda sid: pb.ClickRequest(session_id=sid, points=points(1), mask_prompt_png=mask_png)),
        ("tolerance", "click", lambda sid: pb.ClickRequest(session_id=sid, points=points(1), simplify_tolerance=1e30)),
        ("frame", "open", lambda sid: pb.OpenImageRequest(encoded_image=image, frame=pb.Frame(
            origin_x=1e308, origin_y=1e308, downsample=1e308))),
        ("thin", "open", lambda sid: pb.OpenImageRequest(encoded_image=thin)),
    ]


def hostile_client(target: str, rgb: np.ndarray, max_points: int, stop: threading.Event,
                   counts: dict[str, int], lock: threading.Lock, seed: int, flood: int = 8) -> None:
    """One client on its own channel, attacking until ``stop``: ``flood`` threads at once
    cycling through the attacks (most aim at one session of its own)."""
    import grpc

    from histosam.v1 import segmentation_pb2 as pb
    from histosam.v1 import segmentation_pb2_grpc as pb_grpc

    image, attacks = _hostile_requests(rgb, max_points, seed)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=image), timeout=600).session_id

        def attack(worker: int) -> None:
            i = worker
            while not stop.is_set():
                name, kind, make = attacks[i % len(attacks)]
                i += 1
                call = stub.Click if kind == "click" else stub.OpenImage
                try:
                    call(make(sid), timeout=120)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    counts[f"{name}:{code}"] = counts.get(f"{name}:{code}", 0) + 1

        workers = [threading.Thread(target=attack, args=(k,), daemon=True) for k in range(flood)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()


def _honest_phase(target: str, pairs, clicks: int, max_points: int, hostile: tuple | None) -> dict[str, Any]:
    """The honest clients' click phase, with the hostile client attacking throughout or not."""
    stop = threading.Event()
    counts: dict[str, int] = {}
    attacker = None
    if hostile is not None:
        rgb, seed = hostile
        attacker = threading.Thread(target=hostile_client, daemon=True,
                                    args=(target, rgb, max_points, stop, counts, threading.Lock(), seed))
        attacker.start()
        time.sleep(1.0)  # the attack is under way before the honest clients start
    logs, t0, t1 = run_clients(target, pairs, clicks, max_points, "hostile" if hostile else "calm")
    wall = t1 - t0
    stop.set()
    if attacker is not None:
        attacker.join(300)
    latencies = [v for log in logs for v in log.latencies]
    errors = [e for log in logs for e in log.errors]
    return {"honest_clicks": len(latencies), "click_phase_seconds": wall,
            "honest_clicks_per_second": len(latencies) / wall if wall > 0 else 0.0,
            "honest_click_latency": _percentiles(latencies), "honest_errors": len(errors),
            "honest_error_messages": errors[:20], "hostile_calls": dict(sorted(counts.items()))}


def run_hostile_bench(args: argparse.Namespace) -> int:
    """`histosam bench load --hostile`: ``--clients - 1`` honest clients clicking, first alone,
    then with one hostile client (the attacks of issue 22, 8 calls at a time) on the same
    server; the honest clients' p50/p99 of both runs side by side, as JSON and a table."""
    from histosam.backend.core.errors import InvalidInputError
    from histosam.backend.serving.client import SegmentationClient

    if args.clients < 2 or args.clicks < 1:
        raise InvalidInputError("--hostile needs --clients >= 2 (one of them hostile) and --clicks >= 1")
    pairs, source = load_pairs(args.clients, args.images, args.seed)
    honest, hostile_rgb = pairs[:-1], pairs[-1][1]
    server = ServerProcess(_hostile_argv(args, args.clients))
    try:
        target = server.wait_listening(600)
        with SegmentationClient(target, timeout=600) as probe:
            probe.wait_ready(600)
            deadline = time.monotonic() + 600
            while probe.health() != "SERVING":
                if time.monotonic() > deadline:
                    raise RuntimeError("the server never became ready")
                time.sleep(0.2)
            info = probe.info()
        max_points = int(info.limits.max_points)
        calm = _honest_phase(target, honest, args.clicks, max_points, None)
        calm["server_peak_rss_bytes"] = server.status_kib("VmHWM") * 1024
        attacked = _honest_phase(target, honest, args.clicks, max_points, (hostile_rgb, args.seed))
        attacked["server_peak_rss_bytes"] = server.status_kib("VmHWM") * 1024
        with SegmentationClient(target, timeout=60) as probe:
            after = probe.info()
    finally:
        server.stop()
    ratio = {k: attacked["honest_click_latency"][k] / calm["honest_click_latency"][k]
             for k in ("p50_ms", "p99_ms") if calm["honest_click_latency"][k] > 0}
    result: dict[str, Any] = {
        "bench": "load-hostile", "honest_clients": len(honest), "hostile_clients": 1,
        "clicks_per_client": args.clicks, "images": source, "model": info.default_model,
        "providers": list(info.providers), "server_threads": args.threads,
        "without_hostile": calm, "with_hostile": attacked, "honest_latency_ratio": ratio,
        "server_cache_used_bytes": int(after.cache_used_bytes), "server_session_bytes": int(after.session_bytes),
        "server_cache_budget_bytes": int(after.limits.cache_bytes),
        "cpu_count": os.cpu_count(), "machine": platform.platform(),
    }
    _write_json(args.out, result)
    _print_hostile(result, args.out)
    return 0 if calm["honest_errors"] == 0 and attacked["honest_errors"] == 0 else 1


def _print_hostile(r: dict[str, Any], out: Path) -> None:
    print(f"load bench, hostile: {r['honest_clients']} honest clients x {r['clicks_per_client']} clicks on {r['model']} "
          f"({', '.join(r['providers'])}), alone and beside 1 hostile client; {r['images']}")
    print(f"  {'':16} {'p50 ms':>9} {'p99 ms':>9} {'clicks/s':>9} {'errors':>7} {'peak RSS MiB':>13}")
    for label, key in (("without hostile", "without_hostile"), ("with hostile", "with_hostile")):
        run = r[key]
        lat = run["honest_click_latency"]
        print(f"  {label:16} {lat['p50_ms']:9.1f} {lat['p99_ms']:9.1f} {run['honest_clicks_per_second']:9.2f} "
              f"{run['honest_errors']:7d} {run['server_peak_rss_bytes'] / 2**20:13.0f}")
    ratio = r["honest_latency_ratio"]
    print(f"  {'ratio':16} {ratio.get('p50_ms', float('nan')):9.2f} {ratio.get('p99_ms', float('nan')):9.2f}")
    calls = r["with_hostile"]["hostile_calls"]
    print(f"  hostile calls   {sum(calls.values())}: " + ", ".join(f"{k} {v}" for k, v in calls.items()))
    print(f"  wrote {out}")
