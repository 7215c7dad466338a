"""Shared fixtures: the data folder, and a per-session model cache so tests never touch ~/.cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EXAMPLE = REPO / "examples" / "cardiac_2d"


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("samreg_cache")
    old = os.environ.get("SAMREG_RT_CACHE")
    os.environ["SAMREG_RT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SAMREG_RT_CACHE", None)
    else:
        os.environ["SAMREG_RT_CACHE"] = old


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "manifest.json").is_file():
        pytest.fail(f"shared data not found at {DATA} (tests read ../shared/data beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def litemedsam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LiteMedSAM (real weights) exported once per test session, fp32 graphs."""
    from samreg_export.export import export_model

    return export_model("litemedsam", tmp_path_factory.mktemp("litemedsam"), precisions=("fp32",),
                        name="litemedsam")
