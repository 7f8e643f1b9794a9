#!/usr/bin/env bash
# The README's main job on a fresh machine: set up .venv, then pre-train a small GPT on the Python standard library
# (prepared into data/stdlib on first use) on CPU, validate, checkpoint, and print a summary with a sample.
# Extra arguments go to `pretrain fit`, e.g. bash launch/demo.sh --trainer.max_steps 100
# CONFIG picks another objective's smoke run, e.g. CONFIG=configs/bert/smoke.yaml bash launch/demo.sh (masked LM),
# configs/vision/smoke.yaml (supervised images), configs/clip/smoke.yaml (CLIP)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
exec pretrain fit --config "${CONFIG:-configs/gpt/smoke.yaml}" "$@"
