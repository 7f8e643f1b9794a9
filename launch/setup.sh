#!/usr/bin/env bash
# Creates .venv (if missing) with torch and this package installed; idempotent. Sourced by demo.sh and test.sh.
#   TORCH_VERSION   torch to install when the venv has none (default 2.13.0; a GPU user installs CUDA torch first,
#                   see README "GPU install")
#   VENV            where the environment lives (default .venv at the repository root)
#   EXTRAS          package extras (default test,deepspeed)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
if [[ ! -x $venv/bin/python ]]; then
    echo "creating $venv"
    python3 -m venv "$venv"
fi
py=$venv/bin/python
# torch first, pinned: with no torch installed, a bare requirement would pull a multi-GB CUDA build
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "installing torch==${TORCH_VERSION:-2.13.0}"
    "$py" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp=$venv/.framework-installed
if [[ ! -f $stamp || $repo/pyproject.toml -nt $stamp || $repo/launch/constraints.txt -nt $stamp ]]; then
    echo "installing the framework (editable) with extras [${EXTRAS:-test,deepspeed}], versions from launch/constraints.txt"
    "$py" -m pip install -q -c "$repo/launch/constraints.txt" -e "$repo[${EXTRAS:-test,deepspeed}]"
    touch "$stamp"
fi
# transformers, the reference the Hugging Face interop tests compare against, goes into a directory of its own that only
# the tests put on sys.path (tests/conftest.py): installed in the venv, it would be imported by every process that
# imports Lightning (torchmetrics imports it, and SciPy, whenever they are installed), about 1 s of start-up each
reference=$venv/reference
if [[ ${EXTRAS:-test,deepspeed} == *test* ]] \
        && [[ ! -f $reference/.installed || $repo/launch/constraints.txt -nt $reference/.installed ]]; then
    echo "installing transformers (the interop tests' reference) into $reference"
    rm -rf "$reference"
    "$py" -m pip install -q -c "$repo/launch/constraints.txt" --target "$reference" transformers
    touch "$reference/.installed"
fi
export PATH=$venv/bin:$PATH
