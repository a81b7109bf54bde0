"""Classical click-based segmenters to compare learned models against: GrabCut, random walker.

Both implement the ``Predictor`` protocol so the evaluator treats them exactly like SAM. They
ignore ``mask_logits`` (SAM's letterboxed low-res frame means nothing to them) and instead keep
their own previous mask, keyed by the image (reset on ``set_image``) and by the click sequence
(reused only when the new clicks extend the previous call's clicks). They return
``low_res_logits`` of SAM's shape computed from their mask (+8 inside, -8 outside, letterboxed
like a 1024 input), so anything downstream that expects them works; ``iou`` is NaN (they have
no quality estimate).

They are meant to be honest references, reasonable rather than crippled:
* clicks are disks of hard seeds (radius 5 px at full resolution, RITM's click radius);
* both work on a copy downscaled to a longest side of 160 px. On H&E, pixel-level colour is
  dominated by nuclei and cytoplasm texture, not by the tumour/stroma region, and averaging
  4x4 pixels makes region colour usable; it also makes them interactive (a few hundred ms per
  click). The mask is upsampled bilinearly to full size and thresholded at 0.5.
The settings were chosen on four ocdc and four glas patches among a handful of alternatives
(working size 160/256, Gaussian pre-blur, click influence radius, background fallbacks) for the
best mIoU over ten clicks on both sets; they are constructor arguments, not hidden constants.
"""

from __future__ import annotations

import cv2
import numpy as np

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.core.predictor import Prediction
from histosam.backend.core.transforms import ImageTransform, mask_to_prompt_logits, validate_rgb
from histosam.backend.core.working_grid import WorkingGrid

# Only the letterbox geometry matters for the logits (mean/std are unused): a SAM-style
# 1024 input gives the same (256, 256) frame every learned model in this project uses.
_LOGIT_FRAME = ImageTransform(input_size=1024, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _parse_clicks(
    points: np.ndarray | None, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float x,y and (N,) bool positive; only labels 0/1 are clicks."""
    if points is None or labels is None:
        raise InvalidInputError("the baselines need at least one click (points and labels)")
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    lbl = np.asarray(labels).reshape(-1)
    if len(pts) != len(lbl):
        raise InvalidInputError(f"{len(pts)} points but {len(lbl)} labels")
    if not np.all(np.isfinite(pts)):
        raise InvalidInputError("a point has a non-finite coordinate")
    keep = (lbl == 0) | (lbl == 1)
    if not keep.any():
        raise InvalidInputError("the baselines need at least one positive or negative click")
    return pts[keep], lbl[keep] == 1


class _ClickBaseline:
    """Shared plumbing: downscaled working copy, click disks, previous mask, outputs."""

    name = "baseline"

    def __init__(self, max_side: int, click_radius: float) -> None:
        if max_side < 16:
            raise InvalidInputError(f"max_side must be at least 16, got {max_side}")
        self.max_side = max_side
        self.click_radius = click_radius
        self._image: np.ndarray | None = None
        self._small: np.ndarray | None = None
        self._grid: WorkingGrid | None = None
        self._prev_clicks: np.ndarray | None = None  # (N, 3) x, y, label of the last call
        self._prev_small_mask: np.ndarray | None = None

    # -- working copy ---------------------------------------------------------------------

    def set_image(self, image: np.ndarray) -> None:
        image = validate_rgb(image)
        self._grid = WorkingGrid.for_size(image.shape[0], image.shape[1], self.max_side)
        self._small = self._grid.shrink(image).copy()  # its own copy: subclasses may work on it in place
        self._image = image
        self._prev_clicks = None
        self._prev_small_mask = None
        self._prepare(self._small)

    def _prepare(self, small: np.ndarray) -> None:
        """Per-image work of the subclass (colour conversion), done once per image."""

    def _to_small(self, x: float, y: float) -> tuple[int, int]:
        """Full-resolution pixel index -> pixel index in the working copy (x, y)."""
        assert self._grid is not None
        return self._grid.pixel(x, y)

    # -- seeds ----------------------------------------------------------------------------

    def _seeds(
        self, pts: np.ndarray, positive: np.ndarray, box: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bool maps (working frame) of sure foreground and sure background.

        Each click is a disk; a later click wins where disks overlap (it is a correction).
        Outside a given box is sure background (GrabCut's rectangle semantics).
        """
        assert self._small is not None
        hs, ws = self._small.shape[:2]
        fg = np.zeros((hs, ws), np.uint8)
        bg = np.zeros((hs, ws), np.uint8)
        assert self._grid is not None
        r = self._grid.radius(self.click_radius)
        for (x, y), pos in zip(pts, positive, strict=True):
            centre = self._to_small(x, y)
            cv2.circle(fg, centre, r, 1 if pos else 0, -1)
            cv2.circle(bg, centre, r, 0 if pos else 1, -1)
        if box is not None:
            sx, sy = self._grid.scale_xy
            b = np.asarray(box, np.float64).reshape(4) * (sx, sy, sx, sy)
            if not np.all(np.isfinite(b)):
                raise InvalidInputError("box has a non-finite coordinate")
            x0, x1 = sorted((int(np.floor(b[0])), int(np.ceil(b[2]))))
            y0, y1 = sorted((int(np.floor(b[1])), int(np.ceil(b[3]))))
            outside = np.ones((hs, ws), bool)
            outside[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = False
            bg[outside & (fg == 0)] = 1
        return fg.astype(bool), bg.astype(bool)

    def _previous_mask(self, clicks: np.ndarray) -> tuple[np.ndarray | None, int]:
        """(last mask, number of clicks it saw) if these clicks extend the last call's."""
        prev = self._prev_clicks
        if prev is None or self._prev_small_mask is None or len(prev) > len(clicks):
            return None, 0
        if not np.array_equal(prev, clicks[: len(prev)]):
            return None, 0
        return self._prev_small_mask, len(prev)

    # -- prediction -----------------------------------------------------------------------

    def _segment_small(
        self,
        fg: np.ndarray,
        bg: np.ndarray,
        prev: np.ndarray | None,
        new_clicks: list[tuple[tuple[int, int], bool]],
    ) -> np.ndarray:
        """The bool mask in the working frame. ``new_clicks``: ((x, y), positive) not yet
        reflected in ``prev`` (all clicks when ``prev`` is None)."""
        raise NotImplementedError

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_logits: np.ndarray | None = None,
    ) -> Prediction:
        if self._image is None or self._small is None:
            raise InvalidInputError("set_image must be called before predict")
        pts, positive = _parse_clicks(points, labels)
        clicks = np.column_stack([pts, positive.astype(np.float64)])
        fg, bg = self._seeds(pts, positive, box)
        prev, seen = self._previous_mask(clicks)
        new_clicks = [
            (self._to_small(x, y), bool(p))
            for (x, y), p in zip(pts[seen:], positive[seen:], strict=True)
        ]
        small_mask = self._segment_small(fg, bg, prev, new_clicks)
        self._prev_clicks, self._prev_small_mask = clicks, small_mask
        h, w = self._image.shape[:2]
        if small_mask.shape != (h, w):
            soft = cv2.resize(small_mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            mask = soft > 0.5
        else:
            mask = small_mask.copy()
        low_res = mask_to_prompt_logits(mask, _LOGIT_FRAME).astype(np.float32)
        return Prediction(mask=mask, low_res_logits=low_res, iou=float("nan"))


class GrabCutPredictor(_ClickBaseline):
    """GrabCut (Rother et al. 2004, ``cv2.grabCut`` in mask mode) seeded by clicks.

    Recipe, on the working copy (longest side ``max_side`` = 160), Gaussian-blurred with
    sigma ``blur`` = 1.5 px so the colour models see regions rather than nuclei:
    1. start label map: the previous mask of this click sequence as probable foreground /
       probable background; before any mask exists, everything is probable background;
    2. around each click not yet reflected in that mask, a disk of radius ``influence`` (0.2)
       times the longest side becomes probable foreground (positive click) or probable
       background (negative): a click says "the object (or not) is around here", which plays
       the role of GrabCut's rectangle and gives each colour model enough pixels to start;
    3. positive click disks are sure foreground, negative click disks sure background, outside
       a box (if given) sure background;
    4. ``iterations`` (5) rounds of colour-GMM fitting + graph cut (``GC_INIT_WITH_MASK``);
       the mask is sure + probable foreground.
    """

    name = "grabcut"

    def __init__(
        self,
        max_side: int = 160,
        click_radius: float = 5.0,
        iterations: int = 5,
        influence: float = 0.2,
        blur: float = 1.5,
    ) -> None:
        super().__init__(max_side, click_radius)
        self.iterations = iterations
        self.influence = influence
        self.blur = blur
        self._bgr: np.ndarray | None = None

    def _prepare(self, small: np.ndarray) -> None:
        bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        self._bgr = cv2.GaussianBlur(bgr, (0, 0), self.blur) if self.blur > 0 else bgr

    def _segment_small(
        self,
        fg: np.ndarray,
        bg: np.ndarray,
        prev: np.ndarray | None,
        new_clicks: list[tuple[tuple[int, int], bool]],
    ) -> np.ndarray:
        assert self._bgr is not None
        labels = np.full(fg.shape, cv2.GC_PR_BGD, np.uint8)
        if prev is not None:
            labels[prev] = cv2.GC_PR_FGD
        if self.influence > 0:
            r = max(1, round(self.influence * max(fg.shape)))
            for centre, pos in new_clicks:
                cv2.circle(labels, centre, r, int(cv2.GC_PR_FGD if pos else cv2.GC_PR_BGD), -1)
        labels[bg] = cv2.GC_BGD
        labels[fg] = cv2.GC_FGD
        is_bg = (labels == cv2.GC_BGD) | (labels == cv2.GC_PR_BGD)
        if not is_bg.any():
            return np.ones(fg.shape, bool)  # no background pixel left to model
        if is_bg.all():
            return np.zeros(fg.shape, bool)
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        cv2.grabCut(self._bgr, labels, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


class RandomWalkerPredictor(_ClickBaseline):
    """Random walker (Grady 2006, ``skimage.segmentation.random_walker``) seeded by clicks.

    Recipe, on the working copy (longest side ``max_side`` = 160) in CIELAB, so edge weights
    follow perceived colour differences:
    1. positive click disks are foreground seeds, negative click disks background seeds,
       outside a box (if given) background seeds;
    2. the probability that a walker from each pixel first reaches a foreground seed is solved
       exactly (``mode="bf"``, a direct sparse solve: the iterative modes stop early on these
       ill-conditioned systems and leave both probabilities near 0 far from the seeds),
       ``beta`` = 130 (skimage's default; skimage scales it by the data's spread);
    3. a pixel is foreground when that probability is >= the background one.
    With positive clicks only there is a single label, and every walker reaches a foreground
    seed: the whole image is foreground, as in the method's definition (the first negative
    click then starts the competition). No border or size prior is assumed, since tumour
    regions often fill most of a patch. The previous mask is not used: the random walker is a
    global function of the seeds, and a prior would only lock in its earlier errors.
    """

    name = "random_walker"

    def __init__(
        self, max_side: int = 160, click_radius: float = 5.0, beta: float = 130.0, mode: str = "bf"
    ) -> None:
        super().__init__(max_side, click_radius)
        self.beta = beta
        self.mode = mode
        self._lab: np.ndarray | None = None

    def _prepare(self, small: np.ndarray) -> None:
        self._lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float64)

    def _segment_small(
        self,
        fg: np.ndarray,
        bg: np.ndarray,
        prev: np.ndarray | None,
        new_clicks: list[tuple[tuple[int, int], bool]],
    ) -> np.ndarray:
        from skimage.segmentation import random_walker

        assert self._lab is not None
        bg = bg & ~fg
        if not bg.any():
            return np.ones(fg.shape, bool)
        if not fg.any():
            return np.zeros(fg.shape, bool)
        seeds = np.zeros(fg.shape, np.int32)
        seeds[fg] = 1
        seeds[bg] = 2
        prob = random_walker(
            self._lab, seeds, beta=self.beta, mode=self.mode, channel_axis=-1,
            return_full_prob=True,
        )
        return prob[0] >= prob[1]


BASELINES: dict[str, type[_ClickBaseline]] = {
    "grabcut": GrabCutPredictor,
    "random_walker": RandomWalkerPredictor,
}
