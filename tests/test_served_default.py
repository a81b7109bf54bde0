"""What a user gets from `histosam serve` with no options (issue 18): the shipped default model,
its edge snapping, and the served propagation default, as GetServerInfo reports them and as a
click through the server answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
from serve_helpers import startup_text

from histosam.backend.evaluation.clicker import next_click
from histosam.backend.evaluation.metrics import iou
from histosam.backend.postprocess.propagation import SERVED_DEFAULT
from histosam.backend.serving.client import SegmentationClient
from histosam.backend.serving.server import PROPAGATION_CHOICES, ServerSettings


@pytest.mark.slow
def test_serve_without_options_reports_and_applies_the_chosen_defaults(data_dir, tmp_path):
    pytest.importorskip("torch")  # the first start exports the default bundle
    assert ServerSettings().propagation == SERVED_DEFAULT
    proc = subprocess.Popen([sys.executable, "-m", "histosam.backend.cli", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        text = startup_text(proc, 600)  # a cold cache exports the bundle first
        assert "listening on 127.0.0.1:" in text, (text, proc.stderr.read() if proc.poll() is not None else "")
        assert f"click propagation {SERVED_DEFAULT} by default" in text
        address = text.split("listening on ")[1].split()[0]
        image = data_dir / "patches" / "bcss" / "images" / "bcss_1019_x512_y0.jpg"
        gt = cv2.imread(str(data_dir / "patches" / "bcss" / "masks" / "bcss_1019_x512_y0.png"), 0) > 127
        rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
        # The evaluator's stack for the served default: what `histosam evaluate --model default` measures.
        local = served_default_predictor()
        local.set_image(rgb)
        with SegmentationClient(address, timeout=120) as client:
            info = client.info()
            assert info.propagation_default == PROPAGATION_CHOICES[SERVED_DEFAULT]
            default = next(m for m in info.models if m.name == info.default_model)
            assert info.default_model == "lite_medsam_histo" and default.edge_snap
            session = client.open_image(image)
            clicks: list = []
            served = np.zeros_like(gt)
            previous = None
            for _ in range(4):  # RITM clicks on the served masks
                click = next_click(gt, served, np.zeros_like(gt))
                clicks.append((float(click.x), float(click.y), click.positive))
                reply = session.click(clicks, want_mask=True, min_area=0)
                served = reply.mask
                points = np.array([c[:2] for c in clicks])
                labels = np.array([int(c[2]) for c in clicks])
                # the evaluator feeds the model's previous logits back, as the server's history does
                mine = local.predict(points=points, labels=labels, mask_logits=previous)
                previous = mine.low_res_logits
                assert iou(served, mine.mask) > 0.99, len(clicks)
        proc.send_signal(signal.SIGTERM)  # once: a second signal after the server stopped is the default action
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def served_default_predictor():
    """The default bundle as `histosam evaluate --model default` wraps it (snapping, propagation)."""
    from histosam.backend.cli.commands.evaluate import load_onnx, with_propagation
    from histosam.backend.postprocess.edge_snap import EdgeSnappingPredictor, EdgeSnapSettings
    from histosam.backend.postprocess.propagation import PropagationSettings

    model = load_onnx("default")
    assert model.edge_snap
    snapped = EdgeSnappingPredictor(model, EdgeSnapSettings.load())
    if SERVED_DEFAULT == "off":
        return snapped
    return with_propagation(snapped, PropagationSettings.load(), SERVED_DEFAULT)
