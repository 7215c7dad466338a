"""``samreg-rt eval``: reports with exactly the required keys, identity rows equal to the scores of
the unregistered labels, landmarks, manifest and label reading, and the classical baselines'
field conversion (a known shift recovered to < 1 px)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from samreg_rt import baselines, cli, ddf, evaluate, metrics, volume
from samreg_rt.errors import InputError

from .test_volume import litemedsam_model_dir

SMALL_PAIRS = ["acdc2d_example", "inter_example_1_2"]          # in manifest order


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """identity + both samreg-rt presets on two small labelled pairs, a 2x2 box grid."""
    from samreg_rt.engine import Engine

    engine = Engine.load(litemedsam_model_dir(), threads=2)
    out = tmp_path_factory.mktemp("eval")
    settings = evaluate.EvalSettings(amg={"points_per_side": 2, "pred_iou_thresh": 0.8})
    records = evaluate.run_eval(data_dir, out, engine, methods=("identity", "reference", "default"),
                                pair_ids=SMALL_PAIRS, settings=settings, command="samreg-rt eval (test)",
                                progress=False)
    return out, records


def test_eval_writes_reports_with_exactly_the_required_keys(small_eval) -> None:
    out, records = small_eval
    stored = json.loads((out / "results.json").read_text())
    assert stored == json.loads(json.dumps(records))
    assert [(r["pair"], r["method"]) for r in stored] == [
        (p, m) for p in SMALL_PAIRS for m in ("identity", "reference", "default")]
    for r in stored:
        assert tuple(r) == evaluate.RESULT_KEYS
        assert r["application"] in ("prostate_mr", "cardiac_mr")
        assert 0.0 <= r["dice"] <= 1.0 and list(r["dice_per_class"]) == ["255"]
        assert r["tre_mean"] is None and r["fire_auc"] is None           # no landmarks here
        assert r["time_s"] is not None and 0.0 <= r["folding"] <= 1.0
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == evaluate.RESULT_KEYS and len(rows) == len(stored)
    md = (out / "results.md").read_text()
    assert "samreg-rt eval (test)" in md and "litemedsam" in md and "2x2 prompt grid" in md
    assert "## prostate_mr" in md and "## cardiac_mr" in md and "ROI pairs scored directly" in md
    assert (out / "per_pair.png").stat().st_size > 0
    assert all((out / "overlays" / f"{p}.png").is_file() for p in SMALL_PAIRS)


def test_identity_row_equals_scores_of_unregistered_labels(small_eval, data_dir: Path) -> None:
    _, records = small_eval
    pairs = {p.id: p for p in evaluate.load_pairs(data_dir)}
    for r in (r for r in records if r["method"] == "identity"):
        pair = pairs[r["pair"]]
        fixed = evaluate.read_labels(pair.fixed_label, pair)
        moving = volume.resize_labels(evaluate.read_labels(pair.moving_label, pair), fixed.shape)
        assert r["dice_per_class"] == {"255": metrics.dice(fixed, moving, classes=[255])[255]}
        assert r["hd95"] == pytest.approx(metrics.hd95(fixed == 255, moving == 255))
        assert r["folding"] == 0.0 and r["time_s"] == 0.0


def test_eval_resumes_from_stored_records(small_eval, data_dir: Path) -> None:
    out, records = small_eval
    again = evaluate.run_eval(data_dir, out, None, methods=("identity",), pair_ids=SMALL_PAIRS[:1],
                              progress=False)
    assert again == [records[0]]


def test_landmark_scores_before_registration(tmp_path: Path, data_dir: Path) -> None:
    records = evaluate.run_eval(data_dir, tmp_path, None, methods=("identity",), pair_ids=["fire_A01"],
                                progress=False)
    (r,) = records
    fxy, mxy = evaluate.read_landmarks(data_dir / "retina/fire_A01/landmarks.csv")
    err = metrics.tre_identity(fxy, mxy).px
    assert r["tre_mean"] == pytest.approx(err.mean()) and r["tre_max"] == pytest.approx(err.max())
    assert r["fire_auc"] == pytest.approx(metrics.fire_auc([err.mean()]))
    assert r["dice"] is None and r["hd95"] is None
    assert "FIRE AUC" in (tmp_path / "results.md").read_text()


def test_labels_are_read_per_format(data_dir: Path) -> None:
    pairs = {p.id: p for p in evaluate.load_pairs(data_dir)}
    render = pairs["prostate_slice_s40"]                       # matplotlib render with grey edges
    lab = evaluate.read_labels(render.fixed_label, render)
    assert set(np.unique(lab)) == {0, 255}
    raw = evaluate.load_image(render.fixed_label).array[..., 0]
    assert np.array_equal(lab == 255, raw >= 128)
    acdc = pairs["acdc_patient067_ed_es_3d"]
    assert set(np.unique(evaluate.read_labels(acdc.fixed_label, acdc))) == {0, 1, 2, 3}


def test_bad_manifest_and_selection(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(InputError, match="no such manifest"):
        evaluate.load_pairs(tmp_path)
    (tmp_path / "manifest.json").write_text('{"pairs": [{"id": "x"}]}')
    with pytest.raises(InputError, match="pair 0"):
        evaluate.load_pairs(tmp_path)
    with pytest.raises(InputError, match="unknown pair ids"):
        evaluate.run_eval(data_dir, tmp_path / "out", None, methods=("identity",), pair_ids=["nope"])
    with pytest.raises(InputError, match="needs a model"):
        evaluate.evaluate_pair(evaluate.load_pairs(data_dir)[1], "default", None, evaluate.EvalSettings(amg={}))


def test_eval_subcommand_parser() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "data", "--out", "o", "--pairs", "a", "b", "--methods", "identity,ants",
                              "--points-per-side", "8"])
    assert args.func is cli._cmd_eval and args.pairs == ["a", "b"] and args.points_per_side == 8
    assert parser.parse_args(["eval", "data", "--out", "o"]).methods is None  # all of them
    bad = parser.parse_args(["eval", "data", "--out", "o", "--methods", "identity,magic"])
    with pytest.raises(InputError, match="magic"):
        bad.func(bad)
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    methods_help = next(a.help for a in eval_parser._actions if a.dest == "methods")
    assert methods_help.startswith("comma-separated subset of " + ",".join(evaluate.METHODS) + " ")


def _smooth_pair(shape: tuple[int, ...], shift: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.random(shape), 4)
    moving = ndimage.shift(fixed, shift, order=3, mode="nearest")   # moving(p) = fixed(p - shift)
    return fixed, moving


@pytest.mark.parametrize("method", ["elastix", "ants"])
def test_baseline_recovers_known_shift(method: str) -> None:
    """warped(p) = moving(p + u(p)) = fixed(p) needs u = shift, in pixels, (dy, dx), whatever the
    physical spacing handed to the tool."""
    why = baselines.available([method])[method]
    if why:
        pytest.skip(f"{method} not installed: {why}")
    shift = (3.0, -2.0)
    fixed, moving = _smooth_pair((96, 80), shift)
    res = baselines.run_baseline(method, fixed, moving, spacing=(0.5, 2.0))
    assert res.field.shape == (96, 80, 2)
    inner = res.field[16:-16, 16:-16]
    assert np.abs(inner - np.array(shift)).max() < 1.0
    assert np.abs(inner.mean(axis=(0, 1)) - np.array(shift)).max() < 0.25
    warped = ddf.warp(moving, res.field)
    assert np.abs(warped - fixed)[16:-16, 16:-16].mean() < 0.25 * np.abs(moving - fixed)[16:-16, 16:-16].mean()


def test_ants_recovers_known_shift_in_3d() -> None:
    why = baselines.available(["ants"])["ants"]
    if why:
        pytest.skip(f"ants not installed: {why}")
    shift = (2.0, -1.5, 0.0)
    fixed, moving = _smooth_pair((40, 36, 12), shift)
    res = baselines.ants_syn(fixed, moving, spacing=(1.5, 1.5, 5.0))
    assert res.field.shape == (40, 36, 12, 3)
    inner = res.field[8:-8, 8:-8, 3:-3]
    assert np.abs(inner - np.array(shift)).max() < 1.0


def test_baselines_reject_mismatched_inputs() -> None:
    with pytest.raises(InputError, match="shapes"):
        baselines.run_baseline("ants", np.zeros((10, 10)), np.zeros((10, 12)))
    with pytest.raises(InputError, match="baseline 'magic'"):
        baselines.run_baseline("magic", np.zeros((10, 10)), np.zeros((10, 10)))
