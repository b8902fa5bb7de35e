#!/usr/bin/env bash
# One command on a fresh machine with only Python: set up .venv, then run the main job on the built-in default
# (`lcm demo`: build the teacher and data, distil an LCM-LoRA, sample a 4-step grid). Extra arguments are passed to
# `lcm demo` as dotted config overrides, e.g. `bash run.sh train.max_train_steps=20`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/lcm demo "$@"
