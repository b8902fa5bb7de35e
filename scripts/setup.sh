#!/usr/bin/env bash
# Create .venv and install lcm-distill with its dev extras. torch is installed first, pinned to a CPU-capable build
# that exists on our machines: a bare `torch` requirement with no torch present would pull a multi-GB CUDA build.
# Override the pin with LCM_TORCH_SPEC (e.g. LCM_TORCH_SPEC="torch==2.13.0" or a CUDA wheel spec on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${LCM_TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, diffusers, peft, lcm; print('lcm', lcm.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__, '| peft', peft.__version__)"
