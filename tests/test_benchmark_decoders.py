"""benchmarks/common.py's WholeDecoder (the stand-in through which performance.py and amg_decoder.py run mask
generation on a whole decoder, PyTorch's among them) keeps up with the decoder interface that amg.generate
calls: on the engine's own one-graph decoder it gives the engine's masks."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from samreg_export.export import export_model
from samreg_rt import amg
from samreg_rt.engine import Engine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_whole_decoder_gives_the_engines_masks(common, tmp_path):
    """A padded frame (the low-resolution rows read are fewer than 256) and multimask outputs."""
    model = export_model("random:tiny", tmp_path / "tiny", precisions=("fp32",), name="random_tiny")
    engine = Engine.load(model, threads=2)
    rng = np.random.default_rng(3)
    emb = engine.embed(rng.integers(0, 255, (40, 90), np.uint8))
    params = amg.AmgParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, batch_size=5)
    want = amg.generate(engine, emb, params)
    whole = common.WholeDecoder(lambda e, c, l: engine.decode(e, c, l), threads=2)
    got = amg.generate(whole, emb, params)
    assert len(want) > 0 and got.counts == want.counts
    np.testing.assert_array_equal(got.prompt_ids, want.prompt_ids)
    assert common.same_masks(got, want, 0.99)["identical"]
