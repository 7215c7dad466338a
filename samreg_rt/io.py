"""Reading images from disk into plain arrays, with typed errors that name the file."""
from __future__ import annotations

import io
import os
import struct
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
MAX_FILE_BYTES = 1 << 30  # an image file is read into memory whole: refuse larger files unread


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
    unreadable, too large or non-finite image; the size is read from the file's header and checked
    before the pixels are decoded, so a small file that would decode to a huge image (a
    decompression bomb) is refused without allocating it.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{p}: file is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise InputError(f"{p}: file of {size} bytes exceeds the limit of {MAX_FILE_BYTES} bytes")
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        array, spacing = _read_nifti_2d(p)
    else:
        array, spacing = _read_raster(p), None
    return Image(array=validate_image(array, str(p)), spacing=spacing, path=str(p))


def _read_raster(p: Path) -> np.ndarray:
    data = np.fromfile(p, dtype=np.uint8)
    size = raster_size(data)
    if size is not None:  # refuse before the decoder allocates anything
        _check_size(*size, str(p))
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
    img, zooms = open_nifti(p)
    shape = tuple(int(n) for n in img.shape)
    keep = [i for i, n in enumerate(shape) if n != 1]
    if len(keep) != 2:
        raise InputError(
            f"{p}: NIfTI has shape {shape}; a 2-D image needs exactly two non-singleton axes "
            "(use the volume path for 3-D)"
        )
    _check_size(shape[keep[0]], shape[keep[1]], str(p))  # from the header, before reading the data
    spacing = (float(zooms[keep[0]]), float(zooms[keep[1]]))
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{p}: pixel sizes (pixdim) {spacing} must be positive and finite")
    return np.squeeze(read_nifti_data(img, p)), spacing


def open_nifti(p: Path):
    """Open a NIfTI file without reading its data -> (nibabel image, voxel sizes as stored).

    The voxel sizes come from the header as written (nibabel's ``get_zooms`` turns a zero pixdim
    into 1 with only a log message, which would give a silently wrong spacing)."""
    import nibabel as nib

    try:
        img = nib.load(str(p))
        with nib.openers.ImageOpener(str(p)) as handle:
            raw = type(img.header).from_fileobj(handle, check=False)
        ndim = len(img.shape)
        zooms = tuple(float(z) for z in raw["pixdim"][1:ndim + 1])
    except Exception as exc:  # nibabel raises many exception types for corrupt or foreign files
        raise InputError(f"{p}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    return img, zooms


def read_nifti_data(img, p: Path) -> np.ndarray:
    """The data array of an image from ``open_nifti``; ``InputError`` naming the file when the
    data is truncated or unreadable."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # zlib, EOF and nibabel errors for truncated files
        raise InputError(f"{p}: cannot read NIfTI data ({type(exc).__name__}: {exc})") from None


def raster_size(data: np.ndarray) -> tuple[int, int] | None:
    """(H, W) from the header of an encoded raster image (PNG, JPEG, BMP, TIFF, ... via Pillow,
    which reads only the header), or None when the header is not understood (the decoder then
    decides; OpenCV itself refuses more than 2**30 pixels)."""
    from PIL import Image as PILImage

    limit = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None  # samreg-rt applies its own, lower limit to the size read here
    try:
        with PILImage.open(io.BytesIO(data.tobytes())) as img:
            width, height = img.size
        return int(height), int(width)
    except Exception:  # not a format Pillow knows (e.g. multi-channel float TIFF): use the TIFF tags
        return _tiff_size(data.tobytes())
    finally:
        PILImage.MAX_IMAGE_PIXELS = limit


def _tiff_size(raw: bytes) -> tuple[int, int] | None:
    """(H, W) from the first IFD of a classic TIFF (ImageLength 257, ImageWidth 256), else None."""
    if raw[:4] not in (b"II*\x00", b"MM\x00*") or len(raw) < 8:
        return None
    end = "<" if raw[:2] == b"II" else ">"
    (offset,) = struct.unpack(end + "I", raw[4:8])
    if offset + 2 > len(raw):
        return None
    (count,) = struct.unpack(end + "H", raw[offset:offset + 2])
    tags = {}
    for k in range(count):
        entry = raw[offset + 2 + 12 * k: offset + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(end + "HH", entry[:4])
        if tag in (256, 257):
            tags[tag] = struct.unpack(end + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
    return (tags[257], tags[256]) if len(tags) == 2 else None


def _check_size(h: int, w: int, name: str) -> None:
    if h < 2 or w < 2:
        raise InputError(f"{name}: image of {h}x{w} pixels is too small (at least 2x2)")
    if h * w > MAX_PIXELS:
        raise InputError(f"{name}: image of {h}x{w} pixels exceeds the limit of {MAX_PIXELS} pixels")


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
    _check_size(*array.shape[:2], name)
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
