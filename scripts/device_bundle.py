"""Carry what the GPU check needs to a lent GPU machine in parts that fit the device tool's calls.

The device tool runs a command on a GPU machine over a copy of this repository plus at most 64 MiB a call, and
nothing there can be downloaded. Its image has CUDA 13, PyTorch and Python 3.12, but ONNX Runtime only as the CPU
build and no FAISS; the check needs onnxruntime-gpu (a 244 MiB wheel), faiss-cpu, samreg-rt itself as a wheel for
CPython 3.12 (its extension compiled here) and an exported model. ``pack`` (here) puts them into one tar and
splits it into parts; ``receive`` (there, one call per part) keeps each part in .device/store, which the device
tool leaves there between calls while the machine stays warm (ignored files); ``unpack`` (there, the last call)
checks and joins the parts, unpacks them and installs the wheels into /tmp/site. The sequence of calls:
docs/gpu.md.

    python scripts/device_bundle.py pack [--model DIR] [--precisions fp32 fp16] [--part-mib 40]
                                         [--python312 python3.12] [--out .device]
    python3 scripts/device_bundle.py receive .device/parts/part-NN.bin     (on the GPU machine)
    python3 scripts/device_bundle.py unpack                                (on the GPU machine)

Only the standard library is used (the GPU machine's python3 runs ``receive`` and ``unpack``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / ".device" / "store"     # the GPU machine's received parts (ignored files there outlive a call)
BUNDLE = Path("/tmp/samreg_bundle")     # and what they unpack to
SITE = Path("/tmp/site")                # where their wheels install (PYTHONPATH)
WHEELS = ("onnxruntime-gpu==1.31.1", "faiss-cpu==1.15.1")  # setup.py's gpu extra and its faiss-cpu pin
# the GPU machine's Python (the device tool's docs: Python 3.12, glibc manylinux 2.28)
WHEEL_TARGET = ("--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")


class BundleError(Exception):
    """A part or the bundle is missing, truncated or not the one ``pack`` wrote."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(bundle: Path, parts: Path, part_bytes: int) -> dict:
    """``bundle`` into ``parts``/part-NN.bin of at most ``part_bytes`` each, plus ``parts``/index.json (the bundle's
    and each part's size and sha256); returns the index."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    parts.mkdir(parents=True, exist_ok=True)
    for old in parts.glob("part-*.bin"):
        old.unlink()
    index = {"bundle": {"bytes": bundle.stat().st_size, "sha256": sha256(bundle)}, "parts": []}
    with open(bundle, "rb") as src:
        for n, block in enumerate(iter(lambda: src.read(part_bytes), b""), start=1):
            name = f"part-{n:02d}.bin"
            (parts / name).write_bytes(block)
            index["parts"].append({"file": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    (parts / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def _entry(index: dict, name: str) -> dict:
    for entry in index["parts"]:
        if entry["file"] == name:
            return entry
    raise BundleError(f"{name}: not a part of this bundle (index.json lists {len(index['parts'])} parts)")


def _check(path: Path, entry: dict) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: missing")
    if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
        raise BundleError(f"{path}: not the part pack wrote (size {path.stat().st_size}, expected {entry['bytes']}; "
                          "or another sha256)")


def receive(part: Path, index: dict, store: Path = STORE) -> list[str]:
    """Check ``part`` against the index and copy it into ``store``; returns the parts still missing there."""
    _check(part, _entry(index, part.name))
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part, store / part.name)
    return [e["file"] for e in index["parts"] if not (store / e["file"]).is_file()]


def join(store: Path, index: dict, bundle: Path) -> Path:
    """The parts in ``store``, each checked, joined into ``bundle`` (checked whole)."""
    missing = [e["file"] for e in index["parts"] if not (store / e["file"]).is_file()]
    if missing:
        raise BundleError(f"{store}: parts not received yet: {', '.join(missing)}")
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle, "wb") as out:
        for entry in index["parts"]:
            _check(store / entry["file"], entry)
            out.write((store / entry["file"]).read_bytes())
    if bundle.stat().st_size != index["bundle"]["bytes"] or sha256(bundle) != index["bundle"]["sha256"]:
        raise BundleError(f"{bundle}: the joined parts are not the bundle pack wrote")
    return bundle


def source_digest() -> str:
    """sha256 of what samreg-rt's wheel is built from (setup.py and the packages' and extension's files)."""
    digest = hashlib.sha256()
    files = [REPO / "setup.py", *(f for d in ("samreg_rt", "models", "export", "cpp_ext")
                                  for f in sorted((REPO / d).rglob("*")) if f.is_file() and f.suffix in (".py", ".cpp"))]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def build_wheel(python312: str, work: Path) -> Path:
    """samreg-rt as a wheel for CPython 3.12, its extension compiled by setup.py (in a venv of ``python312`` with
    setup.py's build requirements) -> the wheel; kept by its sources' digest (built again when they change)."""
    dist = work / "dist312" / source_digest()[:16]
    built = sorted(dist.glob("samreg_rt-*-cp312-*.whl"))
    if built:
        return built[-1]
    venv = work / "py312"
    if not (venv / "bin" / "python").is_file():
        subprocess.run([python312, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "setuptools==84.2.1", "pybind11==3.1.0"], check=True)
    subprocess.run([py, "setup.py", "-q", "build_ext", "--build-temp", str(work / "tmp312"), "bdist_wheel",
                    "--dist-dir", str(dist)], check=True, cwd=REPO)
    return sorted(dist.glob("samreg_rt-*-cp312-*.whl"))[-1]


def pack(model: Path, precisions: list[str], part_mib: float, python312: str, out: Path) -> dict:
    """The bundle (wheels/: samreg-rt's and ``WHEELS``; model/: the manifest, the graphs of ``precisions`` and the
    fused CPU kernels' weights) as ``out``/bundle.tar, split into ``out``/parts."""
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    own = build_wheel(python312, out)
    shutil.copyfile(own, wheels / own.name)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    *WHEEL_TARGET, "-d", str(wheels), *WHEELS], check=True)
    manifest = json.loads((model / "manifest.json").read_text())
    missing = [p for p in precisions if p not in manifest.get("graphs", {})]
    if missing:
        raise SystemExit(f"{model}: no {missing} graphs (has {sorted(manifest.get('graphs', {}))})")
    # the graphs of the precisions, and the fused CPU kernels' weights (the CPU provider's reference run)
    files = sorted({entry["file"] for p in precisions for entry in manifest["graphs"][p].values()}
                   | {entry["file"] for entry in manifest.get("weights", {}).values()})
    bundle = out / "bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        for wheel in sorted(wheels.glob("*.whl")):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        tar.add(model / "manifest.json", arcname="model/manifest.json")
        for name in files:
            tar.add(model / name, arcname=f"model/{name}")
    return split(bundle, out / "parts", int(part_mib * 2**20))


def unpack(store: Path, index: dict) -> None:
    """Join and unpack the bundle into BUNDLE and install its wheels into SITE: without dependencies (the GPU
    machine has numpy, scipy, opencv, onnx, protobuf, flatbuffers and packaging) and with samreg-rt's
    ``python_requires`` (3.11) waived for the machine's 3.12."""
    bundle = join(store, index, BUNDLE.with_suffix(".tar"))
    shutil.rmtree(BUNDLE, ignore_errors=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(BUNDLE, filter="data")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--ignore-requires-python", "--upgrade", "--target", str(SITE),
                    *map(str, sorted((BUNDLE / "wheels").glob("*.whl")))], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: build the bundle and its parts")
    p.add_argument("--model", type=Path, default=Path.home() / ".cache" / "samreg-rt" / "litemedsam")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    p.add_argument("--part-mib", type=float, default=40.0,
                   help="part size (the repository and a part travel in one call of at most 64 MiB)")
    p.add_argument("--python312", default="python3.12", help="a CPython 3.12 with its headers, for the extension")
    p.add_argument("--out", type=Path, default=REPO / ".device")
    r = sub.add_parser("receive", help="on the GPU machine: keep a carried part in .device/store")
    r.add_argument("part", type=Path)
    sub.add_parser("unpack", help="on the GPU machine: check, join and install the received parts")
    args = ap.parse_args(argv)
    try:
        if args.command == "pack":
            index = pack(args.model, args.precisions, args.part_mib, args.python312, args.out)
            print(f"{len(index['parts'])} parts of {args.out / 'parts'} (bundle {index['bundle']['bytes']} bytes): "
                  "carry each with its index.json, one call each (docs/gpu.md)")
        elif args.command == "receive":
            index = json.loads((args.part.parent / "index.json").read_text())
            missing = receive(args.part, index)
            print(f"{args.part.name} received; missing: {', '.join(missing) or 'none'}")
        else:
            unpack(STORE, json.loads((REPO / ".device" / "parts" / "index.json").read_text()))
            print(f"unpacked into {BUNDLE}; wheels in {SITE}")
    except BundleError as exc:
        print(f"device_bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
