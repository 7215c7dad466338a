"""One image pair through the SAMReg reference code's structure, on transformers, timed per stage.

Runs in the reference venv (``.venv-ref``: torch 2.14.1 + torchvision 0.29.1 + transformers
4.57.6; the mask-generation pipeline needs torchvision); ``benchmarks/pipeline.py`` starts it as
a subprocess. The structure is that of ``RoiMatching.get_paired_roi`` at SAMReg 34a75cb
(shared/design/reference-algorithm.md, sections 1-3 and 6 "Efficiency"):

1. both images: PIL ``.convert("RGB").resize((200, 200))``;
2. ``_sam_everything``: ``pipeline("mask-generation", model=DIR)`` (model load 1) called on the
   list [fixed, moving] with ``points_per_batch=64`` (encoder passes 1 and 2, then the decoder);
   the reference passes only the two thresholds and leaves the grid (``points_per_crop``, 32) and
   ``mask_threshold`` (0) at the pipeline's defaults, which are options here;
3. ``_mask_criteria`` on each image's masks (area 200..7000 px, containment dedup at 0.9);
4. ``_roi_proto`` per image: ``SamModel.from_pretrained(DIR)`` + ``SamProcessor.from_pretrained``
   (model loads 2 and 3), ``processor(image)``, ``get_image_embeddings`` (encoder passes 3 and 4),
   NaN-trick masked mean per ROI;
5. ``_similarity_matrix`` (a Python double loop of ``cosine_similarity(...).item()``) and
   ``_roi_match`` (greedy at 0.8);
6. the paired masks and all intermediate outputs written to one ``.npz``.

The filtering, pooling and matching functions are the parity test's (tests/reference/hf_reference.py).
Every ``get_image_embeddings`` call is counted and timed, so the pipeline's own encoder time is
split from its mask generation. With ``--embeddings`` (float32 (2, 256, 64, 64): fixed, moving)
every call still runs the model's encoder, then returns the given embedding of its image (found
by the digest of the processor's pixel values), so that an untrained encoder costs what it costs
while the decoder sees real embeddings.

usage: python benchmarks/reference_style.py MODEL_DIR FIXED MOVING OUT.npz
           [--points-per-side 32] [--pred-iou-thresh 0.88] [--stability-thresh 0.95]
           [--mask-threshold 0] [--threads 2] [--embeddings EMB.npz]
Prints one JSON object: per-stage wall and process-CPU seconds, encoder passes, model loads,
versions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision
import transformers
from PIL import Image
from torch.nn.functional import cosine_similarity
from transformers import SamModel, SamProcessor, pipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.reference.hf_reference import mask_criteria, roi_match, roi_proto  # noqa: E402


class StageClock:
    """Wall (perf_counter) and process-CPU (process_time) seconds per stage; encoder calls timed
    apart (``encoder_s[stage]``) so a stage that runs the encoder can be split."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.encoder_s: dict[str, float] = {}
        self.encoder_calls: dict[str, int] = {}
        self.current = ""

    @contextmanager
    def stage(self, name: str):
        self.current = name
        w, c = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def wrap_encoder(self, substitutes: dict[str, torch.Tensor]) -> None:
        """Time every ``SamModel.get_image_embeddings`` call, under the current stage's name; its
        output is replaced by ``substitutes[digest(pixel_values)]`` when ``substitutes`` is given."""
        original = SamModel.get_image_embeddings

        def timed(model, pixel_values, **kwargs):
            t = time.perf_counter()
            out = original(model, pixel_values, **kwargs)
            if substitutes:
                out = substitutes[digest(pixel_values)]
            self.encoder_s[self.current] = self.encoder_s.get(self.current, 0.0) + time.perf_counter() - t
            self.encoder_calls[self.current] = self.encoder_calls.get(self.current, 0) + 1
            return out

        SamModel.get_image_embeddings = timed


def digest(pixel_values: torch.Tensor) -> str:
    """sha256 of a processed image batch (1, 3, 1024, 1024) float32."""
    return hashlib.sha256(pixel_values.detach().contiguous().numpy().tobytes()).hexdigest()


def squash(path: str) -> Image.Image:
    """The reference's input: PIL RGB resized to 200x200 with Pillow's default filter."""
    return Image.open(path).convert("RGB").resize((200, 200))


def similarity_matrix(protos1: list[torch.Tensor], protos2: list[torch.Tensor]) -> torch.Tensor:
    """RoiMatching._similarity_matrix: (N1, N2) cosine, one ``.item()`` per entry."""
    sim = torch.zeros(len(protos1), len(protos2))
    for i, a in enumerate(protos1):
        for j, b in enumerate(protos2):
            sim[i, j] = cosine_similarity(a.view(1, -1), b.view(1, -1)).item()
    return sim


def run_pair(model_dir: str, fixed: str, moving: str, out: str, points_per_side: int,
             pred_iou_thresh: float, stability_thresh: float,
             mask_threshold: float, embeddings: np.ndarray | None) -> tuple[StageClock, dict[str, np.ndarray]]:
    """The reference structure on one pair; returns the clock and the arrays written to ``out``
    (masks_0/1 bool (N, 200, 200) as the pipeline returned them, scores_0/1, kept_0/1 indices of
    the ROIs, protos_0/1 (K, 256), pairs (P, 2) into the ROIs, similarity (P,), paired_fixed /
    paired_moving (P, 200, 200))."""
    clock = StageClock()
    result: dict[str, np.ndarray] = {}
    with clock.stage("load_images"):
        images = [squash(fixed), squash(moving)]
    substitutes = {}
    if embeddings is not None:  # untimed set-up of the substitution
        processor = SamProcessor.from_pretrained(model_dir)
        substitutes = {digest(processor(image, return_tensors="pt")["pixel_values"]): torch.from_numpy(e[None])
                       for image, e in zip(images, embeddings)}
    clock.wrap_encoder(substitutes)
    with clock.stage("load_model_pipeline"):
        generator = pipeline("mask-generation", model=model_dir, device="cpu")
    with clock.stage("pipeline"):
        outputs = generator(images, points_per_batch=64, points_per_crop=points_per_side,
                            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_thresh,
                            mask_threshold=mask_threshold)
    masks = [[np.asarray(m, bool) for m in o["masks"]] for o in outputs]
    with clock.stage("filter"):
        kept = [mask_criteria(m) for m in masks]
    protos = []
    for n, image in enumerate(images):
        with clock.stage(f"load_model_roi_{n}"):
            model = SamModel.from_pretrained(model_dir)
            processor = SamProcessor.from_pretrained(model_dir)
        with clock.stage(f"encode_roi_{n}"):
            embedding = model.get_image_embeddings(processor(image, return_tensors="pt")["pixel_values"])
        with clock.stage("prototypes"):
            protos.append([roi_proto(embedding[0], masks[n][i]) for i in kept[n]])
    with clock.stage("match"):
        sim = similarity_matrix(*protos) if protos[0] and protos[1] else torch.zeros(len(protos[0]), len(protos[1]))
        pairs = roi_match(sim)
    with clock.stage("write"):
        for n in (0, 1):
            result[f"masks_{n}"] = np.stack(masks[n]) if masks[n] else np.zeros((0, 200, 200), bool)
            result[f"scores_{n}"] = outputs[n]["scores"].numpy().astype(np.float32)
            result[f"kept_{n}"] = np.array(kept[n], np.int64)
            result[f"protos_{n}"] = (torch.stack(protos[n]).numpy() if protos[n]
                                     else np.zeros((0, 256), np.float32))
        result["pairs"] = np.array([(i, j) for i, j, _ in pairs], np.int64).reshape(-1, 2)
        result["similarity"] = np.array([s for _, _, s in pairs], np.float32)
        result["paired_fixed"] = result["masks_0"][result["kept_0"]][result["pairs"][:, 0]]
        result["paired_moving"] = result["masks_1"][result["kept_1"]][result["pairs"][:, 1]]
        np.savez_compressed(out, **result)
    return clock, result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("fixed")
    ap.add_argument("moving")
    ap.add_argument("out")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-thresh", type=float, default=0.95)
    ap.add_argument("--mask-threshold", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embeddings", help="npz with embeddings float32 (2, 256, 64, 64) for fixed, moving")
    args = ap.parse_args(argv)
    if args.points_per_side ** 2 % 64:
        # transformers' MaskGenerationPipeline.preprocess marks a batch as the image's last only when
        # the point count is a multiple of points_per_batch; otherwise the image yields no output
        ap.error(f"--points-per-side {args.points_per_side}: the point count must be a multiple of 64 "
                 "(points_per_batch), e.g. 8, 16, 24 or 32")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock, result = run_pair(args.model_dir, args.fixed, args.moving, args.out, args.points_per_side,
                             args.pred_iou_thresh, args.stability_thresh, args.mask_threshold,
                             np.load(args.embeddings)["embeddings"] if args.embeddings else None)
    print(json.dumps({
        "wall_s": clock.wall, "cpu_s": clock.cpu, "encoder_s": clock.encoder_s,
        "encoder_calls": clock.encoder_calls,
        "model_loads": 1 + sum(1 for k in clock.wall if k.startswith("load_model_roi_")),
        "masks": [len(result["masks_0"]), len(result["masks_1"])],
        "rois": [len(result["kept_0"]), len(result["kept_1"])], "pairs": len(result["pairs"]),
        "threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "transformers": transformers.__version__},
    }))


if __name__ == "__main__":
    main()
