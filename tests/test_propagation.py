"""Click propagation: the model's mask as the prior of a click-seeded random walker."""

from __future__ import annotations

import numpy as np
import pytest

from histosam.backend.bundles.catalog import SERVED_PROPAGATION
from histosam.backend.bundles.onnx_predictor import OnnxPredictor
from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.core.predictor import Prediction
from histosam.backend.core.transforms import LOW_RES, ImageTransform
from histosam.backend.evaluation.metrics import iou
from histosam.backend.postprocess.propagation import (
    CORRECTION_COLUMNS,
    DEFAULT_CONFIG,
    ImageGraph,
    PropagatingPredictor,
    PropagationSettings,
    auto_propagates,
    click_ignored,
    model_confidence,
)

FRAME = ImageTransform(input_size=256, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))
H, W = 120, 200


def two_regions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy pink left part, purple right part split by a wavy border; and the left part's mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    left = xx < 90 + 12 * np.sin(yy / 9.0)
    img = np.where(left[..., None], np.array([225, 150, 190]), np.array([110, 60, 150])).astype(np.float64)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), left


def low_res_of(logits_full: np.ndarray) -> np.ndarray:
    """Full-size logits in the model's letterboxed (256, 256) frame (what a decoder returns)."""
    import cv2

    nh, nw = FRAME.resized_shape(H, W)
    out = np.full((LOW_RES, LOW_RES), -20.0, np.float32)
    out[:nh, :nw] = cv2.resize(logits_full.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out


def test_shipped_settings_load_and_bad_settings_are_one_clear_error(tmp_path):
    shipped = PropagationSettings.load()
    assert DEFAULT_CONFIG.is_file() and shipped == PropagationSettings.load(DEFAULT_CONFIG)
    assert 0 < shipped.gamma < 1 and shipped.working_side >= 64
    custom = tmp_path / "p.yaml"
    custom.write_text("gamma: 0.5\nworking_side: 64\n")
    assert PropagationSettings.load(custom) == PropagationSettings(gamma=0.5, working_side=64)
    for text, message in (("gama: 1\n", "unknown propagation setting"), ("beta: -1\n", "positive"),
                          ("beta: x\n", "must be a number"), ("- 1\n", "mapping"), ("a: [\n", "not valid YAML")):
        custom.write_text(text)
        with pytest.raises(InvalidInputError, match=message):
            PropagationSettings.load(custom)
    with pytest.raises(NotFoundError, match="cannot read"):
        PropagationSettings.load(tmp_path / "missing.yaml")


def test_an_undecided_model_lets_two_clicks_fill_their_colour_regions():
    img, left = two_regions()
    graph = ImageGraph.from_image(img, PropagationSettings())
    undecided = low_res_of(np.zeros((H, W)))
    mask = graph.refine(undecided, FRAME, np.array([[20.0, 60.0], [180.0, 60.0]]), np.array([1, 0]))
    assert mask.shape == (H, W)
    assert iou(mask, left) > 0.95  # each click spread over its own region, stopped at the colour edge
    # Swapping the labels swaps the answer.
    swapped = graph.refine(undecided, FRAME, np.array([[20.0, 60.0], [180.0, 60.0]]), np.array([0, 1]))
    assert iou(swapped, ~left) > 0.95


def test_the_mask_keeps_the_models_full_resolution_detail_on_a_coarse_walker_grid():
    img, left = two_regions()
    logits = np.where(left, 12.0, -12.0)  # a confident model that follows the wavy border exactly
    coarse = ImageGraph.from_image(img, PropagationSettings(working_side=40))  # 5x coarser than the image
    assert coarse.small_hw == (24, 40)
    mask = coarse.refine(low_res_of(logits), FRAME, np.array([[20.0, 60.0]]), np.array([1]))
    assert iou(mask, left) > 0.97  # the walker only adds its change: the border is the model's
    walker, _ = coarse.probability_change(low_res_of(logits), FRAME, np.array([[20.0, 60.0]]), np.array([1]))
    import cv2

    blocky = cv2.resize(walker, (W, H), interpolation=cv2.INTER_LINEAR) >= 0.5
    assert iou(mask, left) > iou(blocky, left)


def test_a_negative_click_spreads_within_its_colour_region_and_stops_at_the_edge():
    img, left = two_regions()
    graph = ImageGraph.from_image(img, PropagationSettings())
    # The model says "everything" with modest confidence; a negative click on the purple part.
    low = low_res_of(np.full((H, W), 2.0))
    mask = graph.refine(low, FRAME, np.array([[20.0, 60.0], [170.0, 90.0]]), np.array([1, 0]))
    assert not mask[90, 170] and mask[60, 20]
    removed = ~mask
    assert removed.sum() > 10 * np.pi * 5**2  # far more than the pinned 5-px disk
    assert (removed & left).sum() < 0.01 * left.sum()  # and not across the colour edge


def test_correction_spread_keeps_the_models_answer_where_no_click_disagrees():
    """spread "correction" moves the mask only where a click contradicts the model; "model" lets
    a click the model already obeys spread too (the walker re-decides the model's own edges)."""
    img, left = two_regions()
    yy, _ = np.mgrid[:H, :W]
    top = left & (yy < 60)  # the model, mildly sure, found only the top of the pink part
    low = low_res_of(np.where(top, 1.0, -1.0))
    agree = np.array([[20.0, 30.0]]), np.array([1])
    graph = ImageGraph.from_image(img, PropagationSettings())
    by_spread = {spread: graph.refine(low, FRAME, *agree, spread=spread) for spread in ("model", "correction")}
    assert iou(by_spread["correction"], top) > 0.98
    assert iou(by_spread["model"], top) < iou(by_spread["correction"], top) - 0.05
    # A correction click on the missed bottom spreads over the pink part, not across its edge.
    fixed = graph.refine(low, FRAME, np.array([[20.0, 30.0], [20.0, 100.0]]), np.array([1, 1]), spread="correction")
    added = fixed & ~top
    assert added[100, 20] and added.sum() > 5 * np.pi * 5**2  # far more than the clicked 5-px disk
    assert not (fixed & ~left).any()
    with pytest.raises(InvalidInputError, match="spread must be one of"):
        graph.refine(low, FRAME, *agree, spread="both")
    with pytest.raises(InvalidInputError, match="auto_when_sure must be one of"):
        PropagationSettings(auto_when_sure="never")


def test_correction_spread_factors_once_per_image_and_a_click_costs_one_cached_solve():
    img, left = two_regions()
    graph = ImageGraph.from_image(img, PropagationSettings())
    spread = graph.correction
    assert spread.factorisations == 1 and spread.solves == 0  # factored when the image was opened
    low = low_res_of(np.where(left, 1.0, -1.0))
    pts, labels = np.array([[20.0, 30.0], [180.0, 60.0], [20.0, 100.0]]), np.array([1, 0, 1])
    masks = [graph.refine(low, FRAME, pts[:k], labels[:k], spread="correction") for k in (1, 2, 3)]
    assert spread.solves == 3  # one new column per click; the earlier clicks' columns are reused
    again = graph.refine(low, FRAME, pts, labels, spread="correction")
    assert spread.solves == 3 and spread.factorisations == 1 and np.array_equal(again, masks[-1])
    # The cache is bounded, and its bound is counted in the image's bytes up front.
    for k in range(CORRECTION_COLUMNS + 5):
        graph.refine(low, FRAME, np.array([[5.0 + 2.5 * (k % 70), 5.0 + 20.0 * (k // 70)]]), np.array([1]),
                     spread="correction")
    assert len(spread._columns) == CORRECTION_COLUMNS
    # A prompt with more clicks than the cache holds re-solves only the clicks it could not keep.
    many = np.array([[5.0 + 5.0 * (k % 38), 110.0 - 10.0 * (k // 38)] for k in range(CORRECTION_COLUMNS + 4)])
    ones = np.ones(len(many), int)
    graph.refine(low, FRAME, many, ones, spread="correction")
    before = spread.solves
    graph.refine(low, FRAME, many, ones, spread="correction")
    assert spread.solves - before == 4
    assert graph.nbytes >= CORRECTION_COLUMNS * graph.small_hw[0] * graph.small_hw[1] * 4


def test_box_corners_and_padding_points_are_not_clicks():
    img, _ = two_regions()
    graph = ImageGraph.from_image(img, PropagationSettings())
    low = low_res_of(np.zeros((H, W)))
    pts = np.array([[20.0, 60.0], [0.0, 0.0], [199.0, 119.0], [0.0, 0.0]])
    with_extras = graph.refine(low, FRAME, pts, np.array([1, 2, 3, -1]))
    alone = graph.refine(low, FRAME, pts[:1], np.array([1]))
    assert np.array_equal(with_extras, alone)


def test_graph_of_a_large_image_is_built_on_a_small_copy():
    img = np.zeros((2000, 3000, 3), np.uint8)
    graph = ImageGraph.from_image(img, PropagationSettings(working_side=100))
    assert graph.small_hw == (67, 100) and graph.full_hw == (2000, 3000)
    assert graph.laplacian.shape == (6700, 6700) and graph.nbytes > 0


@pytest.mark.slow
def test_propagating_predictor_wraps_a_real_bundle(tiny_bundle):
    img, _ = two_regions()
    inner = OnnxPredictor.from_bundle(tiny_bundle, threads=1)
    wrapped = PropagatingPredictor(inner, PropagationSettings(), inner.transform)
    with pytest.raises(InvalidInputError, match="set_image"):
        wrapped.predict(points=np.array([[5.0, 5.0]]), labels=np.array([1]))
    wrapped.set_image(img)
    inner.set_image(img)
    pts, labels = np.array([[20.0, 60.0], [180.0, 60.0]]), np.array([1, 0])
    p = wrapped.predict(points=pts, labels=labels)
    q = inner.predict(points=pts, labels=labels)
    assert np.array_equal(p.low_res_logits, q.low_res_logits)  # the model's own state goes on
    graph = ImageGraph.from_image(img, PropagationSettings())
    assert np.array_equal(p.mask, graph.refine(q.low_res_logits, inner.transform, pts, labels))
    assert p.mask[60, 20] and not p.mask[60, 180]  # the clicks are obeyed whatever the random model says


class ScriptedModel:
    """A stand-in decoder whose answer depends only on how many points it gets: the auto rule's
    input (the first step's confidence) is then set by the test, not by a model's whims."""

    name = "scripted"

    def __init__(self, steps: list[np.ndarray]) -> None:
        self.steps, self.calls = steps, []

    def set_image(self, image: np.ndarray) -> None:
        self.calls.clear()

    def predict(self, points=None, labels=None, box=None, mask_logits=None) -> Prediction:
        n = len(points)
        self.calls.append(n)
        low = self.steps[min(n, len(self.steps)) - 1]
        return Prediction(mask=FRAME.logits_to_original(low, (H, W)) > 0, low_res_logits=low, iou=0.5)


def test_auto_propagates_an_image_the_model_is_unsure_of_decided_at_the_first_step():
    img, left = two_regions()
    unsure = low_res_of(np.where(left, 0.05, -0.05))  # coin flips: confidence ~0.01
    sure = low_res_of(np.where(left, 20.0, -20.0))
    assert model_confidence(unsure, FRAME, (H, W), 4.0) < 0.02
    assert model_confidence(sure, FRAME, (H, W), 4.0) > 0.95  # all but the interpolated border
    pts, labels = np.array([[20.0, 60.0], [180.0, 60.0]]), np.array([1, 0])
    graph = ImageGraph.from_image(img, PropagationSettings())
    def answer(low: np.ndarray, n: int, spreads: bool, when_sure: str) -> np.ndarray:
        """What auto should answer: the clicks spread with the model as prior (unsure), only the
        corrections spread (sure, shipped), or the model's own mask (sure, ``auto_when_sure: own``)."""
        if not spreads and when_sure == "own":
            return FRAME.logits_to_original(low, (H, W)) > 0
        return graph.refine(low, FRAME, pts[:n], labels[:n], spread="model" if spreads else "correction")

    for when_sure in ("correction", "own"):
        for first, then, spreads in ((unsure, sure, True), (sure, unsure, False)):
            model = ScriptedModel([first, then])
            auto = PropagatingPredictor(model, PropagationSettings(auto_when_sure=when_sure), FRAME, mode="auto")
            auto.set_image(img)
            one = auto.predict(points=pts[:1], labels=labels[:1])
            two = auto.predict(points=pts, labels=labels)
            # the first step decides for the image: a surer (or less sure) later answer does not switch it
            assert np.array_equal(two.mask, answer(then, 2, spreads, when_sure))
            assert np.array_equal(two.low_res_logits, then)
            assert np.array_equal(one.mask, answer(first, 1, spreads, when_sure))
            assert model.calls == [1, 2]  # the decision came from the answer already given

    model = ScriptedModel([unsure, sure])
    auto = PropagatingPredictor(model, PropagationSettings(), FRAME, mode="auto")
    auto.set_image(img)
    assert np.array_equal(auto.predict(points=pts, labels=labels).mask, graph.refine(sure, FRAME, pts, labels))
    assert model.calls == [2, 1]  # no first step seen for this image: it is answered to decide
    with pytest.raises(InvalidInputError, match="on or auto"):
        PropagatingPredictor(model, PropagationSettings(), FRAME, mode="off")
    with pytest.raises(InvalidInputError, match="propagation must be one of off, on, auto"):
        PropagatingPredictor(model, PropagationSettings(), FRAME, mode="sometimes")
    with pytest.raises(InvalidInputError, match="at most 1"):
        PropagationSettings(auto_confidence=1.5)


def test_auto_propagates_once_the_model_ignores_a_correction_click():
    """A confident wrong answer (issue 18): the model is sure of the whole image and stays so
    whatever the clicks say. Its confidence passes the first-step test, but the negative click
    it ignores switches the image to propagation from that click on, and for the session."""
    img, left = two_regions()
    everything = low_res_of(np.full((H, W), 20.0))  # confident, and wrong on the right part
    assert model_confidence(everything, FRAME, (H, W), 4.0) > 0.95
    pts = np.array([[20.0, 60.0], [180.0, 60.0], [30.0, 30.0]])
    labels = np.array([1, 0, 1])
    assert not click_ignored(everything, FRAME, (H, W), pts[0], 1)
    assert click_ignored(everything, FRAME, (H, W), pts[1], 0)  # the negative click is contradicted
    graph = ImageGraph.from_image(img, PropagationSettings())
    own = FRAME.logits_to_original(everything, (H, W)) > 0
    for ignored_needed, spreads_at in ((1, 2), (2, None), (0, None)):
        model = ScriptedModel([everything])
        settings = PropagationSettings(auto_ignored_clicks=ignored_needed, auto_when_sure="own")
        auto = PropagatingPredictor(model, settings, FRAME, mode="auto")
        auto.set_image(img)
        for n in (1, 2, 3):
            got = auto.predict(points=pts[:n], labels=labels[:n])
            spread = spreads_at is not None and n >= spreads_at
            want = graph.refine(everything, FRAME, pts[:n], labels[:n]) if spread else own
            assert np.array_equal(got.mask, want), (ignored_needed, n)
            assert np.array_equal(got.low_res_logits, everything)  # the model's own logits go on
        if spreads_at is not None:
            assert not got.mask[60, 180] and got.mask[60, 20]  # the walker obeys both clicks
        assert model.calls == [1, 2, 3]  # no step decoded twice to decide
    # Obeyed corrections are no evidence: a model that follows the click stays unspread.
    follows = low_res_of(np.where(left, 20.0, -20.0))
    model = ScriptedModel([everything, follows, follows])
    auto = PropagatingPredictor(model, PropagationSettings(), FRAME, mode="auto")
    auto.set_image(img)
    for n in (1, 2, 3):
        got = auto.predict(points=pts[:n], labels=labels[:n])
    assert np.array_equal(got.mask, FRAME.logits_to_original(follows, (H, W)) > 0)
    # The rule itself: unsure at the first step, or enough ignored clicks.
    s = PropagationSettings(auto_confidence=0.05, auto_ignored_clicks=2)
    assert auto_propagates(0.01, 0, s) and not auto_propagates(0.5, 1, s) and auto_propagates(0.5, 2, s)
    assert not auto_propagates(0.5, 9, PropagationSettings(auto_ignored_clicks=0))
    with pytest.raises(InvalidInputError, match="auto_ignored_clicks must be a positive number"):
        PropagationSettings.from_mapping({"auto_ignored_clicks": -1})


def test_click_ignored_reads_the_mask_a_user_sees():
    """The verdict uses the calibrated mask (the shipped model dilates by one low-res pixel):
    a positive click just outside the raw edge is obeyed, a negative one just inside is not."""
    _, left = two_regions()
    logits = low_res_of(np.where(left, 20.0, -20.0))
    dilated = ImageTransform(input_size=256, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0), mask_dilation=1)
    lh, lw = FRAME.low_res_shape(H, W)
    row = 30
    raw_edge = int(np.nonzero(logits[row, :lw] > 0)[0].max())  # last foreground low-res column
    x_out = (raw_edge + 1.5) * W / lw  # the centre of the first background column
    y = (row + 0.5) * H / lh
    assert click_ignored(logits, FRAME, (H, W), np.array([x_out, y]), 1)
    assert not click_ignored(logits, dilated, (H, W), np.array([x_out, y]), 1)
    assert click_ignored(logits, dilated, (H, W), np.array([x_out, y]), 0)
    assert not click_ignored(logits, FRAME, (H, W), np.array([np.nan, y]), 1)  # not a click


def test_serve_flags_and_config_file_turn_propagation_on(tmp_path):
    from histosam.backend.cli import build_parser
    from histosam.backend.cli.commands.serve import settings_from_args
    from histosam.backend.serving.server import ServerSettings

    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"])).propagation == SERVED_PROPAGATION
    assert settings_from_args(parser.parse_args(["serve", "--propagation", "off"])).propagation == "off"
    flagged = settings_from_args(parser.parse_args(["serve", "--propagation"]))
    assert flagged.propagation == "on" and flagged.propagation_config is None
    assert settings_from_args(parser.parse_args(["serve", "--propagation", "auto"])).propagation == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--propagation", "sometimes"])
    (tmp_path / "p.yaml").write_text("gamma: 0.01\n")
    (tmp_path / "serve.yaml").write_text("propagation: true\npropagation_config: p.yaml\n")
    from_file = settings_from_args(parser.parse_args(["serve", "--config", str(tmp_path / "serve.yaml")]))
    assert from_file.propagation == "on"
    assert from_file.propagation_config == tmp_path / "p.yaml"  # relative to the config file
    assert ServerSettings.from_mapping({"propagation": "auto"}).propagation == "auto"
    assert ServerSettings(propagation=False).propagation == "off"
    with pytest.raises(InvalidInputError, match="propagation must be one of off, on, auto"):
        ServerSettings.from_mapping({"propagation": "yes"})


def test_nested_dissection_order_solves_the_same_system_exactly():
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    from histosam.backend.postprocess.propagation import _laplacian, nested_dissection

    for h, w in ((1, 1), (2, 7), (5, 3), (37, 61), (160, 107)):
        order = nested_dissection(h, w)
        assert np.array_equal(np.sort(order), np.arange(h * w))  # a permutation of every pixel
    img, left = two_regions()
    settings = PropagationSettings(working_side=80)
    graph = ImageGraph.from_image(img, settings)
    low = low_res_of(np.where(left, 3.0, -3.0))
    pts, labels = np.array([[20.0, 60.0], [180.0, 60.0], [100.0, 100.0]]), np.array([1, 0, 1])
    walker, prior = graph.probability_change(low, FRAME, pts, labels)
    # The same system in natural order, solved by SuperLU's own ordering.
    import cv2

    hs, ws = graph.small_hw
    small = cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA)
    lap = _laplacian(cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float64), settings.beta)
    p = prior.astype(np.float64).ravel()
    weight = settings.gamma * np.abs(2 * p - 1) + 1e-4
    target = p.copy()
    pins = graph._pins(pts, labels).ravel()
    weight[pins >= 0], target[pins >= 0] = 1e4, pins[pins >= 0]
    reference = np.clip(spsolve((lap + sp.diags(weight)).tocsc(), weight * target), 0, 1)
    assert np.abs(walker.ravel() - reference).max() < 1e-5


def test_propagation_over_edge_snapping_snaps_only_the_masks_it_keeps():
    """As the server does it: a propagated mask is the walker's (never snapped, and no snap is
    computed for it); a mask auto leaves to the model (``auto_when_sure: own``) is the snapped one."""
    from histosam.backend.postprocess.edge_snap import EdgeSnappingPredictor, EdgeSnapSettings

    class CountingSnapper(EdgeSnappingPredictor):
        snaps = 0

        def snap(self, p, points, labels):
            CountingSnapper.snaps += 1
            return super().snap(p, points, labels)

    img, left = two_regions()
    follows = low_res_of(np.where(left, 20.0, -20.0))
    pts, labels = np.array([[20.0, 60.0], [180.0, 60.0]]), np.array([1, 0])
    snapper = CountingSnapper(ScriptedModel([follows]), EdgeSnapSettings())
    snapper.set_image(img)
    snapped = snapper.predict(points=pts, labels=labels).mask
    CountingSnapper.snaps = 0
    graph = ImageGraph.from_image(img, PropagationSettings())
    for mode, when_sure, want in (("on", "own", graph.refine(follows, FRAME, pts, labels)),
                                  ("auto", "correction", graph.refine(follows, FRAME, pts, labels, spread="correction")),
                                  ("auto", "own", snapped)):
        wrapped = PropagatingPredictor(CountingSnapper(ScriptedModel([follows]), EdgeSnapSettings()),
                                       PropagationSettings(auto_when_sure=when_sure), FRAME, mode=mode)
        wrapped.set_image(img)
        assert np.array_equal(wrapped.predict(points=pts, labels=labels).mask, want), (mode, when_sure)
    assert CountingSnapper.snaps == 1  # only the model's own mask, kept by auto, was snapped
