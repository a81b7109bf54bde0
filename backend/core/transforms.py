"""Pre- and post-processing shared by the PyTorch and the ONNX paths.

Written once, in numpy, so the two predictors cannot drift: the image is resized so its
longest side equals the model's input size (SAM's ResizeLongestSide), normalised, and padded
bottom/right to a square; point and box coordinates are scaled by the same factors; low-res
logits come back to the original image size by SAM's two-step bilinear upsampling
(to the padded input size, crop the padding, resize to the original size).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from histosam.backend.core.errors import InvalidInputError

LOW_RES = 256  # SAM's mask decoder always outputs 256x256 logits (4x the 64x64 embedding)


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size after resizing so the longest side is ``long_side`` (SAM's rounding).

    At least 1 pixel a side: past ~2 * long_side : 1 SAM's rounding gives the short side 0
    pixels, which no resize can produce (an 1100x2 image failed every open that way).
    """
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class ImageTransform:
    """The geometry and normalisation of one model's input.

    ``mean``/``std`` are per channel on the 0-255 scale (SAM: ImageNet statistics;
    LiteMedSAM: mean 0, std 255, i.e. RGB/255).

    ``mask_dilation`` calibrates a fine-tuned model's masks: its low-res logits are max-filtered
    over this many low-res pixels before the threshold (the shipped default's masks came out
    about one low-res pixel too small on its training sets; see its model card). The logits
    themselves, fed back as the next mask prompt, are never changed.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mask_dilation: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.mask_dilation, int) and 0 <= self.mask_dilation <= 8):
            raise InvalidInputError(f"mask_dilation must be an integer in 0..8 (low-res pixels), got {self.mask_dilation!r}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        return preprocess_shape(height, width, self.input_size)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB HxWx3 -> float32 (1, 3, S, S), resized, normalised, zero padded."""
        image = validate_rgb(image)
        h, w = image.shape[:2]
        nh, nw = self.resized_shape(h, w)
        # INTER_AREA when shrinking avoids aliasing on tissue texture; linear when enlarging.
        interp = cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_LINEAR
        resized = cv2.resize(image, (nw, nh), interpolation=interp).astype(np.float32)
        normed = (resized - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        padded = np.zeros((self.input_size, self.input_size, 3), np.float32)
        padded[:nh, :nw] = normed
        return np.ascontiguousarray(padded.transpose(2, 0, 1)[None])

    def apply_coords(self, coords: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(..., 2) x,y in original pixels -> x,y in the model's input frame."""
        h, w = original_hw
        nh, nw = self.resized_shape(h, w)
        out = np.asarray(coords, np.float32).copy()
        out[..., 0] *= nw / w
        out[..., 1] *= nh / h
        return out

    def apply_boxes(self, boxes: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(..., 4) x0,y0,x1,y1 -> the same in the model's input frame."""
        boxes = np.asarray(boxes, np.float32)
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_hw).reshape(boxes.shape)

    def logits_to_original(self, low_res: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(256, 256) low-res logits -> (H, W) float32 logits at the original size."""
        h, w = original_hw
        nh, nw = self.resized_shape(h, w)
        low_res = np.asarray(low_res, np.float32).reshape(LOW_RES, LOW_RES)
        up = cv2.resize(low_res, (self.input_size, self.input_size), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(up[:nh, :nw], (w, h), interpolation=cv2.INTER_LINEAR)

    def mask_from_logits(self, low_res: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """(256, 256) low-res logits -> the (H, W) bool mask a user gets (calibrated, see above)."""
        if self.mask_dilation:
            size = 2 * self.mask_dilation + 1
            low_res = cv2.dilate(np.asarray(low_res, np.float32).reshape(LOW_RES, LOW_RES), np.ones((size, size), np.uint8))
        return self.logits_to_original(low_res, original_hw) > 0

    def low_res_shape(self, height: int, width: int) -> tuple[int, int]:
        """The image's part (top-left) of the (256, 256) low-res frame; the rest is padding."""
        nh, nw = self.resized_shape(height, width)
        scale = LOW_RES / self.input_size
        return max(1, round(nh * scale)), max(1, round(nw * scale))

    def mask_to_low_res(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool mask -> (256, 256) float32 in {0, 1}, letterboxed like the image.

        Used for training targets and to turn an existing annotation into a mask prompt.
        """
        lh, lw = self.low_res_shape(*mask.shape[:2])
        small = cv2.resize(mask.astype(np.float32), (lw, lh), interpolation=cv2.INTER_AREA)
        out = np.zeros((LOW_RES, LOW_RES), np.float32)
        out[:lh, :lw] = small > 0.5
        return out


def mask_to_prompt_logits(mask: np.ndarray, transform: ImageTransform, scale: float = 8.0) -> np.ndarray:
    """An existing mask (H, W) as a low-res logit prompt: +scale inside, -scale outside."""
    low = transform.mask_to_low_res(mask)
    return (low * 2.0 - 1.0) * scale


def validate_rgb(image: np.ndarray) -> np.ndarray:
    """Accept HxW grey, HxWx3 RGB or HxWx4 RGBA uint8; return contiguous HxWx3 uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InvalidInputError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InvalidInputError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InvalidInputError(f"image is too small: {image.shape[1]}x{image.shape[0]}")
    return np.ascontiguousarray(image[..., :3])
