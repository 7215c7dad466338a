"""The bad-input corpus (tests/bad_inputs/make_corpus.py): every case ends in a typed samreg-rt
error with a message that names the file and the problem (or in its documented graceful result),
a non-zero exit code for errors, no traceback from inside ONNX Runtime or OpenCV, and no output
file left behind. The last test prints how many cases ran and how each ended."""
from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from samreg_rt.cli import main
from samreg_rt.errors import SamregError
from tests.bad_inputs.make_corpus import make_corpus, random_tiny_dir

with tempfile.TemporaryDirectory() as _names_dir:  # the case names, for parametrisation
    CASE_NAMES = [case.name for case in make_corpus(_names_dir)]
OUTCOMES: dict[str, str] = {}
FOREIGN_TRACES = ("Traceback (most recent call last)", "onnxruntime_pybind11_state", "cv2.error")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    random_tiny_dir()
    root = tmp_path_factory.mktemp("bad_inputs")
    return root, {case.name: case for case in make_corpus(root)}


def _run(case, capfd, caplog) -> tuple[object, str, str]:
    """Run one case -> (exit code, or the returned value / raised error of a call; stdout;
    everything the user is shown: stdout, stderr and log records)."""
    if case.prepare:
        case.prepare()
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            result = main(list(case.argv)) if case.argv else case.call()
        except SystemExit as exc:  # argparse refusing an argument
            result = exc.code
        except SamregError as exc:  # a library call (no command reads this input)
            result = exc
    out, err = capfd.readouterr()
    raised = str(result) if isinstance(result, SamregError) else ""
    return result, out, "\n".join([out, err, caplog.text, raised])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(corpus, name, capfd, caplog):
    root, cases = corpus
    case = cases[name]
    result, out, shown = _run(case, capfd, caplog)
    for trace in FOREIGN_TRACES:
        assert trace not in shown, f"{name}: a traceback reached the user:\n{shown}"
    assert not list(root.rglob(".*.tmp")), f"{name}: temporary files left behind"
    if case.expect == "ok":
        assert result in (0, None) or not isinstance(result, (int, SamregError)), f"{name}: {shown}"
        case.check(json.loads(out) if case.argv else result)
        OUTCOMES[name] = "graceful result"
        return
    if case.argv:
        assert isinstance(result, int) and result != 0, f"{name}: exit code {result!r}\n{shown}"
        typed = "samreg-rt: error:" in shown or "error: argument" in shown or result == 1
        assert typed, f"{name}: exit {result} without a samreg-rt error message:\n{shown}"
        OUTCOMES[name] = f"exit {result}"
    else:
        assert isinstance(result, SamregError), f"{name}: returned {result!r} instead of raising"
        OUTCOMES[name] = type(result).__name__
    for needle in case.needles:
        assert needle in shown, f"{name}: message lacks {needle!r}:\n{shown}"
    if case.out is not None:
        left = [p for p in case.out.rglob("*") if p.is_file()] if case.out.exists() else []
        assert not left, f"{name}: output files left behind: {left}"


@pytest.mark.parametrize("name", ["image/truncated_png", "model/sha256_mismatch", "cli/points_per_side_zero"])
def test_bad_input_through_the_installed_command(corpus, name):
    """The real entry point in its own process: exit code 2 and a one-line message, no traceback."""
    root, cases = corpus
    case = cases[name]
    if case.prepare:
        case.prepare()
    proc = subprocess.run([sys.executable, "-m", "samreg_rt.cli", *case.argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln and not ln.startswith(("[", "libpng"))]
    assert len(lines) == 1 and all(n in lines[0] for n in case.needles), proc.stderr
    assert not any(trace in proc.stderr for trace in FOREIGN_TRACES), proc.stderr


def test_summary(capsys):
    """How many cases ran and how each ended (printed even without -s)."""
    by_group = collections.defaultdict(collections.Counter)
    for name, outcome in OUTCOMES.items():
        by_group[name.split("/")[0]][outcome] += 1
    lines = [f"bad-input corpus: {len(OUTCOMES)} of {len(CASE_NAMES)} cases ran"]
    lines += [f"  {group:15s} " + ", ".join(f"{n} x {o}" for o, n in sorted(c.items())) for group, c in sorted(by_group.items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert len(CASE_NAMES) >= 40
    assert set(OUTCOMES) <= set(CASE_NAMES)
