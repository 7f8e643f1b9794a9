#!/usr/bin/env bash
# The demo's second half: what pre-training bought, on a labelled task whose texts the model never read (the functions
# of six standard-library packages that the default corpus leaves out, classified by package).
# Pre-trains the GPT smoke model first if its checkpoint is missing, prepares the task, then runs the transfer report:
# pre-trained vs scratch at 1%, 10% and 100% of the labels, 3 seeds, written to reports/stdlib-packages/.
#   CKPT=runs/bert-smoke/checkpoints/last.ckpt bash launch/transfer.sh     # another pre-trained model
# Extra arguments go to `pretrain transfer-report`, e.g. --modes full,linear,lora
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup.sh
ckpt=${CKPT:-runs/gpt-smoke/checkpoints/last.ckpt}
if [[ ! -e $ckpt ]]; then
    pretrain fit --config configs/gpt/smoke.yaml
fi
if [[ ! -f data/stdlib-packages/manifest.json ]]; then
    pretrain prepare --task stdlib-packages --output data/stdlib-packages --tokenizer "$ckpt"
fi
exec pretrain transfer-report --pretrained "$ckpt" --data data/stdlib-packages --output reports/stdlib-packages "$@"
