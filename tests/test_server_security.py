"""Who may talk to the server and what it will touch: loopback by default, bearer tokens, TLS,
slide roots, request limits, and no unpickling anywhere on the serving path.
"""

from __future__ import annotations

import ast
import datetime
import ipaddress
import math
import os
import socket
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histosam.backend.core.errors import NotFoundError, PermissionDeniedError
from histosam.backend.serving.client import SegmentationClient
from histosam.backend.serving.image_sources import resolve_slide_path
from histosam.backend.serving.server import (
    SERVICE_NAME,
    SegmentationServer,
    ServerSettings,
    TokenInterceptor,
)
from histosam.v1 import segmentation_pb2 as pb
from histosam.v1 import segmentation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTOSAM_DATA") or REPO.parent / "shared" / "data")
BACKEND = REPO / "backend"


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


IMAGE = np.full((120, 160, 3), 220, np.uint8)
cv2.circle(IMAGE, (80, 60), 30, (90, 40, 140), -1)


def code_of(call, request, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=20, **kwargs)
    return info.value.code(), info.value.details()


# --------------------------------------------------------------------------- network


def _non_loopback_ipv4() -> str | None:
    """This machine's outward IPv4 address, if it has one (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_loopback_by_default(models):
    from histosam.backend.cli import build_parser
    from histosam.backend.cli.commands.serve import settings_from_args

    assert ServerSettings().host == "127.0.0.1"
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).host == "127.0.0.1"
    with SegmentationServer(ServerSettings(port=0, threads=1), models=models) as srv:
        assert srv.address.startswith("127.0.0.1:")
        other = _non_loopback_ipv4()
        if other is not None:  # reachable on loopback only, not on the machine's network address
            with socket.socket() as s:
                s.settimeout(5)
                assert s.connect_ex((other, srv.port)) != 0


# --------------------------------------------------------------------------- token


def test_every_rpc_but_health_needs_the_bearer_token(models, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("correct horse battery staple\n")
    settings = ServerSettings(port=0, threads=2, token_file=token_file)
    good = (("authorization", "Bearer correct horse battery staple"),)
    bad_metadata = [(), (("authorization", "Bearer wrong"),), (("authorization", "Basic correct horse battery staple"),),
                    (("authorization", "Bearer correct horse battery stapl"),),
                    (("authorization", "Bearer correct horse battery staple!"),)]
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        calls = [(stub.GetServerInfo, pb.GetServerInfoRequest()),
                 (stub.OpenImage, pb.OpenImageRequest(encoded_image=png(IMAGE))),
                 (stub.Click, pb.ClickRequest(session_id="x", points=[pb.Point(x=1, y=1, positive=True)])),
                 (stub.CloseImage, pb.CloseImageRequest(session_id="x"))]
        for call, request in calls:
            for metadata in bad_metadata:
                code, _ = code_of(call, request, metadata=metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED
        assert srv.servicer.cache.misses == 0  # nothing was decoded or encoded for them
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=png(IMAGE)), timeout=30, metadata=good).session_id
        reply = stub.Click(pb.ClickRequest(session_id=sid, points=[pb.Point(x=80, y=60, positive=True)]),
                           timeout=30, metadata=good)
        assert reply.num_points == 1
        with SegmentationClient(srv.address, token_file=token_file) as client:
            assert client.info().token_required


def test_the_token_is_compared_in_constant_time():
    """hmac.compare_digest, never ==: the source of the check says so, and it works."""
    source = ast.parse((BACKEND / "serving" / "server.py").read_text())
    interceptor = next(n for n in ast.walk(source) if isinstance(n, ast.ClassDef) and n.name == "TokenInterceptor")
    calls = {ast.unparse(n.func) for n in ast.walk(interceptor) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    compares = [n for n in ast.walk(interceptor) if isinstance(n, ast.Compare) and "_token" in ast.unparse(n)]
    assert not compares, [ast.unparse(n) for n in compares]
    check = TokenInterceptor("s3cret")
    assert check._valid([("authorization", "Bearer s3cret")])
    assert not check._valid([("authorization", "Bearer s3cre")]) and not check._valid(None)


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_with_a_self_signed_certificate(models, tmp_path):
    key, cert = _self_signed(tmp_path, "server")
    _, stranger = _self_signed(tmp_path, "stranger")
    token_file = tmp_path / "token"
    token_file.write_text("tls-and-token")
    settings = ServerSettings(port=0, threads=2, tls_cert=cert, tls_key=key, token_file=token_file)
    with SegmentationServer(settings, models=models) as srv:
        target = f"localhost:{srv.port}"
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(target, creds) as channel:
            stub = pb_grpc.SegmentationStub(channel)
            metadata = (("authorization", "Bearer tls-and-token"),)
            assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10, metadata=metadata).token_required
            code, _ = code_of(stub.GetServerInfo, pb.GetServerInfoRequest())
            assert code == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace the token
        with SegmentationClient(target, root_certificates=cert, token_file=token_file, timeout=10) as client:
            session = client.open_image(png(IMAGE))
            assert session.click([(80.0, 60.0)]).num_points == 1
        # Plaintext, and TLS trusting another certificate, both fail to connect.
        for channel in (grpc.insecure_channel(target),
                        grpc.secure_channel(target, grpc.ssl_channel_credentials(stranger.read_bytes()))):
            with channel:
                code, _ = code_of(pb_grpc.SegmentationStub(channel).GetServerInfo, pb.GetServerInfoRequest(),
                                  metadata=(("authorization", "Bearer tls-and-token"),))
                assert code == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------- slides and limits


@pytest.fixture
def slide_tree(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.svs").write_bytes(b"secret")
    (root / "sub" / "inside.svs").write_bytes(b"not really a slide")
    (root / "file_link.svs").symlink_to(outside / "secret.svs")
    (root / "dir_link").symlink_to(outside, target_is_directory=True)
    (root / "inner_link.svs").symlink_to(root / "sub" / "inside.svs")
    return root, outside


def test_slide_paths_are_confined_to_the_roots(slide_tree, models):
    root, outside = slide_tree
    escapes = ["../outside/secret.svs", "sub/../../outside/secret.svs", str(outside / "secret.svs"),
               f"{root}/../outside/secret.svs", "file_link.svs", "dir_link/secret.svs", "/etc/passwd",
               "sub/" + "../" * 40 + "etc/passwd"]
    for path in escapes:
        with pytest.raises(PermissionDeniedError):
            resolve_slide_path(path, [root])
    assert resolve_slide_path("sub/inside.svs", [root]) == (root / "sub" / "inside.svs").resolve()
    assert resolve_slide_path("inner_link.svs", [root]) == (root / "sub" / "inside.svs").resolve()
    with pytest.raises(NotFoundError):
        resolve_slide_path("sub/missing.svs", [root])
    with pytest.raises(PermissionDeniedError, match="--slide-root"):
        resolve_slide_path("sub/inside.svs", [])
    settings = ServerSettings(port=0, threads=2, slide_roots=(root,))
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        for path in escapes:
            region = pb.SlideRegion(slide_path=path, width=64, height=64)
            code, details = code_of(stub.OpenImage, pb.OpenImageRequest(slide_region=region))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "secret" not in details.replace(path, ""), details
        region = pb.SlideRegion(slide_path="inner_link.svs", width=64, height=64)
        code, _ = code_of(stub.OpenImage, pb.OpenImageRequest(slide_region=region))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # allowed, but it is no slide
        slides = DATA / "slides"
        real = sorted(slides.glob("*.svs")) if slides.is_dir() else []
        if real:  # a real slide in another root is outside this server's roots
            region = pb.SlideRegion(slide_path=str(real[0]), width=64, height=64)
            code, _ = code_of(stub.OpenImage, pb.OpenImageRequest(slide_region=region))
            assert code == grpc.StatusCode.PERMISSION_DENIED


def test_request_size_and_points_per_click_limits(models):
    settings = ServerSettings(port=0, threads=2, max_message_bytes=256 << 10, max_points=5, max_pixels=300 * 300)
    with SegmentationServer(settings, models=models) as srv, grpc.insecure_channel(
            srv.address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        limits = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).limits
        assert (limits.max_message_bytes, limits.max_points, limits.max_pixels) == (256 << 10, 5, 90000)
        code, _ = code_of(stub.OpenImage, pb.OpenImageRequest(encoded_image=os.urandom(300 << 10)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        sid = stub.OpenImage(pb.OpenImageRequest(encoded_image=png(IMAGE)), timeout=30).session_id
        point = pb.Point(x=80, y=60, positive=True)
        assert stub.Click(pb.ClickRequest(session_id=sid, points=[point] * 5), timeout=30).num_points == 5
        code, details = code_of(stub.Click, pb.ClickRequest(session_id=sid, points=[point] * 6))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 5" in details
        code, _ = code_of(stub.Click, pb.ClickRequest(session_id=sid, points=[point] * 30_000))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the message size, or the point limit
        polygon = pb.Polygon(exterior=[float(v) for v in range(40_000)])
        code, _ = code_of(stub.Click, pb.ClickRequest(session_id=sid, points=[point], mask_prompt_polygons=[polygon]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Click(pb.ClickRequest(session_id=sid, points=[point]), timeout=30).num_points == 1
        assert not math.isnan(limits.session_idle_seconds)


# --------------------------------------------------------------------------- no unpickling


def _python_files(root: Path) -> list[Path]:
    skip = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".ruff_cache"}
    return [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & skip)]


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_serving_path_never_unpickles():
    """ONNX only: no pickle-family import, no torch.load, no np.load(allow_pickle=True)."""
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal", "torch"}
    problems = []
    files = _python_files(BACKEND)
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in unpicklers]
        for call in _calls(tree):
            func = ast.unparse(call.func)
            if func.endswith(("torch.load", "pickle.load", "pickle.loads", "Unpickler")):
                problems.append(f"{path.name}:{call.lineno} calls {func}")
            if func.split(".")[-1] == "load" and func.split(".")[0] in ("np", "numpy"):
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in call.keywords):
                    problems.append(f"{path.name}:{call.lineno} np.load with allow_pickle")
    assert not problems, problems


def test_torch_load_everywhere_passes_weights_only_true():
    problems, seen = [], 0
    for path in _python_files(REPO):
        text = path.read_text(errors="replace")
        if "torch.load" not in text and "load(" not in text:
            continue
        for call in _calls(ast.parse(text, filename=str(path))):
            func = ast.unparse(call.func)
            if not (func == "torch.load" or (func == "load" and "from torch import load" in text)):
                continue
            seen += 1
            weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            if not _is_true(weights_only):
                problems.append(f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)}")
    assert seen > 0  # the scan does find the project's torch.load calls
    assert not problems, problems
