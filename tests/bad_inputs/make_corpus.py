"""Generate the bad-input corpus into a folder and describe how each case must end.

Every case is made by code here (no binary files in git): broken and hostile images, NIfTI files,
labels, landmarks, model directories, correspondence files, pairs lists and command lines. A case
runs either a samreg-rt command line (``argv``, run through ``samreg_rt.cli.main``) or, where no
command reads that kind of input, the library function that loads it (``call``).

Outcomes: ``error`` (a typed ``SamregError``; a command exits non-zero; the message names the file
or argument and contains every string of ``needles``; ``out`` stays empty) or ``ok`` (a documented
graceful result, checked by ``check`` on the command's JSON output or the call's return value).

    .venv/bin/python -m tests.bad_inputs.make_corpus OUT_DIR

writes the files (without running the cases' ``prepare``) and lists the cases.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from samreg_rt import _ext

MODEL = "random_tiny"  # registry name every command uses (random_tiny_dir() makes sure it is cached)
HUGE = 20000  # px per side of the decompression-bomb images (4e8 pixels, far above io.MAX_PIXELS)
SIZE = (40, 48)  # (H, W) of the ordinary test images


@dataclass(frozen=True)
class Case:
    """One bad input and how samreg-rt must answer it (see the module docstring)."""

    name: str
    group: str
    expect: str
    needles: tuple[str, ...] = ()
    argv: tuple[str, ...] | None = None
    call: Callable[[], object] | None = None
    out: Path | None = None
    check: Callable[[object], None] | None = None
    prepare: Callable[[], object] | None = None


def random_tiny_dir() -> Path:
    """The ``random_tiny`` registry model in the samreg-rt cache (``SAMREG_RT_CACHE``), exported
    with fp32 graphs only when missing, so that ``--model random_tiny`` finds it."""
    from samreg_rt.models import cache_dir

    target = cache_dir() / "random_tiny"
    if not (target / "manifest.json").is_file():
        from samreg_export.export import export_model

        export_model("random:tiny", target, precisions=("fp32",), name="random_tiny")
    return target


# ------------------------------------------------------------------------------------ writers

def _texture(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Noise with a bright disc in the middle; uint8 of ``shape`` (H, W[, C])."""
    rng = np.random.default_rng(seed)
    img = (rng.random(shape) * 60).astype(np.uint8)
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    disc = (rows - shape[0] / 2) ** 2 + (cols - shape[1] / 2) ** 2 <= (min(shape[:2]) / 4) ** 2
    img[disc] = 200
    return img


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _encode(suffix: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(suffix, array)
    assert ok, suffix
    return buf.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit grey PNG of width x height, all zero, written row by row through zlib so that a
    20000 x 20000 image takes about 400 kB on disk (a decompression bomb). ``rows``: write only so
    many rows of pixel data (a header that promises more than the data holds)."""
    comp = zlib.compressobj(1)
    row = bytes(1 + width)
    idat, todo = [], height if rows is None else rows
    while todo > 0:
        n = min(todo, 1000)
        idat.append(comp.compress(row * n))
        todo -= n
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(idat))
            + _png_chunk(b"IEND", b""))


def _nifti(path: Path, array: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([1.5, 1.5, 4.0, 1.0]))
    img.to_filename(str(path))
    return path


def _patch_srow(path: Path, row: int, values: tuple[float, float, float, float]) -> Path:
    """Overwrite srow_x/y/z (row 0/1/2) of an uncompressed .nii header (sform stays in use)."""
    data = bytearray(path.read_bytes())
    data[280 + 16 * row: 296 + 16 * row] = struct.pack("<4f", *values)
    path.write_bytes(bytes(data))
    return path


def nifti_bomb(path: Path, dims: tuple[int, ...]) -> Path:
    """A .nii.gz whose header declares ``dims`` of uint8 zeros, gzip-streamed so the file stays
    small; reading the data would allocate prod(dims) bytes."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(dims)
    header.set_zooms((1.0,) * len(dims))
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(raw)
        total, chunk = int(np.prod(dims)), bytes(1 << 24)
        while total > 0:
            f.write(chunk[:min(total, len(chunk))])
            total -= len(chunk)
    return path


def _rehash(model: Path, role: str, data: bytes) -> None:
    """Replace a graph file and update its sha256 and size in the manifest (a consistent but
    wrong model)."""
    entry_file = json.loads((model / "manifest.json").read_text())["graphs"]["fp32"][role]["file"]
    (model / entry_file).write_bytes(data)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["graphs"]["fp32"][role].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (model / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(model: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((model / "manifest.json").read_text())
    edit(manifest)
    (model / "manifest.json").write_text(json.dumps(manifest))


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------ checks

def _embedded_shape(shape: list[int]) -> Callable[[object], None]:
    """Check of an ``embed`` summary: the one image loaded with this shape and encoded."""
    def check(summary: object) -> None:
        image = summary["images"][0]
        assert image["shape"] == shape, image
        assert image["embedding"][0] == 256, image
    return check


def _eval_dice_is_zero(summary: object) -> None:
    """Check of an ``eval`` run whose fixed label map is all background: the record is complete
    and the class that only the moving label holds scores Dice 0 (not an error, not NaN)."""
    results = json.loads((Path(summary["out"]) / "results.json").read_text())
    records = results["records"] if isinstance(results, dict) else results
    assert summary["failed"] == [] and len(records) == 1, summary
    assert records[0]["dice"] == 0.0 and records[0]["time_s"] is not None, records


# ------------------------------------------------------------------------------------ the corpus

def make_corpus(root: str | Path) -> list[Case]:
    """Write the cases' files under ``root`` and return the cases. Large files (decompression
    bombs) and spoiled model directories are written by each case's ``prepare``, just before it
    runs. Commands use the ``random_tiny`` registry model (see ``random_tiny_dir``)."""
    root = Path(root)
    img_dir, out_root = root / "images", root / "out"
    root.mkdir(parents=True, exist_ok=True)
    good = _write(img_dir / "good.png", _encode(".png", _texture(SIZE)))
    good_moving = _write(img_dir / "good_moving.png", _encode(".png", _texture(SIZE, seed=1)))
    cases: list[Case] = []

    def out(name: str) -> Path:
        return out_root / name

    # ---- images, through `samreg-rt embed` (load -> validate -> encode) and `register`
    png = _encode(".png", _texture(SIZE))
    jpg = _encode(".jpg", _texture(SIZE))
    images: dict[str, tuple[Path, str, tuple[str, ...] | list[int]]] = {
        "zero_bytes": (_write(img_dir / "zero.png", b""), "error", ("empty",)),
        "truncated_png": (_write(img_dir / "truncated.png", png[: len(png) // 2]), "error", ("cannot decode",)),
        "png_without_iend": (_write(img_dir / "no_iend.png", png[:-12]), "error", ("cannot decode",)),
        "truncated_jpeg": (_write(img_dir / "truncated.jpg", jpg[: len(jpg) // 2]), "error", ("cannot decode",)),
        "wrong_magic": (_write(img_dir / "text.png", b"this is not an image\n" * 20), "error", ("cannot decode",)),
        "html_as_jpeg": (_write(img_dir / "page.jpg", b"<html><body>404</body></html>"), "error", ("cannot decode",)),
        "one_pixel": (_write(img_dir / "one.png", _encode(".png", np.zeros((1, 1), np.uint8))), "error",
                      ("1x1", "too small")),
        "one_row": (_write(img_dir / "row.png", _encode(".png", np.zeros((1, 300), np.uint8))), "error",
                    ("too small",)),
        "zero_width_png": (_write(img_dir / "zero_width.png", png_bytes(0, 10)), "error", ()),
        "huge_png_bomb": (img_dir / "huge.png", "error", (f"{HUGE}x{HUGE}", "limit")),
        "huge_png_header_only": (_write(img_dir / "huge_header.png", png_bytes(HUGE, HUGE, rows=2)), "error",
                                 (f"{HUGE}x{HUGE}", "limit")),
        "float_tiff_nan": (_write(img_dir / "nan.tiff", _encode(".tiff", np.where(
            _texture(SIZE) > 100, np.nan, 1.0).astype(np.float32))), "error", ("NaN",)),
        "float_tiff_inf": (_write(img_dir / "inf.tiff", _encode(".tiff", np.where(
            _texture(SIZE) > 100, np.inf, 1.0).astype(np.float32))), "error", ("infinite",)),
        "truncated_bmp": (_write(img_dir / "truncated.bmp", _encode(".bmp", _texture(SIZE))[:200]), "error",
                          ("cannot decode",)),
        "directory_as_image": ((img_dir / "a_folder.png"), "error", ("no such file",)),
        "missing_file": ((img_dir / "does_not_exist.png"), "error", ("no such file",)),
        # documented graceful results: converted, never a silently wrong image
        "sixteen_bit_png": (_write(img_dir / "u16.png", _encode(".png", _texture(SIZE).astype(np.uint16) * 257)),
                            "ok", [*SIZE]),
        "float_tiff_finite": (_write(img_dir / "float.tiff", _encode(".tiff", _texture(SIZE).astype(np.float32) / 7)),
                              "ok", [*SIZE]),
        "rgba_png": (_write(img_dir / "rgba.png", _encode(".png", np.dstack([_texture((*SIZE, 3)),
                                                                             np.full(SIZE, 128, np.uint8)]))),
                     "ok", [*SIZE, 3]),
        "grey_alpha_png": (_grey_alpha(img_dir / "grey_alpha.png"), "ok", [*SIZE, 3]),
        "palette_png": (_palette(img_dir / "palette.png"), "ok", [*SIZE, 3]),
        "jpeg_named_png": (_write(img_dir / "really_a_jpeg.png", jpg), "ok", [*SIZE]),
        "constant_image": (_write(img_dir / "constant.png", _encode(".png", np.full(SIZE, 7, np.uint8))), "ok",
                           [*SIZE]),
    }
    (img_dir / "a_folder.png").mkdir(exist_ok=True)
    bombs = {"huge_png_bomb": lambda: _write(img_dir / "huge.png", png_bytes(HUGE, HUGE))}
    for name, (path, expect, extra) in images.items():
        if expect == "error":
            cases.append(Case(f"image/{name}", "image", "error", (path.name, *extra),
                              argv=("embed", str(path), "--model", MODEL), prepare=bombs.get(name)))
        else:
            cases.append(Case(f"image/{name}", "image", "ok", argv=("embed", str(path), "--model", MODEL),
                              check=_embedded_shape(list(extra))))
    for name in ("truncated_png", "huge_png_bomb", "float_tiff_nan"):
        path = images[name][0]
        cases.append(Case(f"register/{name}", "image", "error", (path.name,),
                          argv=("register", str(good), str(path), "--model", MODEL, "--points-per-side", "2",
                                "--out", str(out(name))), out=out(name), prepare=bombs.get(name)))

    # ---- NIfTI: 2-D slices through `embed`, volumes through `eval` (identity: no model needed)
    nii = root / "nifti"
    vol = _texture((24, 20, 6), seed=2).astype(np.int16)
    niftis = {
        "four_d": (_nifti(nii / "four_d.nii.gz", np.zeros((16, 16, 4, 3), np.int16)), ("4",)),
        "singular_affine": (_patch_srow(_patch_srow(_nifti(nii / "singular.nii", vol), 0, (1, 1, 0, 0)), 1,
                                        (1, 1, 0, 0)), ("singular",)),
        "nan_affine": (_patch_srow(_nifti(nii / "nan_affine.nii", vol), 0, (np.nan, 0, 0, 0)), ("affine",)),
        "inf_affine": (_patch_srow(_nifti(nii / "inf_affine.nii", vol), 2, (0, 0, 4.0, np.inf)), ("affine",)),
        "nan_voxels": (_nifti(nii / "nan_voxels.nii.gz", np.where(vol > 100, np.nan, 1.0).astype(np.float32)),
                       ("NaN",)),
        "truncated": (_write(nii / "truncated.nii.gz", (_nifti(nii / "whole.nii.gz", vol)).read_bytes()[:300]),
                      ("cannot read",)),
        "zero_pixdim": (_zero_pixdim(nii / "zero_pixdim.nii", vol), ("voxel sizes",)),
        "huge_volume_bomb": (nii / "huge3d.nii.gz", ("limit",)),
        "not_nifti": (_write(nii / "text.nii", b"plain text, not a NIfTI header\n" * 20), ("cannot read",)),
    }
    good_vol = _nifti(nii / "good.nii.gz", vol)
    for name, (path, extra) in niftis.items():
        case_dir = root / "eval3d" / name
        manifest = _data_manifest(case_dir, {"id": f"v_{name}", "application": "test", "dim": 3,
                                             "fixed": str(good_vol), "moving": str(path)})
        cases.append(Case(f"nifti3d/{name}", "nifti", "error", (path.name, *extra),
                          argv=("eval", str(manifest), "--methods", "identity", "--out", str(case_dir / "out")),
                          prepare=(lambda: nifti_bomb(nii / "huge3d.nii.gz", (HUGE, HUGE, 1)))
                          if name == "huge_volume_bomb" else None))
    slice_bomb = nii / "huge2d.nii.gz"
    for name, path, extra, prepare in (
            ("four_d_as_slice", niftis["four_d"][0], ("shape",), None),
            ("huge_slice_bomb", slice_bomb, (f"{HUGE}x{HUGE}", "limit"), lambda: nifti_bomb(slice_bomb, (HUGE, HUGE)))):
        cases.append(Case(f"nifti2d/{name}", "nifti", "error", (path.name, *extra),
                          argv=("embed", str(path), "--model", MODEL), prepare=prepare))
    slice2d = _nifti(nii / "slice.nii.gz", _texture(SIZE).astype(np.int16)[:, :, None])
    cases.append(Case("nifti2d/singleton_axis_slice", "nifti", "ok", argv=("embed", str(slice2d), "--model", MODEL),
                      check=_embedded_shape([*SIZE])))

    # ---- labels and landmarks, through `eval --methods identity` on a 2-D pair
    lab = root / "labels"
    mask = np.zeros(SIZE, np.uint8)
    mask[10:30, 12:36] = 1
    good_lab = _write(lab / "good_label.png", _encode(".png", mask))
    labels = {
        "wrong_shape": (_write(lab / "small_label.png", _encode(".png", mask[:30, :30])), "error", ("shape",)),
        "non_integer": (_write(lab / "float_label.tiff", _encode(".tiff", mask.astype(np.float32) * 0.5)), "error",
                        ("non-integer",)),
        "negative": (_write(lab / "negative_label.tiff", _encode(".tiff", mask.astype(np.float32) * -2)), "error",
                     ("negative",)),
        "zero_bytes": (_write(lab / "empty_file.png", b""), "error", ("empty",)),
        "no_foreground": (_write(lab / "all_background.png", _encode(".png", np.zeros(SIZE, np.uint8))), "ok", ()),
    }
    for name, (path, expect, extra) in labels.items():
        case_dir = root / "eval_labels" / name
        manifest = _data_manifest(case_dir, {"id": f"l_{name}", "application": "test", "dim": 2,
                                             "fixed": str(good), "moving": str(good_moving),
                                             "fixed_label": str(path), "moving_label": str(good_lab),
                                             "label_classes": {"1": "square"}})
        cases.append(Case(f"labels/{name}", "labels", expect, (path.name, *extra) if expect == "error" else (),
                          argv=("eval", str(manifest), "--methods", "identity", "--out", str(case_dir / "out")),
                          check=_eval_dice_is_zero if expect == "ok" else None))
    header = ["fixed_x", "fixed_y", "moving_x", "moving_y"]
    lm = root / "landmarks"
    landmarks = {
        "wrong_columns": (_csv(lm / "wrong_columns.csv", ["x1", "y1", "x2", "y2"], [[1, 2, 3, 4]]), ("fixed_x",)),
        "three_columns": (_csv(lm / "three_columns.csv", header[:3], [[1, 2, 3]]), ("moving_y",)),
        "nan": (_csv(lm / "nan.csv", header, [[1, 2, 3, 4], [5, "nan", 6, 7]]), ("row 2", "finite")),
        "out_of_image": (_csv(lm / "outside.csv", header, [[10, 10, 12, 11], [400, 10, 401, 12]]),
                         ("row 2", "outside")),
        "negative": (_csv(lm / "negative.csv", header, [[10, 10, 12, 11], [5, 5, -30, 5]]), ("row 2", "outside")),
        "header_only": (_csv(lm / "header_only.csv", header, []), ("no landmarks",)),
        "not_numbers": (_csv(lm / "words.csv", header, [["a", "b", "c", "d"]]), ("fixed_x",)),
        "zero_bytes": (_write(lm / "zero.csv", b""), ("fixed_x",)),
    }
    for name, (path, extra) in landmarks.items():
        case_dir = root / "eval_landmarks" / name
        manifest = _data_manifest(case_dir, {"id": f"k_{name}", "application": "test", "dim": 2,
                                             "fixed": str(good), "moving": str(good_moving),
                                             "landmarks": str(path)})
        cases.append(Case(f"landmarks/{name}", "landmarks", "error", (path.name, *extra),
                          argv=("eval", str(manifest), "--methods", "identity", "--out", str(case_dir / "out"))))

    # ---- model directories, through `samreg-rt embed --model DIR`: copies of the random_tiny
    # model, each spoiled in one way when its case runs (``prepare``)
    models = root / "models"
    for name, spoil, extra in MODEL_CASES:
        cases.append(Case(f"model/{name}", "model", "error", extra,
                          argv=("embed", str(good), "--model", str(models / name)),
                          prepare=_spoiled_model(models / name, spoil)))
    # A copy without int8 graphs: the cached random_tiny has them when another test exported it first.
    no_int8 = models / "missing_precision"
    cases.append(Case("model/missing_precision", "model", "error", ("manifest.json", "int8"),
                      argv=("embed", str(good), "--model", str(no_int8), "--precision", "int8"),
                      prepare=_spoiled_model(no_int8, lambda m: _edit_manifest(m, lambda d: d["graphs"].pop("int8", None)))))
    for name, argv, extra in (
            ("unknown_name", ("--model", "no_such_model"), ("no_such_model", "unknown model")),
            ("unknown_provider", ("--model", MODEL, "--provider", "quantum"), ("quantum", "not available"))):
        cases.append(Case(f"model/{name}", "model", "error", extra, argv=("embed", str(good), *argv)))

    # ---- correspondence files (no command reads them: Correspondence.load)
    cdir = root / "correspondence"
    good_corr = _correspondence(cdir / "good.npz")
    raw = good_corr.read_bytes()
    corr_cases = {
        "truncated": (_write(cdir / "truncated.npz", raw[: len(raw) // 2]), ("not a readable",)),
        "zero_bytes": (_write(cdir / "zero.npz", b""), ("not a readable",)),
        "not_zip": (_write(cdir / "text.npz", b"hello"), ("not a readable",)),
        "wrong_version": (_correspondence(cdir / "v99.npz", meta={"format_version": 99}), ("format_version 99",)),
        "pickled_object": (_pickled_npz(cdir / "pickled.npz"), ("not a readable",)),
        "pair_out_of_range": (_correspondence(cdir / "bad_pair.npz", pairs=np.array([[0, 5]])), ("does not exist",)),
        "wrong_mask_words": (_correspondence(cdir / "bad_masks.npz", words=7), ("masks",)),
        "missing_array": (_correspondence(cdir / "no_pairs.npz", drop="pairs"), ("pairs",)),
    }
    for name, (path, extra) in corr_cases.items():
        cases.append(Case(f"correspondence/{name}", "correspondence", "error", (path.name, *extra),
                          call=_loader(path)))

    # ---- pairs lists, through `samreg-rt register --pairs`
    pl = root / "pairs"
    fixed_rel, moving_rel = f"../images/{good.name}", f"../images/{good_moving.name}"
    lists = {
        "id_dot_dot": (_csv(pl / "dotdot.csv", ["fixed", "moving", "id"], [[fixed_rel, moving_rel, "../escape"]]),
                       ("'../escape'", "plain name")),
        "id_absolute": (_csv(pl / "absolute.csv", ["fixed", "moving", "id"], [[fixed_rel, moving_rel, "/tmp/x"]]),
                        ("'/tmp/x'", "plain name")),
        "id_dot": (_csv(pl / "dot.csv", ["fixed", "moving", "id"], [[fixed_rel, moving_rel, ".."]]),
                   ("'..'", "plain name")),
        "duplicate_ids": (_csv(pl / "dup.csv", ["fixed", "moving", "id"], [[fixed_rel, moving_rel, "a"]] * 2),
                          ("'a'", "unique")),
        "missing_column": (_csv(pl / "nomoving.csv", ["fixed", "id"], [[fixed_rel, "a"]]), ("fixed,moving",)),
        "short_row": (_write(pl / "short_row.csv", f"fixed,moving,id\n{fixed_rel}\n".encode()), ("row 1", "moving")),
        "empty_file": (_write(pl / "empty.csv", b""), ("fixed,moving",)),
        "binary_file": (_write(pl / "binary.csv", bytes(range(256)) * 4), ("pairs list",)),
    }
    for name, (path, extra) in lists.items():
        cases.append(Case(f"pairs/{name}", "pairs", "error", (path.name, *extra),
                          argv=("register", "--pairs", str(path), "--model", MODEL, "--out", str(out(name))),
                          out=out(name)))
    missing = _csv(pl / "missing_image.csv", ["fixed", "moving", "id"], [[fixed_rel, "../images/gone.png", "p1"]])
    cases.append(Case("pairs/missing_image", "pairs", "error", ("gone.png", "no such file"),
                      argv=("register", "--pairs", str(missing), "--model", MODEL, "--out",
                            str(out("missing_image"))), out=out("missing_image")))

    # ---- command-line arguments
    reg = ("register", str(good), str(good_moving), "--model", MODEL, "--points-per-side", "2")
    for name, argv, extra in (
            ("register_nothing", ("register", "--model", MODEL, "--out", "OUT"), ("FIXED MOVING",)),
            ("register_three_images", (*reg[:3], str(good), *reg[3:], "--out", "OUT"), ("3 paths",)),
            ("register_images_and_pairs", (*reg, "--pairs", str(pl / "dup.csv"), "--out", "OUT"),
             ("not both",)),
            ("points_per_side_zero", (*reg, "--points-per-side", "0", "--out", "OUT"),
             ("--points-per-side", "positive")),
            ("batch_size_negative", (*reg, "--batch-size", "-3", "--out", "OUT"),
             ("--batch-size", "positive")),
            ("threads_negative", (*reg, "--threads", "-1", "--out", "OUT"), ("--threads", "positive")),
            ("iou_thresh_nan", (*reg, "--pred-iou-thresh", "nan", "--out", "OUT"),
             ("--pred-iou-thresh", "nan")),
            ("prompt_not_numbers", (*reg, "--prompt", "a,b", "--out", "OUT"), ("'a,b'",)),
            ("prompt_three_numbers", (*reg, "--prompt", "1,2,3", "--out", "OUT"), ("x0,y0,x1,y1",)),
            ("prompt_outside_image", (*reg, "--prompt", "5000,5000", "--out", "OUT"),
             ("5000", "outside")),
            ("out_is_a_file", (*reg, "--out", str(good)), (good.name, "not a directory")),
            ("unknown_command", ("frobnicate",), ("frobnicate",)),
            ("unknown_preset", (*reg, "--preset", "fast", "--out", "OUT"), ("fast",))):
        target = None if name == "out_is_a_file" else out(name)
        cases.append(Case(f"cli/{name}", "cli", "error", extra, out=target,
                          argv=tuple(str(target) if a == "OUT" else a for a in argv)))
    return cases


def _graph(model: Path, role: str) -> Path:
    return model / json.loads((model / "manifest.json").read_text())["graphs"]["fp32"][role]["file"]


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _encoder(model: Path) -> str:
    """The encoder graph Engine.load reads first: random_tiny is a ViT, whose encoder runs as its parts around
    the native global attention on AVX-512 CPUs (samreg_rt.split_encoder) when its export has them."""
    graphs = json.loads((model / "manifest.json").read_text())["graphs"]["fp32"]
    return "encoder_part0" if _ext.mask_upscaling_isa() == "avx512" and "encoder_part0" in graphs else "encoder"


# name, how the copy is spoiled, what the message must contain
MODEL_CASES: list[tuple[str, Callable[[Path], object], tuple[str, ...]]] = [
    ("missing_file", lambda m: _graph(m, "encoder").unlink(), ("encoder.onnx", "missing")),
    ("truncated_graph", lambda m: _truncate(_graph(m, "decoder"), 1 / 3), ("decoder.onnx", "size")),
    ("truncated_graph_rehashed", lambda m: _rehash(m, "decoder", _graph(m, "decoder").read_bytes()[:5000]),
     ("decoder.onnx", "not a loadable ONNX graph")),
    ("sha256_mismatch", lambda m: _flip_byte(_graph(m, _encoder(m))), ("encoder", ".onnx", "sha256")),
    ("newer_format", lambda m: _edit_manifest(m, lambda d: d.update(format_version=d["format_version"] + 1)),
     ("manifest.json", "newer")),
    ("malformed_manifest", lambda m: (m / "manifest.json").write_text('{"format_version": 1, "graphs": '),
     ("manifest.json", "malformed JSON")),
    ("escaping_file_name",
     lambda m: _edit_manifest(m, lambda d: d["graphs"]["fp32"]["encoder"].update(file="../../etc/passwd")),
     ("manifest.json", "plain file name")),
    ("bad_spec", lambda m: _edit_manifest(m, lambda d: d["spec"].update(input_size="big")), ("manifest.json", "spec")),
    ("wrong_input_names", lambda m: _rename_encoder_input(m), ("encoder", ".onnx", "'image'")),
    ("no_manifest", lambda m: (m / "manifest.json").unlink(), ("no_manifest", "not a model")),
]


def _spoiled_model(target: Path, spoil: Callable[[Path], object]) -> Callable[[], object]:
    """A ``prepare`` that copies the random_tiny model to ``target`` and spoils the copy."""
    def prepare() -> Path:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(random_tiny_dir(), target, ignore=shutil.ignore_patterns("trt_cache"))
        spoil(target)
        return target
    return prepare


def _grey_alpha(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_texture(SIZE)).convert("LA").save(path)
    return path


def _palette(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_texture((*SIZE, 3))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    return path


def _zero_pixdim(path: Path, vol: np.ndarray) -> Path:
    _nifti(path, vol)
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path.write_bytes(bytes(data))
    return path


def _rename_encoder_input(model: Path) -> None:
    import onnx

    role = _encoder(model)
    role_file = json.loads((model / "manifest.json").read_text())["graphs"]["fp32"][role]["file"]
    graph = onnx.load(str(model / role_file))
    old = graph.graph.input[0].name
    graph.graph.input[0].name = "pixels"
    for node in graph.graph.node:
        node.input[:] = ["pixels" if i == old else i for i in node.input]
    _rehash(model, role, graph.SerializeToString())


def _data_manifest(case_dir: Path, pair: dict) -> Path:
    case_dir.mkdir(parents=True, exist_ok=True)
    path = case_dir / "manifest.json"
    path.write_text(json.dumps({"pairs": [pair]}))
    return path


def _correspondence(path: Path, meta: dict | None = None, pairs: np.ndarray | None = None,
                    words: int | None = None, drop: str | None = None) -> Path:
    """A small valid correspondence file, optionally spoiled: other meta values, other pairs, a
    wrong number of mask words, or one array left out."""
    from samreg_rt.correspondence import FORMAT_VERSION

    info = {"format_version": FORMAT_VERSION, "params": {}, "model": {}}
    for side in ("fixed", "moving"):
        info[side] = {"work_shape": [8, 8], "original_shape": [8, 8], "spacing": None, "path": ""}
    info.update(meta or {})
    arrays = {"meta": np.frombuffer(json.dumps(info).encode(), np.uint8),
              "fixed_masks": np.ones((2, words or 1), np.uint64), "moving_masks": np.ones((2, 1), np.uint64),
              "pairs": np.array([[0, 1], [1, 0]], np.int64) if pairs is None else pairs.astype(np.int64),
              "similarity": np.ones(2 if pairs is None else len(pairs), np.float32)}
    arrays.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _pickled_npz(path: Path) -> Path:
    """An .npz whose ``pairs`` is an object array (a pickle): loading must not unpickle it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, meta=np.frombuffer(b"{}", np.uint8), pairs=np.array([{"x": 1}], dtype=object))
    return path


def _loader(path: Path) -> Callable[[], object]:
    def load() -> object:
        from samreg_rt.correspondence import Correspondence

        return Correspondence.load(path)
    return load


def main(argv: list[str]) -> int:
    """Write the corpus into argv[0] and list the cases."""
    if len(argv) != 1:
        print(__doc__)
        return 2
    cases = make_corpus(argv[0])
    for case in cases:
        print(f"{case.name:45s} {case.expect:6s} {' | '.join(case.needles)}")
    print(f"{len(cases)} cases in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
