"""The native kernels under AddressSanitizer and UndefinedBehaviorSanitizer: cpp_ext/samreg_ext.cpp
is built with ``-fsanitize=address,undefined`` into a temporary folder and tests/test_ext.py runs
against that build in a subprocess (libasan preloaded into Python; any report fails the run)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "cpp_ext" / "samreg_ext.cpp"

# Runs pytest on tests/test_ext.py with the sanitized module standing in for samreg_rt._ext.
# torch is hidden so the few comparisons against SAM's torch code skip (torch itself is not built
# with the sanitizers and its start-up under libasan costs minutes); everything else runs.
BOOTSTRAP = textwrap.dedent("""
    import importlib.util, sys
    so = sys.argv[1]
    spec = importlib.util.spec_from_file_location("samreg_rt._ext", so)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    sys.modules["samreg_rt._ext"] = ext
    import samreg_rt
    samreg_rt._ext = ext
    sys.modules["torch"] = None
    import pytest
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_ext.py"])
    from samreg_rt import _ext
    with open("/proc/self/maps") as maps:
        asan = any("libasan" in line for line in maps)
    print("SANITIZED_EXT", _ext.__file__, "ASAN_LOADED", asan)
    sys.exit(int(code))
""")


def _tool(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()


def test_kernels_pass_under_asan_and_ubsan(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (it also builds the extension itself)")
    so = tmp_path / f"_ext{sysconfig.get_config_var('EXT_SUFFIX')}"
    includes = _tool(sys.executable, "-m", "pybind11", "--includes").split()
    build = subprocess.run(["g++", "-O1", "-g", "-std=c++17", "-shared", "-fPIC", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", *includes, str(SOURCE),
                            "-o", str(so)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    assert "__asan_init" in _tool("nm", "-D", str(so)), "the build is not instrumented"
    # libstdc++ is preloaded too: Python does not link it, and ASan's __cxa_throw interceptor must
    # find it at start-up, or the first C++ exception (a rejected argument) aborts
    preload = [_tool("g++", f"-print-file-name={lib}") for lib in ("libasan.so", "libstdc++.so")]
    env = dict(os.environ, LD_PRELOAD=" ".join(preload),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(so)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    report = run.stdout[-6000:] + run.stderr[-6000:]
    assert run.returncode == 0, report
    assert f"SANITIZED_EXT {so} ASAN_LOADED True" in run.stdout, report
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, report
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 100, report  # the kernel tests ran, not just a handful
