#!/usr/bin/env bash
# One command on a fresh machine with only Python: set up .venv, then run the main job on the built-in default
# (`lcm demo`: write the digits folder, distil an LCM-LoRA and a full-LCD student from the shipped mini teacher,
# sample a 4-step grid, print the few-step quality table). Extra arguments are passed to
# `lcm demo` as dotted config overrides, e.g. `bash run.sh train.max_train_steps=20`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/lcm demo "$@"
