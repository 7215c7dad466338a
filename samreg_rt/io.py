"""Reading images from disk into plain arrays, with typed errors that name the file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .errors import InputError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_PIXELS = 64_000_000  # refuse before decoding anything larger (about 8000 x 8000)


@dataclass(frozen=True)
class Image:
    """A 2-D image as loaded.

    array: HxW (grey) or HxWx3 (RGB), any real dtype, finite.
    spacing: (row, column) pixel size in mm, or None when the file has none.
    path: the file it came from ('' for arrays).
    """

    array: np.ndarray
    spacing: tuple[float, float] | None
    path: str


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_image(path: str | os.PathLike) -> Image:
    """Load a PNG/JPEG/TIFF/BMP image or a 2-D NIfTI slice.

    Colour images come back as RGB (alpha dropped), palette images as RGB, 16-bit and float
    images keep their dtype. Raises ``InputError`` naming the file for a missing, empty,
    unreadable, too large or non-finite image.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty (0 bytes)")
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        array, spacing = _read_nifti_2d(p)
    else:
        array, spacing = _read_raster(p), None
    return Image(array=validate_image(array, str(p)), spacing=spacing, path=str(p))


def _read_raster(p: Path) -> np.ndarray:
    data = np.fromfile(p, dtype=np.uint8)
    try:
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise InputError(f"{p}: cannot decode image ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if array is None:
        raise InputError(f"{p}: cannot decode image (not a supported format, or truncated)")
    if array.ndim == 3:
        channels = array.shape[2]
        if channels == 4:
            array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
        elif channels == 3:
            array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
        elif channels == 1:
            array = array[..., 0]
        else:
            raise InputError(f"{p}: {channels}-channel image is not supported (1, 3 or 4 channels)")
    return array


def _read_nifti_2d(p: Path) -> tuple[np.ndarray, tuple[float, float]]:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many exception types for corrupt files
        raise InputError(f"{p}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    squeezed = np.squeeze(array)
    if squeezed.ndim != 2:
        raise InputError(
            f"{p}: NIfTI has shape {array.shape}; a 2-D image needs exactly two non-singleton axes "
            "(use the volume path for 3-D)"
        )
    zooms = img.header.get_zooms()
    keep = [i for i, n in enumerate(array.shape) if n != 1][:2]
    spacing = (float(zooms[keep[0]]), float(zooms[keep[1]]))
    return squeezed, spacing


def validate_image(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Check an image array and bring it to HxW or HxWx3.

    Accepts HxW, HxWx1, HxWx3 and HxWx4 (alpha dropped), bool/integer/float dtypes.
    Raises ``InputError`` naming ``name`` for wrong rank, empty or 1-pixel images, too many pixels,
    complex or object dtypes, and NaN/inf values.
    """
    array = np.asarray(array)
    if array.dtype == object or np.iscomplexobj(array) or array.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., 0] if array.shape[2] == 1 else array[..., :3]
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[2] == 3):
        raise InputError(f"{name}: expected an HxW or HxWxC image, got shape {array.shape}")
    h, w = array.shape[:2]
    if h < 2 or w < 2:
        raise InputError(f"{name}: image of {h}x{w} pixels is too small (at least 2x2)")
    if h * w > MAX_PIXELS:
        raise InputError(f"{name}: image of {h}x{w} pixels exceeds the limit of {MAX_PIXELS} pixels")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{name}: image contains NaN or infinite values")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return array


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path`` and move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
