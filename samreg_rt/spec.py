"""Model spec: what the runtime must know about a model to feed and read its graphs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RESIZE_MODES = ("longest_side", "stretch")
NORMALIZATIONS = ("imagenet", "minmax", "unit")
PROMPT_KINDS = ("points", "boxes")
MASK_OUTPUTS = ("multimask", "single")

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelSpec:
    """Preprocessing, prompting and default thresholds of one model.

    ``input_size`` is S of the square model frame (1024 for SAM ViT, 256 for LiteMedSAM).
    ``resize``: ``longest_side`` scales the longest side to S and zero-pads bottom/right;
    ``stretch`` resizes both sides to S (aspect ratio lost).
    ``normalization``: ``imagenet`` = (x - pixel_mean) / pixel_std on 0..255 values;
    ``minmax`` = (x - min) / (max - min) per image; ``unit`` = x / 255 when max > 1.
    ``prompt_kind`` and ``mask_output`` say how automatic mask generation prompts the decoder
    (point grid + multimask outputs for SAM; box grid + single-mask output for box-trained models);
    ``points_per_side`` (grid centres per side) and ``box_sizes`` (box sides as fractions of the
    image side, boxes only) are its default grid.
    """

    name: str
    arch: str
    input_size: int
    resize: str = "longest_side"
    normalization: str = "imagenet"
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    prompt_kind: str = "points"
    mask_output: str = "multimask"
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    mask_threshold: float = 0.0
    points_per_side: int = 32
    box_sizes: tuple[float, ...] = (0.1, 0.2, 0.4)
    embedding_size: int = 64
    trained: bool = True

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("resize", self.resize, RESIZE_MODES),
            ("normalization", self.normalization, NORMALIZATIONS),
            ("prompt_kind", self.prompt_kind, PROMPT_KINDS),
            ("mask_output", self.mask_output, MASK_OUTPUTS),
        ):
            if value not in allowed:
                raise ValueError(f"model spec {self.name!r}: {field}={value!r}, expected one of {allowed}")
        if self.input_size <= 0 or self.input_size % self.embedding_size:
            raise ValueError(
                f"model spec {self.name!r}: input_size {self.input_size} is not a positive multiple "
                f"of the embedding size {self.embedding_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pixel_mean"] = list(self.pixel_mean)
        d["pixel_std"] = list(self.pixel_std)
        d["box_sizes"] = list(self.box_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model spec has unknown keys {sorted(unknown)}")
        d = dict(d)
        for key in ("pixel_mean", "pixel_std", "box_sizes"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)
